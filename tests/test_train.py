"""Training: steps, sharding, checkpoints, exact resume, SIGTERM, and every config's smoke run."""

import importlib
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest

from xct import checkpoint, sharding, steps, train
from xct.configs import default
from xct.experiment import Experiment

CONFIGS = [
    "default",
    "quickstart",
    "unet64",
    "unet128",
    "unet256",
    "gan128",
    "views8_128",
    "baseline64",
    "unet256_patch",
    "progressive",
    "unrolled64",
]


def _render_config(**over):
    """A tiny config that renders phantoms on the fly (no dataset to build)."""
    c = default.get_config("smoke")
    # A 2-level U-Net without attention, X2CT-style lifting: the training mechanics tested
    # here do not depend on them, and its step compiles in about half the time of the smoke
    # U-Net's (60 s alone on 2 cores; the full model is covered by tests/test_models.py,
    # tests/test_sharding.py and the slow every-config smoke).
    c.model.lifting = "expand"
    c.model.num_levels = 2
    c.model.attention = "none"
    c.data.source = "render"
    c.geometry.resolution = 16
    c.data.pool_size = 2
    c.data.batch_size = 4
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    for k, v in over.items():
        node, _, leaf = k.rpartition(".")
        target = c
        for part in node.split(".") if node else []:
            target = target[part]
        target[leaf] = v
    return c


def _fixed_batch(config):
    mesh = sharding.make_mesh({"data": 1})
    pool, render = Experiment.from_config(config).data.renderer(mesh, sharding.DEFAULT_RULES)
    return jax.device_get(render(jax.random.key(0), pool))


def test_complexity_curriculum_pool_and_draws():
    from xct import phantoms

    c = _render_config(**{"data.pool_size": 3})
    mesh = sharding.make_mesh({"data": 1})
    exp = Experiment.from_config(c)
    pool, render = exp.data.renderer(mesh, sharding.DEFAULT_RULES, by_complexity=True)
    grid = exp.acquisition.grid()
    seed = int(c.seed) * 100_003
    # Phantom i of P has complexity (i + 1) / P: the last is the full phantom.
    np.testing.assert_array_equal(np.asarray(pool[2]), phantoms.chest_phantom(seed + 2, grid)[0])
    easy = phantoms.chest_phantom(seed, grid, complexity=1 / 3)[0]
    np.testing.assert_array_equal(np.asarray(pool[0]), easy)
    # Early in the ramp only the easiest phantom is drawn: the same batch as a pool of it.
    key = jax.random.key(3)
    early = render(key, pool, np.float32(0.01))
    only_first = render(key, pool[:1], np.float32(0.01))
    np.testing.assert_allclose(np.asarray(early["ct"]), np.asarray(only_first["ct"]), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_step():
    """The tiny render config's experiment (``mesh.data = -1``: all 4 fake devices) and a
    fixed batch. The tests below share its jitted train step, so it compiles once; they are
    in one xdist group, so they run on one worker."""
    c = _render_config()
    exp = Experiment.from_config(c)
    return exp, exp.shard(_fixed_batch(c))


@pytest.mark.xdist_group(name="unet_step")
def test_train_step_lowers_loss_on_a_fixed_batch(tiny_step):
    exp, batch = tiny_step
    state = exp.init(jax.random.key(0), exp.dummy_batch())
    losses = []
    for i in range(8):
        state, m = exp.train_step(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 8 and int(state.nonfinite_steps) == 0


def _three_steps(exp, batch):
    state = exp.init(jax.random.key(0), exp.dummy_batch())
    ms = []
    for i in range(3):
        state, m = exp.train_step(state, batch, jax.random.key(i))
        ms.append({k: float(m[k]) for k in ("loss", "grad_norm")})
    return ms, jax.device_get(state.params)


def _on_mesh(mesh: dict):
    c = _render_config(**{f"mesh.{k}": v for k, v in mesh.items()})
    exp = Experiment.from_config(c)
    return exp, exp.shard(_fixed_batch(c))


def _check_same_training(runs):
    """``runs``: ``(mesh, (exp, batch))`` pairs, each trained 3 steps and compared with one
    device."""
    ref, ref_params = _three_steps(*_on_mesh({"data": 1, "spatial": 1}))
    for mesh, (exp, batch) in runs:
        ms, params = _three_steps(exp, batch)
        assert len(batch["drr"].sharding.device_set) == 4
        ct_shards = {str(s.index) for s in batch["ct"].addressable_shards}
        assert len(ct_shards) == mesh["data"] * mesh["spatial"], (mesh, ct_shards)
        # Same losses and gradient norms step after step (float reduction order differs only).
        for one, four in zip(ref, ms, strict=True):
            for k in one:
                assert abs(one[k] - four[k]) <= 1e-4 * abs(one[k]), (mesh, k, one[k], four[k])
        # Parameters: Adam divides by sqrt(v), so a weight whose gradient is at float-noise
        # level moves by up to the learning rate whatever its sign; bound by a few steps.
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True)
        )
        assert diff < 3 * 3 * exp.config.optim.learning_rate, (mesh, diff)


