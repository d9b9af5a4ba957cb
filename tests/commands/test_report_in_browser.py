"""The report page in a real browser: headless Chromium (Debian's `chromium`, installed by setup)
opens the index.html that `python -m app report` wrote for a small store, at 1280 px (a desktop) and
390 px (a phone, mobile emulation). No console errors or failed loads, every image loads
(naturalWidth > 0) and fits the page, the phone lays the page out at its own width (the viewport meta
tag) without scrolling sideways, and a full-page screenshot of each is saved in build/test-output/,
named in the test summary ("saved by the tests").
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import browser
from tests.conftest import IN_CI
from tests.ops_helpers import fill_database

REPO = Path(__file__).resolve().parent.parent.parent
# kept after the run (pytest's own tmp dirs rotate away): build/ is the checkout's ignored scratch
OUTPUT = REPO / "build" / "test-output"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report_index(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report-browser")
    (tmp / "none.toml").write_text("")
    db = tmp / "ports.db"
    fill_database(db, end=time.time() - 60, rounds=120)
    env = dict(os.environ, PORTWATCH_CONFIG=str(tmp / "none.toml"), PORTWATCH_DB=str(db),
               PORTWATCH_STATE_DIR=str(tmp / "state"), PORTWATCH_RUN_DIR=str(tmp / "run"),
               PORTWATCH_PIN_ROOT=str(tmp / "no-pins"))
    out = subprocess.run([sys.executable, "-m", "app", "report", "--out", str(tmp / "report"), "--since", "7d"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp / "report" / "index.html"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if browser.binary() is None:
        if IN_CI:
            pytest.fail("chromium is not installed: scripts/setup.sh installs it (make setup)")
        pytest.skip("chromium is not installed (make setup installs Debian's chromium)")
    with browser.Chromium(tmp_path_factory.mktemp("chromium-profile")) as the_browser:
        yield the_browser


@pytest.mark.parametrize("width, mobile", [(1280, False), (390, True)], ids=["desktop-1280", "phone-390"])
def test_report_page_in_chromium(chromium, report_index, width, mobile, saved):
    page = chromium.open_page(width=width, mobile=mobile)
    page.navigate(report_index.as_uri())

    images = page.evaluate("[...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,"
                           " natural: i.naturalWidth, shown: i.getBoundingClientRect().width}))")
    assert len(images) >= 3, images
    broken = [i["src"] for i in images if not i["complete"] or i["natural"] == 0]
    assert not broken, f"images that did not load: {broken}"
    layout = page.evaluate("({inner: window.innerWidth, scroll: document.documentElement.scrollWidth})")
    assert layout["inner"] == width, f"laid out at {layout['inner']} px, not the device's {width} (viewport meta tag?)"
    assert layout["scroll"] <= width, f"the page scrolls sideways: {layout['scroll']} px wide in a {width} px window"
    too_wide = [i["src"] for i in images if i["shown"] > width]
    assert not too_wide, f"images wider than the window: {too_wide}"
    text_px = page.evaluate("parseFloat(getComputedStyle(document.querySelector('p')).fontSize)")
    assert text_px >= 14, f"body text is {text_px} px"

    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = page.screenshot(OUTPUT / f"report-{width}px.png")
    assert shot.stat().st_size > 10_000
    saved(f"report page at {width} px: {shot}")
    errors = page.errors()
    assert not errors, errors
