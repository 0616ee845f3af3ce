"""xct.rng: the named random streams of a run, in their documented order, and who uses which."""

import jax
import numpy as np

from xct import data, geometry, rng, sharding


def _bits(key):
    return np.asarray(jax.random.key_data(key))


def test_streams_are_the_roots_split_in_the_documented_order():
    s = rng.streams(7)
    assert list(s) == ["init", "train", "data"] == list(rng.STREAMS)
    split = jax.random.split(jax.random.key(7), 3)
    for i, name in enumerate(rng.STREAMS):
        np.testing.assert_array_equal(_bits(s[name]), _bits(split[i]))
    assert len({_bits(k).tobytes() for k in s.values()}) == 3  # three different streams
    np.testing.assert_array_equal(
        _bits(rng.step_key(s["train"], 5)), _bits(jax.random.fold_in(s["train"], 5))
    )
    assert _bits(rng.streams(8)["init"]).tobytes() != _bits(s["init"]).tobytes()


def test_a_rendered_batch_comes_from_the_data_stream_folded_with_its_step():
    from xct.configs import default

    acq = geometry.Acquisition(resolution=8, fov_mm=400.0)
    render_fields = dict(default.get_config().data.render, pool_size=2)
    src = data.RenderSource(acquisition=acq, batch_size=2, num_views=2, seed=3, **render_fields)
    mesh = sharding.make_mesh({"data": 1, "spatial": 1}, jax.devices()[:1])
    stream = src.open(mesh, sharding.DEFAULT_RULES, None, 0)
    pool, render = src.renderer(mesh, sharding.DEFAULT_RULES)
    key = rng.step_key(rng.streams(3)["data"], 4)
    want = render(key, pool, np.float32(1.0))
    got = stream.batch(4)
    for k in ("drr", "ct", "angles_deg"):
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    other = render(rng.step_key(rng.streams(3)["train"], 4), pool, np.float32(1.0))
    assert not np.array_equal(np.asarray(other["drr"]), np.asarray(got["drr"]))
