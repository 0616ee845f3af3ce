"""The Colab notebooks in notebooks/ run top to bottom at their tiniest sizes.

Each notebook is executed in a fresh kernel (nbclient, installed with nbmake) whose working
directory is a temporary folder shared by the three, with ``XCT_NOTEBOOK_TEST=1`` so the
notebooks shrink themselves; 03 evaluates the run 02 trained when both land on the same
pytest worker (02 runs under ``-m slow``) and the shipped ``checkpoints/unet32_2v``
otherwise. A check cell appended to the in-memory copy asserts on the kernel's variables
(the files on disk are not changed). The notebooks are stored without outputs.

Most of the time is XLA compiling the training step (02) and the model, the projector's
gradient and the metrics (03); the persistent compilation cache that conftest.py sets up
(``JAX_COMPILATION_CACHE_DIR``, inherited by the kernels) makes later runs much faster.
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 900  # a cold compile of 02's training step takes minutes on 2 busy cores

CHECKS = {
    "01_projector": """
assert drr.shape == (8, DET, DET) and bool(jnp.all(jnp.isfinite(drr)))
rot0, t0_mm = pose_errors(start)
rot1, t1_mm = pose_errors(params)
assert rot1 < 0.5 * rot0 and t1_mm < 0.5 * t0_mm, (rot0, rot1, t0_mm, t1_mm)
assert final_loss < 0.1 * losses[0], (losses[0], final_loss)
""",
    "02_train_small": """
assert [r["step"] for r in rows][-1] == STEPS and rows[-1]["train/loss"] < rows[0]["train/loss"]
assert len(members) >= 2 and all(np.isfinite(psnr)), psnr
assert pred_hu.shape == (2, RES, RES, RES) and np.isfinite(pred_hu).all()
""",
    "03_evaluate": """
assert summary["num_volumes"] == len(per_volume) >= 2 and np.isfinite(summary["psnr"])
assert (eval_dir / "report.html").is_file() and (eval_dir / "metrics.json").is_file()
assert gt_hu.shape == pred_hu.shape == (exp.acquisition.resolution,) * 3
assert rmse[-1] < rmse[0], rmse
assert all(np.isfinite(scores(v)[0]) for v in results.values())
""",
}


def _kernel_env() -> dict:
    env = dict(os.environ)
    env.update(XCT_NOTEBOOK_TEST="1", JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise")
    # One device, as in Colab: conftest's fake CPU devices would split every batch.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if not f.startswith("--xla_force_host_platform_device_count")
    )
    env.pop("MPLBACKEND", None)  # the kernel's inline backend renders every figure
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("notebooks")


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
        assert nb.cells[1].cell_type == "code" and "IN_COLAB" in nb.cells[1].source, path.name
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == set(CHECKS)


# 02 trains for minutes (about 125 s on 2 cores): run with -m slow
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "02_train_small" else n for n in CHECKS],
)
def test_notebook_runs(name, workdir):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    # "python3" runs this interpreter (jupyter_client puts sys.executable for the kernelspec's
    # "python"), so the kernel imports the xct installed here.
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=_kernel_env())
