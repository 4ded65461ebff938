"""The web chat page in a real headless Chromium: type a message, see the streamed answer (Markdown
rendered, model text escaped) and the thinking panel; the screenshot is kept in docs/webchat.png."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import CHAT_REASONING, SERVER_API_KEY

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "webchat.png"


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium: `make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 700})
        finally:
            browser.close()


def test_web_chat_streams_answer_and_thinking(page, chat_server):
    page.goto(chat_server + "/")
    page.fill("#api-key", SERVER_API_KEY)
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max-tokens", "64")
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant .answer").last
    answer.locator("strong").wait_for(timeout=60_000)  # Markdown **world** became <strong>
    page.locator("#send:not([hidden])").wait_for(timeout=60_000)  # the stream has ended
    assert "Hello world!" in answer.inner_text()
    assert answer.locator("code").inner_text() == "x = 1"
    thinking = page.locator(".msg.assistant details.thinking").last
    assert thinking.is_visible()
    page.locator(".msg.assistant details.thinking summary").last.click()  # open the collapsed panel
    assert CHAT_REASONING in thinking.locator(".thinking-text").inner_text()
    assert page.locator("#history button").count() == 1
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#history button").count() == 2


def test_model_text_is_escaped(page, chat_server):
    page.goto(chat_server + "/")
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **b** [l](javascript:alert(1)) "
                         "\\n```js\\n<script>x</script>\\n```')")
    assert "<img" not in html and "&lt;img" in html and "<strong>b</strong>" in html
    assert "<a " not in html  # only http(s) links become links
    assert "&lt;script&gt;" in html and "<script>" not in html
