"""The page builder: one self-contained page, escaped text, inlined figures, atomic writes."""

import base64
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from xct import report


def _figure():
    fig = Figure(figsize=(2, 2))
    fig.subplots().imshow(np.arange(16.0).reshape(4, 4))
    return fig


def test_png_is_a_data_uri_of_a_png():
    src = report.png(_figure())
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_has_title_sections_and_escapes_text():
    body = report.table(["name", "value"], [["a<b", 0.123456789], ["n", 3]])
    body += report.paragraph("x & y", css_class="def") + report.image(_figure(), "it's")
    html = report.page("T <1>", [("First", body), ("", "<p>raw</p>")], heading="H", dated=False)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<title>T &lt;1&gt;</title>" in html and "<h1>H</h1>" in html
    assert html.count("<h2>") == 1 and "<h2>First</h2>" in html and "<p>raw</p>" in html
    assert "<th>name</th>" in html and "<td>a&lt;b</td>" in html and "<td>0.1235</td>" in html
    assert "<p class='def'>x &amp; y</p>" in html and "alt='it&#x27;s'" in html
    assert html.count("src='data:image/png;base64,") == 1
    assert not re.search(r"<p>\d{4}-\d\d-\d\dT", html)
    dated = report.page("T", [])
    assert re.search(r"<h1>T</h1>\n<p>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d</p>", dated)


def test_table_without_header():
    assert report.table(None, [[1, "b"]]) == "<table><tr><td>1</td><td>b</td></tr></table>"


def test_write_page_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "page.html"
    assert report.write_page(path, "one", [("", "<p>1</p>")]) == path
    first = path.read_text(encoding="utf-8")
    assert "<p>1</p>" in first

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(report, "page", broken)
    with pytest.raises(RuntimeError):
        report.write_page(path, "two", [])
    assert path.read_text(encoding="utf-8") == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["page.html"]
