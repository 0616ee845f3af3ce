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
