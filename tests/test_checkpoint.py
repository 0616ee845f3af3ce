"""Checkpointer: checked restores (truncated, changed, non-finite, foreign), fall-back to the
newest intact step, a full disk during a write, and the workdir lock. Tiny pytrees: no model."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(scale: float = 1.0):
    return {
        "params": {"w": jnp.arange(4096, dtype=jnp.float32) * scale, "b": jnp.ones((3, 2))},
        "step": jnp.int32(int(scale)),
    }


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())


def _saved(workdir, steps=(1, 2), best=()):
    ckpt = checkpoint.Checkpointer(workdir)
    for s in steps:
        ckpt.save(s, _state(s), {"next": s}, force=True)
    for s in best:
        ckpt.save_best(s, _state(s), {"val_psnr": 10.0 + s})
    ckpt.close()


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_restore_returns_the_state_and_data(tmp_path):
    _saved(tmp_path)
    state, data, step = checkpoint.Checkpointer(tmp_path).restore(_abstract())
    assert step == 2 and data == {"next": 2}  # the checksums stay inside the checkpointer
    np.testing.assert_array_equal(state["params"]["w"], np.arange(4096) * 2.0)


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, lambda p: p.write_bytes(b"")])
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    _saved(tmp_path, steps=(1, 2, 3))
    damage(_largest_file(tmp_path / "checkpoints" / "3"))
    ckpt = checkpoint.Checkpointer(tmp_path)
    state, _, step = ckpt.restore(_abstract(), set_aside=True)
    assert step == 2 and float(state["params"]["w"][1]) == 2.0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "step 3" in lines[0] and "damaged (" in lines[0], lines
    # Moved aside, so the resumed run can save step 3 again, and a later resume takes it.
    assert (tmp_path / "damaged" / "checkpoints_3").is_dir()
    assert ckpt.latest_step() == 2
    ckpt.save(3, _state(3), force=True)
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path).restore(_abstract())[2] == 3


def test_an_explicit_damaged_step_is_one_clear_error(tmp_path):
    _saved(tmp_path)
    _truncate(_largest_file(tmp_path / "checkpoints" / "2"))
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"step 2 .* is damaged \("):
        checkpoint.Checkpointer(tmp_path).restore(_abstract(), step=2)


def test_non_finite_values_count_as_damage(tmp_path, capsys):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, _state(1), force=True)
    bad = _state(2)
    bad["params"]["b"] = bad["params"]["b"].at[0, 0].set(jnp.nan)
    ckpt.save(2, bad, force=True)
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path).restore(_abstract())[2] == 1
    assert "params/b holds NaN or inf" in capsys.readouterr().out


def test_every_step_damaged_is_an_error_never_a_fresh_start(tmp_path):
    _saved(tmp_path)
    for s in (1, 2):
        (tmp_path / "checkpoints" / str(s) / "state" / "_METADATA").unlink()
    with pytest.raises(checkpoint.DamagedCheckpoint, match="no intact checkpoint"):
        checkpoint.Checkpointer(tmp_path).restore(_abstract(), set_aside=True)


def test_another_config_is_a_shape_error_not_damage(tmp_path):
    _saved(tmp_path)
    other = _abstract()
    other["params"]["b"] = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    with pytest.raises(ValueError, match=r"does not fit this config: params/b") as e:
        checkpoint.Checkpointer(tmp_path).restore(other)
    assert not isinstance(e.value, checkpoint.DamagedCheckpoint)
    assert (tmp_path / "checkpoints" / "2").is_dir()  # nothing moved


def test_damaged_best_is_named_and_skipped(tmp_path, capsys):
    _saved(tmp_path, steps=(2,), best=(2,))
    _truncate(_largest_file(tmp_path / "best" / "2"))
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.restore(_abstract(), which="best", set_aside=True) is None
    out = capsys.readouterr().out
    assert "step 2" in out and str(tmp_path / "best") in out
    assert ckpt.best.all_steps() == [] and (tmp_path / "damaged" / "best_2").is_dir()
    ckpt.close()


_FULL_DISK = """
import resource, sys
import jax
from xct import checkpoint
# Many arrays that do not compress: a failed save leaves many writes in flight.
keys = jax.random.split(jax.random.key(0), 64)
noise = {f"p{i}": jax.random.uniform(k, (20_000,)) for i, k in enumerate(keys)}
state = lambda s: jax.tree.map(lambda x: x + s, noise)
ckpt = checkpoint.Checkpointer(sys.argv[1])
if len(sys.argv) > 2:  # space is back: save the next step
    ckpt.save(2, state(2.0), force=True)
    ckpt.close()
    sys.exit(0)
ckpt.save(1, state(1.0), force=True)
ckpt.wait()
# Writes past the limit fail with EFBIG (Python ignores SIGXFSZ).
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    ckpt.save(2, state(2.0), force=True)
    ckpt.close()
except checkpoint.DiskFull as e:
    print("DISKFULL", e)
"""


def test_full_disk_stops_with_one_line_and_the_last_checkpoint_intact(tmp_path):
    env = {**os.environ, "XCT_VERBOSE": "0"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-c", textwrap.dedent(_FULL_DISK), str(tmp_path), *a],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    p = run()
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("DISKFULL"))
    # Orbax's thread errors and TensorStore's late writes into a closed loop: not shown.
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "disk full: writing checkpoint step 2" in line and "(File too large)" in line, line
    assert "step 1, is intact" in line and "Errno" not in line, line
    abstract = {f"p{i}": jax.ShapeDtypeStruct((20_000,), jnp.float32) for i in range(64)}
    state, _, step = checkpoint.Checkpointer(tmp_path).restore(abstract)
    assert step == 1 and 1.0 <= float(state["p0"][0]) < 2.0
    assert run("again").returncode == 0  # space is back: the next save of step 2 commits
    state, _, step = checkpoint.Checkpointer(tmp_path).restore(abstract)
    assert step == 2 and float(state["p63"][-1]) >= 2.0


def test_workdir_lock_refuses_a_second_run_and_is_released(tmp_path):
    first = checkpoint.WorkdirLock(tmp_path).acquire()
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
    with pytest.raises(checkpoint.WorkdirBusy, match=f"in use by another run \\(pid {os.getpid()}"):
        checkpoint.WorkdirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / "run.lock").exists()
    with checkpoint.WorkdirLock(tmp_path):
        assert (tmp_path / "run.lock").exists()


def test_workdir_lock_of_a_live_process_is_refused_and_a_dead_ones_taken_over(tmp_path, capsys):
    code = (
        "import sys, time; from xct import checkpoint; "
        "checkpoint.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(checkpoint.WorkdirBusy, match=f"pid {proc.pid} on host"):
            checkpoint.WorkdirLock(tmp_path).acquire()
    finally:
        proc.kill()  # like SIGKILL of a run: its lock file stays, its flock goes
        proc.wait()
    assert (tmp_path / "run.lock").exists()
    lock = checkpoint.WorkdirLock(tmp_path).acquire()
    assert f"taking over the lock of a run that is gone (pid {proc.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
