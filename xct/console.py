"""What a terminal shows: progress, results and real errors, not library noise.

``quiet()`` turns off, for this process and the subprocesses it starts: XLA's C++ log
lines (the "Very slow compile?" ``slow_operation_alarm`` banners that read as crashes),
absl/Python INFO lines of JAX, TFDS and Orbax ("Unable to initialize backend 'tpu'"), and
TFDS's own progress bars (xct shows its own). Call it before JAX is imported: XLA reads
its log level once. ``XCT_VERBOSE=1`` (or ``--verbosity`` on a command line) keeps
everything.

``enable_compilation_cache()`` keeps compiled XLA programs on disk (default
``$XDG_CACHE_HOME/xct/jax``, i.e. ``~/.cache/xct/jax``; ``XCT_COMPILATION_CACHE_DIR``
overrides it and ``XCT_COMPILATION_CACHE=0`` turns it off), so a repeated or resumed run
starts stepping in seconds instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import pathlib

VERBOSE_ENV = "XCT_VERBOSE"
NOISY_LOGGERS = ("jax", "jax._src.xla_bridge", "tensorflow_datasets", "orbax", "absl", "grain")


def verbose(argv: list[str] | None = None) -> bool:
    """Whether library logs were asked for (``XCT_VERBOSE=1`` or a ``--verbosity`` flag)."""
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return True
    return any(a.startswith(("--verbosity", "-v=")) for a in (argv or []))


def quiet(argv: list[str] | None = None) -> bool:
    """Silence library noise unless ``verbose(argv)``; returns whether it did."""
    if verbose(argv):
        return False
    # XLA / TSL C++ logging: FATAL only (the env var is inherited by subprocesses).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ[VERBOSE_ENV] = "0"
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
        absl_logging.set_stderrthreshold("error")
    except ImportError:  # pragma: no cover - absl comes with jax
        pass
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def quiet_tfds() -> None:
    """TFDS's progress bars and banners off (xct prints its own progress), unless verbose."""
    if verbose():
        return
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("tensorflow_datasets").setLevel(logging.ERROR)


def stdout_unless_verbose():
    """A context that drops what libraries print to stdout (not stderr, where progress
    bars go), unless verbose."""
    import contextlib
    import io

    if verbose():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(io.StringIO())


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "xct" / "jax"


def enable_compilation_cache(path=None, *, enabled: bool | None = None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default: the environment's
    ``XCT_COMPILATION_CACHE_DIR``, else ``default_cache_dir()``); returns the folder, or
    None when it is off (``enabled=False`` or ``XCT_COMPILATION_CACHE=0``)."""
    import jax

    if enabled is None:
        enabled = os.environ.get("XCT_COMPILATION_CACHE", "1") not in ("0", "false", "no")
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = pathlib.Path(
        path or os.environ.get("XCT_COMPILATION_CACHE_DIR") or default_cache_dir()
    ).expanduser()
    if jax.config.jax_compilation_cache_dir and not path:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)  # set by the environment
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Programs that compile in under a second are not worth a disk read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
