"""The training loop over an ``Experiment``: resume, step, log, checkpoint, validate.

``train_and_evaluate(exp, workdir)`` runs ``exp.train_step`` (``xct.steps``, jitted once
by the Experiment on its mesh) from this workdir's last checkpoint, else from
``config.init_from``, else fresh. Randomness comes from named streams of ``config.seed``
(``xct.rng``: ``jax.random.split(jax.random.key(seed), 3)`` named ``init``, ``train``,
``data`` in that order): the initial parameters use ``init``, step ``s`` uses
``fold_in(train, s)`` and a rendered data source ``fold_in(data, s)``. No key is saved:
with the data source's state saved beside each checkpoint, a resumed run computes exactly
the steps it would have computed; the metrics log is cut back to the restored step, so a
run killed at any moment and restarted leaves the log an uninterrupted run would have
written. Validation uses the experiment's evaluator (the one ``--mode=evaluate`` uses)
and keeps the best checkpoint by validation PSNR. SIGTERM (preemption) or the time budget
saves a checkpoint and stops; a non-finite loss stops the run naming the step and the last
good checkpoint (``config.train.on_nonfinite="skip"``: the step is skipped and the run goes
on). A run holds ``WORKDIR/run.lock`` while it lives (a second run is refused), resumes from
the newest intact checkpoint (``checkpoint.Checkpointer.restore`` names and sets aside a
damaged one), and a full disk during a checkpoint write stops it with the last committed
checkpoint intact (README, "What a run survives").
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import time
from typing import NamedTuple

import jax
import numpy as np

from xct import checkpoint, experiment, rng, sharding
from xct.experiment import Experiment


class Logger:
    """``WORKDIR/metrics.jsonl`` (one JSON row per logged step) and TensorBoard scalars.

    On resume from step ``s`` the rows past ``s`` (written after the restored checkpoint
    by a run that was killed) are dropped, so no step is logged twice.
    """

    def __init__(self, workdir: pathlib.Path, enabled: bool, resume_step: int = 0):
        self.enabled, self.jsonl, self.tb = enabled, None, None
        if not enabled:
            return
        path = workdir / "metrics.jsonl"
        if path.exists():
            self._truncate(path, resume_step)
        self.jsonl = open(path, "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            # Events past the restored step (a killed run's) are dropped, as in the log.
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # pragma: no cover
            self.tb = None

    @staticmethod
    def _truncate(path: pathlib.Path, step: int) -> None:
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)

    def write(self, step: int, values: dict, prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def initial_state(exp: Experiment, ckpt: checkpoint.Checkpointer, workdir: pathlib.Path):
    """``(state, data_state, start step)``: this workdir's newest intact checkpoint, then
    ``config.init_from``, then fresh. A damaged step is named in one line and set aside
    (``WORKDIR/damaged/``); a workdir whose every step is damaged is an error, never a
    silent fresh start. The best checkpoint is checked the same way."""
    restored = ckpt.restore(exp.abstract_state, set_aside=True)
    if restored is not None:
        state, data_state, start = restored
        if ckpt.best.all_steps():
            ckpt.restore(exp.abstract_state, which="best", set_aside=True)
        print(f"resumed from {workdir / 'checkpoints'} step {start}", flush=True)
        return state, data_state, start
    state = exp.fresh_state()
    if exp.init_from:
        other = checkpoint.Checkpointer(exp.init_from).restore(exp.abstract_state)
        if other is None:
            raise ValueError(f"config.init_from: no checkpoint in {exp.init_from}")
        state = state.replace(params=other[0].params, ema_params=other[0].ema_params)
        print(f"initialised parameters from {exp.init_from} step {other[2]}", flush=True)
    return state, None, 0


def validate(exp: Experiment, params) -> dict:
    """The evaluator's mean scores on the validation split (empty without one)."""
    examples = exp.data.examples("validation", exp.num_views) if exp.data.has_validation else None
    return {} if examples is None else exp.evaluator.validate(params, examples)


