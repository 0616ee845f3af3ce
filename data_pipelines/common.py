"""What every xct multi-view dataset shares: geometry, features, example rendering, a cache.

An example holds the CT at the target resolution (HU, int16), its DRRs for the largest
view count (float32 line integrals, views in ``geometry.nested_view_angles`` order so any
prefix of 2, 4 or 8 views is a sensible subset), the view angles, the projection geometry
and the voxel spacing, plus the source id.

Examples are rendered by worker functions that take only plain arguments, so they run in
spawned processes; each finished example is written atomically to a cache folder, so an
interrupted build that is run again skips the work already done (TFDS itself writes into
an ``incomplete.*`` folder and renames it only when every split is complete, so a rerun
never duplicates or corrupts records).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from xct import geometry as _geometry

SOD_MM = _geometry.DEFAULT_SOD_MM  # source to isocentre, as in a chest radiography / CBCT set-up
SDD_MM = _geometry.DEFAULT_SDD_MM  # source to detector


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """Projection set-up of a dataset: ``num_views`` cone-beam views of ``res^2`` pixels."""

    resolution: int  # voxels per side of the CT and pixels per side of each DRR
    num_views: int  # views stored per example (the largest count a model may use)
    fov_mm: float  # side of the CT cube in mm
    arc_deg: float = 180.0  # angles spread over this arc, nested order

    @property
    def acquisition(self) -> _geometry.Acquisition:
        """The dataset's acquisition: every view sees the whole cylinder inscribed in the
        cube (``Acquisition`` with the default pixel)."""
        return _geometry.Acquisition(
            self.resolution, self.fov_mm, SOD_MM, SDD_MM, arc_deg=self.arc_deg
        )

    @property
    def spacing_mm(self) -> float:
        return self.acquisition.voxel_mm

    @property
    def pixel_mm(self) -> float:
        return self.acquisition.detector_pixel_mm

    def angles_deg(self) -> np.ndarray:
        return self.acquisition.view_angles(self.num_views)

    def grid(self):
        return self.acquisition.grid()

    def geometry(self):
        return self.acquisition.orbit(self.angles_deg())


def features(spec: ViewSpec, *, with_labels: bool):
    """The TFDS ``FeaturesDict`` of an example for ``spec``."""
    import tensorflow_datasets as tfds

    r, v = spec.resolution, spec.num_views
    f = {
        "ct_hu": tfds.features.Tensor(shape=(r, r, r), dtype=np.int16, encoding="zlib"),
        "drr": tfds.features.Tensor(shape=(v, r, r), dtype=np.float32, encoding="zlib"),
        "angles_deg": tfds.features.Tensor(shape=(v,), dtype=np.float32),
        "sod_mm": tfds.features.Scalar(dtype=np.float32),
        "sdd_mm": tfds.features.Scalar(dtype=np.float32),
        "pixel_mm": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "spacing_mm": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "id": tfds.features.Text(),
    }
    if with_labels:
        f["labels"] = tfds.features.Tensor(shape=(r, r, r), dtype=np.uint8, encoding="zlib")
    return tfds.features.FeaturesDict(f)


def render_example(hu: np.ndarray, spec: ViewSpec, example_id: str, labels=None) -> dict:
    """The record for a CT already at ``spec``'s resolution (HU ``[r, r, r]``)."""
    import jax

    from xct import physics

    drr = physics.render_drrs(hu, spec.grid(), spec.geometry(), jax.random.key(0))
    ex = {
        "ct_hu": np.clip(np.round(hu), -1024, 3071).astype(np.int16),
        "drr": np.asarray(drr, np.float32),
        "angles_deg": spec.angles_deg(),
        "sod_mm": np.float32(SOD_MM),
        "sdd_mm": np.float32(SDD_MM),
        "pixel_mm": np.full((2,), spec.pixel_mm, np.float32),
        "spacing_mm": np.full((3,), spec.spacing_mm, np.float32),
        "id": example_id,
    }
    if labels is not None:
        ex["labels"] = np.asarray(labels, np.uint8)
    return ex


def stable_fraction(text: str) -> float:
    """A number in [0, 1) from ``text`` that never changes between runs or machines."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---------------------------------------------------------------------------------------
# A cache of finished examples, so that a rerun after an interruption skips done work.


class ExampleCache:
    """``key -> example`` stored as one ``.npz`` per key, written atomically."""

    def __init__(self, folder: pathlib.Path | None):
        self.folder = None if folder is None else pathlib.Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> pathlib.Path:
        safe = hashlib.sha1(key.encode()).hexdigest()[:20]
        return self.folder / f"{safe}.npz"

    def get(self, key: str) -> dict | None:
        if self.folder is None or not self._path(key).exists():
            return None
        try:
            with np.load(self._path(key), allow_pickle=False) as z:
                ex = {k: z[k] for k in z.files}
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None
        ex["id"] = str(ex["id"])
        return ex

    def put(self, key: str, example: dict) -> None:
        if self.folder is None:
            return
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp.npz")
        os.close(fd)
        np.savez(tmp, **{k: np.asarray(v) for k, v in example.items()})
        os.replace(tmp, self._path(key))


def run_jobs(
    jobs: Iterable[tuple[str, tuple]],
    fn: Callable,
    *,
    workers: int,
    cache: ExampleCache,
    progress_desc: str,
    total: int,
) -> Iterator[tuple[str, dict | None, str | None]]:
    """Run ``fn(*args)`` per ``(key, args)`` job; yields ``(key, example or None, error)``.

    Jobs whose key is cached are not run again. ``fn`` returns an example dict or raises
    ``ValueError`` for bad input (reported, not fatal). With ``workers > 1`` jobs run in
    spawned processes (JAX must not be forked).
    """
    from tqdm import tqdm

    jobs = list(jobs)
    bar = tqdm(total=total, desc=progress_desc, unit="vol", dynamic_ncols=True)
    todo = []
    for key, args in jobs:
        ex = cache.get(key)
        if ex is not None:
            bar.update(1)
            yield key, ex, None
        else:
            todo.append((key, args))

    def finish(key, fut_or_result):
        try:
            ex = fut_or_result() if callable(fut_or_result) else fut_or_result
        except ValueError as e:  # bad input: count it and go on
            bar.update(1)
            return key, None, str(e)
        cache.put(key, ex)
        bar.update(1)
        return key, ex, None

    if workers <= 1:
        for key, args in todo:
            yield finish(key, lambda args=args: fn(*args))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [(key, pool.submit(fn, *args)) for key, args in todo]
            for key, fut in futures:  # in submission order: deterministic output
                yield finish(key, fut.result)
    bar.close()
