"""Resume under repeated kills: SIGKILL a training run at random moments, restart it each time,
and check that it ends bit-identical to an uninterrupted run.

    python -m scripts.kill_resume --workdir=/tmp/xct/kill_resume     # 10 kills, 2.5 min on 2 cores
    python -m scripts.kill_resume --workdir=/tmp/xct/kr --kills=4 --seed=1 \\
        --config=configs/default.py:smoke --set train.num_steps=18

1. ``python -m xct.main --config=CONFIG --workdir=WORKDIR/straight`` runs once, untouched,
   while this script watches its ``metrics.jsonl`` and ``checkpoints/`` to time its phases
   (start-up and compile, one step, a checkpoint write, a validation, the final evaluation).
2. The same command runs in ``WORKDIR/killed`` again and again; each run is killed (SIGKILL
   to its process group, as a preemption would) at a random moment inside a phase chosen in
   turn: start-up/compile, a training step, a checkpoint write (the blocking copy and the
   asynchronous Orbax write, or the moment ``checkpoints/N`` is committed), a validation,
   the final evaluation. Steps are drawn before the second checkpoint ahead, so a kill costs
   at most one checkpoint of progress and the kills spread over the run. After ``--kills``
   kills the run is left to finish; it must exit 0.
3. Checks, each PASS or FAIL: the metrics log (rows equal after dropping timing fields, each
   (kind, step) row exactly once), the last checkpoint (step, every array of the train
   state bit for bit, the data-iterator state), the best checkpoint (step and arrays), the
   final evaluation's ``metrics.json`` numbers, and no ``N.orbax-checkpoint-tmp`` left behind
   (Orbax replaces one when it saves step N again; one that stays is a save never redone).

Exit status: 0 when every check passes, 1 when one fails, 2 when the straight run itself
fails. The configuration is ``--config`` shrunk further by ``DEFAULT_SETS`` (12 steps of
a 2-level U-Net, checkpoints every 3 steps, validation every 4) and then by ``--set
KEY=VALUE`` (any ``config`` field). Subprocesses run without ``XLA_FLAGS`` (one CPU device
unless a GPU is present) and share a persistent compilation cache in ``WORKDIR/jax_cache``
so that restarts skip compiling; the dataset goes to ``WORKDIR/data`` and is built by the
straight run, so no kill hits the build. Bit-identity assumes deterministic kernels (CPU
XLA is; on a GPU set ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` yourself).
Every run's output is kept in ``WORKDIR/logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/default.py:smoke"
# A run of about 15 s once compiled (2-core CPU; 40-60 s the first time): every step logged,
# checkpoints every 3 steps and validations every 4 (they meet only at the last step; try
# --set train.eval_every=3 for a validation before each checkpoint), a tiny final evaluation.
DEFAULT_SETS = (
    "train.num_steps=12",
    "train.checkpoint_every=3",
    "train.eval_every=4",
    "train.log_every=1",
    "data.batch_size=1",
    "model.num_levels=2",
    "model.attention=none",
    "loss.projection=0",
    "loss.ssim=0",
    "eval.batch_size=2",
    "eval.save_volumes=0",
    "eval.report_volumes=0",
)
PHASES = ("startup", "step", "checkpoint", "validation", "final")
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes step N into N.orbax-checkpoint-tmp, then renames
_TIMING_TOKENS = {"time", "times", "seconds", "secs", "sec", "eta", "wall", "elapsed", "duration"}
POLL_S = 0.002


# ---------------------------------------------------------------------------------------
# Comparisons (pure)


def is_timing_key(key: str) -> bool:
    """True for metric names that measure time (``train/steps_per_s``, ``eval/wall_time``)."""
    k = key.lower()
    return "per_s" in k or any(t in _TIMING_TOKENS for t in re.split(r"[/_.\-\s]+", k))


def row_kind(row: dict) -> str:
    """The prefix of a metrics row's keys (``train``, ``validation``); ``?`` when mixed."""
    prefixes = {k.split("/", 1)[0] for k in row if k != "step"}
    return prefixes.pop() if len(prefixes) == 1 else "?"


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not is_timing_key(k)}


