"""Input pipeline: TFDS data source -> grain -> globally sharded ``jax.Array`` batches.

Two ways to feed a model:

* **Stored views** (``make_dataset``): examples of a TFDS dataset built by
  ``data_pipelines.build`` (array_record, read with ``tfds.data_source``; no TensorFlow),
  shuffled per epoch, sharded per host, batched by grain. Per example a subset of the stored
  views is selected (the first ``num_views``, which the nested angle order makes well
  spread, or a random subset), and the DRRs get intensity jitter and noise. Geometric
  augmentation is not applied here: a flipped or deformed volume needs its views rendered
  again, which is what the second way does.
* **Rendered on the accelerator** (``render_batch``): a jitted function that takes a batch
  of CT volumes (HU) and a key, applies random flips and smooth elastic deformations to
  the volumes, picks random view angles, and renders DRRs with the differentiable
  projector (with Poisson noise), so a model can be trained for any view count and
  geometry.

The iterator of ``make_dataset(...).to_iter_dataset()`` has ``get_state`` /
``set_state``: saved beside a checkpoint, a resumed run sees exactly the data it would
have seen. ``xct.sharding.shard_batch`` turns each host's batch into globally sharded
arrays on a mesh.

Normalisation is defined once, in ``xct.physics`` (``normalize_ct``, ``normalize_drr``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def data_source(name: str, data_dir, split: str):
    """``tfds.data_source`` of a built dataset split (random access, no TensorFlow)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, data_dir=str(data_dir), split=split)
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for a missing dataset
        raise ValueError(
            f"dataset {name!r} split {split!r} not found in {data_dir}: build it with "
            f"`python -m data_pipelines.build --dataset={name} --data_dir={data_dir}` ({e})"
        ) from e


@dataclasses.dataclass(frozen=True)
class ExampleTransform:
    """Per-example preprocessing and augmentation (NumPy, runs in grain workers).

    Attributes:
      num_views: views handed to the model (at most the stored count).
      view_selection: ``"first"`` (nested order prefix) or ``"random"`` (a random subset,
        kept in stored order).
      intensity_jitter: DRRs are scaled by ``1 + U(-j, j)`` (train only).
      drr_noise_std: Gaussian noise added to normalised DRRs (train only).
      train: whether to augment.
    """

    num_views: int
    view_selection: str = "first"
    intensity_jitter: float = 0.0
    drr_noise_std: float = 0.0
    train: bool = False

    def __call__(self, ex: Mapping, rng: np.random.Generator | None = None) -> dict:
        from xct import physics

        drr = np.asarray(ex["drr"], np.float32)
        stored = drr.shape[0]
        if self.num_views > stored:
            raise ValueError(
                f"num_views: {self.num_views} views requested but the dataset stores {stored}"
            )
        if self.view_selection == "random" and rng is not None:
            idx = np.sort(rng.choice(stored, size=self.num_views, replace=False))
        elif self.view_selection in ("first", "random"):
            idx = np.arange(self.num_views)
        else:
            raise ValueError(
                f"view_selection: expected 'first' or 'random', got {self.view_selection!r}"
            )
        drr = np.asarray(physics.normalize_drr(drr[idx]), np.float32)
        if self.train and rng is not None:
            if self.intensity_jitter > 0:
                scale = 1.0 + rng.uniform(-self.intensity_jitter, self.intensity_jitter)
                drr = drr * np.float32(scale)
            if self.drr_noise_std > 0:
                drr = drr + rng.normal(0.0, self.drr_noise_std, drr.shape).astype(np.float32)
        out = {
            "drr": drr,
            "angles_deg": np.asarray(ex["angles_deg"], np.float32)[idx],
            "ct": np.asarray(physics.normalize_ct(np.asarray(ex["ct_hu"], np.float32)), np.float32),
            "sod_mm": np.float32(ex["sod_mm"]),
            "sdd_mm": np.float32(ex["sdd_mm"]),
            "pixel_mm": np.asarray(ex["pixel_mm"], np.float32),
            "spacing_mm": np.asarray(ex["spacing_mm"], np.float32),
        }
        if "labels" in ex:
            out["labels"] = np.asarray(ex["labels"], np.int32)
        return out


