"""Compile time of every jitted function a run uses, with the size of its program.

    python -m scripts.bench_compile --config=quickstart
    python -m scripts.bench_compile --config=default:smoke --set geometry.resolution=64

For each function (``init``, ``train_step``, ``predict_hu``, the evaluator's scores and
re-projection, and the render source's batch): the time to trace and lower it, the time
XLA takes to compile it, and the size of its StableHLO (lines, and ``while``/``scan``
loops left in it: unrolled loops show up as large programs with few loops). The
persistent compilation cache is off, so every figure is a real compile. Prints a table and
one JSON line per function; machine and date are in each row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def _measure(name, fn, *args) -> dict:
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    text = lowered.as_text()
    return {
        "function": name,
        "trace_lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "hlo_lines": text.count("\n"),
        "while_loops": text.count("stablehlo.while"),
    }


def measure(config) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xct import data, evaluator
    from xct.experiment import Experiment

    exp = Experiment.from_config(config)
    key = jax.random.key(0)
    batch = exp.dummy_batch()
    rows = [_measure("init", exp.init, key, batch)]
    state = exp.init(key, batch)
    sharded = exp.shard(batch)
    rows.append(_measure("train_step", exp.train_step, state, sharded, key))
    b = exp.eval.batch_size
    drr = jnp.zeros((b, exp.eval.num_views) + exp.acquisition.det_shape)
    angles = jnp.zeros((b, exp.eval.num_views))
    rows.append(_measure("predict_hu", exp.predict_hu, state.ema_params, drr, angles))
    r = exp.acquisition.resolution
    vol = jnp.zeros((b, r, r, r))
    rows.append(_measure("eval_scores", evaluator._scores, vol, vol, drr, drr))
    rows.append(_measure("eval_reproject", data._render_views, exp.acquisition, vol[0], angles[0]))
    if isinstance(exp.data, data.RenderSource):
        pool, render = exp.data.renderer(exp.mesh, exp.rules)
        rows.append(_measure("render_batch", render, key, pool, np.float32(1.0)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="quickstart", help="NAME[:arg] or FILE.py[:arg]")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    p.add_argument("--json", default="", help="also append the rows to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from scripts.quality_table import _load_config

    config = _load_config(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = type(node[leaf])(json.loads(value) if value[:1] in "[{" else value)
    meta = {
        "config": args.config + "".join(f" {s}" for s in args.set),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }
    rows = measure(config)
    print(f"{'function':<16}{'trace+lower s':>14}{'compile s':>11}{'HLO lines':>11}{'loops':>7}")
    for r in rows:
        print(
            f"{r['function']:<16}{r['trace_lower_s']:>14.2f}{r['compile_s']:>11.2f}"
            f"{r['hlo_lines']:>11}{r['while_loops']:>7}"
        )
    for r in rows:
        line = json.dumps({**r, **meta})
        print(line)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