@dataclasses.dataclass
class LogComparison:
    """How a metrics log differs from a reference one; rows are keyed ``(kind, step)``."""

    duplicates: dict  # key -> times it appears in the candidate (> 1)
    missing: list  # keys of the reference absent from the candidate
    extra: list  # keys of the candidate absent from the reference
    differing: list  # (key, {field: (reference, candidate)}) for rows whose values differ
    reordered: bool  # same rows, another order
    unparsable: list  # lines of the candidate that are not JSON objects

    @property
    def ok(self) -> bool:
        return (
            not (self.duplicates or self.missing or self.extra or self.differing or self.reordered)
            and not self.unparsable
        )

    def lines(self) -> list[str]:
        out = []
        if self.duplicates:
            dup = ", ".join(f"{k}@{s} x{n}" for (k, s), n in sorted(self.duplicates.items()))
            out.append(f"rows logged more than once: {dup}")
        if self.missing:
            out.append("rows missing: " + ", ".join(f"{k}@{s}" for k, s in sorted(self.missing)))
        if self.extra:
            out.append("rows not in the reference: " + ", ".join(f"{k}@{s}" for k, s in self.extra))
        for (k, s), fields in self.differing[:5]:
            diff = "; ".join(f"{f}: {a!r} vs {b!r}" for f, (a, b) in list(fields.items())[:3])
            out.append(f"{k}@{s} differs: {diff}")
        if len(self.differing) > 5:
            out.append(f"... {len(self.differing) - 5} more differing rows")
        if self.reordered:
            out.append("rows appear in another order")
        if self.unparsable:
            out.append(f"{len(self.unparsable)} unparsable lines, first: {self.unparsable[0]!r}")
        return out


def compare_logs(
    reference: list[dict], candidate: list[dict], unparsable: list[str] = ()
) -> LogComparison:
    """Compare two metrics logs (lists of rows ``{"step": N, "train/loss": ...}``) after
    dropping timing fields: every row of ``reference`` must appear in ``candidate`` exactly
    once, with equal values (floats compared exactly), in the same order."""
    ref = [without_timing(r) for r in reference]
    can = [without_timing(r) for r in candidate]
    key = lambda r: (row_kind(r), int(r.get("step", -1)))  # noqa: E731
    counts = Counter(key(r) for r in can)
    ref_rows = {key(r): r for r in ref}
    can_rows: dict = {}
    for r in can:
        can_rows.setdefault(key(r), []).append(r)
    differing = []
    for k, r in ref_rows.items():
        for c in can_rows.get(k, []):
            if c != r:
                fields = {f: (r.get(f), c.get(f)) for f in sorted(set(r) | set(c))}
                differing.append((k, {f: v for f, v in fields.items() if v[0] != v[1]}))
                break
    comparison = LogComparison(
        duplicates={k: n for k, n in counts.items() if n > 1},
        missing=[k for k in ref_rows if k not in counts],
        extra=[k for k in can_rows if k not in ref_rows],
        differing=differing,
        reordered=False,
        unparsable=list(unparsable),
    )
    comparison.reordered = comparison.ok and can != ref
    return comparison


def read_log(path: pathlib.Path) -> tuple[list[dict], list[str]]:
    """Rows of a ``metrics.jsonl`` and the lines that are not JSON objects."""
    rows, bad = [], []
    if not path.exists():
        return rows, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(line)
    return rows, bad


