"""The privacy report as a person sees it: rendered by headless Chromium, and not blank.

`./dev test` installs Debian's ``chromium`` when it is missing; set ``PRIVFL_BROWSER`` to use
another Chromium-family binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from .test_report import build, central_ledger

HEIGHT = 4000  # tall enough for the whole page, charts included


def browser() -> str:
    found = os.environ.get("PRIVFL_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no Chromium found for the report's browser test: `./dev test` installs Debian's chromium; "
                    "or set PRIVFL_BROWSER to a Chromium-family binary")  # fmt: skip
    return found


def screenshot(page: Path, out: Path) -> np.ndarray:
    """The page rendered at 1200 px wide, as an (H, W, channels) array in [0, 1]."""
    cmd = [
        browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--window-size=1200,{HEIGHT}", f"--screenshot={out}", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
    return image.imread(out)


def inked_rows(pixels: np.ndarray) -> np.ndarray:
    """Rows of the screenshot holding anything but the background colour."""
    rgb = pixels[..., :3]
    return np.flatnonzero((np.abs(rgb - rgb[-1, -1]).sum(-1) > 0.1).any(1))


def test_the_report_renders_in_a_browser_with_text_and_charts(tmp_path):
    report = build(central_ledger())
    paths = report.save(tmp_path / "report")
    html = Path(paths.html)
    pixels = screenshot(html, tmp_path / "report.png")
    rows = inked_rows(pixels)
    assert rows.size > 1500, f"only {rows.size} of {HEIGHT} rows show anything"  # text and charts down the page
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # anti-aliased text and the charts' lines, not a flat page

    # the positive control: the same checks find a blank page blank
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><html><body></body></html>")
    assert inked_rows(screenshot(blank, tmp_path / "blank.png")).size == 0
