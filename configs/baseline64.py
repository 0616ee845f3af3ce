"""The plain encoder-decoder baseline (no skips, X2CT-style expansion), 64^3, 2 views.

python -m xct.main --config=configs/baseline64.py --workdir=/tmp/xct/baseline64
"""

from configs import common, unet64


def get_config(arg=None):
    c = unet64.get_config()
    c.model.name = "baseline"
    c.loss.projection = 0.0
    return common.apply_arg(c, arg)