def checkpoint_steps(folder: pathlib.Path) -> list[int]:
    """Finished checkpoint steps in an Orbax manager folder (``N/``, not ``N<TMP_MARK>``)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def partial_checkpoints(workdir: pathlib.Path) -> list[str]:
    """Unfinished Orbax writes (``checkpoints/N.orbax-checkpoint-tmp``) under ``workdir``."""
    return sorted(
        f"{sub}/{p.name}"
        for sub in ("checkpoints", "best")
        if (workdir / sub).is_dir()
        for p in (workdir / sub).iterdir()
        if TMP_MARK in p.name
    )


def compare_trees(reference, candidate) -> list[str]:
    """Differences between two pytrees of arrays, bit for bit: paths, shapes, dtypes, bytes."""
    import jax
    import numpy as np

    flat_ref = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
    flat_can = dict(jax.tree_util.tree_flatten_with_path(candidate)[0])
    name = jax.tree_util.keystr
    problems = [f"{name(p)}: only in the reference" for p in flat_ref if p not in flat_can]
    problems += [f"{name(p)}: only in the candidate" for p in flat_can if p not in flat_ref]
    for p, a in flat_ref.items():
        if p not in flat_can:
            continue
        a, b = np.asarray(a), np.asarray(flat_can[p])
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name(p)}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif a.tobytes() != b.tobytes():
            differ = int(np.sum(a != b)) if a.dtype.kind in "fciub" else -1
            err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.dtype.kind == "f" else 0
            problems.append(f"{name(p)}: {differ} of {a.size} values differ (max |diff| {err:.3g})")
    return problems


def restore_checkpoint(step_dir: pathlib.Path) -> tuple[dict, dict]:
    """``(train state as a dict of arrays, data-iterator state)`` of one saved step, read
    without knowing the model (the arrays as saved, on the default device)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(step_dir / "state")
    data = {}
    if (step_dir / "data").is_dir():
        data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "data") or {}
    return state, dict(data)


# ---------------------------------------------------------------------------------------
# Running and killing


@dataclasses.dataclass
class Event:
    t: float  # seconds since launch
    kind: str  # "train", "validation", "ckpt" (a finished checkpoints/N), "tmp" (a write began)
    step: int


def _step_of(name: str) -> int:
    digits = re.match(r"\d+", name.rsplit("/", 1)[-1])
    return int(digits.group()) if digits else -1


class Watcher:
    """Polls a workdir for new metric rows and checkpoint folders while a run goes on.

    Rows up to ``resume`` (the checkpoint the run starts from) are history, not events:
    a trainer that rewrites its log on resume shows them again.
    """

    def __init__(self, workdir: pathlib.Path, resume: int = 0):
        self.workdir, self.resume = workdir, resume
        self.log = workdir / "metrics.jsonl"
        self.file = self._file_id()
        self.offset = self.log.stat().st_size if self.file else 0
        self.partial = ""
        self.seen_ckpt = set(checkpoint_steps(workdir / "checkpoints"))
        self.seen_tmp = set(partial_checkpoints(workdir))
        self.tmp_at_launch = {name: self._signature(name) for name in self.seen_tmp}
        self.events: list[Event] = []

    def _file_id(self):
        try:
            st = self.log.stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def poll(self, t: float) -> None:
        try:
            size = self.log.stat().st_size
        except FileNotFoundError:
            size = 0
        file = self._file_id()
        if size < self.offset or file != self.file:  # rewritten: read it again from the top
            self.file, self.offset, self.partial = file, 0, ""
        if size > self.offset:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            self.offset += len(chunk)
            *lines, self.partial = (self.partial + chunk.decode("utf-8", "replace")).split("\n")
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and int(row.get("step", -1)) > self.resume:
                    self.events.append(Event(t, row_kind(row), int(row["step"])))
        for s in checkpoint_steps(self.workdir / "checkpoints"):
            if s not in self.seen_ckpt:
                self.seen_ckpt.add(s)
                self.events.append(Event(t, "ckpt", s))
        tmp = set(partial_checkpoints(self.workdir))
        for name in sorted(tmp - self.seen_tmp):
            self.events.append(Event(t, "tmp", _step_of(name)))
        self.seen_tmp = tmp

    def _signature(self, name: str):
        try:
            st = (self.workdir / name).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def fresh_partial_checkpoints(self) -> list[str]:
        """Unfinished checkpoint writes this run started (Orbax removes a leftover and makes
        the same name again: compared by inode and time, not by name)."""
        return [
            name
            for name in partial_checkpoints(self.workdir)
            if self._signature(name) not in (None, self.tmp_at_launch.get(name))
        ]

    def last(self, *kinds: str) -> Event | None:
        return next((e for e in reversed(self.events) if e.kind in kinds), None)

    def find(self, kind: str, step: int) -> Event | None:
        return next((e for e in self.events if e.kind == kind and e.step == step), None)


