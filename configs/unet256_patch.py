"""U-Net, 256^3, 2 views, trained on random 128^3 patches (whole views in, a patch out);
evaluated and predicted by overlapping sliding windows, so 256^3 fits where whole-volume
training does not.

python -m xct.main --config=unet256_patch --workdir=/tmp/xct/unet256_patch
python -m xct.main --config=unet256_patch:smoke --workdir=/tmp/xct/smoke  # a few minutes
"""

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.tfds.dataset = "synthetic_chest/res256_views8"
    c.geometry.resolution = 256
    c.data.batch_size = 2
    c.model.base_features = 16
    c.model.num_levels = 4
    c.loss.projection = 0.0  # needs whole volumes; patches are compared voxel-wise
    c.train.patch_size = 128
    c.train.patch_overlap = 16
    c.train.num_steps = 40000
    c.eval.batch_size = 1
    return common.apply_arg(c, arg)
