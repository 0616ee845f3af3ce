"""Learned gradient descent (6 iterations, 16 features), 64^3, 400 mm cube, 2 views (0 and 90
degrees): trained on procedural chest phantoms version 2 rendered every step, batch 2,
stopped by its time budget.

Trained with (about 95 minutes on a 2-core CPU, shared with other jobs part of the time; the
run was resumed at steps 100 and 200 as the code got faster, and stopped by its time budget
at step 1395):

    python -m xct.main --config=unrolled64 --workdir=/tmp/runs/lgd64 \\
        --config.data.source=render --config.data.phantom_version=2 \\
        --config.data.num_views=2 --config.data.batch_size=2 --config.train.num_steps=1400 \\
        --config.train.max_seconds=4800 --config.train.eval_every=100000 \\
        --config.train.checkpoint_every=100

Score it on a folder of CTs, or reconstruct your own radiographs:

    python -m xct.main --mode=evaluate --config=checkpoints/unrolled64_2v/config.py \\
        --workdir=checkpoints/unrolled64_2v --checkpoint=last --eval_ct_dir=DIR
    python -m scripts.quality_table --checkpoint_workdir=checkpoints/unrolled64_2v \\
        --config=checkpoints/unrolled64_2v/config.py --checkpoint=last --ct_dir=DIR --phantoms=0 ...

Written by ``python -m scripts.ship_checkpoint``; BENCHMARKS.md has its scores.
"""

from xct.configs import unrolled64


def get_config(arg=None):
    c = unrolled64.get_config(arg)
    c.data.source = 'render'
    c.data.phantom_version = 2
    c.data.num_views = 2
    c.data.batch_size = 2
    c.train.num_steps = 1400
    c.train.max_seconds = 4800.0
    c.train.eval_every = 100000
    c.train.checkpoint_every = 100
    return c