@dataclasses.dataclass
class Run:
    """One launch of the trainer."""

    index: int
    resume_step: int  # the last finished checkpoint when it started (0: none)
    target: str  # "phase@step" it was aimed at ("" for a run left to finish)
    killed: bool
    returncode: int | None
    seconds: float
    phase: str  # where the kill landed, from the files at the moment of the kill
    events: list
    log: pathlib.Path

    def line(self) -> str:
        head = f"run {self.index:2d}: resumed at step {self.resume_step:3d}, "
        if self.killed:
            return (
                f"{head}aimed at {self.target:14s} SIGKILL at {self.seconds:6.2f} s: {self.phase}"
            )
        aim = f"aimed at {self.target} but " if self.target else ""
        return f"{head}{aim}exited {self.returncode} after {self.seconds:.2f} s"


def _launch(cmd, env, cwd, log_path):
    log = open(log_path, "wb")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, log


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and anything it started
    except ProcessLookupError:
        pass
    proc.wait()


def run_watched(
    cmd,
    env,
    cwd,
    workdir,
    log_path,
    *,
    resume=0,
    trigger=None,
    delay_s=0.0,
    timeout_s=600.0,
    label=None,
) -> tuple[int | None, float, bool, str, Watcher]:
    """Launch ``cmd``; with ``trigger`` (``("launch", 0)`` or ``(event kind, step)``) send
    SIGKILL ``delay_s`` after that event. Returns ``(returncode, seconds, killed, phase at
    the kill, watcher)``; returncode is None on timeout."""
    watcher = Watcher(workdir, resume)
    t0 = time.perf_counter()
    proc, log = _launch(cmd, env, cwd, log_path)
    kill_at = delay_s if trigger == ("launch", 0) else None
    killed, phase = False, ""
    try:
        while proc.poll() is None:
            t = time.perf_counter() - t0
            watcher.poll(t)
            if kill_at is None and trigger is not None:
                hit = watcher.find(*trigger)
                if hit is not None:
                    kill_at = hit.t + delay_s
            if kill_at is not None and t >= kill_at:
                phase = label(watcher) if label else ""
                _kill(proc)
                killed = True
                break
            if t > timeout_s:
                _kill(proc)
                return None, t, False, "timeout", watcher
            time.sleep(POLL_S)
        seconds = time.perf_counter() - t0
        watcher.poll(seconds)
    finally:
        if proc.poll() is None:
            _kill(proc)
        log.close()
    return proc.returncode, seconds, killed, phase, watcher


