"""Native CPU kernels, C++ called through ``jax.ffi``: the Joseph projector (``joseph.cc``)
and the kernel gradient of 3D convolutions (``conv3d.cc``, used by :mod:`xct.models.conv`).

Private to :mod:`xct.projector`, which runs them for ``kernel="native"`` and picks them with
``kernel="auto"`` for float32 Joseph on CPU. They compute the operator of
``projector._joseph_samples`` (same planes, validity tests, floor, bilinear taps) in float32,
so they agree with the XLA version to float rounding and the adjoint is the exact transpose
of the forward projection (dot-product test). ``joseph.cc`` says what makes them fast.

Build: on first use the sources are compiled for this machine (``-O3 -march=native``, no
fast-math, plus ``$XCT_NATIVE_FLAGS``) with ``$XCT_CXX`` (else ``$CXX``, else ``g++``) into
``$XCT_CACHE_DIR`` (else ``$XDG_CACHE_HOME/xct/native``, else ``~/.cache/xct/native``) as
``xct-<key>.so``; the key hashes the sources, the flags, the compiler's version, jax's
version and the CPU, so a changed source or machine rebuilds, and concurrent builders (test
workers) each write a temporary file and rename it atomically. ``make`` prebuilds it
(``python -m xct._native build``). Without a compiler, or when the build fails,
:func:`available` is False (said once in a debug-level log) and ``"auto"`` keeps the XLA
version; it also keeps it where only the portable scalar code could be built (no AVX2:
:func:`preferred`).

Shapes (float32): ``volume [nz, ny, nx]`` on a ``geometry.VolumeGrid``, projections
``[V, rows, cols]`` of a ``geometry.Geometry``, whose rays the library computes as
``projector._rays`` does (from :func:`geometry_arrays`). Under ``jax.vmap`` every argument
gets the batch dimension and the library loops over it ("broadcast_all"), so volumes,
projections and geometries may all be batched.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_LOG = logging.getLogger(__name__)
_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "joseph.cc", _HERE / "conv3d.cc")  # compiled into one library
HEADERS = (_HERE / "parallel.h",)
# Tried in order: the machine's own instruction set (AVX-512 or AVX2 gathers where it has
# them), then portable code for compilers without -march=native. No -ffast-math: the
# results must stay within float rounding of the XLA version; -fno-math-errno and
# -fno-trapping-math change no result, they let the compiler vectorise the per-ray set-up.
_COMMON = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c++17")
FLAG_SETS = (
    (*_COMMON, "-march=native", "-fPIC", "-shared", "-pthread"),
    (*_COMMON, "-fPIC", "-shared", "-pthread"),
)
# The least SIMD width at which kernel="auto" prefers these kernels to XLA's (the portable
# scalar code, e.g. on CPUs without AVX2, is slower than XLA's gathers).
AUTO_MIN_SIMD_WIDTH = 8
_TARGETS = {
    "xct_joseph_forward": "XctJosephForward",
    "xct_joseph_adjoint": "XctJosephAdjoint",
    "xct_conv3d_weight_grad": "XctConv3dWeightGrad",
    "xct_conv3d_forward": "XctConv3dForward",
}
_registered: set[str] = set()
_register_lock = threading.Lock()


class BuildError(RuntimeError):
    """The native library could not be compiled or loaded."""


def compiler() -> str:
    """The C++ compiler used: ``$XCT_CXX``, else ``$CXX``, else ``g++``."""
    return os.environ.get("XCT_CXX") or os.environ.get("CXX") or "g++"


def cache_dir() -> pathlib.Path:
    """Where built libraries live: ``$XCT_CACHE_DIR``, else ``$XDG_CACHE_HOME/xct/native``,
    else ``~/.cache/xct/native``."""
    env = os.environ.get("XCT_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "xct" / "native"


def fits(grid_shape) -> bool:
    """Whether a ``[z, y, x]`` volume fits the kernels' int32 voxel offsets."""
    n = 1
    for s in grid_shape:
        n *= int(s)
    return n < 2**31


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep))) or f"{platform.machine()} {platform.processor()}"


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise BuildError(f"{cxx} --version failed: {out.stderr.strip()[:200]}")
    return out.stdout.strip()


