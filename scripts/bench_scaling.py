"""Per-device memory of the training step against the ``spatial`` mesh size (compile only).

    python -m scripts.bench_scaling --configs unet128 unet256 --spatial 1 2 4 --devices 4

Fakes ``--devices`` CPU devices (or uses the real accelerators with ``--real``), builds the
config's jitted, sharded ``train_step`` on a mesh ``data=1 x spatial=S`` with a batch of
``--batch``, compiles it without running, and prints XLA's memory analysis of the compiled
per-device program (arguments, outputs, temporaries: the bytes one device must hold for a
step) as one JSON line per case, plus the ratio against ``spatial=1``. On CPU this is the
partitioned program XLA would run; the accelerator's own compiler plans similar buffers
(measure there with ``--real`` for the figures that matter).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["unet128", "unet256"])
    p.add_argument("--spatial", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--real", action="store_true", help="use the real devices (no faking)")
    args = p.parse_args(argv)
    if not args.real:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    from xct import sharding
    from xct.experiment import Experiment

    for name in args.configs:
        base = None
        for s in args.spatial:
            c = importlib.import_module(f"xct.configs.{name}").get_config()
            c.mesh.data = 1
            c.mesh.spatial = s
            c.data.batch_size = args.batch
            exp = Experiment.from_config(c)
            mesh, step_fn, abstract, batch = (
                exp.mesh,
                exp.train_step,
                exp.abstract_state,
                exp.dummy_batch(),
            )
            shardings = sharding.batch_shardings(mesh, batch, exp.rules)
            abstract_batch = {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                for k, v in batch.items()
            }
            key = jax.ShapeDtypeStruct(
                (), jax.random.key(0).dtype, sharding=sharding.replicated(mesh)
            )
            t0 = time.perf_counter()
            compiled = step_fn.lower(abstract, abstract_batch, key).compile()
            secs = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            base = base or total
            dev = jax.devices()[0]
            row = {
                "config": name,
                "resolution": int(c.geometry.resolution),
                "batch": args.batch,
                "mesh": {"data": 1, "spatial": s},
                "per_device_gib": round(total / 2**30, 3),
                "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3),
                "arguments_gib": round(mem.argument_size_in_bytes / 2**30, 3),
                "ratio_vs_spatial1": round(total / base, 3),
                "compile_s": round(secs, 1),
                "device": f"{dev.platform}:{dev.device_kind}",
                "jax": jax.__version__,
                "host": platform.node(),
                "date": datetime.date.today().isoformat(),
            }
            print(json.dumps(row), flush=True)
            del compiled, step_fn, exp
            np.asarray(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
