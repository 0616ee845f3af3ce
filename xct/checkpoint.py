"""Thin Orbax wrapper: the last N checkpoints, the best by validation PSNR, data state beside;
restores that are checked, and a lock that keeps a second run out of a workdir.

Two managers under the workdir: ``checkpoints/`` keeps the last ``keep`` saves (asynchronous)
and ``best/`` keeps the single best by ``metrics["val_psnr"]``. Each save holds the train
state (a pytree) and, beside it, the data iterator's state (JSON), so a resumed run sees
exactly the data it would have seen. The JSON also holds a CRC-32 of every array, so a
restore notices an array file changed after it was written (Orbax's array files carry no
checksum: a flipped byte restores silently).

A restore checks what it reads: Orbax's own errors (a truncated or missing file), the stored
shapes and dtypes against the abstract state (Orbax's item metadata, read before any array),
the checksums, and that every value is finite. A damaged step is named in one line and, when
resuming, moved to ``WORKDIR/damaged/`` so that the run goes on from the newest intact step
and later saves of that step number do not collide with it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import re
import socket
import sys
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from xct import console

_CRC_KEY = "_xct_crc32"  # beside the data state in each save's JSON item
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DamagedCheckpoint(OSError):
    """A saved step that cannot be restored as it was written (the message says why). An
    ``OSError`` (as ``gzip.BadGzipFile``): a damaged file, not a value that does not fit,
    which is the ``ValueError`` of a checkpoint of another config."""


class DiskFull(OSError):
    """A checkpoint write failed for lack of space (or a file-size limit)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]"
        return str(self.strerror)


class WorkdirBusy(ValueError):
    """Another live run holds the workdir's lock."""


