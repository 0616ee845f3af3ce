"""Data sources for training and the examples evaluation scores.

A training data source is a small object made once from ``config.data`` by the
Experiment (a section of it is its constructor's keyword arguments: ``config.data.tfds``
or ``config.data.render``), with the same interface whatever the data comes from:

* ``prepare()`` on the host before anything is compiled (build a missing synthetic
  dataset, check a stored one against what the config asks for);
* ``open(mesh, rules, state, start_step)`` -> a ``Stream`` whose ``batch(step)`` gives the
  globally sharded batch of that step and whose ``state()`` is what a checkpoint keeps
  beside the parameters (a resumed run sees exactly the batches it would have seen);
* ``examples(split, num_views)`` -> the ``Example``s of a split for the evaluator (None
  when the source has no such split).

``TfdsSource`` reads a stored TFDS dataset with grain; ``RenderSource`` keeps a pool of
phantoms on the device and renders each step's batch there (``input_pipeline.
render_batch``), its stream a pure function of the step. Evaluation examples of a folder
of real CTs come from ``ct_dir_examples`` (read and preprocessed exactly as the
``ct_folder`` dataset builder does).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from xct import geometry, input_pipeline, io, physics, rng, sharding

#: Views every dataset builder stores (names end in ``_views8``), in nested order; a model
#: trained on ``k <= 8`` of them saw their first ``k`` angles.
DATASET_VIEWS = 8


@dataclasses.dataclass
class Example:
    """One volume to reconstruct, in the projector frame the model works in."""

    id: str
    drr: np.ndarray  # [V, r, r] normalize_drr units
    angles_deg: np.ndarray  # [V]
    ct: np.ndarray  # [r, r, r] normalize_ct units
    grid: geometry.VolumeGrid  # the patient (LPS) grid its NIfTI outputs are written on
    source: str


class Stream(Protocol):
    def batch(self, step: int) -> dict: ...

    def state(self) -> dict: ...


class DataSource(Protocol):
    """What the training loop and the evaluator need from a data source."""

    has_validation: bool
    source: str  # its name in config.data.source

    def prepare(self) -> None: ...

    def open(self, mesh, rules, state: dict | None, start_step: int) -> Stream: ...

    def examples(self, split: str, num_views: int) -> Iterator[Example] | None: ...


# ---------------------------------------------------------------------------------------
# Stored TFDS datasets


def _stored_info(path: pathlib.Path) -> dict | None:
    """``{"splits": {name: count}, "shapes": {feature: shape}}`` of a built dataset."""
    # Version folders only: TFDS writes into ``incomplete.*`` and renames it when complete,
    # and a build killed after writing its dataset_info.json leaves one behind.
    infos = sorted(path.glob("[0-9]*/dataset_info.json"))
    if not infos:
        return None
    info = json.loads(infos[-1].read_text())
    splits = {
        s["name"]: int(sum(int(n) for n in s.get("shardLengths", [])) or s.get("numExamples", 0))
        for s in info.get("splits", [])
    }
    return {"splits": splits, "dir": infos[-1].parent}


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A dataset built by ``data_pipelines.build`` (``config.data.source = "tfds"``):
    ``TfdsSource(**config.data.tfds, acquisition=..., batch_size=..., num_views=...,
    seed=..., labels=...)``; the fields' defaults and meanings are in ``configs/default.py``."""

    dataset: str  # NAME/CONFIG, e.g. synthetic_chest/res64_views8
    data_dir: str
    acquisition: geometry.Acquisition
    batch_size: int
    num_views: int
    seed: int
    view_selection: str
    intensity_jitter: float
    drr_noise_std: float
    worker_count: int
    split_sizes: Any  # ((split, count), ...) asked of an auto-built synthetic set (or a mapping)
    labels: bool = False  # hand the organ labels to the step (a segmentation head)
    has_validation: bool = True
    source: ClassVar[str] = "tfds"  # its config.data.source

    def __post_init__(self):
        sizes = self.split_sizes or ()
        sizes = dict(sizes).items() if hasattr(sizes, "items") else sizes
        object.__setattr__(self, "split_sizes", tuple(sorted((str(k), int(v)) for k, v in sizes)))

    @property
    def root(self) -> pathlib.Path:
        return pathlib.Path(self.data_dir).expanduser().absolute()

    @property
    def path(self) -> pathlib.Path:
        return self.root / self.dataset

    def prepare(self) -> None:
        """Build a missing synthetic dataset (in a subprocess: xct does not import
        data_pipelines); check a stored one against the config; anything else missing is
        a clear error."""
        info = _stored_info(self.path)
        if info is None:
            self._build()
            info = _stored_info(self.path)
        self._check(info)

    def _build(self) -> None:
        data_dir = self.root
        if not self.dataset.startswith("synthetic_chest/"):
            raise ValueError(
                f"config.data.tfds.dataset: {self.dataset!r} not found in {data_dir}; build "
                f"it with python -m data_pipelines.build --dataset={self.dataset} "
                f"--data_dir={data_dir} --source_dir=..."
            )
        cmd = [sys.executable, "-m", "data_pipelines.build", f"--dataset={self.dataset}"]
        cmd.append(f"--data_dir={data_dir}")
        if self.split_sizes:
            cmd.append("--split_sizes=" + ",".join(f"{k}={v}" for k, v in self.split_sizes))
        if jax.process_index() == 0:  # one builder; the data_dir is shared by all hosts
            print(f"building {self.dataset} into {data_dir} (first run only) ...", flush=True)
            subprocess.run(cmd, check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("xct: dataset built")

    def _check(self, info: dict | None) -> None:
        """Refuse a stored dataset that is not what the config asks for."""
        if info is None:
            raise ValueError(f"config.data.tfds.dataset: no dataset_info.json under {self.path}")
        wanted = {k: int(v) for k, v in self.split_sizes}
        have = {k: info["splits"].get(k) for k in wanted}
        if wanted and have != wanted:
            raise ValueError(
                f"config.data.tfds.split_sizes: asks {_sizes(wanted)} but {info['dir']} holds "
                f"{_sizes(info['splits'])}; delete that folder to rebuild it, or set "
                "config.data.tfds.data_dir to another folder"
            )
        ex = input_pipeline.data_source(self.dataset, self.root, "train")[0]
        r, stored = self.acquisition.resolution, int(np.shape(ex["drr"])[0])
        if tuple(np.shape(ex["ct_hu"])) != (r, r, r):
            raise ValueError(
                f"config.geometry.resolution: {r} but {self.dataset} stores "
                f"{np.shape(ex['ct_hu'])} volumes"
            )
        if self.num_views > stored:
            raise ValueError(
                f"config.data.num_views: {self.num_views} views but {self.dataset} stores {stored}"
            )
        for field, want in (
            ("sod_mm", self.acquisition.sod_mm),
            ("sdd_mm", self.acquisition.sdd_mm),
        ):
            if abs(float(ex[field]) - want) > 1e-3 * want:
                raise ValueError(
                    f"config.geometry.{field}: {want:g} but {self.dataset} was rendered with "
                    f"{float(ex[field]):g}"
                )

    def _source(self, split: str):
        return input_pipeline.data_source(self.dataset, self.root, split)

    def open(self, mesh, rules, state: dict | None, start_step: int) -> Stream:
        del start_step  # the iterator state says where the stream is
        transform = input_pipeline.ExampleTransform(
            num_views=self.num_views,
            view_selection=self.view_selection,
            intensity_jitter=self.intensity_jitter,
            drr_noise_std=self.drr_noise_std,
        )
        ds = input_pipeline.make_dataset(
            self._source("train"),
            batch_size=self.batch_size,
            transform=transform,
            seed=self.seed,
            train=True,
        )
        it = input_pipeline.iterate(ds, worker_count=self.worker_count)
        if state:
            it.set_state(state)
        keys = ("drr", "angles_deg", "ct") + (("labels",) if self.labels else ())
        return _TfdsStream(it, mesh, rules, keys)

    def examples(self, split: str, num_views: int) -> Iterator[Example]:
        """The examples of ``split``, transformed as for evaluation (first ``num_views``)."""
        src = self._source(split)
        t = input_pipeline.ExampleTransform(num_views=num_views)
        for i in range(len(src)):
            raw = src[i]
            ex = t(raw)
            name = raw.get("id", f"{split}-{i:05d}")
            name = name.decode() if isinstance(name, bytes) else str(name)
            # Outputs go back to the patient (LPS) frame: io.from_projector_frame swaps the
            # first two axes, so their spacings swap too.
            sz, sy, sx = (float(s) for s in ex["spacing_mm"])
            r = ex["ct"].shape
            grid = geometry.VolumeGrid.centered((r[1], r[0], r[2]), (sy, sz, sx))
            yield Example(name, ex["drr"], ex["angles_deg"], ex["ct"], grid, f"{split}[{i}]")


def _sizes(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "nothing"


class _TfdsStream:
    def __init__(self, it, mesh, rules, keys: tuple[str, ...]):
        self._it, self._mesh, self._rules, self._keys = it, mesh, rules, keys

    def batch(self, step: int) -> dict:
        del step  # the iterator is sequential; its state was restored on resume
        b = next(self._it)  # the fields the step consumes (the data may carry more)
        return sharding.shard_batch({k: b[k] for k in self._keys}, self._mesh, self._rules)

    def state(self) -> dict:
        return self._it.get_state()


# ---------------------------------------------------------------------------------------
# Phantoms rendered on the device


@dataclasses.dataclass(frozen=True)
class RenderSource:
    """Phantoms rendered each step on the device (``config.data.source = "render"``):
    ``RenderSource(**config.data.render, acquisition=..., batch_size=..., num_views=...,
    seed=...)``; the fields' defaults are in ``configs/default.py``.

    ``curriculum_steps > 0``: deformation and noise grow linearly over the first steps,
    and (``complexity_curriculum``) phantoms come from a pool ordered by complexity, drawn
    from its easiest part first; after the ramp the pool is replaced by full phantoms.

    Real CTs mixed into the phantoms (``real_fraction`` of the examples), each a new
    patient every step: random pose (``real_rotation_deg``), anisotropic scale (up to
    ``real_scale``), smooth displacement (``elastic_mm``, at least 10 mm) and smooth
    contrast (``real_hu_gain``) through ``recon.template.warp``; then flips and noise as the
    phantoms. CTs whose name (path relative to ``real_ct_dir``) matches a glob of
    ``real_exclude`` are never read: list the held-out ones there. The real CTs' cube
    before augmentation (``real_fov``): "" (the acquisition's ``fov_mm``, as ``ct_folder``
    makes datasets) or "body" (``io.preprocess_body_cube``: the cube the body fills, its
    voxels then taken at the acquisition's size, as in the quality table's real-chest
    cubes). Batches of step ``s`` use ``fold_in(rng.streams(seed)["data"], s)``.
    """

    acquisition: geometry.Acquisition
    batch_size: int
    num_views: int
    seed: int
    pool_size: int
    flip: bool
    elastic_mm: float
    photons: float
    curriculum_steps: int
    complexity_curriculum: bool
    real_ct_dir: str
    real_fraction: float
    real_exclude: tuple[str, ...]
    real_scale: float
    real_rotation_deg: float
    real_hu_gain: float
    real_fov: str
    phantom_version: int  # xct.phantoms.chest_phantom's version (2: arms, scapulae, ...)
    has_validation: bool = False
    source: ClassVar[str] = "render"  # its config.data.source

    def __post_init__(self):
        object.__setattr__(self, "real_exclude", tuple(str(g) for g in self.real_exclude or ()))
        object.__setattr__(self, "real_fov", str(self.real_fov or ""))
        if self.phantom_version not in (1, 2):
            raise ValueError(
                f"config.data.render.phantom_version: expected 1 or 2, got {self.phantom_version!r}"
            )
        if not 0.0 <= float(self.real_fraction) <= 1.0:
            raise ValueError(
                f"config.data.render.real_fraction: expected a fraction in [0, 1], got "
                f"{self.real_fraction!r}"
            )
        if self.real_fraction > 0 and not self.real_ct_dir:
            raise ValueError(
                "config.data.render.real_fraction > 0 needs config.data.render.real_ct_dir "
                "(a folder of CTs)"
            )
        if self.real_ct_dir and not pathlib.Path(self.real_ct_dir).expanduser().is_dir():
            raise ValueError(f"config.data.render.real_ct_dir: {self.real_ct_dir} is not a folder")
        if self.real_fov not in ("", "body"):
            raise ValueError(
                f"config.data.render.real_fov: expected '' or 'body', got {self.real_fov!r}"
            )
        for name in ("real_scale", "real_rotation_deg", "real_hu_gain"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(
                    f"config.data.render.{name}: expected >= 0, got {getattr(self, name)!r}"
                )

    def prepare(self) -> None:
        return None

    def real_sources(self) -> list[tuple[str, pathlib.Path]]:
        """``(name, path)`` of the CTs under ``real_ct_dir`` not excluded by ``real_exclude``."""
        return real_sources(self.real_ct_dir, self.real_fraction, self.real_exclude)

    def real_pool(self) -> tuple[np.ndarray, list[str]]:
        """The readable real CTs (HU ``[R, r, r, r]``, projector frame, ``ct_folder``'s
        preprocessing) and their names; unreadable ones are printed and left out. No real CT
        left is an error."""
        acq, vols, names = self.acquisition, [], []
        for name, path in self.real_sources():
            try:
                cube = io.load_cube(
                    path, resolution=acq.resolution, fov_mm=self.real_fov or acq.fov_mm
                )
            except ValueError as e:
                print(f"real_ct_dir: skipped {name}: {str(e).splitlines()[0]}", flush=True)
                continue
            vols.append(cube.hu)
            names.append(name)
        if not vols:
            raise ValueError(
                f"config.data.render.real_ct_dir: no readable CT in {self.real_ct_dir} after "
                f"real_exclude={list(self.real_exclude)}"
            )
        return np.stack(vols), names

    def pool(self, by_complexity: bool) -> np.ndarray:
        """Phantoms (HU ``[P, r, r, r]``); with ``by_complexity``, phantom ``i`` of ``P`` has
        complexity ``(i + 1) / P`` (easy first), else all are full phantoms."""
        from xct import phantoms

        n, grid = int(self.pool_size), self.acquisition.grid()
        return np.stack(
            [
                phantoms.chest_phantom(
                    self.seed * 100_003 + i,
                    grid,
                    complexity=(i + 1) / n if by_complexity else 1.0,
                    version=self.phantom_version,
                )[0]
                for i in range(n)
            ]
        )

    def renderer(self, mesh, rules, by_complexity: bool = False):
        """``(pool on the device, jitted render(key, pool, strength) -> sharded batch)``.

        ``strength`` in [0, 1] scales deformation and noise; with ``by_complexity`` (a pool
        ordered by complexity) it also draws phantoms only from the easiest
        ``ceil(strength * P)`` of the pool.
        """
        pool = self.pool(by_complexity)
        if self.real_fraction > 0:
            real, names = self.real_pool()
            print(f"real CTs in the training pool: {', '.join(names)}", flush=True)
            pool = (pool, real)
        pool = jax.device_put(pool, sharding.replicated(mesh))
        out_shardings = {
            "ct": sharding.batch_sharding(mesh, 4, volume=True, rules=rules),
            "drr": sharding.batch_sharding(mesh, 4, rules=rules),
            "angles_deg": sharding.batch_sharding(mesh, 2, rules=rules),
        }
        render = jax.jit(
            functools.partial(_render, self, by_complexity), out_shardings=out_shardings
        )
        return pool, render

    def open(self, mesh, rules, state: dict | None, start_step: int) -> Stream:
        del state  # the stream is a function of the step
        return _RenderStream(self, mesh, rules, start_step)

    def examples(self, split: str, num_views: int) -> None:
        return None


def real_sources(ct_dir: str, fraction: float, exclude) -> list[tuple[str, pathlib.Path]]:
    """``(name, path)`` of the CTs a render source with these ``config.data.render.real_*``
    settings trains on: those under ``ct_dir`` whose name (path relative to it) matches no
    glob of ``exclude``; none when ``fraction`` is 0."""
    import fnmatch

    if not ct_dir or not fraction:
        return []
    root = pathlib.Path(ct_dir).expanduser()
    out = []
    for path in find_ct_sources(root):
        name = path.relative_to(root).as_posix()
        if not any(fnmatch.fnmatch(name, g) for g in exclude):
            out.append((name, path))
    return out


def augment_real(key, hu: jax.Array, src: RenderSource, strength=1.0) -> jax.Array:
    """A new patient from a real CT ``hu [r, r, r]`` (projector frame): random rotation,
    anisotropic scale, smooth displacement and smooth contrast (``recon.template.warp`` on
    ``HU + 1000``, air outside)."""
    from xct.recon import template

    k = jax.random.split(key, 4)
    sched = template.Schedule()
    init = sched.init(hu.dtype)
    rot = jnp.deg2rad(src.real_rotation_deg) / template._ROT_RAD
    scale = jnp.log1p(src.real_scale) / template._LOG_SCALE
    disp = max(src.elastic_mm, 10.0) / template._DISP_MM
    gain = src.real_hu_gain / template._LOG_GAIN
    params = init._replace(
        rotvec=strength * rot * jax.random.normal(k[0], (3,)),
        log_scale=strength * scale * jax.random.uniform(k[1], (3,), minval=-1.0, maxval=1.0),
        coarse=strength * disp * jax.random.normal(k[2], init.coarse.shape),
        log_gain=strength * gain * jax.random.normal(k[3], init.log_gain.shape),
    )
    return template.warp(hu + 1000.0, params, src.acquisition.grid()) - 1000.0


def _render(src: RenderSource, by_complexity: bool, key, pool, strength=1.0) -> dict:
    k_pick, k_render, k_real, k_aug = jax.random.split(key, 4)
    phantoms = pool[0] if isinstance(pool, tuple) else pool
    n, b = phantoms.shape[0], src.batch_size
    if by_complexity:  # the easiest ceil(strength * n), with replacement
        available = jnp.clip(jnp.ceil(strength * n), 1, n).astype(jnp.int32)
        idx = jax.random.randint(k_pick, (b,), 0, available)
    else:
        idx = jax.random.choice(k_pick, n, (b,), replace=n < b)
    cts = phantoms[idx]
    if isinstance(pool, tuple):  # real CTs mixed in
        real = pool[1]
        k_which, k_idx = jax.random.split(k_real)
        use_real = jax.random.bernoulli(k_which, src.real_fraction, (b,))
        ridx = jax.random.randint(k_idx, (b,), 0, real.shape[0])
        made = jax.vmap(lambda k, hu: augment_real(k, hu, src, strength))(
            jax.random.split(k_aug, b), real[ridx]
        )
        cts = jnp.where(use_real[:, None, None, None], made, cts)
    return input_pipeline.render_batch(
        k_render,
        cts,
        src.acquisition,
        num_views=src.num_views,
        flip=src.flip,
        elastic_mm=src.elastic_mm,
        photons=src.photons if src.photons else None,
        strength=strength,
    )


class _RenderStream:
    def __init__(self, src: RenderSource, mesh, rules, start_step: int):
        self.src, self.mesh, self.rules = src, mesh, rules
        self.key = rng.streams(src.seed)["data"]
        ramp = src.curriculum_steps
        self.full = not (ramp and src.complexity_curriculum and start_step < ramp)
        self.pool, self.render = src.renderer(mesh, rules, not self.full)

    def batch(self, step: int) -> dict:
        ramp = self.src.curriculum_steps
        strength = np.float32(min(1.0, (step + 1) / ramp) if ramp else 1.0)
        if not self.full and step >= ramp:
            self.pool = None  # free the curriculum pool first
            self.pool, self.render = self.src.renderer(self.mesh, self.rules, False)
            self.full = True
        return self.render(rng.step_key(self.key, step), self.pool, strength)

    def state(self) -> dict:
        return {}


# ---------------------------------------------------------------------------------------
# Real CT volumes for evaluation


@functools.partial(jax.jit, static_argnums=0)
def _render_views(acquisition: geometry.Acquisition, hu, angles_deg):
    geom = acquisition.orbit(angles_deg)
    return physics.normalize_drr(physics.render_drrs(hu, acquisition.grid(), geom))


def drr_renderer(acquisition: geometry.Acquisition):
    """Jitted ``(hu [r, r, r], angles_deg [V]) -> DRRs [V, r, r]`` in ``normalize_drr``
    units: the datasets' rendering (``physics.render_drrs``, monochromatic, noise-free) on
    the acquisition's orbit, the model's input geometry."""
    return functools.partial(_render_views, acquisition)


def eval_view_angles(acquisition: geometry.Acquisition, num_views: int) -> np.ndarray:
    """The angles (degrees) of ``num_views`` views: the datasets' nested order's prefix."""
    return acquisition.view_angles(max(num_views, DATASET_VIEWS))[:num_views]


def ct_example(
    path,
    example_id: str,
    acquisition: geometry.Acquisition,
    num_views: int,
    render=None,
    series_uid: str | None = None,
) -> Example:
    """One CT file or DICOM folder, preprocessed and rendered as ``ct_folder`` does
    (``io.load_cube`` to the acquisition's cube -> DRRs at the first ``num_views`` nested
    angles)."""
    render = render or drr_renderer(acquisition)
    cube = io.load_cube(
        path,
        resolution=acquisition.resolution,
        fov_mm=acquisition.fov_mm,
        series_uid=series_uid,
    )
    hu, lps_grid = cube.hu, cube.lps_grid
    angles = eval_view_angles(acquisition, num_views)
    drr = np.asarray(render(hu, angles), np.float32)
    # As stored by the dataset builder (int16 HU), then normalised as ExampleTransform does.
    ct = physics.normalize_ct(np.clip(np.round(hu), physics.HU_MIN, physics.HU_MAX))
    return Example(example_id, drr, angles, np.asarray(ct, np.float32), lps_grid, str(path))


def find_ct_sources(ct_dir) -> list[pathlib.Path]:
    """Volume files (NIfTI, MHA/MHD, NRRD) and DICOM series folders under ``ct_dir``."""
    return io.find_ct_sources(ct_dir, what="--eval_ct_dir")


def ct_dir_examples(
    ct_dir,
    acquisition: geometry.Acquisition,
    num_views: int,
    skipped: list,
    series_uids: dict | None = None,
) -> Iterator[Example]:
    """Examples of every readable CT under ``ct_dir``; unreadable ones are printed and
    appended to ``skipped`` as ``(name, reason)``. ``name`` is the path relative to
    ``ct_dir`` (``/``-separated); ``series_uids`` maps such a name to the
    SeriesInstanceUID to read from a DICOM folder with several CT series."""
    root = pathlib.Path(ct_dir).expanduser()
    sources = find_ct_sources(root)
    if not sources:
        raise ValueError(f"--eval_ct_dir: no CT volumes or DICOM series found in {root}")
    series_uids = dict(series_uids or {})
    names = {p.relative_to(root).as_posix(): p for p in sources}
    unknown = sorted(set(series_uids) - set(names))
    if unknown:
        raise ValueError(
            f"--eval_series_uids: no input {unknown[0]!r} under {root}; expected names "
            "relative to --eval_ct_dir"
        )
    render = drr_renderer(acquisition)
    for name, p in names.items():
        try:
            yield ct_example(p, name, acquisition, num_views, render, series_uids.get(name))
        except ValueError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"skipped {name}: {reason}", flush=True)
            skipped.append((name, reason))


def dummy_batch(
    acquisition: geometry.Acquisition, batch_size: int, num_views: int, seg_classes: int = 0
) -> dict[str, Any]:
    """Zeros in the shapes of a training batch (for init and shape inference)."""
    r, b = acquisition.resolution, int(batch_size)
    batch = {
        "drr": np.zeros((b, num_views, r, r), np.float32),
        "angles_deg": np.tile(acquisition.view_angles(num_views)[None], (b, 1)),
        "ct": np.zeros((b, r, r, r), np.float32),
    }
    if seg_classes > 0:
        batch["labels"] = np.zeros((b, r, r, r), np.int32)
    return batch
