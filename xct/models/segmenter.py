"""A small 3D organ segmenter whose features make a "medical perceptual loss" offline.

Perceptual losses compare the features a pretrained network extracts from the prediction
and from the target. The medical ones in the literature use networks trained on large CT
archives, whose weights xct does not download. This is the honest offline form: a network
the project trains itself, on its own labelled phantoms (``phantoms.chest_phantom``'s organ
label maps), to segment organs from a normalised CT; its intermediate features, frozen,
then define ``losses.perceptual``. ``scripts/train_segmenter.py`` trains and saves one
(``save``/``load``: Flax msgpack plus a JSON of its settings).

``OrganSegmenter``: ``[B, D, D, D]`` normalised CT (``physics.normalize_ct``) -> logits
``[B, D, D, D, classes]``; ``features`` returns the activations of its two scales.
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp

from xct.models.conv import Conv


class OrganSegmenter(nn.Module):
    """Two-scale 3D CNN: ``width`` channels at full resolution, twice as many at half,
    upsampled back to per-voxel class logits."""

    classes: int
    width: int = 16

    def setup(self):
        f = self.width
        self.c1 = Conv(f, (3, 3, 3), name="c1")
        self.c2 = Conv(f, (3, 3, 3), name="c2")
        self.down = Conv(2 * f, (3, 3, 3), strides=(2, 2, 2), name="down")
        self.c3 = Conv(2 * f, (3, 3, 3), name="c3")
        self.up = Conv(f, (3, 3, 3), name="up")
        self.head = Conv(self.classes, (1, 1, 1), name="head")

    def _encode(self, ct):
        h = ct[..., None]
        h1 = nn.silu(self.c2(nn.silu(self.c1(h))))
        h2 = nn.silu(self.c3(nn.silu(self.down(h1))))
        return h1, h2

    def __call__(self, ct: jax.Array) -> jax.Array:
        h1, h2 = self._encode(ct)
        b, d, hh, w, c = h2.shape
        up = jax.image.resize(h2, (b, 2 * d, 2 * hh, 2 * w, c), "trilinear")
        up = up[:, : h1.shape[1], : h1.shape[2], : h1.shape[3]]
        return self.head(nn.silu(self.up(jnp.concatenate([h1, up], -1))))

    def features(self, ct: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The activations of both scales: ``([B, D, D, D, f], [B, D/2, D/2, D/2, 2f])``."""
        return self._encode(ct)


def save(directory, params, *, classes: int, width: int, info: dict | None = None):
    """Write ``segmenter.msgpack`` (parameters) and ``segmenter.json`` (settings, ``info``)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "segmenter.msgpack").write_bytes(flax.serialization.to_bytes(params))
    meta = {"classes": int(classes), "width": int(width), **(info or {})}
    (d / "segmenter.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def load(directory) -> tuple[OrganSegmenter, dict]:
    """``(module, params)`` saved by :func:`save` in ``directory``.

    Raises:
      ValueError: the folder lacks ``segmenter.json`` / ``segmenter.msgpack`` (named).
    """
    d = pathlib.Path(directory)
    meta_file, params_file = d / "segmenter.json", d / "segmenter.msgpack"
    for f in (meta_file, params_file):
        if not f.is_file():
            raise ValueError(
                f"loss.perceptual_net: {f} not found (train one with "
                "python -m scripts.train_segmenter --out DIR)"
            )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    model = OrganSegmenter(classes=int(meta["classes"]), width=int(meta["width"]))
    template = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8), jnp.float32))
    params = flax.serialization.from_bytes(template, params_file.read_bytes())
    return model, params
