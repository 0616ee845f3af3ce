"""TFDS builder ``ct_folder``: any directory of CT volumes, rendered to multi-view DRRs.

    python -m data_pipelines.build --dataset=ct_folder/res128_views8 --data_dir=DIR \\
        --source_dir=../shared/data/ct

Sources: every NIfTI / MHA / MHD / NRRD file, and every folder holding a DICOM series (a
LIDC-IDRI tree works: each series folder is one volume), under ``source_dir``. Each is
read with ``xct.io.load_cube``: ``read_ct``, then ``preprocess`` (canonical
orientation, couch removal, crop/pad to a ``fov_mm`` cube, resize), turned into the
projector frame (``xct.io.to_projector_frame``: 0 degrees is a PA view), and projected. The
split of a volume is a stable hash of its patient id (its path relative to
``source_dir``, ``/``-separated: unique, and the name under which a skipped input is
reported), so adding files never moves existing ones between splits. A file that cannot
be read (truncated, not CT, not HU, several CT series in one folder, ...) is skipped with
a warning and counted; it never aborts the build. ``series_uids`` (``--series_uids=
ID=UID,...`` of ``data_pipelines.build``) picks the series of a DICOM folder holding
several CT series.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import tempfile

import tensorflow_datasets as tfds

from data_pipelines import common
from xct import io

VOLUME_SUFFIXES = io.CT_SUFFIXES
_SPLITS = (("train", 0.8), ("validation", 0.9), ("test", 1.0))


@dataclasses.dataclass(eq=False)
class CTFolderConfig(tfds.core.BuilderConfig):
    resolution: int = 128  # voxels per side (CT) and pixels per side (DRR)
    num_views: int = 8  # views stored per example
    fov_mm: float = 400.0  # side of the CT cube in mm


def find_sources(source_dir) -> list[pathlib.Path]:
    """Volume files and DICOM series folders under ``source_dir``, sorted."""
    return io.find_ct_sources(source_dir, what="source_dir")


def source_id(source_dir, path) -> str:
    """The id of a source: its path relative to ``source_dir``, ``/``-separated."""
    return pathlib.Path(path).relative_to(source_dir).as_posix()


def _fingerprint(path: str) -> str:
    """Size and modification time, so an edited source is rendered again, not cached."""
    p = pathlib.Path(path)
    files = [p] if p.is_file() else [q for q in p.iterdir() if q.is_file()]
    return f"{sum(q.stat().st_size for q in files)}-{max(int(q.stat().st_mtime) for q in files)}"


def split_of(patient_id: str) -> str:
    f = common.stable_fraction(patient_id)
    return next(name for name, upper in _SPLITS if f < upper)


def make_ct_example(
    path: str, patient_id: str, spec: common.ViewSpec, series_uid: str | None = None
) -> dict:
    """One example from a CT file or DICOM folder (plain arguments: runs in a worker);
    ``series_uid`` chooses the series of a DICOM folder (``io.read_ct``)."""
    from xct import io

    cube = io.load_cube(
        path, resolution=spec.resolution, fov_mm=spec.fov_mm, series_uid=series_uid
    )
    return common.render_example(cube.hu, spec, patient_id)


class CtFolder(tfds.core.GeneratorBasedBuilder):
    """CT volumes from a folder (NIfTI, MHA, NRRD, DICOM series) with multi-view DRRs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        CTFolderConfig(name=f"res{r}_views8", resolution=r, num_views=8, description=f"{r}^3 CT")
        for r in (32, 64, 128, 256)
    ]

    def __init__(
        self, *, source_dir=None, workers: int = 1, cache_dir=None, series_uids=None, **kwargs
    ):
        """``series_uids``: ``{source id: SeriesInstanceUID}`` for DICOM folders that hold
        several CT series (ids as ``source_id`` gives them)."""
        super().__init__(**kwargs)
        self._source_dir = None if source_dir is None else pathlib.Path(source_dir)
        self._series_uids = dict(series_uids or {})
        self._workers = int(workers)
        # The cache holds rendered examples between reading and writing (always on).
        self._cache = common.ExampleCache(cache_dir or tempfile.mkdtemp(prefix="xct_ct_folder_"))
        self.skipped: list[tuple[str, str]] = []

    @property
    def spec(self) -> common.ViewSpec:
        c = self.builder_config
        return common.ViewSpec(c.resolution, c.num_views, c.fov_mm)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.features(self.spec, with_labels=False),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        if self._source_dir is None:
            raise ValueError("source_dir: ct_folder needs --source_dir, the folder of CT volumes")
        sources = find_sources(self._source_dir)
        if not sources:
            raise ValueError(
                f"source_dir: no CT volumes or DICOM series found in {self._source_dir}"
            )
        c = self.builder_config
        ids = {source_id(self._source_dir, p): p for p in sources}
        unknown = sorted(set(self._series_uids) - set(ids))
        if unknown:
            raise ValueError(
                f"series_uids: no source {unknown[0]!r} under {self._source_dir}; expected "
                "ids as paths relative to source_dir, e.g. " + ", ".join(list(ids)[:3])
            )
        jobs, split_of_key, pid_of_key = [], {}, {}
        for pid, p in ids.items():
            uid = self._series_uids.get(pid, "")
            key = f"{c.name}/{self.VERSION}/{pid}/{uid}/{_fingerprint(str(p))}"
            jobs.append((key, (str(p), pid, self.spec, uid)))
            split_of_key[key] = split_of(pid)
            pid_of_key[key] = pid
        # Render everything first (into the cache): which inputs are readable is only known
        # after reading them, and TFDS refuses a split that yields nothing.
        by_split: dict[str, list[str]] = {}
        for key, ex, err in common.run_jobs(
            jobs,
            make_ct_example,
            workers=self._workers,
            cache=self._cache,
            progress_desc=f"{c.name} volumes",
            total=len(jobs),
        ):
            if ex is None:
                pid = pid_of_key[key]
                logging.warning("skipped %s: %s", pid, err)
                self.skipped.append((pid, err))
            else:
                by_split.setdefault(split_of_key[key], []).append(key)
        if not by_split:
            raise ValueError(f"source_dir: none of the {len(jobs)} inputs could be read")
        return {name: self._generate_examples(keys) for name, keys in by_split.items()}

    def _generate_examples(self, keys):
        for key in keys:
            ex = self._cache.get(key)
            yield ex["id"], ex
