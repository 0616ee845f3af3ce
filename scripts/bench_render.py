"""On-accelerator view rendering for training (``input_pipeline.render_batch``) throughput.

    python -m scripts.bench_render

Batch of 8 CTs (128^3, 3.1 mm), random flips and angles, Poisson noise; with and without
elastic deformation; 2 and 8 views of 128^2. Prints examples/s and DRRs/s per setting.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xct import geometry, input_pipeline, phantoms

    n, batch = 128, 8
    grid = geometry.VolumeGrid.centered((n, n, n), 400.0 / n)
    sl = phantoms.voxelize(phantoms.shepp_logan_3d(180.0, scale=1000.0), grid, supersample=1)
    hu = jnp.broadcast_to(sl - 1000.0, (batch, n, n, n))
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__}))
    for views in (2, 8):
        for elastic in (0.0, 8.0):
            f = jax.jit(
                lambda k, x, v=views, e=elastic: input_pipeline.render_batch(
                    k,
                    x,
                    grid,
                    num_views=v,
                    det_shape=(n, n),
                    pixel_mm=750.0 / n,
                    elastic_mm=e,
                    photons=1e5,
                )
            )
            jax.block_until_ready(f(jax.random.key(0), hu))
            reps = 10
            t = time.perf_counter()
            for i in range(reps):
                out = f(jax.random.key(i), hu)
            jax.block_until_ready(out)
            dt = (time.perf_counter() - t) / reps
            print(
                json.dumps(
                    {
                        "views": views,
                        "elastic_mm": elastic,
                        "batch": batch,
                        "ms_per_batch": round(dt * 1e3, 2),
                        "examples_per_s": round(batch / dt, 1),
                        "drrs_per_s": round(batch * views / dt, 1),
                        "finite": bool(np.isfinite(np.asarray(out["drr"])).all()),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