class _Progress:
    """Averages the pending step metrics and prints a progress line with ETA."""

    def __init__(self, exp: Experiment, start: int, is_main: bool):
        self.exp, self.is_main = exp, is_main
        self.t, self.s, self.pending = time.perf_counter(), start, []
        self.t0 = self.t
        self.first = True  # the first interval includes compiling: no ETA from its rate

    def check_finite(self, done: int, last_good, workdir) -> list[int]:
        """With ``on_nonfinite="stop"``: ``FloatingPointError`` naming the first pending
        step whose update was skipped for a NaN/inf loss or gradient (one host sync)."""
        rows = jax.device_get([r["nonfinite"] for r in self.pending])
        bad = [done - len(rows) + 1 + i for i, r in enumerate(rows) if r > 0]
        if bad and self.exp.loop.on_nonfinite == "stop":
            good = f"step {last_good} in {workdir / 'checkpoints'}" if last_good else "none"
            raise FloatingPointError(
                f"training stopped at step {bad[0]}: the loss or gradients became NaN/inf "
                f"(that update was skipped); last good checkpoint: {good}. Lower "
                "config.optim.learning_rate, check the data, or set "
                "config.train.on_nonfinite=skip to skip such steps"
            )
        return bad

    def report(self, done: int, logger: Logger, last_good, workdir) -> None:
        skipped = self.check_finite(done, last_good, workdir)
        rows = jax.device_get(self.pending)
        self.pending = []
        if skipped and self.is_main:
            print(
                f"  skipped {len(skipped)} step(s) with a NaN/inf loss or gradient "
                f"(first: step {skipped[0]}; config.train.on_nonfinite=skip)",
                flush=True,
            )
        avg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        now = time.perf_counter()
        rate = (done - self.s) / max(now - self.t, 1e-9)
        self.t, self.s = now, done
        avg["steps_per_s"] = rate
        logger.write(done, avg)
        n = self.exp.loop.num_steps
        eta = (
            "ETA after the next line (these steps included compiling)"
            if self.first and done < n
            else f"ETA {(n - done) / max(rate, 1e-9) / 60:.1f} min"
        )
        self.first = False
        if self.is_main:
            print(
                f"step {done:>6}/{n}  loss {avg['loss']:.4f}  {rate:.2f} steps/s  "
                f"elapsed {(now - self.t0) / 60:.1f} min  {eta}",
                flush=True,
            )


def train_and_evaluate(exp: Experiment, workdir) -> dict:
    """Train ``exp`` in ``workdir`` (resuming from its newest intact checkpoint); returns the
    last validation scores. Returns early, after saving, on SIGTERM or the time budget; the
    returned dict then has ``"stopped"`` set to the reason. A second run on a workdir in use
    raises ``checkpoint.WorkdirBusy`` before doing anything; a full disk during a checkpoint
    write raises ``checkpoint.DiskFull``; a NaN/inf step ``FloatingPointError`` (unless
    ``config.train.on_nonfinite="skip"``); each with a one-line message."""
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    # One process holds the lock: the workdir is shared by the hosts of a multi-host run.
    lock = checkpoint.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _run(exp, workdir)
    finally:
        if lock is not None:
            lock.release()


def _run(exp: Experiment, workdir: pathlib.Path) -> dict:
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(exp.config_json())
    exp.data.prepare()
    loop = exp.loop
    ckpt = checkpoint.Checkpointer(workdir, keep=loop.keep_checkpoints)
    try:
        state, data_state, start = initial_state(exp, ckpt, workdir)
    except BaseException:
        ckpt.close()
        raise
    stream = exp.data.open(exp.mesh, exp.rules, data_state, start)
    logger = Logger(workdir, is_main, start)
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    progress, last_good, t_start = (
        _Progress(exp, start, is_main),
        ckpt.latest_step(),
        time.perf_counter(),
    )
    final_val: dict = {}
    step_fn = exp.train_step
    try:
        for step in range(start, loop.num_steps):
            batch = stream.batch(step)
            key = rng.step_key(exp.streams["train"], step)
            if step == start and jax.process_count() > 1:
                # Compile first, then meet: compile times differ between hosts by more
                # than the collectives' set-up waits.
                step_fn = step_fn.lower(state, batch, key).compile()
                sharding.barrier(f"xct: train step compiled ({start})")
            state, m = step_fn(state, batch, key)
            progress.pending.append(m)
            done = step + 1
            if loop.max_seconds and time.perf_counter() - t_start > loop.max_seconds:
                stop["signal"] = stop["signal"] or f"time budget of {loop.max_seconds:.0f} s"
            # One reading per step: a signal that arrives later is handled after the next.
            stopping = stop["signal"]
            last = done == loop.num_steps or bool(stopping)
            if done % loop.log_every == 0 or last:
                progress.report(done, logger, last_good, workdir)
            # Validation comes before the step's checkpoint: a run killed in between
            # resumes from an earlier checkpoint and validates this step again.
            validating = done % loop.eval_every == 0 or done == loop.num_steps
            if exp.data.has_validation and validating and not stopping:
                final_val = _validate_and_keep_best(exp, state, done, ckpt, logger, stream)
            if done % loop.checkpoint_every == 0 or last:
                progress.check_finite(done, last_good, workdir)  # no save after a NaN step
                ckpt.save(done, state, stream.state(), force=True)
                last_good = done
            if stopping:
                print(f"stopped ({stopping}): saved step {done}", flush=True)
                return {"stopped": str(stopping)}
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.close()
        ckpt.close()  # waits for the pending write: the last good checkpoint is committed
    return final_val


