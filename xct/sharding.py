"""Device mesh and sharding rules (``jax.jit`` with ``NamedSharding``; no pmap).

The mesh has a ``data`` axis (batch split across devices) and a ``spatial`` axis (kept at
1 here; the scaling issue splits volumes along z over it). Parameters and optimiser state
are replicated; batches are split along their leading axis over ``data``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "spatial")


def maybe_initialize_distributed(enabled: bool | None = None) -> None:
    """``jax.distributed.initialize()`` when asked (config) or when the environment sets
    ``JAX_COORDINATOR_ADDRESS`` (one process per host; see the scaling docs)."""
    if enabled is None:
        enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over ``devices`` (default all) with axes ``data`` and ``spatial``.

    ``axis_sizes`` maps axis name to size; one size may be ``-1`` (all remaining devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axis_sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}, expected {AXES}")
    sizes = [int(axis_sizes.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes, strict=True))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not split into {dict(axis_sizes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in [int(axis_sizes.get(a, 1)) for a in AXES] and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]  # an explicit smaller mesh uses the first devices
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: axis sizes {dict(zip(AXES, sizes, strict=True))} need {math.prod(sizes)} "
            f"devices, {len(devices)} available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def shard_batch(batch: Mapping, mesh: Mesh) -> dict:
    """Host NumPy batch -> globally sharded arrays (works single- and multi-host)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out
