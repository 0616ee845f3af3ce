"""TFDS builder ``synthetic_chest``: procedural chest phantoms and their DRRs.

    python -m data_pipelines.build --dataset=synthetic_chest/res64_views8 --data_dir=DIR

Each example is one seeded chest phantom (``xct.phantoms.chest_phantom``) in HU with its
organ labels, and cone-beam DRRs at ``num_views`` angles (``common.ViewSpec``). Splits are
disjoint seed ranges, so train, validation and test never share a phantom and any split
can be regenerated alone.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from data_pipelines import common

# Disjoint seed ranges per split.
_SEED_OFFSETS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}


@dataclasses.dataclass(eq=False)
class SyntheticChestConfig(tfds.core.BuilderConfig):
    resolution: int = 64  # voxels per side (CT) and pixels per side (DRR)
    num_views: int = 8  # views stored per example
    fov_mm: float = 400.0  # side of the CT cube in mm
    num_train: int = 200  # phantoms in the train split
    num_validation: int = 20  # phantoms in the validation split
    num_test: int = 20  # phantoms in the test split
    nodules: bool = True  # add lung nodules
    couch: bool = False  # add a scanner couch under the patient


def _config(name, res, views, n_train, n_val, n_test, desc):
    return SyntheticChestConfig(
        name=name,
        resolution=res,
        num_views=views,
        num_train=n_train,
        num_validation=n_val,
        num_test=n_test,
        description=desc,
    )


def make_phantom_example(seed: int, spec: common.ViewSpec, nodules: bool, couch: bool) -> dict:
    """One example (plain arguments: runs in a worker process)."""
    from xct import phantoms

    hu, labels = phantoms.chest_phantom(seed, spec.grid(), nodules=nodules, couch=couch)
    return common.render_example(hu, spec, f"chest-{seed:07d}", labels=labels)


class SyntheticChest(tfds.core.GeneratorBasedBuilder):
    """Procedural chest phantoms with organ labels and multi-view cone-beam DRRs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        _config("tiny_res32_views8", 32, 8, 8, 2, 2, "Tiny: for tests and demos."),
        # `:smoke` configs get their own folder, so a smoke run never occupies the dataset a
        # full run of the same config (the quickstart's 80 phantoms) builds in the same data_dir.
        _config("smoke_res32_views8", 32, 8, 8, 2, 2, "Smoke runs of any config (:smoke)."),
        _config("res64_views8", 64, 8, 400, 40, 40, "64^3 CT (6.25 mm), 8 views of 64^2."),
        _config("res128_views8", 128, 8, 400, 40, 40, "128^3 CT (3.1 mm), 8 views of 128^2."),
        _config("res256_views8", 256, 8, 400, 40, 40, "256^3 CT (1.6 mm), 8 views of 256^2."),
    ]

    def __init__(self, *, workers: int = 1, cache_dir=None, split_sizes=None, **kwargs):
        """``workers``: processes rendering examples; ``cache_dir``: keeps finished examples
        so a rerun after an interruption skips them; ``split_sizes``: override counts."""
        super().__init__(**kwargs)
        self._workers = int(workers)
        self._cache = common.ExampleCache(cache_dir)
        self._split_sizes = dict(split_sizes or {})
        self.skipped: list[tuple[str, str]] = []

    @property
    def spec(self) -> common.ViewSpec:
        c = self.builder_config
        return common.ViewSpec(c.resolution, c.num_views, c.fov_mm)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.features(self.spec, with_labels=True),
            homepage="https://github.com/xct",
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        sizes.update(self._split_sizes)
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        seeds = [_SEED_OFFSETS[split] + i for i in range(int(count))]
        jobs = [
            (f"{c.name}/{self.VERSION}/{seed}", (seed, self.spec, c.nodules, c.couch))
            for seed in seeds
        ]
        for key, ex, err in common.run_jobs(
            jobs,
            make_phantom_example,
            workers=self._workers,
            cache=self._cache,
            progress_desc=f"{c.name} {split}",
            total=len(jobs),
        ):
            if ex is None:
                self.skipped.append((key, err))
                continue
            yield ex["id"], ex
