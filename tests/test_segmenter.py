"""xct.models.segmenter and the perceptual loss built on it (losses.perceptual)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import losses
from xct.models import segmenter


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    model = segmenter.OrganSegmenter(classes=3, width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))
    d = tmp_path_factory.mktemp("seg")
    segmenter.save(d, params, classes=3, width=4, info={"note": "test"})
    return model, params, d


def test_save_load_round_trip_and_shapes(net):
    model, params, d = net
    loaded, p2 = segmenter.load(d)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 8))
    np.testing.assert_allclose(loaded.apply(p2, x), model.apply(params, x), rtol=1e-6)
    assert loaded.apply(p2, x).shape == (2, 8, 8, 8, 3)
    f1, f2 = loaded.apply(p2, x, method=loaded.features)
    assert f1.shape == (2, 8, 8, 8, 4) and f2.shape == (2, 4, 4, 4, 8)


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"segmenter\.json not found"):
        segmenter.load(tmp_path)


def test_perceptual_loss_is_zero_on_the_target_and_trains_only_the_prediction(net):
    model, params, _ = net

    def features(ct):
        return model.apply(params, ct, method=model.features)

    t = jax.random.uniform(jax.random.key(2), (2, 8, 8, 8))
    p = t + 0.1 * jax.random.normal(jax.random.key(3), t.shape)
    np.testing.assert_allclose(losses.perceptual(t, t, features), 0.0, atol=1e-7)
    val = losses.perceptual(p, t, features)
    assert val.shape == (2,) and np.all(val > 0)
    loss = lambda a, b: losses.perceptual(a, b, features).sum()  # noqa: E731
    g_pred, g_target = jax.jit(jax.grad(loss, (0, 1)))(p, t)
    assert float(jnp.abs(g_pred).sum()) > 0 and float(jnp.abs(g_target).sum()) == 0


def test_config_needs_the_segmenter_folder():
    from xct.configs import quickstart
    from xct.experiment import Loop, make_setup, settings
    from xct.geometry import Acquisition

    c = quickstart.get_config()
    c.loss.perceptual = 0.1
    loop = settings(Loop, c.train, "train")
    with pytest.raises(ValueError, match="loss.perceptual_net"):
        make_setup(c, Acquisition(resolution=32, fov_mm=400.0), loop)
