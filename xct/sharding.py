"""Device mesh and sharding rules (``jax.jit`` with ``NamedSharding``; no pmap).

The mesh has a ``data`` axis (batch split across devices) and a ``spatial`` axis (volumes
split along z across devices). Arrays name their axes logically (``batch``, ``z``) and
Flax logical axis rules (``config.logical_axis_rules``, default ``DEFAULT_RULES``: batch
-> data, z -> spatial) map the names onto the mesh. Parameters and optimiser state are
replicated; batches are split along their leading axis (``batch``), and volume fields
(``VOLUME_KEYS``: the CT and its labels, ``[B, z, y, x]``) also along ``z``. Inside the
models, 3D activations carry the same logical axes (``xct.models.layers.constrain``,
active within ``activation_context(mesh, rules)``), so a ``spatial`` of 2 or 4 roughly
halves or quarters the activation memory per device; XLA inserts the halo exchanges.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "spatial")
#: Logical array axes -> mesh axes (the config's ``logical_axis_rules`` by default).
DEFAULT_RULES = (("batch", "data"), ("z", "spatial"))
Rules = Sequence[tuple[str, str | None]]


def check_rules(rules: Rules) -> tuple[tuple[str, str | None], ...]:
    """``rules`` as a tuple of ``(logical, mesh axis)`` pairs; unknown mesh axes raise."""
    out = []
    for item in rules:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(
                f"logical_axis_rules: expected (logical name, mesh axis) pairs, got {item!r}"
            )
        if item[1] is not None and item[1] not in AXES:
            raise ValueError(
                f"logical_axis_rules: {item[0]!r} -> {item[1]!r}: unknown mesh axis, "
                f"expected one of {AXES} or None"
            )
        out.append((str(item[0]), item[1]))
    return tuple(out)


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context, jitted code traced sees ``mesh`` and the logical axis ``rules``:
    the models' ``constrain`` shards activations, and the lifting runs as z-slabs."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(check_rules(rules)):
        yield


def logical_spec(axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of an array whose axes have the logical names ``axes``."""
    return nn.logical_to_mesh_axes(tuple(axes), check_rules(rules))


def maybe_initialize_distributed(enabled: bool | None = None) -> None:
    """``jax.distributed.initialize()`` when asked (config) or when the environment sets
    ``JAX_COORDINATOR_ADDRESS``: one process per host (or per GPU).

    Environment (read here, so any launcher works): ``JAX_COORDINATOR_ADDRESS`` (host:port
    of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; without the last two JAX
    detects them on clusters it knows (SLURM, Open MPI, TPU pods, ...). On CPU the
    collectives between processes use gloo.
    """
    if enabled is None:
        enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not enabled or jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


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


VOLUME_KEYS = ("ct", "labels")  # batch fields laid out [B, z, y, x]: split z over spatial


def batch_sharding(
    mesh: Mesh, ndim: int, volume: bool = False, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """Leading axis named ``batch``; with ``volume``, the next named ``z``; the rest
    replicated (mapped onto ``mesh`` by ``rules``)."""
    names = ["batch", *(["z" if volume else None] + [None] * (ndim - 2) if ndim > 1 else [])]
    return NamedSharding(mesh, logical_spec(names[:ndim] if ndim else [], rules))


def batch_shardings(mesh: Mesh, batch: Mapping, rules: Rules = DEFAULT_RULES) -> dict:
    """The sharding of each field of a batch (volume fields also split along ``z``)."""
    return {
        k: batch_sharding(mesh, np.ndim(v), volume=k in VOLUME_KEYS, rules=rules)
        for k, v in batch.items()
    }


def batch_axis_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways a batch is split: the size of the mesh axis ``batch`` maps to."""
    (axis,) = logical_spec(["batch"], rules) or (None,)
    return int(mesh.shape[axis]) if isinstance(axis, str) else 1


def shard_batch(batch: Mapping, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Host NumPy batch -> globally sharded arrays (works single- and multi-host)."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    shardings = batch_shardings(mesh, batch, rules)
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Wait until every process gets here (a no-op with one process). Uses the distributed
    runtime's coordination service, not a device collective: call it after compiling and
    before the first collective, whose CPU (gloo) set-up waits only 30 s for the others."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def process_rows(batch: Mapping) -> dict:
    """This process's rows of a global host batch (all of it in a single-process run)."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return dict(batch)
    out = {}
    for k, v in batch.items():
        if len(v) % n:
            raise ValueError(f"batch field {k!r}: {len(v)} rows do not split over {n} processes")
        per = len(v) // n
        out[k] = v[p * per : (p + 1) * per]
    return out


def fetch(tree):
    """Device arrays -> host NumPy, whole (gathered from every process when sharded
    across several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(
            x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
        ),
        tree,
    )
