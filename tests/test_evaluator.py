"""xct.evaluator.volume_scores: the one scorer of validation, evaluation and the quality
table (whole volume, DRRs, inside the body)."""

import numpy as np
import pytest

from xct import evaluator, metrics


def _pair(seed=0, shape=(2, 16, 16, 16)):
    rng = np.random.default_rng(seed)
    true = rng.uniform(-1000, 800, shape).astype(np.float32)
    return true, true.copy()


def test_body_box_is_the_masks_bounds_at_least_seven_voxels():
    body = np.zeros((16, 16, 16), bool)
    body[3:12, 5:6, 2:14] = True
    assert evaluator.body_box(body) == (slice(3, 12), slice(2, 9), slice(2, 14))
    assert evaluator.body_box(np.zeros((16, 16, 16), bool)) == (slice(0, 16),) * 3


def test_whole_volume_scores_and_drr_psnr():
    true, pred = _pair()
    pred[1] += 10.0  # the second volume 10 HU off everywhere
    drr = np.ones((2, 2, 8, 8), np.float32)
    s = evaluator.volume_scores(pred, true, drr * 0.9, drr)
    assert not any(k.endswith("_body") for k in s)
    np.testing.assert_allclose(np.asarray(s["mae_hu"]), [0.0, 10.0], atol=1e-3)
    np.testing.assert_allclose(np.asarray(s["drr_psnr"]), [20.0, 20.0], rtol=1e-5)  # 0.1 off
    assert {"x2ct_psnr", "x2ct_ssim", "x2ct_cosine_similarity"} <= set(s)
    assert "drr_psnr" not in evaluator.volume_scores(pred, true)


@pytest.mark.parametrize("offset", [25.0])
def test_inside_the_body(offset):
    """Errors only outside the body: perfect inside; errors only inside: the body's MAE is
    the offset; x2ct inside the body is x2ct on the body's box."""
    true, _ = _pair(1)
    body = np.zeros(true.shape, bool)
    body[:, 4:12, 3:13, 5:11] = True
    outside = np.where(body, true, true + offset)
    s = evaluator.volume_scores(outside, true, body=body)
    np.testing.assert_allclose(np.asarray(s["mae_hu_body"]), 0.0, atol=1e-4)
    assert np.all(np.asarray(s["mae_hu"]) > 0.5 * offset)
    inside = np.where(body, true + offset, true)
    s = evaluator.volume_scores(inside, true, body=body)
    np.testing.assert_allclose(np.asarray(s["mae_hu_body"]), offset, rtol=1e-4)
    box = evaluator.body_box(body[0])
    want = metrics.x2ct_metrics(inside[0][box][None], true[0][box][None])
    np.testing.assert_allclose(s["x2ct_psnr_body"][0], np.asarray(want["psnr"])[0], rtol=1e-6)
    assert s["x2ct_psnr_body"].shape == (2,) and "psnr_mask" not in s


def test_jitted_scores_equal_the_volume_path():
    """The scores-only step (prediction, the members' mean, re-projection and scores jitted
    on the mesh; validation's path) gives the numbers of the path that brings the volumes
    to the host (evaluation's), within float32 tolerance: one member and an ensemble of
    two, 3 examples in a padded batch of 4 on 2 devices."""
    import jax

    from xct import data, physics
    from xct.configs import default
    from xct.experiment import Experiment

    c = default.get_config("smoke")
    c.data.source = "render"
    c.geometry.resolution = 16
    c.model.num_levels, c.model.attention = 2, "none"
    c.mesh.data = 2 if len(jax.devices()) >= 2 else 1
    exp = Experiment.from_config(c)
    rng = np.random.default_rng(0)
    members = [
        jax.tree.map(
            lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), exp.abstract_state.params
        )
        for _ in range(2)
    ]
    grid, angles = exp.acquisition.grid(), exp.acquisition.view_angles(2)
    examples = []
    for i in range(3):
        hu = rng.uniform(-1000, 1000, (16, 16, 16)).astype(np.float32)
        drr = rng.uniform(0, 1, (2, 16, 16)).astype(np.float32)
        ct = np.asarray(physics.normalize_ct(hu), np.float32)
        examples.append(data.Example(f"v{i}", drr, angles, ct, grid, "test"))
    for params in (members[:1], members):
        volumes, shown = exp.evaluator.run(params, examples, report_volumes=1)
        assert len(shown) == 1  # this path brought the volumes to the host
        scores, _ = exp.evaluator.run(params, examples)
        assert [r["id"] for r in scores] == ["v0", "v1", "v2"]
        assert list(scores[0]) == list(volumes[0])
        for a, b in zip(scores, volumes, strict=True):
            for k in ("psnr", "ssim", "mae_hu", "rmse_hu", "drr_psnr", "x2ct_psnr"):
                np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-4, err_msg=k)
    one, _ = exp.evaluator.run(members[:1], examples, report_volumes=1)
    mean = exp.evaluator.validate(members[0], examples)  # the scores-only step's means
    np.testing.assert_allclose(mean["psnr"], np.mean([r["psnr"] for r in one]), rtol=2e-5)
