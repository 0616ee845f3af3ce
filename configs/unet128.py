"""U-Net, 128^3, 2 views.

python -m xct.main --config=unet128 --workdir=/tmp/xct/unet128
"""

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.tfds.dataset = "synthetic_chest/res128_views8"
    c.geometry.resolution = 128
    c.data.batch_size = 2
    c.model.base_features = 16
    c.model.num_levels = 4
    c.train.num_steps = 20000
    return common.apply_arg(c, arg)
