"""Test-wide JAX settings: strict rank promotion and several fake CPU devices.

The XLA flag must be set before JAX initialises its backends, hence at import time here.
"""

import os
import pathlib

# The tests' programs are tiny: most of their time is XLA compiling them, and half of that is
# LLVM optimising machine code that then runs for milliseconds. Level 0 halves the compile
# time of the train step (38 s -> 19 s on 2 cores) and changes no result the tests check.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are shared between test workers and the subprocesses tests launch
# (most of the suite's time is XLA compiling the same small models).
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_CT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def shared_ct_dir() -> pathlib.Path:
    """``../shared/data/ct`` beside the project root; tests that need it skip without it."""
    if not SHARED_CT.is_dir():
        pytest.skip(f"shared CT folder not found at {SHARED_CT}")
    return SHARED_CT


@pytest.fixture(scope="session")
def num_fake_devices() -> int:
    return len(jax.devices())


_PAGE_CHECK = """<html><body><iframe id="f" src="{src}" width="1280" height="4000"></iframe>
<pre id="result">pending</pre><script>
document.getElementById("f").onload = () => {{
  const d = document.getElementById("f").contentDocument;
  const imgs = Array.from(d.images);
  const broken = imgs.filter((i) => !(i.complete && i.naturalWidth > 0))
    .map((i) => i.alt || i.src.slice(0, 60));
  document.getElementById("result").textContent = JSON.stringify({{
    images: imgs.length, broken: broken, text: d.body ? d.body.innerText.trim().length : 0,
    title: d.title}});
}};
</script></body></html>"""


class BrowserPage:
    """Opens an HTML report in headless Chromium as a user would: every ``<img>`` must load
    (decoded, non-zero width), the page must have text and must not render blank."""

    def __init__(self, exe: str):
        self.exe = exe

    def _chromium(self, *args: str) -> str:
        import subprocess

        cmd = [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        p = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    def __call__(self, page: pathlib.Path, min_images: int = 1) -> dict:
        import html
        import json
        import re

        import numpy as np
        from matplotlib import image as mpimg

        page = pathlib.Path(page).resolve()
        wrapper = page.parent / f".browser_check_{page.stem}.html"
        wrapper.write_text(_PAGE_CHECK.format(src=page.name), encoding="utf-8")
        try:
            dom = self._chromium(
                "--allow-file-access-from-files",
                "--virtual-time-budget=10000",
                "--dump-dom",
                wrapper.as_uri(),
            )
        finally:
            wrapper.unlink()
        found = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
        assert found and found.group(1) != "pending", f"{page}: the page did not load"
        result = json.loads(html.unescape(found.group(1)))
        assert not result["broken"], f"{page}: images that do not load: {result['broken']}"
        assert result["images"] >= min_images, f"{page}: {result['images']} images"
        assert result["text"] > 20, f"{page}: no text on the page"
        shot = page.parent / f".browser_check_{page.stem}.png"
        self._chromium(f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri())
        pixels = mpimg.imread(shot)
        shot.unlink()
        result["screenshot_std"] = float(np.std(pixels[..., :3]))
        assert result["screenshot_std"] > 0.01, f"{page}: renders blank"
        return result


def _chromium() -> str | None:
    import shutil

    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


@pytest.fixture(scope="session")
def browser() -> BrowserPage:
    """Headless Chromium (the Debian package ``chromium``; ``.ci/run`` installs it where it
    can); tests that use it skip where it is not installed."""
    exe = _chromium()
    if not exe:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    return BrowserPage(exe)


@pytest.fixture(scope="session")
def browser_or_none() -> BrowserPage | None:
    """``browser`` for tests whose other checks run without Chromium too."""
    exe = _chromium()
    return BrowserPage(exe) if exe else None