def _durations(events: list[Event], seconds: float | None, resume: int, last_step: int) -> dict:
    """Phase durations seen in one run: ``{name: [seconds, ...]}``; ``seconds`` is the run's
    length when it exited by itself (None when killed)."""
    times = {(e.kind, e.step): e.t for e in events if e.kind in ("train", "validation")}
    ckpt_t = {e.step: e.t for e in events if e.kind == "ckpt"}
    train = sorted(s for k, s in times if k == "train")
    special = set(ckpt_t) | {s for k, s in times if k == "validation"}
    out = {
        "startup": [times["train", train[0]]] if train else [],
        "step": [
            times["train", b] - times["train", a]
            for a, b in zip(train, train[1:], strict=False)
            if b == a + 1 and a not in special and a != train[0]
        ],
        "checkpoint": [t - times["train", s] for s, t in ckpt_t.items() if ("train", s) in times],
        "validation": [
            times["validation", s] - times["train", s]
            for k, s in times
            if k == "validation" and ("train", s) in times
        ],
        "final": [],
        "finished": [],
    }
    if seconds is not None:
        if resume >= last_step:
            out["finished"].append(seconds)  # a restart of a finished run, start to exit
        elif train and train[-1] == last_step:
            out["final"].append(seconds - max(times.values()))
    return out


@dataclasses.dataclass
class Profile:
    """The run's steps and how long its phases take, for aiming kills. Durations come from
    the straight run (a cold compilation cache) until restarted runs have shown them warm."""

    last_step: int
    train_steps: list
    ckpt_steps: list
    val_steps: list
    cold: dict  # phase -> durations seen in the straight run
    warm: dict = dataclasses.field(default_factory=dict)  # ... in restarted runs

    @classmethod
    def from_straight_run(cls, events: list[Event], seconds: float) -> Profile:
        train = sorted({e.step for e in events if e.kind == "train"})
        if not train:
            raise RuntimeError("the straight run logged no training rows")
        cold = _durations(events, seconds, 0, train[-1])
        # The first validation compiles its step: leave it out if there are others.
        cold["validation"] = cold["validation"][1:] or cold["validation"]
        return cls(
            last_step=train[-1],
            train_steps=train,
            ckpt_steps=sorted({e.step for e in events if e.kind == "ckpt"}),
            val_steps=sorted({e.step for e in events if e.kind == "validation"}),
            cold=cold,
        )

    def observe(self, events: list[Event], seconds: float | None, resume: int) -> None:
        for name, values in _durations(events, seconds, resume, self.last_step).items():
            self.warm.setdefault(name, []).extend(values)

    def seconds(self, phase: str) -> float:
        """Typical duration of ``phase`` (``startup``, ``step``, ``checkpoint``,
        ``validation``, ``final``, ``finished``: a restart of a finished run)."""
        seen = self.warm.get(phase) or self.cold.get(phase)
        if seen:
            return max(statistics.median(seen[-5:]), 0.005)
        if phase == "finished":
            return self.seconds("startup") + self.seconds("final")
        return {"step": 0.5, "checkpoint": 0.05}.get(phase, 1.0)


def choose_target(
    profile: Profile, resume: int, phase: str, rng: random.Random, advance: bool = True
) -> tuple[str, int, tuple, float] | None:
    """``(phase, step, trigger, delay_s)`` for a kill inside ``phase`` of a run resuming at
    step ``resume``, or None when that phase does not come before the second checkpoint
    after ``resume``: a kill then costs at most one checkpoint of progress. ``advance``
    prefers a step after the next checkpoint (so that the run gets on), otherwise one up to
    it; the caller mixes both to spread the kills over the whole run."""
    p = profile
    later = [s for s in p.ckpt_steps if s > resume]
    horizon = later[1] - 1 if len(later) > 1 else p.last_step
    next_ckpt = later[0] if later else p.last_step
    if resume >= p.last_step:  # a finished run restarted: start-up, then the final evaluation
        if phase not in ("startup", "final"):
            return None
        return phase, resume, ("launch", 0), rng.uniform(0.05, 0.95) * p.seconds("finished")
    if phase == "startup":
        return phase, resume, ("launch", 0), rng.uniform(0.05, 0.95) * p.seconds("startup")
    if phase == "step":  # inside step N: after the last row of step N-1, before row N
        steps = [
            s
            for s in p.train_steps
            if s - 1 > resume and s - 1 in p.train_steps and s - 1 not in p.ckpt_steps
        ]
        trigger = lambda s: ("validation" if s - 1 in p.val_steps else "train", s - 1)  # noqa: E731
        window = (0.1, 0.9)
    elif phase == "checkpoint":  # the blocking copy and the asynchronous write after row N
        steps = [s for s in p.ckpt_steps if s > resume]
        trigger, window = (lambda s: ("train", s)), (0.0, 1.0)
    elif phase == "validation":
        steps = [s for s in p.val_steps if s > resume]
        trigger, window = (lambda s: ("train", s)), (0.1, 0.95)
    elif phase == "final":  # after the last row: the final checkpoint's wait, the evaluation
        if horizon < p.last_step:
            return None
        kind = "validation" if p.last_step in p.val_steps else "train"
        return phase, p.last_step, (kind, p.last_step), rng.uniform(0.05, 0.9) * p.seconds(phase)
    else:
        raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
    steps = [s for s in steps if s <= horizon]
    preferred = [s for s in steps if (s > next_ckpt) == advance]
    if not steps:
        return None
    s = rng.choice(preferred or steps)
    if phase == "checkpoint" and rng.random() < 0.5:
        # The moment checkpoints/N is committed: the best/ save of a validated step N may
        # still be writing, and the next step has not begun.
        return "commit", s, ("ckpt", s), 0.0
    return phase, s, trigger(s), rng.uniform(*window) * p.seconds(phase)


