"""Dataset build and input-pipeline throughput on this machine.

    python -m scripts.bench_data --data_dir=/tmp/xct_bench_data

Builds ``synthetic_chest/res128_views8`` with small splits (train 8, validation 2, test
2) into ``data_dir`` (volumes/s, 1 worker), then reads the train split through the grain
pipeline (batch 4, 8 views, augmentation on) and reports examples/s after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--dataset", default="synthetic_chest/res128_views8")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args(argv)

    from data_pipelines import build
    from xct import input_pipeline

    sizes = {"train": 8, "validation": 2, "test": 2}
    _, summary = build.build(args.dataset, args.data_dir, split_sizes=sizes, workers=args.workers)
    print(json.dumps(summary))
    src = input_pipeline.data_source(args.dataset, args.data_dir, "train")
    t = input_pipeline.ExampleTransform(num_views=8, intensity_jitter=0.1, drr_noise_std=0.01)
    ds = input_pipeline.make_dataset(src, batch_size=4, transform=t, seed=0, train=True)
    it = iter(ds.to_iter_dataset())
    next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t0
    print(json.dumps({"pipeline_examples_per_s": round(4 * args.batches / dt, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
