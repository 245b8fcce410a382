"""
The page in a real browser: headless Chromium against a real ``twistd -n webchat``.

These are synchronous tests (Playwright's sync API drives the browser, the
server is a subprocess), so they run the same under pytest and trial and
never touch the Twisted reactor.  Every assertion is about what a person
sees: the status text, the Send button, the lines in the log.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase

from tests.support import Twistd, free_port, require, slow

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: How long (ms) a page gets to show something that needs no reconnect.
QUICK = 5_000
#: How long (ms) a page gets to reconnect: a few rounds of the page's backoff
#: (0.5 s doubling, at most 10 s per wait) after a server restart.
RECONNECT = 15_000

RECEIVED = re.compile(r"^id (\d+): (.*)$", re.DOTALL)

XSS = (
    '<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>'
)


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright's own browser downloads are not used)."""
    path = os.environ.get("WEBCHAT_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


@slow
class PageTests(SynchronousTestCase):
    """Two browser tabs chatting through one server."""

    def setUp(self) -> None:
        try:
            from playwright.sync_api import expect, sync_playwright
        except ImportError as e:
            raise require("Playwright", f"cannot import playwright ({e})") from e
        chromium = chromium_path()
        if chromium is None:
            raise require(
                "Chromium", "no executable chromium on PATH or in WEBCHAT_CHROMIUM"
            )
        self.expect = expect

        self.port = free_port()
        self.server = self.start_server()

        playwright = sync_playwright().start()
        self.addCleanup(playwright.stop)
        self.browser = playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        self.addCleanup(self.browser.close)

    def start_server(self) -> Twistd:
        # A fresh directory per start: the log is appended to, so an old
        # "Site starting on" would otherwise satisfy the wait at once.
        workdir = Path(self.mktemp())
        workdir.mkdir(parents=True)
        server = Twistd(workdir, "--port", f"tcp:{self.port}:interface=127.0.0.1")
        self.addCleanup(server.stop)
        server.wait_for_log("Site starting on")
        return server

    def open_tab(self) -> Page:
        """A new tab (its own browser context) showing the chat, connected."""
        page = self.browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        self.addCleanup(self.assertEqual, errors, [], "JavaScript errors on the page")
        page.goto(f"http://127.0.0.1:{self.port}/")
        self.assert_connected(page)
        return page

    # -- what a person sees ------------------------------------------------------

    def assert_connected(self, page: Page, timeout: int = QUICK) -> None:
        self.expect(page.locator("#status")).to_have_text("Connected", timeout=timeout)
        self.expect(page.locator("#send-button")).to_be_enabled(timeout=QUICK)

    def messages(self, page: Page) -> Locator:
        return page.locator("#messages > li")

    def wait_for_count(self, page: Page, count: int) -> None:
        self.expect(self.messages(page)).to_have_count(count, timeout=QUICK)

    def last_received(self, page: Page, count: int) -> tuple[int, str]:
        """Wait for the log to hold ``count`` lines; the last is ``id N: text``."""
        self.wait_for_count(page, count)
        last = self.messages(page).nth(count - 1)
        self.expect(last).not_to_have_class(re.compile(r"\bmine\b"))
        match = RECEIVED.match(last.text_content() or "")
        self.assertIsNotNone(match, f"not a received message: {last.text_content()!r}")
        assert match is not None
        return int(match.group(1)), match.group(2)

    def assert_sent(self, page: Page, count: int, text: str) -> None:
        """Our own message is line ``count``, marked as ours, and the field is empty."""
        self.wait_for_count(page, count)
        mine = self.messages(page).nth(count - 1)
        self.expect(mine).to_have_class(re.compile(r"\bmine\b"))
        self.expect(mine).to_have_text(f"you: {text}")
        self.expect(page.locator("#message-input")).to_have_value("")

    def send_with_enter(self, page: Page, text: str) -> None:
        page.locator("#message-input").fill(text)
        page.locator("#message-input").press("Enter")

    def send_with_button(self, page: Page, text: str) -> None:
        page.locator("#message-input").fill(text)
        page.locator("#send-button").click()

    # -- the tests ---------------------------------------------------------------

    def test_two_tabs_chat_both_ways(self) -> None:
        a = self.open_tab()
        b = self.open_tab()

        self.send_with_enter(a, "hello from A")
        self.assert_sent(a, 1, "hello from A")
        id_of_a, text = self.last_received(b, 1)
        self.assertEqual(text, "hello from A")

        self.send_with_button(b, "hello back from B")
        self.assert_sent(b, 2, "hello back from B")
        id_of_b, text = self.last_received(a, 2)
        self.assertEqual(text, "hello back from B")
        self.assertNotEqual(id_of_a, id_of_b)

        # Nobody got their own message back from the server.
        self.assertEqual(self.messages(a).count(), 2)
        self.assertEqual(self.messages(b).count(), 2)

    def test_html_in_a_message_is_shown_as_text(self) -> None:
        a = self.open_tab()
        b = self.open_tab()

        self.send_with_enter(a, XSS)
        self.wait_for_count(a, 1)
        self.wait_for_count(b, 1)
        for page in (a, b):
            injected = page.locator("#messages img, #messages b, #messages script")
            self.assertEqual(injected.count(), 0, "markup from a message was parsed")
            # Nothing in the message ran (the page's CSP is a second line of defence).
            self.assertIsNone(page.evaluate("window.__pwned"))

        self.assert_sent(a, 1, XSS)
        _, text = self.last_received(b, 1)
        self.assertEqual(text, XSS)

    def test_page_reconnects_after_a_server_restart(self) -> None:
        a = self.open_tab()
        b = self.open_tab()
        self.send_with_enter(a, "before the restart")
        self.last_received(b, 1)
        # Set on the live page: still there afterwards means it never reloaded.
        for page in (a, b):
            page.evaluate("window.__sameDocument = true")

        self.server.stop()
        for page in (a, b):
            self.expect(page.locator("#status")).to_have_text(
                re.compile(r"^Connection closed"), timeout=QUICK
            )
            self.expect(page.locator("#send-button")).to_be_disabled()

        self.server = self.start_server()
        for page in (a, b):
            self.assert_connected(page, timeout=RECONNECT)
            self.assertIs(page.evaluate("window.__sameDocument"), True)

        self.send_with_button(b, "after the restart")
        self.assert_sent(b, 2, "after the restart")
        _, text = self.last_received(a, 2)
        self.assertEqual(text, "after the restart")
