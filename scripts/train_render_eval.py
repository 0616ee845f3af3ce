"""Train a config on phantoms rendered on the device for a time budget, then score it.

    python -m scripts.train_render_eval --config=unet64 --seconds=180 --workdir=/tmp/xct/r64

For accelerators without TFDS: training data is ``data.source="render"`` (a pool of chest
phantoms, random angles and flips each step); the test set is chest phantoms with the
synthetic dataset's test seeds (2,000,000 + i), rendered at the nested angles exactly as
``data_pipelines`` would (``physics.render_drrs``), scored in the primary metric
definition (``xct.metrics.volume_metrics``). Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="unet64")
    p.add_argument("--workdir", required=True)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--pool", type=int, default=64)
    p.add_argument("--test", type=int, default=16)
    p.add_argument("--views", type=int, nargs="+", default=[2])
    p.add_argument("--batch", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from xct import evaluate, metrics, phantoms, physics, train
    from xct.experiment import Experiment

    c = importlib.import_module(f"xct.configs.{args.config}").get_config()
    c.data.source = "render"
    c.data.pool_size = args.pool
    c.train.max_seconds = args.seconds
    c.train.num_steps = 100_000
    c.train.log_every = 100
    c.train.checkpoint_every = 100_000
    if args.batch:
        c.data.batch_size = args.batch
    t0 = time.perf_counter()
    exp = Experiment.from_config(c)
    train.train_and_evaluate(exp, args.workdir)
    wall = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    rows = [json.loads(x) for x in open(f"{args.workdir}/metrics.jsonl")]
    last = rows[-1]
    info = {
        "config": args.config,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "train_seconds": round(wall, 1),
        "steps": last["step"],
        "steps_per_s": round(last["train/steps_per_s"], 2),
        "volumes_per_s": round(last["train/steps_per_s"] * c.data.batch_size, 1),
        "batch": c.data.batch_size,
        "final_loss": round(last["train/loss"], 4),
        "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
    }
    print(json.dumps(info), flush=True)

    (member,) = evaluate.restore_members(exp, args.workdir, "last")
    params, step, acq = member.params, member.step, exp.acquisition
    grid = acq.grid()
    apply = jax.jit(lambda prm, d, a: exp.model.apply({"params": prm}, d, a, train=False)["ct"])
    for views in args.views:
        angles = acq.view_angles(8)[:views]
        geom = acq.orbit(angles)
        scores = []
        for i in range(args.test):
            hu, _ = phantoms.chest_phantom(2_000_000 + i, grid)
            hu = np.clip(np.round(hu), -1024, 3071).astype(np.float32)
            drr = physics.render_drrs(hu, grid, geom, jax.random.key(0))
            pred = apply(
                params, physics.normalize_drr(drr)[None], np.asarray(angles, np.float32)[None]
            )
            m = metrics.volume_metrics(physics.denormalize_ct(pred), hu[None])
            scores.append({k: float(v[0]) for k, v in m.items()})
        mean = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
        print(
            json.dumps({"views": views, "test_phantoms": args.test, "step": step, **mean}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