@pytest.mark.xdist_group(name="unet_step")
def test_step_on_four_devices_equals_one_device(tiny_step):
    """data=4 (the shared step: ``mesh.data = -1`` on 4 devices) gives the losses, gradient
    norms and parameters of one device."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    _check_same_training([({"data": 4, "spatial": 1}, tiny_step)])


@pytest.mark.slow
def test_spatially_sharded_steps_equal_one_device():
    """The whole train step (optimiser, EMA, projection loss) with volumes split along z:
    data=2 x spatial=2 and spatial=4. (tests/test_sharding.py checks the model's loss and
    gradients on these meshes, also under -m slow; the default run checks the lifting's z
    slabs and the batch shardings there. This compiles 3 full steps, minutes.)"""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    meshes = [{"data": 2, "spatial": 2}, {"data": 1, "spatial": 4}]
    _check_same_training([(m, _on_mesh(m)) for m in meshes])


@pytest.mark.xdist_group(name="unet_step")
def test_checkpoint_restore_gives_identical_next_loss(tmp_path, tiny_step):
    exp, batch = tiny_step
    state = exp.init(jax.random.key(0), exp.dummy_batch())
    state, _ = exp.train_step(state, batch, jax.random.key(0))
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state, {"next_index": 7}, force=True)
    ckpt.wait()
    _, m_direct = exp.train_step(jax.tree.map(lambda x: x.copy(), state), batch, jax.random.key(1))
    restored, data_state, step = checkpoint.Checkpointer(tmp_path).restore(exp.abstract_state)
    _, m_restored = exp.train_step(restored, batch, jax.random.key(1))
    assert step == 1 and data_state == {"next_index": 7}
    assert float(m_restored["loss"]) == float(m_direct["loss"])
    ckpt.close()


def _final_params(workdir, c):
    abstract = Experiment.from_config(c).abstract_state
    state, _, step = checkpoint.Checkpointer(workdir).restore(abstract)
    return step, jax.device_get(state.params)


class _Killed(BaseException):
    """Like a kill: not an Exception, so nothing in the training loop handles it."""


@pytest.mark.slow  # three full training runs, each compiling its step (minutes on 2 cores)
def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    """Kill a 4-step run right after its step-2 checkpoint, rerun it: the result equals an
    uninterrupted run, because keys fold in the step and checkpoints hold everything.
    (The same config both times: a shorter num_steps would change the LR schedule.)
    A 3-step curriculum makes the resumed run cross from the complexity-ordered pool to
    the full one."""
    c = _render_config(**{"data.curriculum_steps": 3})
    exp = Experiment.from_config(c)
    train.train_and_evaluate(exp, tmp_path / "straight")
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            raise _Killed("after the step-2 checkpoint")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save", save_then_die)
        with pytest.raises(_Killed):
            train.train_and_evaluate(exp, tmp_path / "resumed")
    train.train_and_evaluate(exp, tmp_path / "resumed")
    s1, p1 = _final_params(tmp_path / "straight", c)
    s2, p2 = _final_params(tmp_path / "resumed", c)
    assert s1 == s2 == 4
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # about 7 minutes on 2 cores
def test_sigterm_saves_a_restorable_checkpoint_and_stops(tmp_path):
    c = _render_config(
        **{"train.num_steps": 10_000, "train.log_every": 1, "train.checkpoint_every": 10_000}
    )
    log = tmp_path / "metrics.jsonl"

    def kill_after_first_log():
        for _ in range(600):
            if log.exists() and log.read_text().strip():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    threading.Thread(target=kill_after_first_log, daemon=True).start()
    result = train.train_and_evaluate(Experiment.from_config(c), tmp_path)
    assert result["stopped"]
    step, params = _final_params(tmp_path, c)
    assert 1 <= step < 10_000
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_clear_message(tmp_path):
    c = _render_config(**{"optim.learning_rate": float("nan"), "train.log_every": 1})
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        train.train_and_evaluate(Experiment.from_config(c), tmp_path)


@pytest.mark.slow  # ~4 min of compiling per config on 2 cores; the render-config tests cover
@pytest.mark.parametrize("name", CONFIGS)  # the same step in the default run
def test_every_config_smoke_compiles_and_steps(name):
    c = importlib.import_module(f"xct.configs.{name}").get_config("smoke")
    exp = Experiment.from_config(c)
    batch = exp.dummy_batch()
    state = exp.init(jax.random.key(0), batch)
    state, m = exp.train_step(state, exp.shard(batch), jax.random.key(1))
    assert np.isfinite(float(m["loss"])) and int(state.step) == 1


def test_bad_config_values_are_clear_errors():
    c = _render_config(**{"data.batch_size": 3, "mesh.data": 2})
    with pytest.raises(ValueError, match="batch_size"):
        Experiment.from_config(c)
    c = _render_config(**{"model.lifting": "sideways"})
    with pytest.raises(ValueError, match="lifting"):
        Experiment.from_config(c)


@pytest.mark.slow  # compiles a second U-Net step (minutes); test_patches.py covers the parts
def test_patch_training_and_sliding_window_prediction():
    c = _render_config(**{"train.patch_size": 12, "train.patch_overlap": 4, "loss.projection": 0.0})
    exp = Experiment.from_config(c)
    batch = exp.shard(_fixed_batch(c))
    state = exp.init(jax.random.key(0), exp.dummy_batch())
    state, m = exp.train_step(state, batch, jax.random.key(1))
    assert np.isfinite(float(m["loss"]))
    whole = jax.jit(lambda p, b: steps.predict_ct(exp.setup, p, b))(state.params, batch)
    assert whole.shape == batch["ct"].shape and np.all(np.isfinite(np.asarray(whole)))
    with pytest.raises(ValueError, match="projection"):
        Experiment.from_config(_render_config(**{"train.patch_size": 8, "loss.projection": 0.1}))


@pytest.mark.slow  # two stages, two compiles (minutes)
def test_progressive_stages_carry_the_weights(tmp_path, capsys):
    c = _render_config(**{"train.stages": "12:1,16:2", "model.num_levels": 2})
    last = train.train_progressive(c, tmp_path)
    assert last.workdir == tmp_path / "stage1_16" and last.experiment.acquisition.resolution == 16
    out = capsys.readouterr().out
    assert "stage 0: 12^3" in out and "stage 1: 16^3" in out
    for stage, n_steps in (("stage0_12", 1), ("stage1_16", 2)):
        assert checkpoint.Checkpointer(tmp_path / stage).latest_step() == n_steps
    with pytest.raises(ValueError, match="stages"):
        train.parse_stages("64-100")


# ---------------------------------------------------------------------------------------
# The training loop in the default suite: the tiny step above, shared (no compile of its own).


def _loop_exp(tiny_step, **loop):
    """The shared experiment with a loop that logs every step and validates every 2 steps
    (a render source has no validation split: ``validate`` is replaced in these tests)."""
    import dataclasses

    exp, _ = tiny_step
    loop = {"log_every": 1, "eval_every": 2, **loop}
    return dataclasses.replace(
        exp,
        loop=dataclasses.replace(exp.loop, **loop),
        data=dataclasses.replace(exp.data, has_validation=True),
    )


def _last_params(exp, workdir):
    state, _, step = checkpoint.Checkpointer(workdir).restore(exp.abstract_state)
    return step, jax.device_get(state.params)


def _rows(workdir, prefix="train/loss"):
    import json

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if prefix in r]


@pytest.fixture
def fake_validation(monkeypatch):
    """Validation scores in call order: 20 dB at the first validation, 15 dB after."""
    calls = []

    def validate(exp, params):
        calls.append(len(calls))
        return {"psnr": 20.0 if len(calls) == 1 else 15.0}

    monkeypatch.setattr(train, "validate", validate)
    return calls


@pytest.mark.xdist_group(name="unet_step")
def test_run_stopped_partway_resumes_and_finishes(
    tmp_path, tiny_step, monkeypatch, capsys, fake_validation
):
    """Stop a 4-step run after logging step 3 (its last checkpoint: step 2), rerun it: the
    log is cut back to step 2 and each step logged once, the best checkpoint (step 2) is
    kept. Then a damaged step-4 checkpoint: the rerun names it, resumes from step 2 and
    finishes. The parameters equal an uninterrupted run's."""
    exp = _loop_exp(tiny_step)
    write = train.Logger.write

    def write_then_die(self, step, values, prefix="train"):
        write(self, step, values, prefix)
        if step == 3 and prefix == "train":
            raise _Killed("after logging step 3")

    with monkeypatch.context() as m:
        m.setattr(train.Logger, "write", write_then_die)
        with pytest.raises(_Killed):
            train.train_and_evaluate(exp, tmp_path / "run")
    assert _rows(tmp_path / "run") == [1, 2, 3]
    assert checkpoint.Checkpointer(tmp_path / "run").latest_step() == 2
    assert not (tmp_path / "run" / "run.lock").exists()  # released on the way out
    train.train_and_evaluate(exp, tmp_path / "run")
    assert _rows(tmp_path / "run") == [1, 2, 3, 4]
    assert _rows(tmp_path / "run", "validation/psnr") == [2, 4]
    assert checkpoint.Checkpointer(tmp_path / "run").best.all_steps() == [2]  # 20 dB > 15 dB

    # A copy of the workdir whose step-4 array files are cut in half (a copy: TensorStore
    # caches what this process wrote, so the original would be read from memory; every
    # file: OCDBT keeps superseded files that no read needs, and cutting one loses nothing;
    # every data folder: Orbax may have merged the per-process tree into state/d, which is
    # then what a restore reads).
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    step4 = tmp_path / "copy" / "checkpoints" / "4"
    data_files = [p for p in (step4 / "state").rglob("*") if p.parent.name == "d" and p.is_file()]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    capsys.readouterr()
    train.train_and_evaluate(exp, tmp_path / "copy")
    out = capsys.readouterr().out.splitlines()
    assert any("checkpoint step 4" in ln and "is damaged (" in ln for ln in out), out
    assert any(ln.endswith("checkpoints step 2") and "resumed" in ln for ln in out), out
    assert (tmp_path / "copy" / "damaged" / "checkpoints_4").is_dir()
    assert _rows(tmp_path / "copy") == [1, 2, 3, 4]

    fake_validation.clear()
    train.train_and_evaluate(exp, tmp_path / "straight")
    s1, p1 = _last_params(exp, tmp_path / "straight")
    s2, p2 = _last_params(exp, tmp_path / "run")
    s3, p3 = _last_params(exp, tmp_path / "copy")
    assert s1 == s2 == s3 == 4
    for a, b, c in zip(*(jax.tree.leaves(p) for p in (p1, p2, p3)), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    best = checkpoint.Checkpointer(tmp_path / "run").restore(exp.abstract_state, which="best")
    assert best[2] == 2


def _nan_at(monkeypatch, exp, bad_step: int):
    """Make the stream's batch of 0-based ``bad_step`` all NaN."""
    import jax.numpy as jnp

    open_ = type(exp.data).open

    class NanStream:
        def __init__(self, inner):
            self.inner = inner

        def batch(self, step):
            b = self.inner.batch(step)
            return {**b, "drr": b["drr"] * jnp.nan} if step == bad_step else b

        def state(self):
            return self.inner.state()

    monkeypatch.setattr(type(exp.data), "open", lambda self, *a: NanStream(open_(self, *a)))


@pytest.mark.xdist_group(name="unet_step")
def test_nan_step_stops_naming_it_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_step, monkeypatch, fake_validation
):
    exp = _loop_exp(tiny_step)
    _nan_at(monkeypatch, exp, 2)  # the third update
    with pytest.raises(FloatingPointError) as e:
        train.train_and_evaluate(exp, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "stopped at step 3" in msg and "last good checkpoint: step 2" in msg
    state, _, step = checkpoint.Checkpointer(tmp_path).restore(exp.abstract_state)
    assert step == 2 and int(state.nonfinite_steps) == 0


@pytest.mark.xdist_group(name="unet_step")
def test_nan_step_is_skipped_with_on_nonfinite_skip(
    tmp_path, tiny_step, monkeypatch, capsys, fake_validation
):
    exp = _loop_exp(tiny_step, on_nonfinite="skip")
    _nan_at(monkeypatch, exp, 2)
    train.train_and_evaluate(exp, tmp_path)
    assert "skipped 1 step(s) with a NaN/inf loss or gradient (first: step 3" in (
        capsys.readouterr().out
    )
    state, _, step = checkpoint.Checkpointer(tmp_path).restore(exp.abstract_state)
    assert step == 4 and int(state.step) == 4 and int(state.nonfinite_steps) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.xdist_group(name="unet_step")
def test_a_second_run_on_a_busy_workdir_is_refused_at_once(tmp_path, tiny_step):
    exp = _loop_exp(tiny_step)
    with checkpoint.WorkdirLock(tmp_path):
        t0 = time.perf_counter()
        with pytest.raises(checkpoint.WorkdirBusy, match="in use by another run"):
            train.train_and_evaluate(exp, tmp_path)
        assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "config.json").exists()  # it wrote nothing


def test_log_is_cut_back_to_the_resumed_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [f'{{"step": {s}, "train/loss": {s / 10}}}' for s in (1, 2, 3, 4)]
    log.write_text("\n".join(rows) + '\n{"step": 5, "train/lo')  # cut short by a kill
    logger = train.Logger(tmp_path, True, resume_step=2)
    logger.write(3, {"loss": 0.5})
    logger.close()
    assert _rows(tmp_path) == [1, 2, 3]
    assert log.read_text().splitlines()[-1] == '{"step": 3, "train/loss": 0.5}'