def _validate_and_keep_best(exp, state, done, ckpt, logger, stream) -> dict:
    scores = validate(exp, state.ema_params)
    logger.write(done, scores, prefix="validation")
    if jax.process_index() == 0:
        shown = [k for k in ("psnr", "ssim", "mae_hu", "drr_psnr") if k in scores]  # all: logged
        print("  validation: " + "  ".join(f"{k} {scores[k]:.4f}" for k in shown), flush=True)
    ckpt.save_best(done, state, {"val_psnr": scores["psnr"]}, stream.state())
    return scores


def parse_stages(text: str) -> list[tuple[int, int, int]]:
    """``"64:2000,128:1000:2"`` -> ``[(64, 2000, 0), (128, 1000, 2)]``: resolution, steps and
    (optionally) global batch of each stage (0: the config's batch)."""
    stages = []
    for item in filter(None, (x.strip() for x in str(text).split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            res, steps, batch = (int(p) for p in (*parts, "0")[:3])
        except ValueError:
            raise ValueError(
                f"config.train.stages: expected 'resolution:steps[:batch],...', got {item!r}"
            ) from None
        if res < 2 or steps < 0 or batch < 0:
            raise ValueError(f"config.train.stages: bad stage {item!r}")
        stages.append((res, steps, batch))
    return stages


def stage_configs(config) -> list:
    """One config per stage of ``config.train.stages`` (resolution, steps, batch set)."""
    out = []
    config = experiment.upgrade_config(config)
    for res, steps, batch in parse_stages(config.train.stages):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.train.stages = ""
            c.geometry.resolution = res
            c.train.num_steps = steps
            if batch:
                c.data.batch_size = batch
            if c.data.source == "tfds":
                c.data.tfds.dataset = re.sub(r"res\d+", f"res{res}", c.data.tfds.dataset)
            if int(c.train.get("patch_size", 0)) > res:
                c.train.patch_size = 0  # a stage smaller than the patch trains on whole volumes
        out.append(c)
    return out


class StagesResult(NamedTuple):
    """What ``train_progressive`` ran last."""

    experiment: Experiment  # the last stage's
    workdir: pathlib.Path  # the last stage's folder
    result: dict  # its ``train_and_evaluate`` result


def train_progressive(config, workdir) -> StagesResult:
    """Progressive multi-resolution training: one run per stage of ``config.train.stages``
    in ``workdir/stage<i>_<res>``, each initialised from the previous stage's last
    checkpoint (``init_from``; the models' parameters do not depend on the resolution).
    An interrupted schedule resumes: finished stages are skipped, the current one resumes
    from its own checkpoint."""
    workdir = pathlib.Path(workdir).expanduser()
    previous = str(config.get("init_from", "") or "")
    exp, stage_dir, result = None, workdir, {}
    for i, c in enumerate(stage_configs(config)):
        with c.unlocked():
            c.init_from = previous
        res = int(c.geometry.resolution)
        stage_dir = workdir / f"stage{i}_{res}"
        print(f"stage {i}: {res}^3, {c.train.num_steps} steps -> {stage_dir}", flush=True)
        exp = Experiment.from_config(c)
        result = train_and_evaluate(exp, stage_dir)
        if result.get("stopped"):
            break
        previous = str(stage_dir)
    return StagesResult(exp, stage_dir, result)
