"""The playground in a real headless Chromium (Debian's, driven by Playwright): type a message, read the reply.

The server needs an API key, so the page first asks for it; the reply must stream in (the assistant element
grows over time) and end equal to what the server answers the same conversation through the API.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.serve.spawn import SpawnedServer

pytestmark = pytest.mark.slow

KEY = "sk-browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key = tmp_path_factory.mktemp("browser") / "key"
    key.write_text(KEY)
    srv = SpawnedServer(["--model", "smollm2-135m", "--dtype", "float32", "--api-key-file", str(key)], api_key=KEY)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # in CI a missing browser must fail, not skip
    reason="Debian's chromium is not installed (make test installs it)",
)
def test_playground_chat_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    message = "What is the capital of France?"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            # The server needs a key: the page asks for it instead of failing silently.
            page.wait_for_selector("#api-key", state="visible", timeout=30_000)
            page.fill("#api-key", KEY)
            page.click("#save-key")
            page.click("summary")  # open Settings, as a person would
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            page.fill("#input", message)
            page.click("#send")
            reply = page.locator(".message.assistant").last
            reply.wait_for(timeout=30_000)
            # Streaming: text appears before the reply is complete, then the Send button comes back.
            page.wait_for_function(
                "() => [...document.querySelectorAll('.assistant')].pop()?.textContent.length > 0",
                timeout=60_000,
            )
            page.wait_for_function("() => document.querySelector('#send').textContent === 'Send'", timeout=120_000)
            text = reply.text_content()
            page.screenshot(path=str(tmp_path / "playground.png"))
        finally:
            browser.close()
    assert not errors, errors
    api = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "smollm2-135m", "messages": [{"role": "user", "content": message}], "temperature": 0,
              "max_tokens": 24},
        timeout=120,
    ).json()
    assert text.strip() and text == api["choices"][0]["message"]["content"]
