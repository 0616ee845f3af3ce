"""Named random streams: every random number of a run comes from one of them.

``streams(seed)`` splits the root key ``jax.random.key(seed)`` into ``len(STREAMS)`` keys
(``jax.random.split``) and names them, in this fixed order:

* ``init``: the initial parameters (``Experiment.fresh_state``), used as is;
* ``train``: the training step's randomness (patches, extra projection views, ...): step
  ``s`` uses ``fold_in(streams["train"], s)``;
* ``data``: a rendered data source's batches (``data.RenderSource``): step ``s`` uses
  ``fold_in(streams["data"], s)``.

A key per step is a function of the seed and the step only, so a resumed run needs no
saved key. Append new streams at the end of ``STREAMS``: the keys of the others stay.
"""

from __future__ import annotations

import jax

#: The streams, in the order of ``jax.random.split(jax.random.key(seed), len(STREAMS))``.
STREAMS = ("init", "train", "data")


def streams(seed: int) -> dict[str, jax.Array]:
    """``{name: key}`` of every stream of ``STREAMS`` for the root seed ``seed``."""
    keys = jax.random.split(jax.random.key(int(seed)), len(STREAMS))
    return dict(zip(STREAMS, keys, strict=True))


def step_key(stream: jax.Array, step: int) -> jax.Array:
    """The key of ``step`` in ``stream``: ``fold_in(stream, step)``."""
    return jax.random.fold_in(stream, step)
