"""The plain encoder-decoder baseline (no skips, X2CT-style expansion), 64^3, 2 views.

python -m xct.main --config=baseline64 --workdir=/tmp/xct/baseline64
"""

from ml_collections import ConfigDict

from xct.configs import common, unet64


def get_config(arg=None):
    c = unet64.get_config()
    c.model = ConfigDict()
    c.model.name = "baseline"  # plain encoder-decoder (xct.models.get_model)
    c.model.base_features = 16  # channels of the first layer
    c.model.num_layers = 3  # encoder / decoder layers
    c.model.seg_classes = 0  # >0: segmentation head
    c.loss.projection = 0.0
    return common.apply_arg(c, arg)
