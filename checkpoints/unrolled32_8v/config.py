"""Learned gradient descent (6 iterations, 8 features), 32^3, 400 mm cube, 8 views over 180
degrees: 600 steps on the quickstart's 80 procedural chest phantoms (version 1).

Trained with (a 16-minute run on a 2-core CPU):

    # after make quickstart built the data
    python -m xct.main --config=quickstart:unrolled --workdir=quickstart_out/unrolled8 \\
        --config.data.data_dir=quickstart_out/data --config.data.num_views=8 \\
        --config.train.num_steps=600 --config.train.eval_every=300

Score it on a folder of CTs, or reconstruct your own radiographs:

    python -m xct.main --mode=evaluate --config=checkpoints/unrolled32_8v/config.py \\
        --workdir=checkpoints/unrolled32_8v --checkpoint=last --eval_ct_dir=DIR
    python -m scripts.quality_table --checkpoint_workdir=checkpoints/unrolled32_8v \\
        --config=checkpoints/unrolled32_8v/config.py --checkpoint=last --ct_dir=DIR --phantoms=0 ...

Written by ``python -m scripts.ship_checkpoint``; BENCHMARKS.md has its scores.
"""

from xct.configs import quickstart


def get_config(arg=None):
    c = quickstart.get_config(arg or 'unrolled')
    c.data.num_views = 8
    c.train.num_steps = 600
    c.train.eval_every = 300
    return c
