"""Classical reconstruction on xct's matched projector.

``fdk`` (filtered backprojection: FDK for circular cone beam, FBP for parallel beam) and
the iterative solvers ``sirt``, ``sart`` (SART / OS-SART), ``cgls`` and ``tv`` (TV-regularised
least squares by preconditioned Chambolle-Pock), which share the signature
``solver(drr, geom, grid, num_iters, x0=None, ...) -> (volume, residuals)``.
"""

from xct.recon.fdk import fdk, field_of_view_mask, parker_weights, ramp_filter, ramp_response
from xct.recon.iterative import cgls, gradient, gradient_adjoint, sart, sirt, tv

__all__ = [
    "cgls",
    "fdk",
    "field_of_view_mask",
    "gradient",
    "gradient_adjoint",
    "parker_weights",
    "ramp_filter",
    "ramp_response",
    "sart",
    "sirt",
    "tv",
]
