"""U-Net, 256^3, 2 views (a GPU config; see docs for memory).

python -m xct.main --config=configs/unet256.py --workdir=/tmp/xct/unet256
"""

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.tfds.dataset = "synthetic_chest/res256_views8"
    c.geometry.resolution = 256
    c.data.batch_size = 1
    c.model.base_features = 16
    c.model.num_levels = 5
    c.train.num_steps = 40000
    return common.apply_arg(c, arg)
