"""The web page in a real browser: Debian's headless Chromium driven by Playwright, against uvicorn on loopback.

Saves a screenshot to tests/artifacts/serve_page.png (or to $MIXT5_SCREENSHOT). To serve another checkpoint than the
tiny random one (e.g. a fine-tuned model, for the README picture), set $MIXT5_SERVE_MODEL; see docs/serve.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from mixt5.serve import ServeArguments, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACT = Path(__file__).resolve().parents[1] / "artifacts" / "serve_page.png"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); Playwright must not download its own browser")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.mark.slow
def test_page_answers_and_shows_the_routing(browser, tiny_moe_dir, serve_in_thread):
    model = os.environ.get("MIXT5_SERVE_MODEL") or str(tiny_moe_dir)
    app = create_app(ServeArguments(model, device="cpu"))
    health = app.state.service.health()
    num_layers, num_experts = health["num_moe_layers"], health["num_experts"]
    with serve_in_thread(app) as url:
        page = browser.new_page(viewport={"width": 1360, "height": 760})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#example option').length > 1")
        assert "MoE layers" in page.inner_text("#model-info")

        # pick an example paragraph, then type a question of our own about it
        page.select_option("#example", index=1)
        context = page.input_value("#context")
        assert len(context) > 100
        question = "Which NFL team won Super Bowl 50?"
        page.fill("#question", question)
        page.click("#submit")
        page.wait_for_selector("body[data-state=answered]", timeout=60_000)

        answer = page.inner_text("#answer")
        expected = httpx.post(url + "/v1/answer", json={"question": question, "context": context}, timeout=60).json()
        assert answer == (expected["answer"] or "(empty answer)")
        # routing view: the input tokens of the first encoder layer, coloured by their top-1 expert
        first = expected["routing"]["encoder"][0]
        assert page.is_visible("#routing") and page.input_value("#layer") == first["layer"]
        tokens = page.query_selector_all("#tokens .token")
        assert len(tokens) == len(first["tokens"])
        assert [t.get_attribute("data-expert") for t in tokens] == [str(e[0]) for e in first["experts"]]
        colours = {t.evaluate("node => getComputedStyle(node).backgroundColor") for t in tokens}
        assert len(colours) == len({e[0] for e in first["experts"]})  # one colour per top-1 expert
        # load bars: every MoE layer, one bar per expert
        assert len(page.query_selector_all("#loads .load-layer")) == num_layers
        assert len(page.query_selector_all("#loads .bar")) == num_layers * num_experts

        # the layer selector switches to a decoder layer: the answer's tokens
        decoder = expected["routing"]["decoder"][-1]
        page.select_option("#layer", decoder["layer"])
        assert len(page.query_selector_all("#tokens .token")) == len(decoder["tokens"])
        assert "Answer tokens" in page.inner_text("#routing-caption")
        page.select_option("#layer", first["layer"])

        screenshot = Path(os.environ.get("MIXT5_SCREENSHOT") or ARTIFACT)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot.with_suffix(".tmp.png")), full_page=True)
        shutil.move(screenshot.with_suffix(".tmp.png"), screenshot)  # a reader never sees half a file
        page.close()
    assert requested and all(u.startswith(url) for u in requested), "the page fetched something not from the server"
