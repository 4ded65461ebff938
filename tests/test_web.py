"""The web chat page in a real headless Chromium, at a desktop and a phone width: type a message, see the
streamed answer (Markdown rendered, model text escaped) and the thinking panel; on a phone the sidebar is
a drawer and the composer takes the width; max tokens is capped by what the context leaves; a failed
request shows its error in the reply's bubble.

Each layout test takes a screenshot, under its temporary folder or, with NANOSEEK_SCREENSHOTS=DIR, into
DIR (to compare them by eye). The chat model is the tests' tiny greeting model (conftest.chat_model_dir),
so the screenshots show its one answer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from conftest import CHAT_REASONING, SERVER_API_KEY, require, require_module

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# At module level, so that a missing browser is reported before the (session-scoped) server starts.
require(Path(CHROMIUM).exists(), f"Chromium at {CHROMIUM} (`make browser` installs Debian's chromium; "
                                 "NANOSEEK_CHROMIUM names another binary)")
sync_api = require_module("playwright.sync_api", "pip install playwright (in the [dev] extra)")

DESKTOP = {"width": 1100, "height": 700}
PHONE = {"width": 390, "height": 844}  # an iPhone 12-15 in CSS pixels
CONTEXT = 1024  # the chat_server's --max-len


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport=DESKTOP)
    try:
        yield ctx.new_page()
    finally:
        ctx.close()


@pytest.fixture
def phone(browser):
    ctx = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        yield ctx.new_page()
    finally:
        ctx.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    d = Path(os.environ.get("NANOSEEK_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def box(page, selector: str) -> dict:
    b = page.locator(selector).bounding_box()
    assert b is not None, f"{selector} is not rendered"
    return b


def say(page, text: str, api_key: str = SERVER_API_KEY, max_tokens: str = "64") -> None:
    page.fill("#api-key", api_key)
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max-tokens", max_tokens)
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.locator("#send:not([hidden])").wait_for(timeout=60_000)  # the reply has ended


def test_web_chat_streams_answer_and_thinking(page, chat_server, shots):
    page.goto(chat_server + "/")
    say(page, "Hi")
    answer = page.locator(".msg.assistant .answer").last
    answer.locator("strong").wait_for(timeout=60_000)  # Markdown **world** became <strong>
    assert "Hello world!" in answer.inner_text()
    assert answer.locator("code").inner_text() == "x = 1"
    thinking = page.locator(".msg.assistant details.thinking").last
    assert thinking.is_visible()
    page.locator(".msg.assistant details.thinking summary").last.click()  # open the collapsed panel
    assert CHAT_REASONING in thinking.locator(".thinking-text").inner_text()
    assert page.locator("#history button").count() == 1
    # the desktop layout: the sidebar beside the conversation, no menu button
    side, composer = box(page, "#sidebar"), box(page, "#composer")
    assert side["x"] == 0 and side["width"] == 250 and composer["x"] >= 250
    assert composer["x"] + composer["width"] == DESKTOP["width"] and not page.locator("#menu").is_visible()
    screenshot(page, shots / "webchat-desktop.png")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#history button").count() == 2


def test_on_a_phone_the_composer_takes_the_width_and_the_sidebar_is_a_drawer(phone, chat_server, shots):
    phone.goto(chat_server + "/")
    width = PHONE["width"]
    assert box(phone, "#composer")["width"] >= 0.8 * width
    assert box(phone, "#input")["width"] >= 0.6 * width
    assert box(phone, "#messages")["width"] == width
    side = box(phone, "#sidebar")
    assert side["x"] + side["width"] <= 0  # the drawer is closed: off the screen
    assert phone.evaluate("document.documentElement.scrollWidth") <= width  # nothing scrolls sideways

    def drawer_settled():
        phone.wait_for_function("!document.getAnimations().length")  # the slide has ended

    phone.locator("#menu").tap()
    drawer_settled()
    side = box(phone, "#sidebar")
    assert side["x"] == 0 and side["width"] <= 0.85 * width and phone.locator("#scrim").is_visible()
    assert phone.get_attribute("#menu", "aria-expanded") == "true"
    screenshot(phone, shots / "webchat-phone-drawer.png")
    phone.fill("#api-key", SERVER_API_KEY)  # the settings are in the drawer
    phone.locator("#scrim").tap(position={"x": width - 20, "y": 400})  # beside the drawer closes it
    drawer_settled()
    assert box(phone, "#sidebar")["x"] + box(phone, "#sidebar")["width"] <= 0
    assert not phone.locator("#scrim").is_visible() and phone.get_attribute("#menu", "aria-expanded") == "false"

    phone.fill("#input", "Hi")
    phone.locator("#send").tap()
    answer = phone.locator(".msg.assistant .answer").last
    answer.locator("strong").wait_for(timeout=60_000)
    phone.locator("#send:not([hidden])").wait_for(timeout=60_000)
    assert "Hello world!" in answer.inner_text()
    assert box(phone, ".msg.assistant")["width"] >= 0.9 * width - 16  # the reply uses the width too
    assert box(phone, "#composer")["width"] >= 0.8 * width
    screenshot(phone, shots / "webchat-phone.png")

    phone.locator("#menu").tap()  # a new chat from the drawer closes it
    drawer_settled()
    phone.locator("#new-chat").tap()
    drawer_settled()
    assert phone.locator(".msg").count() == 0 and box(phone, "#sidebar")["x"] < 0


def test_max_tokens_is_capped_by_what_the_context_leaves(page, chat_server):
    page.goto(chat_server + "/")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        say(page, "Hi", max_tokens="5000")
    count = httpx.post(chat_server + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]},
                       headers={"Authorization": f"Bearer {SERVER_API_KEY}"}).json()["count"]
    assert json.loads(sent.value.post_data)["max_tokens"] == CONTEXT - count  # not the 5000 asked for
    assert page.input_value("#max-tokens") == str(CONTEXT) and page.get_attribute("#max-tokens", "max") == str(CONTEXT)
    assert f"{CONTEXT}-token context" in page.inner_text("#max-tokens-note")
    assert f"context {CONTEXT} tokens" in page.inner_text("#model-name")
    assert "Hello world!" in page.locator(".msg.assistant .answer").last.inner_text()
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        say(page, "Hello", max_tokens="40")  # the second turn: below the room, the setting is kept
    assert json.loads(sent.value.post_data)["max_tokens"] == 40


def test_a_failed_request_shows_its_error_in_the_reply(page, chat_server):
    page.goto(chat_server + "/")
    say(page, "Hi", api_key="wrong-key")
    reply = page.locator(".msg.assistant").last
    assert "failed" in reply.get_attribute("class")
    error = reply.locator(".error").inner_text()
    assert error.startswith("Error: HTTP 401: invalid or missing API key"), error
    assert reply.locator(".answer").inner_text() == ""  # no "(empty reply)" beside the error
    page.click("#new-chat")
    say(page, "word " * 2000)  # past the 1024-token context: said before anything is generated
    error = page.locator(".msg.assistant .error").last.inner_text()
    assert "this conversation fills the model's context" in error and f"of {CONTEXT} tokens" in error, error
    page.click("#new-chat")
    say(page, "Hi")  # the page recovers: the right key, a short chat
    assert "Hello world!" in page.locator(".msg.assistant .answer").last.inner_text()
    assert page.locator(".msg.assistant.failed").count() == 0


def test_model_text_is_escaped(page, chat_server):
    page.goto(chat_server + "/")
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **b** [l](javascript:alert(1)) "
                         "\\n```js\\n<script>x</script>\\n```')")
    assert "<img" not in html and "&lt;img" in html and "<strong>b</strong>" in html
    assert "<a " not in html  # only http(s) links become links
    assert "&lt;script&gt;" in html and "<script>" not in html


def test_the_readme_screenshot_script(chat_server, tmp_path):
    """scripts/webchat_screenshots.py, which made docs/webchat.png and docs/webchat-phone.png from the
    speedrun model, run here against the tests' server: two real PNGs of the pictured answer."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "webchat_screenshots.py"
    r = subprocess.run([sys.executable, str(script), "--url", chat_server, "--api-key", SERVER_API_KEY,
                        "--prompt", "Hi", "--max-tokens", "64", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the answer: 'Hello world! x = 1'" in r.stdout, r.stdout
    for name, width in (("webchat.png", 1100), ("webchat-phone.png", 780)):  # the phone at 2x
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == width
    r = subprocess.run([sys.executable, str(script), "--url", chat_server, "--api-key", "wrong",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "the chat failed: Error: HTTP 401" in r.stderr, r.stderr