def make_dataset(
    source,
    *,
    batch_size: int,
    transform: ExampleTransform,
    seed: int,
    train: bool,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
):
    """A grain ``MapDataset`` of this host's part of each global batch (dicts of NumPy
    arrays with a leading batch axis of ``batch_size // shard_count``).

    Every host walks the same globally shuffled (and augmented) stream of examples and
    keeps every ``shard_count``-th one, starting at ``shard_index``; so global batch ``k``
    holds the same examples whatever the number of hosts (only their order within the batch
    differs), a multi-host run trains on the data of a single-host run, and hosts never
    read the same example for the same batch.

    Args:
      source: a random-access source (``data_source(...)``, or any sequence of examples).
      batch_size: global batch (all hosts together); divisible by ``shard_count``.
      transform: per-example preprocessing (``ExampleTransform``).
      seed: shuffling and augmentation seed; a resumed run with the same seed and the
        saved iterator state sees the same batches.
      train: shuffle (reshuffled every epoch), repeat ``num_epochs`` times (forever when
        ``None``), augment, and drop a last partial batch.
      shard_index, shard_count: this host's shard (default ``jax.process_index()`` of
        ``jax.process_count()``).
    """
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size % shard_count:
        raise ValueError(
            f"batch_size: the global batch {batch_size} is not divisible by {shard_count} hosts"
        )
    ds = grain.MapDataset.source(source)
    if len(ds) < (batch_size if train else 1):
        raise ValueError(f"dataset: {len(ds)} examples, fewer than batch_size={batch_size}")
    if train:
        ds = ds.seed(seed).shuffle().repeat(num_epochs)
        t = dataclasses.replace(transform, train=True)
        # Augmentation before the host split: an example's random draw depends on its
        # position in the global stream only.
        ds = ds.random_map(lambda ex, rng: t(ex, rng), seed=seed + 1)
    else:
        t = dataclasses.replace(transform, train=False)
        ds = ds.map(lambda ex: t(ex, None))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.batch(batch_size // shard_count, drop_remainder=train)


#: Reading ahead (grain.ReadOptions): threads reading examples and the number of batches
#: kept ready; grain's defaults, stated here so they are a choice, not an accident.
READ_OPTIONS = {"num_threads": 16, "prefetch_buffer_size": 500}


def iterate(ds, *, worker_count: int = 0):
    """An iterator over a ``make_dataset`` result; ``worker_count > 0`` decodes and
    augments in that many grain worker processes (the program must run under
    ``absl.app.run``, which grain's workers need). ``get_state``/``set_state`` work in both.

    Batches are read ahead in threads either way: ``to_iter_dataset`` prefetches with
    ``READ_OPTIONS`` (grain's ``PrefetchIterDataset``), so the training step does not wait
    on the array_record reads of the next batch.
    """
    import grain

    it_ds = ds.to_iter_dataset(grain.ReadOptions(**READ_OPTIONS))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


# ---------------------------------------------------------------------------------------
# On-accelerator augmentation and rendering.


def elastic_displacement(
    key: jax.Array, shape, *, max_mm: float, spacing_mm: float, coarse: int = 4
):
    """A smooth random displacement field ``[3, z, y, x]`` in voxels (max about ``max_mm``).

    Uniform noise on a ``coarse^3`` lattice, upsampled trilinearly to ``shape``.
    """
    coarse_field = jax.random.uniform(key, (3, coarse, coarse, coarse), minval=-1.0, maxval=1.0)
    field = jax.image.resize(coarse_field, (3, *shape), method="linear")
    return field * (max_mm / spacing_mm)


def warp(volume: jax.Array, displacement: jax.Array, fill: float) -> jax.Array:
    """Trilinear resampling of ``volume [z, y, x]`` at ``index + displacement``."""
    idx = jnp.stack(
        jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in volume.shape], indexing="ij")
    )
    coords = idx + displacement
    return jax.scipy.ndimage.map_coordinates(
        volume, list(coords), order=1, mode="constant", cval=fill
    )


def render_batch(
    key: jax.Array,
    ct_hu: jax.Array,
    acquisition,
    *,
    num_views: int,
    random_angles: bool = True,
    flip: bool = True,
    elastic_mm: float = 0.0,
    photons: float | None = None,
    strength: float | jax.Array = 1.0,
) -> dict:
    """Augment a batch of CTs and render its views on the accelerator (jit-friendly).

    Args:
      key: PRNG key (``fold_in`` the step for a resumable stream).
      ct_hu: ``[batch, z, y, x]`` HU on ``acquisition.grid()``.
      acquisition: the orbit, detector and cube (``xct.geometry.Acquisition``).
      num_views: views per example; angles are uniform over 180 degrees with a random
        offset when ``random_angles`` (else the nested fixed angles).
      flip: random left-right flips (x axis) of the volume.
      elastic_mm: amplitude of smooth random deformations (0 disables).
      photons: Poisson noise at this many photons per pixel (``None``: noiseless).
      strength: in [0, 1], scales the deformation amplitude and the noise (a curriculum
        from easy to hard examples; may be traced, so changing it does not recompile).

    Returns ``{"ct": normalised CT, "drr": normalised DRRs [batch, views, rows, cols],
    "angles_deg": [batch, views]}``.
    """
    from xct import physics, projector

    grid = acquisition.grid()
    if tuple(ct_hu.shape[1:]) != grid.shape:
        raise ValueError(f"ct_hu: expected [batch, *{grid.shape}], got {tuple(ct_hu.shape)}")

    def one(k, hu):
        k_flip, k_el, k_ang, k_noise = jax.random.split(k, 4)
        if flip:
            hu = jnp.where(jax.random.bernoulli(k_flip), hu[:, :, ::-1], hu)
        if elastic_mm > 0:
            disp = strength * elastic_displacement(
                k_el, hu.shape, max_mm=elastic_mm, spacing_mm=min(grid.spacing_mm)
            )
            hu = warp(hu, disp, fill=-1000.0)
        base = jnp.asarray(acquisition.view_angles(num_views))
        offset = jax.random.uniform(k_ang, (), maxval=180.0) if random_angles else 0.0
        angles = base + offset
        geom = acquisition.orbit(angles)
        mu = physics.hu_to_mu(hu)
        drr = projector.forward_project(mu, grid, geom)
        if photons is not None:
            drr = drr + strength * (physics.add_poisson_noise(k_noise, drr, photons) - drr)
        return {
            "ct": physics.normalize_ct(hu),
            "drr": physics.normalize_drr(drr),
            "angles_deg": angles,
        }

    keys = jax.random.split(key, ct_hu.shape[0])
    return jax.vmap(one)(keys, ct_hu)