def _library_path(cxx: str, flags, directory: pathlib.Path) -> pathlib.Path:
    h = hashlib.sha256()
    for part in (
        *(f.read_bytes() for f in (*SOURCES, *HEADERS)),
        " ".join(flags).encode(),
        _compiler_version(cxx).encode(),
        jax.__version__.encode(),
        jaxlib.__version__.encode(),
        _cpu_id().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return directory / f"xct-{h.hexdigest()[:16]}.so"


def _compile(cxx: str, flags, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            errors = [ln for ln in out.stderr.splitlines() if "error" in ln][:3]
            raise BuildError(f"{' '.join(cmd)} failed: {' | '.join(errors) or out.stderr[-300:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never see a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def extra_flags() -> tuple[str, ...]:
    """``$XCT_NATIVE_FLAGS``, appended to the compiler flags (e.g. ``-mno-avx512f`` for the
    AVX2 code on an AVX-512 machine)."""
    return tuple(os.environ.get("XCT_NATIVE_FLAGS", "").split())


def build(cxx: str | None = None, directory: pathlib.Path | None = None) -> pathlib.Path:
    """Compile (or find in the cache) the library; returns its path.

    Raises:
      BuildError: no compiler, or every flag set failed to compile.
    """
    cxx = cxx or compiler()
    directory = pathlib.Path(directory) if directory is not None else cache_dir()
    if shutil.which(cxx) is None:
        raise BuildError(f"C++ compiler {cxx!r} not found (set XCT_CXX or CXX)")
    errors = []
    for flags in FLAG_SETS:
        flags = (*flags, *extra_flags())
        try:
            path = _library_path(cxx, flags, directory)
            if not path.exists():
                _compile(cxx, flags, path)
            return path
        except (BuildError, OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    raise BuildError("; ".join(errors))


@functools.cache
def _load(cxx: str, directory: str, flags: tuple[str, ...]):
    """The loaded library for this compiler, cache directory and extra flags (``build``
    reads them), or None (logged once)."""
    try:
        path = build(cxx, pathlib.Path(directory))
        lib = ctypes.CDLL(str(path))
        lib.XctJosephSimdWidth.restype = ctypes.c_int
        with _register_lock:  # once per process, whichever library loads first
            for name, symbol in _TARGETS.items():
                if name not in _registered:
                    capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
                    _registered.add(name)
        return lib
    except Exception as e:  # noqa: BLE001 - any failure means "use the XLA version"
        _LOG.debug("xct native projector kernels unavailable: %s", e)
        return None


def available() -> bool:
    """Whether the native kernels are built (building them now if needed) and registered."""
    return _load(compiler(), str(cache_dir()), extra_flags()) is not None


def preferred() -> bool:
    """Whether ``kernel="auto"`` should use them: available, with SIMD gathers (AVX2 or
    AVX-512; the portable scalar build is slower than XLA's version)."""
    return available() and simd_width() >= AUTO_MIN_SIMD_WIDTH


def simd_width() -> int:
    """Lanes of the compiled kernels (16: AVX-512, 8: AVX2, 1: portable code); 0 if absent."""
    lib = _load(compiler(), str(cache_dir()), extra_flags())
    return 0 if lib is None else int(lib.XctJosephSimdWidth())


def geometry_arrays(geom, grid) -> tuple[jax.Array, jax.Array]:
    """``(views [V, 12], frame [12])`` float32: per view the source, detector centre and
    column / row steps (world mm), and the grid's world -> index matrix (row-major) and
    origin, as ``projector._rays`` uses them."""
    f32 = jnp.float32
    views = jnp.concatenate(
        [
            geom.source_xyz_mm.astype(f32),
            geom.det_center_xyz_mm.astype(f32),
            geom.det_u_xyz_mm.astype(f32),
            geom.det_v_xyz_mm.astype(f32),
        ],
        axis=-1,
    )
    m, origin = grid.world_to_index()
    frame = jnp.concatenate([jnp.asarray(m, f32).reshape(-1), jnp.asarray(origin, f32)])
    return views, frame


def forward(volume: jax.Array, geom, grid) -> jax.Array:
    """Joseph line integrals ``[V, rows, cols]`` of ``volume [nz, ny, nx]`` (float32) for
    a ``geometry.Geometry`` and ``geometry.VolumeGrid``."""
    views, frame = geometry_arrays(geom, grid)
    call = jax.ffi.ffi_call(
        "xct_joseph_forward",
        jax.ShapeDtypeStruct((geom.num_views, *geom.det_shape), jnp.float32),
        vmap_method="broadcast_all",
    )
    return call(volume.astype(jnp.float32), views, frame, parallel=_parallel(geom))


def adjoint(drr: jax.Array, geom, grid) -> jax.Array:
    """The exact transpose of :func:`forward`: ``[V, rows, cols]`` -> ``[nz, ny, nx]``."""
    views, frame = geometry_arrays(geom, grid)
    call = jax.ffi.ffi_call(
        "xct_joseph_adjoint",
        jax.ShapeDtypeStruct(tuple(grid.shape), jnp.float32),
        vmap_method="broadcast_all",
    )
    return call(drr.astype(jnp.float32), views, frame, parallel=_parallel(geom))


def conv3d_weight_grad(x_padded: jax.Array, dy: jax.Array, kernel_shape, strides) -> jax.Array:
    """The kernel gradient ``[KD, KH, KW, Ci, Co]`` of a channels-last 3D convolution
    (float32): ``x_padded [N, Dp, Hp, Wp, Ci]`` is its input with the convolution's padding
    applied, ``dy [N, D, H, W, Co]`` the gradient of its output, ``strides`` its three
    window strides; ``kernel_shape`` is ``(KD, KH, KW)``."""
    ci, co = x_padded.shape[-1], dy.shape[-1]
    call = jax.ffi.ffi_call(
        "xct_conv3d_weight_grad",
        jax.ShapeDtypeStruct((*map(int, kernel_shape), ci, co), jnp.float32),
        vmap_method="sequential",
    )
    sd, sh, sw = (np.int32(s) for s in strides)
    return call(
        x_padded.astype(jnp.float32), dy.astype(jnp.float32), stride_d=sd, stride_h=sh, stride_w=sw
    )


def conv3d(x_padded: jax.Array, kernel: jax.Array, strides) -> jax.Array:
    """A channels-last 3D convolution (float32, cross-correlation as ``lax.conv``):
    ``x_padded [N, Dp, Hp, Wp, Ci]`` already padded, ``kernel [KD, KH, KW, Ci, Co]`` with
    ``Co`` a multiple of 8, three window ``strides``; returns ``[N, D, H, W, Co]``."""
    kd, kh, kw, _, co = kernel.shape
    sd, sh, sw = (int(s) for s in strides)
    n, dp, hp, wp, _ = x_padded.shape
    shape = (n, (dp - kd) // sd + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1, co)
    call = jax.ffi.ffi_call(
        "xct_conv3d_forward", jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential"
    )
    return call(
        x_padded.astype(jnp.float32),
        kernel.astype(jnp.float32),
        stride_d=np.int32(sd),
        stride_h=np.int32(sh),
        stride_w=np.int32(sw),
    )


def _parallel(geom) -> np.int32:
    return np.int32(geom.kind == "parallel")


def main(argv=None) -> int:
    """``python -m xct._native build``: compile the library now (make does, after install)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m xct._native build", file=sys.stderr)
        return 2
    try:
        path = build()
    except BuildError as e:
        print(f"xct._native: {e}", file=sys.stderr)
        return 1
    if not available():
        print(f"xct._native: built {path} but could not load it", file=sys.stderr)
        return 1
    print(f"xct._native: {path} (SIMD width {simd_width()})")
    return 0
