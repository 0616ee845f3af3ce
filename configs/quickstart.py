"""Quickstart: a small U-Net from 2 views of 32^3 synthetic chests, minutes on a laptop CPU.

    python -m xct.main --config=quickstart --workdir=quickstart_out/run
    python -m xct.main --config=quickstart --workdir=quickstart_out/run --mode=evaluate
    python -m xct.main --config=quickstart:unrolled --workdir=quickstart_out/unrolled

``:unrolled`` trains learned gradient descent (``xct.models.unrolled``: 6 iterations, 8
channels) instead of the U-Net on the same data, steps and schedule.

The dataset (96 phantoms) is built on first use into ``~/xct_data`` (``make quickstart``
puts it in ``quickstart_out/data``).
"""

from ml_collections import ConfigDict

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.tfds.dataset = "synthetic_chest/tiny_res32_views8"
    c.data.tfds.split_sizes = {"train": 80, "validation": 8, "test": 8}
    c.geometry.resolution = 32
    c.data.batch_size = 4
    c.model.base_features = 8
    c.model.num_levels = 3
    c.train.num_steps = 400
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.checkpoint_every = 100
    c.optim.warmup_steps = 40
    if arg == "unrolled":
        c.model = ConfigDict(
            {"name": "unrolled", "num_iters": 6, "features": 8, "depth": 3, "memory": 4}
        )
        c.loss.projection = 0.0  # the iterations are data-consistent by construction
        return c
    return common.apply_arg(c, arg)
