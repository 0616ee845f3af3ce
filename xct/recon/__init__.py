"""Classical reconstruction on xct's matched projector.

``fdk`` (filtered backprojection: FDK for circular cone beam, FBP for parallel beam) and
the iterative solvers ``sirt``, ``sart`` (SART / OS-SART), ``cgls`` and ``tv`` (TV-regularised
least squares by preconditioned Chambolle-Pock), which share the signature
``solver(drr, geom, grid, num_iters, x0=None, ...) -> (volume, residuals)``; ``sirt``,
``cgls``, ``tv`` and ``refine.refine`` take ``constraints=`` from ``priors`` (support from
the views' visual hull, value bounds), and ``template`` registers a real CT to the views;
``atlas`` screens several, registers the best few and fuses them into one prior
(``atlas.atlas``), and ``atlas.atlas_tv`` is TV pulled towards it.
"""

from xct.recon import atlas, priors
from xct.recon.fdk import fdk, field_of_view_mask, parker_weights, ramp_filter, ramp_response
from xct.recon.iterative import cgls, gradient, gradient_adjoint, sart, sirt, tv
from xct.recon.priors import Constraints, visual_hull

__all__ = [
    "Constraints",
    "atlas",
    "cgls",
    "fdk",
    "field_of_view_mask",
    "gradient",
    "gradient_adjoint",
    "parker_weights",
    "priors",
    "ramp_filter",
    "ramp_response",
    "sart",
    "sirt",
    "tv",
    "visual_hull",
]