class _OrbaxWriteErrors(logging.Filter):
    """Drops Orbax's ERROR records (tracebacks of its background save threads, and
    asyncio's "Task exception was never retrieved" for its abandoned writes) unless library
    logs were asked for (``console.verbose``): every failed save reaches the caller as an
    exception, which ``Checkpointer`` turns into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}"
        if console.verbose():
            return True
        if record.name == "asyncio":
            return orbax not in record.getMessage()
        return orbax not in record.pathname


def _quiet_orbax_errors() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxWriteErrors) for f in logger.filters):
            logger.addFilter(_OrbaxWriteErrors())
    if not getattr(sys.unraisablehook, "_xct", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


def _unraisable_hook(previous):
    """After a failed save or restore, Orbax's other reads and writes end where nothing can
    raise: TensorStore completes writes into the save's already closed event loop
    (``RuntimeError: Event loop is closed``, hundreds of tracebacks) and Orbax's abandoned
    read coroutines raise as they are closed. Those alone are dropped unless verbose: the
    failure itself reaches the caller as one exception."""

    def hook(unraisable):
        e, obj = unraisable.exc_value, unraisable.object
        late_write = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        code = getattr(obj, "cr_code", None)
        orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if console.verbose() or not (late_write or orbax_read):
            previous(unraisable)

    hook._xct = True
    return hook


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


class Checkpointer:
    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True):
        _quiet_orbax_errors()
        self.root = pathlib.Path(workdir).absolute()
        self.last = ocp.CheckpointManager(
            self.root / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save
            ),
            item_handlers=_handlers(),
        )
        self.best = ocp.CheckpointManager(
            self.root / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: float(m["val_psnr"]),
                best_mode="max",
                keep_checkpoints_without_metrics=False,
                enable_async_checkpointing=async_save,
            ),
            item_handlers=_handlers(),
        )
        self._writing: int | None = None  # the step whose asynchronous write may be pending

    @staticmethod
    def _args(state, data_state):
        data = {**(data_state or {}), _CRC_KEY: _checksums(state)}
        return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))

    def save(
        self, step: int, state, data_state: dict | None = None, *, force: bool = False
    ) -> None:
        """Save ``state`` as ``step`` (asynchronously); ``DiskFull`` when the disk is full."""
        with self._writes(step):
            # The best checkpoint of this step (validated first) must be committed before
            # checkpoints/ says the step is done: a run resumed from it does not validate
            # this step again, so a kill in between would lose it.
            self.best.wait_until_finished()
            self.last.save(step, args=self._args(state, data_state), force=force)

    def save_best(self, step: int, state, metrics: dict, data_state: dict | None = None) -> None:
        """Offer ``state`` as the best; a step already saved (a resumed run validating the
        same step again, with the same result) is kept as it is."""
        if step in self.best.all_steps():
            return
        with self._writes(step):
            self.best.save(
                step,
                args=self._args(state, data_state),
                metrics={k: float(v) for k, v in metrics.items()},
            )

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def restore(
        self,
        abstract_state,
        step: int | None = None,
        *,
        which: str = "last",
        set_aside: bool = False,
    ) -> tuple[Any, dict, int] | None:
        """``(state, data_state, step)`` of ``step`` (default: latest / best), or ``None``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings), e.g.
        from ``jax.eval_shape``; the restored arrays take those shardings. A damaged step
        named by ``step`` raises ``DamagedCheckpoint``; otherwise a damaged step is named in
        one line and the next one tried (newest first; for ``which="best"`` best first, and
        ``None`` when none is intact); ``set_aside`` moves it to ``WORKDIR/damaged/``.
        A checkpoint of other shapes than ``abstract_state`` raises ``ValueError``.
        """
        mgr = self.last if which == "last" else self.best
        if step is not None:
            try:
                return _restore_step(mgr, int(step), abstract_state)
            except DamagedCheckpoint as e:
                raise DamagedCheckpoint(
                    f"checkpoint step {step} in {mgr.directory} is damaged ({e})"
                ) from e
        candidates = list(reversed(mgr.all_steps()))
        if which != "last" and mgr.best_step() is not None:
            candidates.remove(mgr.best_step())
            candidates.insert(0, mgr.best_step())
        damaged = []
        for i, s in enumerate(candidates):
            try:
                return _restore_step(mgr, s, abstract_state)
            except DamagedCheckpoint as e:
                damaged.append(s)
                moved = self._set_aside(mgr, s) if set_aside else None
                then = f"trying step {candidates[i + 1]}" if i + 1 < len(candidates) else ""
                _say(
                    f"warning: checkpoint step {s} in {mgr.directory} is damaged ({e})"
                    + (f"; moved to {moved}" if moved else "")
                    + (f"; {then}" if then else "")
                )
        if damaged and which == "last":
            raise DamagedCheckpoint(
                f"no intact checkpoint in {mgr.directory}: steps {damaged} are damaged"
                + ("; they were moved aside, so a rerun starts afresh" if set_aside else "")
            )
        return None

    def _set_aside(self, mgr, step: int) -> pathlib.Path | None:
        """Move the damaged ``step`` of ``mgr`` to ``WORKDIR/damaged/`` (process 0)."""
        src = pathlib.Path(mgr.directory) / str(step)
        dest = self.root / "damaged" / f"{src.parent.name}_{step}"
        k = 1
        while dest.exists():
            k += 1
            dest = self.root / "damaged" / f"{src.parent.name}_{step}.{k}"
        if jax.process_index() == 0 and src.is_dir():
            dest.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        if jax.process_count() > 1:
            from xct import sharding

            sharding.barrier(f"xct: damaged step {step} set aside")
        mgr.reload()
        return dest

    def wait(self) -> None:
        with self._writes(None):
            self.last.wait_until_finished()
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()

    @contextlib.contextmanager
    def _writes(self, step: int | None):
        """Turns a write error for lack of space (raised now, or by the pending asynchronous
        write) into one ``DiskFull`` line naming the step and the last committed one."""
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            self.last.reload()
            committed, pending = self.last.latest_step(), self._writing
            failed = pending if pending is not None and committed != pending else step
            raise DiskFull(
                errno.ENOSPC,
                f"disk full: writing checkpoint step {failed} in {self.root} failed "
                f"({_disk_full_reason(e)}); the last committed checkpoint, step {committed}, "
                "is intact: free some space and run again to resume from it",
            ) from e
        self._writing = step


def _is_disk_full(error: BaseException) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        text = str(e)
        if any(f"os_error_code='{n}'" in text for n in _DISK_FULL) or any(
            os.strerror(n) in text for n in _DISK_FULL
        ):
            return True
    return False


def _disk_full_reason(error: BaseException) -> str:
    """``No space left on device`` / ``File too large`` / ``Disk quota exceeded``."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return os.strerror(e.errno)
        for n in _DISK_FULL:
            if f"os_error_code='{n}'" in str(e) or os.strerror(n) in str(e):
                return os.strerror(n)
    return _reason(error)


def _chain(error: BaseException):
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        yield error
        error = error.__cause__ or error.__context__


