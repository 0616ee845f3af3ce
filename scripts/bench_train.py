"""Training step time and peak memory of a config on this machine (no data needed).

    python -m scripts.bench_train --config=unet64 --batch=4 --steps=5
    python -m scripts.bench_train --config=unet128 --batch=1 --steps=3

Builds the config's model, optimiser and jitted, sharded ``train_step`` exactly as
``xct.train`` does, feeds it a fixed random batch of the config's shapes and reports:
compile seconds, the median step time after one warm-up step (volumes/s), the compiled
program's memory analysis (arguments + outputs + temporaries, bytes XLA plans for one
step) and, on CPU, the process peak RSS; on accelerators, the device's peak bytes in use.
The peer in the same run is the baseline model (``--peer=baseline64``) at the same shapes,
so the ratio shows what the U-Net's skips and attention cost; ``--conv_peer`` instead
measures the same config with other convolutions (``xla``: XLA's own 3D convolutions, the
version before ``xct.models.conv``; ``planes``: 2D planes with XLA's kernel gradient, the
version before the native one). Prints one JSON line each.

    python -m scripts.bench_train --config=unet64 --batch=2 --steps=3 --conv_peer xla planes
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def bench(config, steps: int) -> dict:
    import jax
    import numpy as np

    from xct.experiment import Experiment

    exp = Experiment.from_config(config)
    init_fn, step_fn, batch = exp.init, exp.train_step, exp.dummy_batch()
    rng = np.random.default_rng(0)
    batch = {
        k: (rng.standard_normal(v.shape).astype(v.dtype) * 0.1 if v.dtype.kind == "f" else v)
        for k, v in batch.items()
    }
    state = init_fn(jax.random.key(0), batch)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    planned = None
    if mem is not None:
        planned = int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        )
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.key(2 + i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[1:] or times)  # --steps=0: the one (post-compile) step
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    b = int(config.data.batch_size)
    return {
        "model": config.model.name,
        "resolution": int(config.geometry.resolution),
        "views": int(config.data.num_views),
        "batch": b,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "compile_s": round(compile_s, 1),
        "step_s": round(step_s, 3),
        "volumes_per_s": round(b / step_s, 3),
        "planned_gib": None if planned is None else round(planned / 2**30, 3),
        "temp_gib": None if mem is None else round(mem.temp_size_in_bytes / 2**30, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device_peak_gib": round(stats["peak_bytes_in_use"] / 2**30, 3)
        if "peak_bytes_in_use" in stats
        else None,
        "device": f"{dev.platform}:{dev.device_kind}",
        "conv3d": os.environ.get("XCT_CONV3D", "auto"),
        "jax": jax.__version__,
        "host": platform.node(),
        "date": datetime.date.today().isoformat(),
        "loss": float(metrics["loss"]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="unet64", help="configs/<name>.py")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument("--views", type=int, default=0, help="views (0: the config's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--peer", default="baseline64", help="config measured for the ratio ('' none)")
    p.add_argument("--resolution", type=int, default=0, help="override geometry.resolution")
    p.add_argument(
        "--conv_peer",
        nargs="*",
        choices=("xla", "planes"),
        default=None,
        help="peers: the same config with other convolutions, each in its own process: "
        "'xla' (XLA's 3D convolutions, the default when no mode is given) and/or 'planes' "
        "(2D planes with XLA's kernel gradient, before the native one)",
    )
    args = p.parse_args(argv)

    def config():
        c = importlib.import_module(f"xct.configs.{args.config}").get_config()
        c.mesh.data = 1
        if args.resolution:
            c.geometry.resolution = args.resolution
        if args.batch:
            c.data.batch_size = args.batch
        if args.views:
            c.data.num_views = args.views
        return c

    first = config()
    rows = [bench(first, args.steps)]
    print(json.dumps(rows[0]), flush=True)
    if args.conv_peer is not None:
        peers = [(args.config, mode) for mode in (args.conv_peer or ["xla"])]
    else:
        peers = [(args.peer, None)] if args.peer else []
    for peer, mode in peers:  # a separate process each, so its peak RSS is its own
        env = dict(os.environ, XCT_CONV3D=mode) if mode else None
        cmd = [sys.executable, "-m", "scripts.bench_train", "--peer=", f"--config={peer}"]
        cmd += [f"--resolution={first.geometry.resolution}", f"--batch={first.data.batch_size}"]
        cmd += [f"--views={first.data.num_views}"]
        cmd += [f"--steps={args.steps}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    for row in rows[1:]:
        print(
            f"{rows[0]['model']} ({rows[0]['conv3d']}) / {row['model']} "
            f"({row['conv3d']}) step time ratio: {rows[0]['step_s'] / row['step_s']:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
