"""U-Net, 128^3, 8 views with attention fusion.

python -m xct.main --config=views8_128 --workdir=/tmp/xct/views8_128
"""

from xct.configs import common, unet128


def get_config(arg=None):
    c = unet128.get_config()
    c.data.num_views = 8
    c.model.fusion = "attention"
    return common.apply_arg(c, arg)
