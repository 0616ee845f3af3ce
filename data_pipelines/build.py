"""Build an xct dataset (TFDS, array_record) from Python; no TensorFlow needed.

    python -m data_pipelines.build --dataset=synthetic_chest/res64_views8 --data_dir=DIR
    python -m data_pipelines.build --dataset=ct_folder/res128_views8 --data_dir=DIR \\
        --source_dir=../shared/data/ct

Shows a progress bar per split, renders with ``--workers`` processes, and prints a summary
(examples per split, skipped inputs with the reason, time, volumes/s). Finished examples
are kept in ``DATA_DIR/_xct_cache/`` until the dataset is complete, so a build that was
interrupted and run again skips the work already done; TFDS writes into an
``incomplete.*`` folder and renames it only at the end, so a rerun never duplicates or
corrupts records, a half-written shard is never read, and the rerun writes the same bytes
as an uninterrupted build (``tests/test_faults.py``). The ``incomplete.*`` folders that
killed builds leave are removed once a build completes.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "dataset",
    None,
    "NAME/CONFIG: synthetic_chest/{tiny_res32,res64,res128,res256}_views8 or "
    "ct_folder/res{32,64,128,256}_views8 (--list prints them all)",
)
flags.DEFINE_bool("list", False, "print every dataset NAME/CONFIG and exit")
flags.DEFINE_string("data_dir", None, "where TFDS datasets are written")
flags.DEFINE_string("source_dir", None, "ct_folder: the folder of CT volumes")
flags.DEFINE_integer("workers", 1, "processes rendering examples")
flags.DEFINE_list(
    "series_uids",
    [],
    "ct_folder: ID=UID,... the SeriesInstanceUID to read from a DICOM folder with several CT "
    "series (ID: the folder's path relative to --source_dir)",
)
flags.DEFINE_list("split_sizes", [], "synthetic_chest: override counts, e.g. train=8,test=2")
flags.DEFINE_bool("keep_cache", False, "keep the per-example cache after a complete build")


def builders():
    from data_pipelines import ct_folder, synthetic_chest

    return {"synthetic_chest": synthetic_chest.SyntheticChest, "ct_folder": ct_folder.CtFolder}


def build(
    dataset: str,
    data_dir,
    *,
    source_dir=None,
    workers=1,
    split_sizes=None,
    keep_cache=False,
    series_uids=None,
):
    """Build ``dataset`` (``NAME/CONFIG``) into ``data_dir``; returns ``(builder, summary)``."""
    name, _, config = dataset.partition("/")
    table = builders()
    if name not in table:
        raise ValueError(f"dataset: unknown name {name!r}, expected one of {sorted(table)}")
    cls = table[name]
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if config not in configs:
        raise ValueError(f"dataset: unknown config {config!r} of {name}, expected one of {configs}")
    data_dir = pathlib.Path(data_dir)
    cache_dir = data_dir / "_xct_cache" / name / config
    kwargs = dict(
        config=config, data_dir=str(data_dir), file_format="array_record", workers=workers
    )
    kwargs["cache_dir"] = cache_dir
    if name == "ct_folder":
        kwargs["source_dir"] = source_dir
        kwargs["series_uids"] = series_uids
    elif split_sizes:
        kwargs["split_sizes"] = split_sizes
    builder = cls(**kwargs)
    existed = builder.is_prepared() if hasattr(builder, "is_prepared") else False
    t0 = time.perf_counter()
    from xct import console

    console.quiet_tfds()
    with console.stdout_unless_verbose():  # TFDS's "Dataset ... downloaded and prepared" banner
        builder.download_and_prepare()
    elapsed = time.perf_counter() - t0
    if not keep_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    # What killed builds left: TFDS's temporary folders (renamed only once complete, so never
    # read, but as large as the dataset).
    for leftover in pathlib.Path(builder.data_dir).parent.glob("incomplete.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    counts = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    differs = {k: v for k, v in (split_sizes or {}).items() if counts.get(k) != int(v)}
    if existed and differs:
        raise ValueError(
            f"--split_sizes: {builder.data_dir} already holds "
            + ", ".join(f"{k}={n}" for k, n in sorted(counts.items()))
            + " (asked "
            + ", ".join(f"{k}={v}" for k, v in sorted(differs.items()))
            + "); delete that folder to rebuild it, or use another --data_dir"
        )
    summary = dict(
        dataset=dataset,
        data_dir=str(builder.data_dir),
        examples=counts,
        skipped=list(builder.skipped),
        seconds=round(elapsed, 1),
        volumes_per_s=None if existed else round(sum(counts.values()) / max(elapsed, 1e-9), 3),
        already_built=existed,
    )
    return builder, summary


def main(argv):
    del argv
    if FLAGS.list:
        for name, cls in sorted(builders().items()):
            for c in cls.BUILDER_CONFIGS:
                print(f"{name}/{c.name}")
        return 0
    if not FLAGS.dataset or not FLAGS.data_dir:
        print("error: --dataset and --data_dir are required", file=sys.stderr)
        return 2
    sizes = {}
    for item in FLAGS.split_sizes:
        split, _, n = item.partition("=")
        if not n.isdigit():
            print(f"error: --split_sizes: expected split=count, got {item!r}", file=sys.stderr)
            return 2
        sizes[split] = int(n)
    series_uids = {}
    for item in FLAGS.series_uids:
        sid, _, uid = item.rpartition("=")
        if not sid or not uid:
            print(f"error: --series_uids: expected ID=UID, got {item!r}", file=sys.stderr)
            return 2
        series_uids[sid] = uid
    try:
        _, summary = build(
            FLAGS.dataset,
            FLAGS.data_dir,
            source_dir=FLAGS.source_dir,
            workers=FLAGS.workers,
            split_sizes=sizes,
            keep_cache=FLAGS.keep_cache,
            series_uids=series_uids,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{summary['dataset']} -> {summary['data_dir']}")
    for split, n in summary["examples"].items():
        print(f"  {split:<11} {n} examples")
    print(f"  skipped     {len(summary['skipped'])} inputs")
    for pid, why in summary["skipped"]:
        print(f"    {pid}: {why}")
    if summary["already_built"]:
        print("  already built: nothing to do")
    else:
        print(f"  {summary['seconds']} s, {summary['volumes_per_s']} volumes/s")
    return 0


if __name__ == "__main__":
    from xct import console

    console.quiet(sys.argv)  # before JAX is imported
    app.run(main)
