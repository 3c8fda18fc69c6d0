"""The web page of `smallgpt serve` in a real headless Chromium (Debian's `chromium` package, driven
by playwright): streamed completion, stop, and a chat round trip; screenshots of both."""

import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
INSTALL = "install Chromium: `apt-get install -y chromium` (scripts/setup.sh does it when run as root)"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if path is None:
        pytest.fail(f"no Chromium for the page test at {CHROMIUM}: {INSTALL}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_page_streams_a_completion_and_a_chat_reply(browser, server, lm_run, lccc_chat_run, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.base_url)
    page.select_option("#model", lm_run.name)
    page.fill("#prompt", "ROMEO:")
    page.fill("#max-tokens", "200")  # a range input takes its value like a text field
    page.click("#generate")
    page.wait_for_function("document.querySelector('#output').textContent.length > 'ROMEO:'.length")
    page.wait_for_function("document.querySelector('#stats').textContent.includes('tokens/s')")
    output = page.text_content("#output")
    shown = re.match(r"(\d+) tokens in ", page.text_content("#stats"))
    assert output.startswith("ROMEO:") and shown
    # a char model: one token per character, up to the limit of 200; if sampling ends earlier, it
    # ended at end-of-text, which the usage counts and the page does not show
    generated = len(output) - len("ROMEO:")
    assert 0 < generated <= 200
    assert int(shown[1]) == (200 if generated == 200 else generated + 1)
    page.screenshot(path=tmp_path / "complete.png")

    page.select_option("#model", lccc_chat_run.name)
    page.fill("#temperature", "0")  # greedy: this tiny run's first reply is not empty
    assert page.is_visible("#chat-view") and not page.is_visible("#complete-view")
    page.fill("#message", "你好")
    page.press("#message", "Enter")
    page.wait_for_function("document.querySelector('#chat-stats').textContent.includes('tokens/s')")
    turns = page.locator("#history .turn")
    assert turns.count() == 2 and turns.nth(0).text_content() == "你好"
    assert turns.nth(1).text_content()  # the bot's streamed reply
    page.screenshot(path=tmp_path / "chat.png")
    page.click("#reset")
    assert page.locator("#history .turn").count() == 0
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    assert not errors, errors