def _reason(error: BaseException) -> str:
    """The innermost cause's first line, without TensorStore's long specs and paths."""
    last = list(_chain(error))[-1]
    text = (str(last).strip().splitlines() or [type(last).__name__])[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = re.sub(r" \[tensorstore_spec=.*", "", text)
    return text[:200]


def _checksums(state) -> list[int | None]:
    """CRC-32 of each array's bytes, in ``jax.tree.leaves`` order (``None``: an array no
    host holds whole)."""
    return [_crc(x) for x in _host_copies([x for x in jax.tree.leaves(state) if _is_array(x)])]


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _host_copies(leaves: list) -> list:
    """NumPy copies; of a replicated array of a multi-host run, this host's replica; of an
    array split over hosts, ``None``."""
    out = []
    for x in leaves:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            out.append(np.asarray(jax.device_get(x)))
        elif x.sharding.is_fully_replicated:
            out.append(np.asarray(x.addressable_data(0)))
        else:
            out.append(None)
    return out


def _crc(x) -> int | None:
    return None if x is None else zlib.crc32(np.ascontiguousarray(x).tobytes())


def _path_key(path) -> tuple[str, ...]:
    """A tree path as strings, the same for a state and for Orbax's metadata of it."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        _path_key(p): (tuple(x.shape), str(np.dtype(x.dtype)))
        for p, x in flat
        if hasattr(x, "shape")
    }


def _check_metadata(mgr, step: int, abstract_state) -> None:
    """Compare the stored shapes and dtypes (Orbax's metadata; no array is read) with
    ``abstract_state``'s: ``ValueError`` naming the first that differs."""
    try:
        meta = mgr.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is damage
        raise DamagedCheckpoint(f"its metadata cannot be read: {_reason(e)}") from e
    if meta is None:
        raise DamagedCheckpoint("its array metadata is missing")
    stored = _shapes(getattr(meta, "tree", meta))
    wanted = _shapes(abstract_state)
    if stored == wanted:
        return
    where = f"checkpoint step {step} in {mgr.directory}"
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if a != b:
            name = "/".join(key)
            raise ValueError(
                f"{where} does not fit this config: {name} is "
                f"{'absent' if a is None else f'{a[1]}{list(a[0])}'} there, "
                f"{'absent' if b is None else f'{b[1]}{list(b[0])}'} here"
            )


def _restore_step(mgr, step: int, abstract_state) -> tuple[Any, dict, int]:
    """Restore and check one step; ``DamagedCheckpoint`` says what is wrong with it."""
    _check_metadata(mgr, step, abstract_state)
    try:
        out = mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise DamagedCheckpoint(_reason(e)) from e
    state, data = out["state"], dict(out["data"] or {})
    stored_crc = data.pop(_CRC_KEY, None)
    paths = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if _is_array(x)]
    leaves = _host_copies([x for _, x in paths])
    names = ["/".join(_path_key(p)) for p, _ in paths]
    for name, x in zip(names, leaves, strict=True):
        if x is not None and np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            raise DamagedCheckpoint(f"{name} holds NaN or inf")
    if stored_crc is not None:
        crc = [_crc(x) for x in leaves]
        pairs = zip(names, crc, stored_crc, strict=False)
        bad = [n for n, a, b in pairs if a is not None and b is not None and a != b]
        if bad or len(crc) != len(stored_crc):
            raise DamagedCheckpoint(
                f"{bad[0] if bad else 'the state'} differs from what was written (checksum)"
            )
    return state, data, int(step)


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


# ---------------------------------------------------------------------------------------
# One run per workdir.


class WorkdirLock:
    """``WORKDIR/run.lock``: an exclusive ``flock`` held while a run lives, and the holder's
    host, PID and start time written in it for the refusal message.

    The kernel drops a ``flock`` when its process dies (even by SIGKILL), so a lock file
    left behind by a dead run is free and is taken over with a one-line note; a live run's
    lock is refused with ``WorkdirBusy``. Where ``flock`` is not supported, a lock whose
    PID is gone from this host counts as stale.
    """

    def __init__(self, workdir):
        self.path = pathlib.Path(workdir).absolute() / "run.lock"
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        import fcntl

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkdirBusy(self._busy(holder)) from None
            except OSError:  # no flock on this filesystem: judge by the PID
                locked = False
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break  # not a file that its holder removed while we opened it
            os.close(fd)
        else:
            raise WorkdirBusy(f"--workdir: could not take {self.path}")
        holder = _read_holder(fd)
        if holder and not locked and _alive(holder):
            os.close(fd)
            raise WorkdirBusy(self._busy(holder))
        if holder:
            _say(
                f"note: taking over the lock of a run that is gone (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')})"
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "pid_start": _pid_start(os.getpid()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _busy(self, holder: dict | None) -> str:
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            if holder
            else "a run that has not written its name yet"
        )
        return (
            f"--workdir: {self.path.parent} is in use by another run ({who}; lock "
            f"{self.path}): wait for it to finish or use another --workdir"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiting opener then retries
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's holder may still run: on another host, assume so."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0) or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = holder.get("pid_start")
    return started is None or _pid_start(pid) in (None, started)
