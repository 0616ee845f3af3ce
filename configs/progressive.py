"""Progressive multi-resolution U-Net: 64^3 -> 128^3 -> 256^3, each stage starting from the
previous one's weights (the model's parameters do not depend on the resolution), with a
curriculum on phantoms rendered on the accelerator (phantom complexity, deformation and noise
ramp up).

python -m xct.main --config=progressive --workdir=/tmp/xct/progressive
python -m xct.main --config=progressive:smoke --workdir=/tmp/xct/smoke  # a few minutes

Stages go to WORKDIR/stage<i>_<resolution>; an interrupted schedule resumes where it was.
"""

from xct.configs import common, default


def get_config(arg=None):
    c = default.get_config()
    c.data.source = "render"  # rendered each step: any resolution, no dataset to build
    c.data.render.pool_size = 32
    c.data.render.elastic_mm = 8.0
    c.data.render.photons = 1e5
    c.data.render.curriculum_steps = 2000
    c.model.base_features = 16
    c.model.num_levels = 4
    c.train.stages = "64:20000:8,128:10000:2,256:5000:1"  # resolution:steps:batch
    c.train.num_steps = 20000  # per stage: set by train.stages
    return common.apply_arg(c, arg)
