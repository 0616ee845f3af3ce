"""U-Net (base 8, 3 levels, back-projection lifting), 32^3, 400 mm cube, 2 views (0 and 90
degrees): the model make quickstart trains, 400 steps on 80 procedural chest phantoms
(version 1).

Trained with (a 4-minute run on a 2-core CPU):

    # what make quickstart runs, after building the data
    python -m xct.main --config=quickstart --workdir=quickstart_out/train \\
        --config.data.data_dir=quickstart_out/data

Score it on a folder of CTs, or reconstruct your own radiographs:

    python -m xct.main --mode=evaluate --config=checkpoints/unet32_2v/config.py \\
        --workdir=checkpoints/unet32_2v --checkpoint=last --eval_ct_dir=DIR
    python -m scripts.quality_table --checkpoint_workdir=checkpoints/unet32_2v \\
        --config=checkpoints/unet32_2v/config.py --checkpoint=last --ct_dir=DIR --phantoms=0 ...

Written by ``python -m scripts.ship_checkpoint``; BENCHMARKS.md has its scores.
"""

from xct.configs import quickstart


def get_config(arg=None):
    c = quickstart.get_config(arg)
    c.train.checkpoint_every = 60
    return c
