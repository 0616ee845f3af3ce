"""What a run survives, from the command line and the dataset builder: a workdir that cannot
be written or does not exist and a missing data_dir (one line, exit 2), a second run on a
busy workdir (one line, at once), and a dataset build killed while writing a shard (nothing
of it is read; the rerun writes the bytes of an uninterrupted build). The checkpoint faults
(damaged steps, a full disk, the lock itself) are in tests/test_checkpoint.py, those of the
training loop (NaN/inf, a damaged checkpoint at resume) in tests/test_train.py."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from xct import checkpoint, data, input_pipeline
from xct.configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The stored dataset's fields: config.data.tfds (sectioned configs) or config.data (flat).
TFDS = "data.tfds" if "tfds" in default.get_config().data else "data"
QUICK = str(ROOT / "configs" / "quickstart.py") + ":smoke"
TINY = "synthetic_chest/tiny_res32_views8"
SIZES = {"train": 2, "validation": 1, "test": 1}


def _main(*args):
    return subprocess.run(
        [sys.executable, "-m", "xct.main", f"--config={QUICK}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line(p, status: int, expected: str) -> None:
    err = p.stderr.strip().splitlines()
    assert p.returncode == status, p.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in p.stderr


def _read_only_dir(tmp_path) -> pathlib.Path:
    """A folder this process cannot write in (root writes anywhere chmod allows: /sys)."""
    if os.geteuid() != 0:
        d = tmp_path / "read_only"
        d.mkdir()
        d.chmod(0o500)
        return d
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return pathlib.Path("/sys")
    pytest.skip("no read-only folder for root here")


def test_workdir_that_cannot_be_written_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _one_line(_main(f"--workdir={blocker / 'run'}"), 2, f"--workdir: cannot write in {blocker}")
    ro = _read_only_dir(tmp_path)
    _one_line(_main(f"--workdir={ro}"), 2, f"--workdir: cannot write in {ro}")


def test_missing_workdir_for_evaluate_and_missing_data_dir_are_one_line_exit_2(tmp_path):
    _one_line(
        _main(f"--workdir={tmp_path / 'none'}", "--mode=evaluate"),
        2,
        f"--workdir: {tmp_path / 'none'} does not exist",
    )
    missing = tmp_path / "no_data"
    p = _main(
        f"--workdir={tmp_path / 'run'}",
        f"--config.{TFDS}.dataset=ct_folder/res32_views8",
        f"--config.{TFDS}.data_dir={missing}",
    )
    _one_line(p, 2, f"--config.{TFDS}.data_dir: {missing} does not exist")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    p = _main(f"--workdir={tmp_path / 'run'}", f"--config.{TFDS}.data_dir={blocker / 'data'}")
    _one_line(p, 2, f"--config.{TFDS}.data_dir: cannot create {blocker / 'data'}")


def test_second_run_on_a_busy_workdir_exits_at_once_with_one_line(tmp_path):
    with checkpoint.WorkdirLock(tmp_path):
        t0 = time.perf_counter()
        p = _main(f"--workdir={tmp_path}", f"--config.{TFDS}.data_dir={tmp_path / 'data'}")
        seconds = time.perf_counter() - t0
    _one_line(p, 1, f"--workdir: {tmp_path} is in use by another run (pid {os.getpid()} on host")
    assert seconds < 60, seconds  # imports and the config only: no dataset, no compiling
    assert not list((tmp_path / "data").glob("synthetic_chest"))


_KILLED_WHILE_WRITING = """
import os, signal, sys
from tensorflow_datasets.core import file_adapters
from data_pipelines import build

def half_then_kill(cls, path, iterator):
    with open(path, "wb") as f:  # a shard cut short by the kill
        for _, example in iterator:
            f.write(example[: len(example) // 2])
            break
    os.kill(os.getpid(), signal.SIGKILL)

file_adapters.ArrayRecordFileAdapter.write_examples = classmethod(half_then_kill)
build.build(sys.argv[1], sys.argv[2], split_sizes={"train": 2, "validation": 1, "test": 1})
"""


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "_xct_cache" not in p.parts
    }


def test_build_killed_mid_shard_leaves_nothing_read_and_rerun_writes_the_same_files(tmp_path):
    from data_pipelines import build

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    p = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_WRITING, TINY, str(killed)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == -9, p.stderr[-2000:]
    shards = list((killed / TINY).glob("incomplete.*/*train.array_record*"))
    assert shards and shards[0].stat().st_size > 0  # the half-written shard is there ...
    assert data._stored_info(killed / TINY) is None  # ... and nothing reads it
    with pytest.raises(ValueError, match="not found"):
        input_pipeline.data_source(TINY, killed, "train")

    build.build(TINY, killed, split_sizes=SIZES)  # the rerun
    build.build(TINY, clean, split_sizes=SIZES)  # an uninterrupted build
    assert not list((killed / TINY).glob("incomplete.*"))  # the killed build's folder: gone
    assert _files(killed) == _files(clean)
    assert len(input_pipeline.data_source(TINY, killed, "train")) == 2

    # A build killed after writing its dataset_info.json, before the rename: not read either.
    leftover = clean / TINY / "incomplete.ABCDEF_1.0.0"
    shutil.copytree(clean / TINY / "1.0.0", leftover)
    assert data._stored_info(clean / TINY)["dir"].name == "1.0.0"
    shutil.rmtree(clean / TINY / "1.0.0")
    assert data._stored_info(clean / TINY) is None
