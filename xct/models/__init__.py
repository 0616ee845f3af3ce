"""Flax modules for few-view X-ray to CT: view encoders, 2D->3D lifting, 3D U-Net, PatchGAN.

``get_model(name, **kwargs)`` builds a module from a config section: ``config.model``
without its ``name`` (one of ``MODELS``) is the keyword arguments, and a generator gets its
acquisition geometry as one object (``xct.experiment.make_model`` does
``get_model(name, acquisition=acq, **rest)``); ``model_kwargs(name)`` lists what it accepts.

Generators (``"baseline"``, ``"unet"``, ``"unrolled"``: learned gradient descent through the
projector, ``xct.models.unrolled``)::

    acq = xct.geometry.Acquisition(resolution=32)      # D = 32: the cube and each DRR
    model = get_model("unet", acquisition=acq, lifting="backproject", num_levels=3)
    variables = model.init(key, drr, angles_deg)            # {"params"} only
    out = model.apply(variables, drr, angles_deg, train=True)
    out["ct"]            # [B, D, D, D] float32, normalised CT (linear head)
    out["seg_logits"]    # [B, D, D, D, K], only with seg_classes = K > 0

with ``drr [B, V, D, D]`` normalised line integrals and ``angles_deg [B, V]`` gantry angles
(any ``V >= 1``; the same parameters serve every view count).

Discriminator (``"patchgan"``): ``model.apply(variables, ct, train=..., mutable=...)`` ->
``(logits, features)``; see ``xct.models.discriminator`` for the spectral-norm state.

Import rule: ``xct.models`` imports only jax/flax, except ``lifting.py``, which needs
``xct.geometry`` and ``xct.projector`` for the geometry-aware back-projection, and
``unrolled.py``, whose iterations call the projector, SIRT's preconditioners
(``xct.recon.iterative.sirt_weights``) and ``xct.physics``' unit conversions.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from xct.models.baseline import Baseline
from xct.models.discriminator import PatchGAN3D
from xct.models.encoder import ViewEncoder
from xct.models.fusion import FUSIONS, ViewFusion
from xct.models.lifting import LIFTINGS, backproject_view, expand_view
from xct.models.unet import ATTENTIONS, UNetGenerator
from xct.models.unrolled import LearnedGradientDescent

MODELS: dict[str, type[nn.Module]] = {
    "baseline": Baseline,
    "unet": UNetGenerator,
    "unrolled": LearnedGradientDescent,
    "patchgan": PatchGAN3D,
}

#: Registry names of the discriminators (the others are generators).
DISCRIMINATORS = ("patchgan",)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments ``get_model(name, ...)`` accepts."""
    cls = _model_class(name)
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def _model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"model name: unknown model {name!r}, expected one of {sorted(MODELS)}")
    return MODELS[name]


def get_model(name: str, **kwargs) -> nn.Module:
    """The module registered as ``name`` (a key of ``MODELS``).

    ``dtype`` may be a string (``"bfloat16"``, as configs hold it) or a dtype. Raises
    ``ValueError`` naming an unknown model, an unknown keyword, or a bad value.
    """
    allowed = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown keyword(s) {unknown}, expected some of {sorted(allowed)}"
        )
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in _DTYPES:
            raise ValueError(
                f"model {name!r}: dtype {kwargs['dtype']!r}, expected one of {sorted(_DTYPES)}"
            )
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    return MODELS[name](**kwargs)


__all__ = [
    "ATTENTIONS",
    "FUSIONS",
    "LIFTINGS",
    "MODELS",
    "Baseline",
    "LearnedGradientDescent",
    "PatchGAN3D",
    "UNetGenerator",
    "ViewEncoder",
    "ViewFusion",
    "backproject_view",
    "expand_view",
    "get_model",
    "model_kwargs",
]
