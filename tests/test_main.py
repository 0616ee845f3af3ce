"""The command line: one-line errors for bad flags and configs, --help exits 0, a quiet
terminal (no XLA/absl banners) and the README's snippets run."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.py")


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "xct.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        ((f"--config={QUICK}", "--config.data.num_view=4"), 'Did you mean "num_views"'),
        ((f"--config={ROOT / 'configs' / 'nothere.py'}",), "No such file or directory"),
        ((f"--config={QUICK}:tiny",), "expected ':smoke' or nothing"),
        ((f"--config={QUICK}", "--config.data.batch_size=four"), "batch_size"),
        (("--bogus",), "Unknown command line flag 'bogus'"),
        (("--config=quickstrat",), "no config named 'quickstrat'; xct's own are"),
        (("--config=quickstart", "--config.data.num_view=4"), 'Did you mean "num_views"'),
    ],
)
def test_bad_flags_and_configs_are_one_line(args, expected, tmp_path):
    p = _run(*args, f"--workdir={tmp_path}")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(err) == 2 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in p.stderr


def test_config_names_resolve_to_the_shipped_files():
    from xct.main import config_path

    assert config_path("quickstart") == QUICK
    assert config_path("unet64:smoke") == str(ROOT / "configs" / "unet64.py") + ":smoke"
    assert config_path("mine.py:smoke") == "mine.py:smoke"  # a file: unchanged
    assert config_path("dir/quickstart") == "dir/quickstart"


def test_design_card_config_path_loads_from_the_repo_root(monkeypatch):
    """The design card's command: ``--config=configs/unet256.py`` (a path from the repo root)
    loads the top-level configs/ file, which imports its base through ``xct.configs``."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    monkeypatch.chdir(ROOT)
    fv = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(["prog", "--config=configs/unet256.py:smoke"])
    assert fv.config.geometry.resolution == 32 and fv.config.model.num_levels == 3
    fv(["prog", "--config=configs/unet256.py"])
    assert fv.config.geometry.resolution == 256


@pytest.mark.parametrize("name", ["quickstart", "unet64", "unet256", "baseline64", "views8_128"])
def test_smoke_runs_keep_their_own_dataset(name):
    """A ``:smoke`` run never occupies the stored dataset of the full config: after
    ``--config=quickstart:smoke``, ``--config=quickstart`` in the same data_dir must not meet
    the smoke run's 8-phantom set under its own dataset name."""
    import importlib

    module = importlib.import_module(f"xct.configs.{name}")
    full, smoke = module.get_config(), module.get_config("smoke")
    if smoke.data.source == "tfds":
        assert smoke.data.tfds.dataset != full.data.tfds.dataset
        assert smoke.data.tfds.dataset.endswith("smoke_res32_views8")


def test_configs_is_not_a_top_level_package_outside_the_repo(tmp_path):
    """configs/ is installed as ``xct.configs``: nothing generic lands in site-packages."""
    code = "import importlib.util as u; print(u.find_spec('configs') is None)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.stdout.strip() == "True", p.stderr
    code = "import xct.configs.quickstart as q; print(q.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.stdout.strip() == QUICK, p.stderr


def test_help_exits_zero():
    p = _run("--help")
    assert p.returncode == 0 and "--mode" in p.stdout + p.stderr


def test_readme_tour_runs():
    """The README's first Python snippet (the short tour), as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["drr"].shape == (2, 128, 128) and float(scope["drr"].max()) > 1.0
    assert scope["bp"].shape == (64, 64, 64) and scope["drr2"].shape == (2, 64, 64)
