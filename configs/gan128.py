"""U-Net + 3D PatchGAN (LSGAN with feature matching), 128^3, 2 views.

python -m xct.main --config=gan128 --workdir=/tmp/xct/gan128
"""

from xct.configs import common, unet128


def get_config(arg=None):
    c = unet128.get_config()
    c.loss.adversarial = 0.01
    c.loss.feature_matching = 0.1
    return common.apply_arg(c, arg)
