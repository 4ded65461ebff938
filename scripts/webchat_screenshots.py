"""Screenshots of the web chat for the README: one real conversation, at a desktop and at a phone width.

    python scripts/webchat_screenshots.py --model runs/speedrun/model --out docs
    python scripts/webchat_screenshots.py --url http://127.0.0.1:8000 --api-key KEY --out /tmp/shots

It starts `nanoseek serve --model DIR` on a free loopback port (or uses the server at --url), opens headless
Chromium (NANOSEEK_CHROMIUM, else /usr/bin/chromium) at 1100 x 700 and at 390 x 844 (a phone, in CSS
pixels), sends --prompt at temperature 0 (greedy: the same model gives the same picture), opens the
thinking panel and writes OUT/webchat.png and OUT/webchat-phone.png. It prints the answer it pictured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
VIEWPORTS = {"webchat.png": ({"width": 1100, "height": 700}, 1), "webchat-phone.png": ({"width": 390, "height": 844}, 2)}


@contextlib.contextmanager
def served(model: str, api_key: str | None, max_len: int | None):
    """A `nanoseek serve` process on a free loopback port; yields its URL once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"] + (["--api-key", api_key] if api_key else []) + \
          (["--max-len", str(max_len)] if max_len else [])
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"webchat_screenshots: the server exited ({proc.returncode}):\n{log.read()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if time.time() > deadline:
                    raise SystemExit("webchat_screenshots: the server did not start in 300 s")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def picture(url: str, out: Path, prompt: str, api_key: str | None, max_tokens: int) -> str:
    from playwright.sync_api import sync_playwright

    answer = ""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            for name, (viewport, scale) in VIEWPORTS.items():
                ctx = browser.new_context(viewport=viewport, device_scale_factor=scale, is_mobile=scale > 1)
                page = ctx.new_page()
                page.goto(url + "/")
                page.fill("#api-key", api_key or "")
                page.fill("#temperature", "0")
                page.dispatch_event("#temperature", "input")
                page.fill("#max-tokens", str(max_tokens))
                page.fill("#input", prompt)
                page.press("#input", "Enter")
                page.locator("#send:not([hidden])").wait_for(timeout=300_000)
                reply = page.locator(".msg.assistant").last
                error = reply.locator(".error")
                if error.is_visible():
                    raise SystemExit(f"webchat_screenshots: the chat failed: {error.inner_text()}")
                if reply.locator("details.thinking").is_visible():
                    reply.locator("details.thinking summary").click()  # show the reasoning, folded after the answer
                answer = reply.locator(".answer").inner_text()
                page.screenshot(path=str(out / name))
                ctx.close()
        finally:
            browser.close()
    return answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory to serve (runs/speedrun/model)")
    src.add_argument("--url", help="a running nanoseek server instead")
    p.add_argument("--api-key", default=None, help="the server's API key (with --model: the key it is started with)")
    p.add_argument("--prompt", default="Make 10 from 2 3 5", help="the message sent (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="the reply's max tokens (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=None, help="with --model: the server's context length")
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder for the two PNGs (default: %(default)s)")
    args = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"webchat_screenshots: no Chromium at {CHROMIUM} (make browser, or set NANOSEEK_CHROMIUM)")
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(served(args.model, args.api_key, args.max_len))
        answer = picture(url.rstrip("/"), args.out, args.prompt, args.api_key, args.max_tokens)
    print(f"wrote {args.out / 'webchat.png'} and {args.out / 'webchat-phone.png'}; the answer: {answer!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
