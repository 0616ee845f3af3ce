"""Learned gradient descent (``xct.models.unrolled``), 64^3, 2 views: 6 unrolled
iterations, each one projection + back-projection and a small 3D CNN.

python -m xct.main --config=unrolled64 --workdir=/tmp/xct/unrolled64
"""

from ml_collections import ConfigDict

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.tfds.dataset = "synthetic_chest/res64_views8"
    c.geometry.resolution = 64
    c.model = ConfigDict(
        {"name": "unrolled", "num_iters": 6, "features": 16, "depth": 3, "memory": 4}
    )
    c.loss.projection = 0.0  # the iterations are data-consistent by construction
    return common.apply_arg(c, arg)
