"""The web chat page in a real headless Chromium: type a message, see the streamed answer (Markdown
rendered, model text escaped) and the thinking panel. The test takes a screenshot under its temporary
folder (docs/webchat.png is one such screenshot)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import CHAT_REASONING, SERVER_API_KEY, require, require_module

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# At module level, so that a missing browser is reported before the (session-scoped) server starts.
require(Path(CHROMIUM).exists(), f"Chromium at {CHROMIUM} (`make browser` installs Debian's chromium; "
                                 "NANOSEEK_CHROMIUM names another binary)")
sync_api = require_module("playwright.sync_api", "pip install playwright (in the [dev] extra)")


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 700})
        finally:
            browser.close()


def test_web_chat_streams_answer_and_thinking(page, chat_server, tmp_path):
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
    shot = tmp_path / "webchat.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#history button").count() == 2


def test_model_text_is_escaped(page, chat_server):
    page.goto(chat_server + "/")
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **b** [l](javascript:alert(1)) "
                         "\\n```js\\n<script>x</script>\\n```')")
    assert "<img" not in html and "&lt;img" in html and "<strong>b</strong>" in html
    assert "<a " not in html  # only http(s) links become links
    assert "&lt;script&gt;" in html and "<script>" not in html