def phase_at_kill(watcher: Watcher, profile: Profile, resume: int) -> str:
    """Where a run is, judged from its files: an unfinished checkpoint write wins."""
    tmp = watcher.fresh_partial_checkpoints()
    if tmp:
        return "checkpoint write (" + ", ".join(tmp) + ")"
    last = watcher.last("train", "validation")
    if last is None:
        if resume >= profile.last_step:
            return "startup or final evaluation of a finished run"
        return "startup/compile"
    n = last.step
    ckpt = watcher.last("ckpt")
    if ckpt is not None and ckpt.step >= n:
        return f"just after checkpoint {ckpt.step} was committed"
    if last.kind == "train":
        saving = n in profile.ckpt_steps and n not in watcher.seen_ckpt
        if n in profile.val_steps:  # a validation row comes next (before or after the save)
            return f"validation{' or checkpoint save' if saving else ''} (step {n})"
        if saving:
            return f"checkpoint save, blocking part (step {n})"
    elif n in profile.ckpt_steps and n not in watcher.seen_ckpt:
        return f"checkpoint save, blocking part (step {n})"
    if n >= profile.last_step:
        return "final checkpoint wait / evaluation"
    return f"step {n + 1}"


def _category(phase: str) -> str:
    for word, cat in (
        ("validation", "validation"),
        ("checkpoint", "checkpoint"),
        ("startup", "startup"),
        ("final", "final"),
        ("step", "step"),
    ):
        if word in phase:
            return cat
    return phase or "-"


@dataclasses.dataclass
class Report:
    runs: list
    checks: list  # (name, ok, detail lines)
    notes: list

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def text(self, runs: bool = True) -> str:
        out = [r.line() for r in self.runs] if runs else []
        kills = Counter(_category(r.phase) for r in self.runs if r.killed)
        out.append(
            f"kills: {sum(kills.values())} ("
            + ", ".join(f"{c} {kills[c]}" for c in PHASES if kills[c])
            + ")"
        )
        for name, ok, detail in self.checks:
            out.append(f"[{'PASS' if ok else 'FAIL'}] {name}")
            out.extend(f"       {d}" for d in detail)
        out.extend(f"note: {n}" for n in self.notes)
        out.append("PASS" if self.ok else "FAIL")
        return "\n".join(out)


def train_command(python: str, config: str, workdir: pathlib.Path, sets) -> list[str]:
    return [
        python,
        "-m",
        "xct.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *(f"--config.{s}" for s in sets),
    ]


