"""U-Net, 64^3, 2 views (geometry-aware back-projection lifting, bottleneck attention).

python -m xct.main --config=unet64 --workdir=/tmp/xct/unet64
"""

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.tfds.dataset = "synthetic_chest/res64_views8"
    c.geometry.resolution = 64
    return common.apply_arg(c, arg)
