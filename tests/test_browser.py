"""The headless-browser check of HTML reports (``conftest.BrowserPage``) can fail: a broken
image or a blank page is caught. The reports themselves are checked in test_reconstruct and
test_evaluate (reconstruct, evaluate and predict pages)."""

import base64
import io

import numpy as np
import pytest
from matplotlib.figure import Figure


def _png() -> str:
    fig = Figure(figsize=(2, 2))
    fig.subplots().imshow(np.arange(16.0).reshape(4, 4))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _page(path, body: str):
    path.write_text(f"<html><head><title>t</title></head><body>{body}</body></html>")
    return path


def test_a_page_with_loading_images_passes(tmp_path, browser):
    text = "<h1>Report</h1><p>some words about the reconstruction</p>"
    page = _page(
        tmp_path / "ok.html", f'{text}<img alt="slices" src="data:image/png;base64,{_png()}">'
    )
    result = browser(page)
    assert result["images"] == 1 and result["broken"] == []


def test_a_broken_image_fails(tmp_path, browser):
    good = f'<img alt="good" src="data:image/png;base64,{_png()}">'
    bad = '<img alt="truncated" src="data:image/png;base64,iVBORw0KGgo=">'
    page = _page(tmp_path / "bad.html", f"<h1>Report</h1><p>words words words</p>{good}{bad}")
    with pytest.raises(AssertionError, match="truncated"):
        browser(page)


def test_a_blank_page_fails(tmp_path, browser):
    with pytest.raises(AssertionError, match="no text|0 images"):
        browser(_page(tmp_path / "blank.html", ""))
