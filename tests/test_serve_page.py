"""The web page of `smallgpt serve` in a real headless Chromium (Debian's `chromium` package, driven
by playwright): streamed completion, stop, and a chat round trip (screenshots of both); a refused chat
message leaves the conversation as it was, and unseen characters get a reply; the default settings
keep a whole prompt; warnings shown."""

import json
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


def test_a_refused_chat_message_leaves_the_conversation_as_it_was(browser, server, lccc_chat_run):
    """One message the server refuses (too long for the context) used to stay in the page's history
    and be re-sent with every later message, each failing the same way until Reset."""
    page = browser.new_page()
    page.goto(server.base_url)
    page.select_option("#model", lccc_chat_run.name)
    page.fill("#temperature", "0")
    too_long = "你" * 100  # the chat run's context is 64 tokens
    page.fill("#message", too_long)
    page.press("#message", "Enter")
    page.wait_for_function("!document.querySelector('#error').hidden")
    assert "at most" in page.text_content("#error")
    assert page.locator("#history .turn").count() == 0 and page.input_value("#message") == too_long
    page.fill("#message", "你好")
    page.press("#message", "Enter")
    page.wait_for_function("document.querySelector('#chat-stats').textContent.includes('tokens/s')")
    turns = page.locator("#history .turn")
    assert turns.count() == 2 and turns.nth(0).text_content() == "你好" and turns.nth(1).text_content()
    assert page.is_hidden("#error")
    page.fill("#message", "☃你好")  # a character the model never saw: read as <|unk|>, and said so
    page.press("#message", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('#history .turn').length == 4 && !document.querySelector('#send').disabled"
    )
    assert page.is_hidden("#error") and turns.nth(2).text_content() == "☃你好"
    assert "1 character(s) the model never saw are read as <|unk|>: '☃'" in page.text_content("#warning")


def complete_on_page(page, prompt: str) -> tuple[str, int]:
    """The page's completion of `prompt` with its default settings, once it has ended, and the
    prompt tokens the server used (the last event's usage)."""
    with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as response:
        page.fill("#prompt", prompt)
        page.click("#generate")
    page.wait_for_function("document.querySelector('#stats').textContent.includes('tokens/s')")
    events = [e for e in response.value.text().split("\n\n") if e.startswith("data: {")]
    usage = json.loads(events[-1][len("data: ") :])["usage"]
    return page.text_content("#output"), usage["prompt_tokens"]


def test_the_default_settings_keep_the_whole_prompt_and_warnings_are_shown(browser, server, lm_run):
    """The default max tokens used to cut the prompt to the context less max_tokens (the API's
    `warnings` said so; the page showed nothing). Now the window slides: only a prompt longer than
    the context loses its beginning, and the page shows the server's warning."""
    page = browser.new_page()
    page.goto(server.base_url)
    page.select_option("#model", lm_run.name)
    assert page.input_value("#max-tokens") == "200"
    prompt = "To be, or not to be, that is the question. " * 3  # 129 tokens: 129 + 200 > 256
    output, prompt_tokens = complete_on_page(page, prompt)
    assert output.startswith(prompt) and prompt_tokens == len(prompt)  # a char model
    assert page.is_hidden("#warning")
    _, prompt_tokens = complete_on_page(page, prompt * 3)  # 387 tokens: more than the context of 256
    assert prompt_tokens == 256 and page.is_visible("#warning")
    assert "the prompt has 387 tokens; only its last 256 were used" in page.text_content("#warning")