def subprocess_env(repo: pathlib.Path, cache_dir: pathlib.Path) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # no fake devices from a test session: the run's own devices
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: pathlib.Path, n: int = 8) -> list[str]:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return lines[-n:]


def compare_workdirs(straight: pathlib.Path, killed: pathlib.Path) -> tuple[list, list]:
    """``(checks, notes)`` comparing two finished workdirs of the same run."""
    checks, notes = [], []
    ref_rows, _ = read_log(straight / "metrics.jsonl")
    rows, bad = read_log(killed / "metrics.jsonl")
    logs = compare_logs(ref_rows, rows, bad)
    checks.append(
        (
            f"metrics log: {len(rows)} rows vs {len(ref_rows)}, timing fields dropped",
            logs.ok,
            logs.lines(),
        )
    )
    for sub, name in (("checkpoints", "last checkpoint"), ("best", "best checkpoint")):
        a, b = checkpoint_steps(straight / sub), checkpoint_steps(killed / sub)
        if not a and not b:
            continue
        if not a or not b or a[-1] != b[-1]:
            checks.append((name, False, [f"steps {a} vs {b}"]))
            continue
        try:
            state_a, data_a = restore_checkpoint(straight / sub / str(a[-1]))
            state_b, data_b = restore_checkpoint(killed / sub / str(b[-1]))
        except Exception as e:  # noqa: BLE001 - a checkpoint that does not read is a finding
            checks.append((name, False, [f"restore failed: {type(e).__name__}: {e}"]))
            continue
        problems = compare_trees(state_a, state_b)
        if data_a != data_b:
            problems.append(f"data-iterator state {data_a} vs {data_b}")
        import jax

        n = len(jax.tree.leaves(state_a))
        checks.append(
            (
                f"{name}: step {a[-1]}, {n} arrays bit for bit, data state {data_a}",
                not problems,
                problems[:10],
            )
        )
    if (straight / "metrics.json").exists() or (killed / "metrics.json").exists():
        try:
            ea = json.loads((straight / "metrics.json").read_text())
            eb = json.loads((killed / "metrics.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            checks.append(("evaluation metrics.json", False, [str(e)]))
        else:
            num = lambda d: {  # noqa: E731
                k: v for k, v in d.items() if isinstance(v, int | float) and not is_timing_key(k)
            }
            diff = [
                f"{k}: {num(ea).get(k)!r} vs {num(eb).get(k)!r}"
                for k in sorted(set(num(ea)) | set(num(eb)))
                if num(ea).get(k) != num(eb).get(k)
            ]
            checks.append((f"evaluation metrics.json: {len(num(ea))} numbers", not diff, diff))
    # Orbax replaces N.orbax-checkpoint-tmp when it saves step N again, so one left behind
    # is a save that the restarted run never redid: a lost checkpoint.
    leftovers = partial_checkpoints(killed)
    checks.append(
        (
            f"no unfinished checkpoint writes left behind ({len(leftovers)})",
            leftovers == partial_checkpoints(straight),
            leftovers,
        )
    )
    return checks, notes


def run(
    workdir,
    *,
    kills: int = 10,
    seed: int = 0,
    config: str = DEFAULT_CONFIG,
    sets=(),
    repo: pathlib.Path = REPO,
    python: str = sys.executable,
    overwrite: bool = False,
    verbose: bool = True,
) -> Report:
    """Run straight, then killed ``kills`` times and restarted; compare (see the module)."""
    workdir = pathlib.Path(workdir).expanduser().absolute()
    straight, killed, logs = workdir / "straight", workdir / "killed", workdir / "logs"
    for d in (straight, killed, logs):
        if d.exists():
            if not overwrite:
                raise FileExistsError(f"{d} exists: choose another --workdir or pass --overwrite")
            shutil.rmtree(d)
    logs.mkdir(parents=True)
    sets = [f"data.data_dir={workdir / 'data'}", *DEFAULT_SETS, *sets]
    env = subprocess_env(pathlib.Path(repo), workdir / "jax_cache")
    say = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    rng = random.Random(seed)

    say(f"straight run -> {straight}")
    log = logs / "straight.log"
    rc, seconds, _, _, watcher = run_watched(
        train_command(python, config, straight, sets), env, repo, straight, log, timeout_s=3600
    )
    if rc != 0:
        tail = "\n".join(_tail(log, 20))
        raise RuntimeError(f"the straight run exited {rc} (log {log}):\n{tail}")
    profile = Profile.from_straight_run(watcher.events, seconds)
    say(
        f"straight run: {seconds:.1f} s, steps {profile.train_steps[0]}..{profile.last_step}, "
        f"checkpoints {profile.ckpt_steps}, validations {profile.val_steps}; "
        + ", ".join(f"{k} {profile.seconds(k):.2f} s" for k in PHASES)
    )
    timeout = max(300.0, 5 * seconds)

    runs: list[Run] = []
    order: list[str] = []
    while True:
        index = len(runs)
        done_kills = sum(r.killed for r in runs)
        steps = checkpoint_steps(killed / "checkpoints")
        resume = steps[-1] if steps else 0
        choice = None
        if done_kills < kills:
            for _ in range(3 * len(PHASES)):
                if not order:
                    order = rng.sample(PHASES, len(PHASES))
                phase = order.pop()
                if phase == "startup" and index == 0:
                    continue  # not timed yet with a warm compilation cache
                ahead = sum(s > resume for s in profile.ckpt_steps)
                advance = rng.random() < ahead / max(kills - done_kills, 1)
                choice = choose_target(profile, resume, phase, rng, advance)
                if choice is not None:
                    break
        if choice is None and done_kills < kills:
            choice = choose_target(profile, resume, "startup", rng)
        target = f"{choice[0]}@{choice[1]}" if choice else ""
        log = logs / f"killed_{index:02d}.log"
        rc, seconds, was_killed, phase, watcher = run_watched(
            train_command(python, config, killed, sets),
            env,
            repo,
            killed,
            log,
            resume=resume,
            trigger=choice[2] if choice else None,
            delay_s=choice[3] if choice else 0.0,
            timeout_s=timeout,
            label=lambda w, resume=resume: phase_at_kill(w, profile, resume),
        )
        profile.observe(watcher.events, None if was_killed else seconds, resume)
        r = Run(index, resume, target, was_killed, rc, seconds, phase, watcher.events, log)
        runs.append(r)
        say(r.line())
        if was_killed:
            continue
        if rc != 0:
            detail = [f"exit status {rc} (log {log})", *_tail(log)]
            return Report(runs, [("restarted run finishes", False, detail)], [])
        if done_kills >= kills or index >= 3 * kills + 3:
            break
        # It finished before the kill came: rerun the finished run to spend the kills.

    checks = [
        (
            f"restarted run finishes: exit 0 after {sum(r.killed for r in runs)} kills",
            sum(r.killed for r in runs) >= kills,
            [],
        )
    ]
    more, notes = compare_workdirs(straight, killed)
    return Report(runs, checks + more, notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="straight/, killed/, logs/, data/ go here")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs before the run may finish")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill phases and delays")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:smoke]")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable), e.g. --set train.num_steps=18",
    )
    p.add_argument("--overwrite", action="store_true", help="replace earlier straight/killed")
    args = p.parse_args(argv)
    if args.kills < 0:
        print("error: --kills: expected >= 0", file=sys.stderr)
        return 2
    for s in args.set:
        if "=" not in s:
            print(f"error: --set {s!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        report = run(
            args.workdir,
            kills=args.kills,
            seed=args.seed,
            config=args.config,
            sets=args.set,
            overwrite=args.overwrite,
        )
    except (RuntimeError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text(runs=False))  # run() printed the runs as they went
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
