"""The web explorer at ``/``, in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): the heatmap renders, hovering names a cell, a click shows both layers'
neighbour lists with the shared ones marked, and a new text gets its neighbours."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from layerbase.ingest.synthetic import store_synthetic
from tests.helpers import cli_subprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: `bash scripts/test` installs Debian's chromium when run as root"
)


@pytest.fixture
def server(wh, db_url: str, tiny_models, tmp_path):
    import layerbase
    from tests.conftest import random_texts

    store_synthetic(wh, "A", "d", n=80, d=8, n_layers=6, seed=1)
    store_synthetic(wh, "B", "d", n=80, d=8, n_layers=4, seed=2)
    lb = layerbase.connect(db_url, progress=False)
    lb.affinity("A", "B", "d", k=5)
    # a causal model with a steering vector, for the steering panel
    lb.add_dataset("pos", random_texts(6, seed=1))
    lb.add_dataset("neg", random_texts(6, seed=2))
    lb.ingest(str(tiny_models["gpt2"]), ["pos", "neg"], name="g")
    lb.make_steering_vector("g", 2, "pos", "neg", name="v")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli_subprocess("serve", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/health", timeout=2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.3)
    yield base
    proc.terminate()
    proc.communicate(timeout=30)


def test_the_explorer_draws_the_matrix_and_shows_a_cells_neighbours(server: str, tmp_path: Path) -> None:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/")
        page.wait_for_selector("#heatmap[data-rendered=true]", timeout=20_000)
        assert "A × B on d" in page.inner_text("#run")
        assert "diagonal test t =" in page.inner_text("#run-about")
        canvas = page.locator("#heatmap")
        box = canvas.bounding_box()
        assert box is not None
        # MARGIN (56, 18) and the cell size of a 6 x 4 matrix (28 px): row 2, column 1
        x, y = box["x"] + 56 + 28 * 1.5, box["y"] + 18 + 28 * 2.5
        page.mouse.move(x, y)
        tip = page.inner_text("#tooltip")
        assert tip.startswith("A L3 (depth 0.50) × B L2 (depth 0.50): ")
        page.fill("#k", "5")
        page.mouse.click(x, y)
        page.wait_for_selector("#overlap ol.neighbors li")
        lists = page.locator("#overlap ol.neighbors")
        assert lists.count() == 2 and page.locator("#overlap ol.neighbors li").count() == 10
        first = {int(v) for v in lists.nth(0).locator("li").evaluate_all("els => els.map(e => e.dataset.position)")}
        second = {int(v) for v in lists.nth(1).locator("li").evaluate_all("els => els.map(e => e.dataset.position)")}
        marked = page.locator("#overlap li.shared").count()
        assert marked == 2 * len(first & second)
        assert page.inner_text("#cell") == "A layer 3 × B layer 2"
        # the steering panel: unsteered and steered continuations side by side
        page.select_option("#vector", "v")
        page.fill("#coefficient", "500")
        page.fill("#tokens", "4")
        page.fill("#steer-prompt", "the cat")
        page.click("#steer-go")
        page.wait_for_selector("#steer-result .generation")
        panels = page.locator("#steer-result .column")
        assert panels.count() == 2 and panels.nth(0).inner_text().startswith("unsteered")
        assert "steered (500 × v)" in panels.nth(1).inner_text()
        assert all(panels.nth(i).locator(".generation").inner_text().startswith("the cat") for i in (0, 1))
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "explorer.png").stat().st_size > 10_000
