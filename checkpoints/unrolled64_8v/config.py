"""Learned gradient descent (6 iterations, 16 features), 64^3, 400 mm cube, 8 views over 180
degrees: unrolled64_2v fine-tuned at 8 views on procedural chest phantoms version 2 rendered
every step, batch 2, stopped by its time budget.

Trained with (a 70-minute (479 steps) run on a 2-core CPU):

    python -m xct.main --config=checkpoints/unrolled64_2v/config.py \\
        --workdir=/tmp/runs/lgd64_8v --config.init_from=checkpoints/unrolled64_2v \\
        --config.data.num_views=8 --config.train.num_steps=3000 \\
        --config.train.max_seconds=4200 --config.train.checkpoint_every=50

Score it on a folder of CTs, or reconstruct your own radiographs:

    python -m xct.main --mode=evaluate --config=checkpoints/unrolled64_8v/config.py \\
        --workdir=checkpoints/unrolled64_8v --checkpoint=last --eval_ct_dir=DIR
    python -m scripts.quality_table --checkpoint_workdir=checkpoints/unrolled64_8v \\
        --config=checkpoints/unrolled64_8v/config.py --checkpoint=last --ct_dir=DIR --phantoms=0 ...

Written by ``python -m scripts.ship_checkpoint``; BENCHMARKS.md has its scores.
"""

from xct.configs import unrolled64


def get_config(arg=None):
    c = unrolled64.get_config(arg)
    c.data.source = 'render'
    c.data.phantom_version = 2
    c.data.num_views = 8
    c.data.batch_size = 2
    c.train.num_steps = 3000
    c.train.max_seconds = 4200.0
    c.train.eval_every = 100000
    c.train.checkpoint_every = 50
    c.init_from = 'checkpoints/unrolled64_2v'
    return c
