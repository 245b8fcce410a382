"""
The page in a real browser: headless Chromium against a real ``twistd -n webchat``.

These are synchronous tests (Playwright's sync API drives the browser, the
server is a subprocess), so they run the same under pytest and trial and
never touch the Twisted reactor.  Every assertion is about what a person
sees: the status text, the room name, who is online, the messages in the
log with their sender and delivery state, the Send button.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support import Twistd, free_port, require, slow

if TYPE_CHECKING:
    from playwright.sync_api import Page

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

XSS = (
    '<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>'
)

#: Run before the page's own script: stores a name as an earlier visit would have.
REMEMBER_NAME = "localStorage.setItem('webchat.name', {name!r});"

#: Run before the page's own script: makes the page believe the server accepts
#: any length (so it sends what its own limit would hold back), and records
#: what the server really advertised and every error event it sent.
LIE_ABOUT_THE_LIMIT = """
(() => {
  window.__advertised = null;
  window.__errors = [];
  const Real = window.WebSocket;
  window.WebSocket = class extends Real {
    addEventListener(type, listener, ...rest) {
      if (type !== 'message') return super.addEventListener(type, listener, ...rest);
      return super.addEventListener(type, (event) => {
        const data = JSON.parse(event.data);
        if (data.type === 'error') window.__errors.push(data);
        if (data.type === 'welcome') {
          window.__advertised = data.limits.max_text_bytes;
          data.limits.max_text_bytes = 1e9;
          event = new MessageEvent('message', { data: JSON.stringify(data) });
        }
        listener(event);
      }, ...rest);
    }
  };
})();
"""


#: Run before the page's own script: the tab is hidden while ``window.__hidden``
#: (headless Chromium's tabs are never hidden by themselves).
PRETEND_HIDDEN = """
Object.defineProperty(Document.prototype, 'hidden', {
  configurable: true,
  get() { return Boolean(window.__hidden); },
});
"""


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright's own browser downloads are not used)."""
    path = os.environ.get("WEBCHAT_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


class BrowserMixin:
    """A server, a browser, and what a person sees in a tab."""

    #: Extra command-line options for the server a test starts.
    server_args: tuple[str, ...] = ()

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
        server = Twistd(
            workdir, "--port", f"tcp:{self.port}:interface=127.0.0.1", *self.server_args
        )
        self.addCleanup(server.stop)
        server.wait_for_log("Site starting on")
        return server

    def open_tab(
        self, path: str = "/", name: str | None = None, script: str | None = None
    ) -> Page:
        """
        A new tab (its own browser context, so its own localStorage) showing
        the chat at ``path``, connected; ``name`` as remembered from a visit
        before.
        """
        context = self.browser.new_context(viewport={"width": 1000, "height": 700})
        self.addCleanup(context.close)
        if name is not None:
            context.add_init_script(REMEMBER_NAME.format(name=name))
        if script is not None:
            context.add_init_script(script)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        self.addCleanup(self.assertEqual, errors, [], "JavaScript errors on the page")
        page.goto(f"http://127.0.0.1:{self.port}{path}")
        self.assert_connected(page)
        return page

    # -- what a person sees ------------------------------------------------------

    def assert_connected(self, page: Page, timeout: int = QUICK) -> None:
        self.expect(page.locator("#status")).to_have_text("Connected", timeout=timeout)

    def assert_online(self, page: Page, *names: str) -> None:
        """The online list, in join order; ours is marked "(you)"."""
        self.expect(page.locator("#members > li")).to_have_text(
            list(names), timeout=QUICK
        )

    def log(self, page: Page) -> list[dict[str, Any]]:
        """Each line of the log: its kind, sender, text and delivery state."""
        return page.evaluate(
            """() => [...document.querySelectorAll('#messages > li')].map((li) => ({
                 kind: li.className,
                 sender: li.querySelector('.sender')?.textContent ?? null,
                 time: li.querySelector('time')?.textContent ?? null,
                 text: (li.querySelector('.text') ?? li).textContent,
                 delivery: li.querySelector('.delivery')?.textContent ?? null,
               }))"""
        )

    def messages(self, page: Page) -> list[tuple[str, str]]:
        """(sender, text) of every message in the log, notices left out."""
        return [
            (line["sender"], line["text"])
            for line in self.log(page)
            if "message" in line["kind"].split()
        ]

    def wait_for_messages(self, page: Page, count: int) -> list[tuple[str, str]]:
        self.expect(page.locator("#messages > li.message")).to_have_count(
            count, timeout=QUICK
        )
        return self.messages(page)

    def wait_for_delivered(self, page: Page, count: int) -> None:
        """``count`` messages, none of ours still sending or failed."""
        self.wait_for_messages(page, count)
        self.expect(page.locator("#messages > li.pending")).to_have_count(
            0, timeout=QUICK
        )
        self.expect(page.locator("#messages > li.failed")).to_have_count(0)

    def type_message(self, page: Page, text: str) -> None:
        """Types ``text``, a newline typed as Shift+Enter, then Enter."""
        field = page.locator("#message-input")
        field.fill("")
        for number, line in enumerate(text.split("\n")):
            if number:
                field.press("Shift+Enter")
            field.press_sequentially(line)
        field.press("Enter")

    def send_with_button(self, page: Page, text: str) -> None:
        page.locator("#message-input").fill(text)
        page.locator("#send-button").click()

    def record_status(self, page: Page) -> None:
        """From now on, what the status line shows is kept in ``window.__statuses``."""
        page.evaluate(
            """() => {
                 const status = document.getElementById('status');
                 window.__statuses = [];
                 const note = () => window.__statuses.push(status.textContent);
                 new MutationObserver(note).observe(
                   status, { childList: true, characterData: true, subtree: true });
               }"""
        )


@slow
class PageTests(BrowserMixin, SynchronousTestCase):
    """People chatting through one server, each in a browser tab of their own."""

    def test_two_people_in_a_room_chat_and_a_third_elsewhere_sees_nothing(
        self,
    ) -> None:
        ann = self.open_tab("/r/team", name="ann")
        bob = self.open_tab("/#team")
        carol = self.open_tab("/r/other", name="carol")

        for page, room in ((ann, "team"), (bob, "team"), (carol, "other")):
            self.expect(page.locator("#room-name")).to_have_text(room)
            self.expect(page).to_have_title(f"#{room} — WebChat")
            self.expect(page.locator("#message-input")).to_be_focused()

        # Bob came without a name and picks one; Ann sees the rename.
        self.expect(bob.locator("#name-input")).to_have_value("")
        self.expect(bob.locator("#members > li.me")).to_have_text(
            re.compile(r"^guest-\d+ \(you\)$")
        )
        self.expect(bob.locator("#name-input")).to_have_attribute(
            "placeholder", "Choose a name"
        )
        bob.locator("#name-input").fill("bob")
        bob.locator("#name-button").click()
        self.assert_online(ann, "ann (you)", "bob")
        self.assert_online(bob, "ann", "bob (you)")
        self.assert_online(carol, "carol (you)")
        self.assertEqual(bob.evaluate("localStorage.getItem('webchat.name')"), "bob")

        self.type_message(ann, "hello bob")
        self.type_message(ann, "are you there?")
        self.wait_for_delivered(ann, 2)
        self.assertEqual(
            self.wait_for_messages(bob, 2),
            [("ann", "hello bob"), ("ann", "are you there?")],
        )
        self.type_message(bob, "yes\nand on two lines")
        self.wait_for_delivered(bob, 3)
        self.assertEqual(
            self.wait_for_messages(ann, 3),
            [
                ("ann (you)", "hello bob"),
                ("ann (you)", "are you there?"),
                ("bob", "yes\nand on two lines"),
            ],
        )
        # Ours are marked as ours; one sender's run is grouped; every message
        # has a time; text keeps its line breaks and its own direction.
        lines = [line for line in self.log(ann) if "message" in line["kind"]]
        self.assertEqual(
            [line["kind"] for line in lines],
            ["message mine", "message mine grouped", "message"],
        )
        for line in lines:
            self.assertRegex(line["time"], r"\d")
        text = ann.locator("#messages > li.message .text").last
        self.assertEqual(text.get_attribute("dir"), "auto")
        self.assertEqual(
            text.evaluate("e => getComputedStyle(e).whiteSpace"), "pre-wrap"
        )
        self.assertGreater(text.bounding_box()["height"], 30, "one line for two")

        # Carol, in another room, saw none of it.
        self.assertEqual(self.messages(carol), [])
        self.assertEqual(self.log(carol), [])

        # Carol switches rooms: the address, the title and the list follow.
        carol.locator("#room-input").fill("team")
        carol.locator("#room-button").click()
        self.expect(carol).to_have_url(re.compile(r"/r/team$"))
        self.expect(carol.locator("#room-name")).to_have_text("team")
        self.assert_connected(carol)
        self.assert_online(carol, "ann", "bob", "carol (you)")
        self.assert_online(ann, "ann (you)", "bob", "carol")
        self.expect(ann.locator("#messages > li.notice").last).to_have_text(
            "carol joined"
        )

        # Bob leaves: quietly noted, gone from the lists.
        bob.context.close()
        self.assert_online(ann, "ann (you)", "carol")
        self.expect(ann.locator("#messages > li.notice").last).to_have_text("bob left")

        # The name is remembered: Ann comes back as ann.
        ann.reload()
        self.assert_connected(ann)
        self.expect(ann.locator("#name-input")).to_have_value("ann")
        self.assert_online(ann, "carol", "ann (you)")

    def test_a_refused_name_is_explained_and_not_remembered(self) -> None:
        ann = self.open_tab(name="ann")
        bob = self.open_tab(name="bob")
        field, note = bob.locator("#name-input"), bob.locator("#name-note")

        field.fill("ANN")  # names are unique case-insensitively
        bob.locator("#name-button").click()
        self.expect(note).to_have_text(re.compile(r"\S"))
        self.expect(field).to_have_value("bob")
        taken = note.text_content()

        field.fill("evil\u202ename")  # a bidi override
        bob.locator("#name-button").click()
        self.expect(note).to_have_text(re.compile(r"\S"))
        self.expect(note).not_to_have_text(taken or "")
        self.expect(field).to_have_value("bob")
        self.assertEqual(bob.evaluate("localStorage.getItem('webchat.name')"), "bob")
        self.assert_online(ann, "ann (you)", "bob")

        # A remembered name the server refuses is forgotten: guest next time.
        carol = self.open_tab(name="car\u202eol")
        self.expect(carol.locator("#name-note")).to_have_text(re.compile(r"\S"))
        self.expect(carol.locator("#name-input")).to_have_value("")
        self.expect(carol.locator("#members > li.me")).to_have_text(
            re.compile(r"^guest-\d+ \(you\)$")
        )
        self.assertEqual(carol.evaluate("localStorage.getItem('webchat.name')"), "")

    def test_html_in_a_message_is_shown_as_text(self) -> None:
        a = self.open_tab()
        b = self.open_tab()

        self.send_with_button(a, XSS)
        self.wait_for_delivered(a, 1)
        self.wait_for_messages(b, 1)
        for page in (a, b):
            injected = page.locator("#messages img, #messages b, #messages script")
            self.assertEqual(injected.count(), 0, "markup from a message was parsed")
            # Nothing in the message ran (the page's CSP is a second line of defence).
            self.assertIsNone(page.evaluate("window.__pwned"))
            self.assertEqual(self.messages(page)[0][1], XSS)

    def test_the_input_holds_back_what_the_server_would_refuse(self) -> None:
        page = self.open_tab()
        limit = page.evaluate(
            "() => new Promise((done) => {"
            "  const ws = new WebSocket(`ws://${location.host}/ws`, 'webchat.v1.json');"
            "  ws.onmessage = (e) => { done(JSON.parse(e.data).limits.max_text_bytes);"
            "                          ws.close(); };"
            "})"
        )
        # Counted in UTF-8 bytes, not characters: "é" is two.
        page.locator("#message-input").fill("é" * (limit // 2 + 1))
        self.expect(page.locator("#send-button")).to_be_disabled()
        self.expect(page.locator("#limit-note")).to_have_text(
            f"Too long: {2 * (limit // 2 + 1)} of at most {limit} bytes"
        )
        page.locator("#message-input").press("Enter")
        self.assertEqual(self.messages(page), [])
        page.locator("#message-input").fill("é" * (limit // 2))
        self.expect(page.locator("#send-button")).to_be_enabled()

    def test_what_arrives_while_scrolled_up_or_away_is_pointed_out(self) -> None:
        ann = self.open_tab(name="ann", script=PRETEND_HIDDEN)
        bob = self.open_tab(name="bob")
        tall = "\n".join(f"line {n}" for n in range(15))
        for _ in range(3):
            self.send_with_button(bob, tall)
        self.wait_for_messages(ann, 3)
        self.expect(ann.locator("#new-messages")).to_be_hidden()

        # Scrolled back to read: the log stays put and says there is more.
        log = ann.locator("#messages")
        log.evaluate("e => { e.scrollTop = 0; }")
        self.send_with_button(bob, "one more")
        self.wait_for_messages(ann, 4)
        self.expect(ann.locator("#new-messages")).to_be_visible()
        self.expect(ann.locator("#new-messages")).to_have_text("New messages ↓")
        self.assertEqual(log.evaluate("e => e.scrollTop"), 0)
        ann.locator("#new-messages").click()
        self.expect(ann.locator("#new-messages")).to_be_hidden()
        self.assertLess(
            log.evaluate("e => e.scrollHeight - e.scrollTop - e.clientHeight"), 24
        )
        self.expect(ann.locator("#message-input")).to_be_focused()

        # Bob types: Ann sees it; he sends: the hint goes.
        # (The server relays one typing event per 2 s: his earlier ones,
        # from filling in the messages above, may hold back the first few.)
        typing = ann.locator("#typing")
        for _ in range(10):
            bob.locator("#message-input").press_sequentially("typing ")
            if typing.text_content() == "bob is typing…":
                break
            ann.wait_for_timeout(500)
        self.expect(typing).to_have_text("bob is typing…")
        bob.locator("#message-input").press("Enter")
        self.expect(ann.locator("#typing")).to_have_text("")

        # Ann's tab is in the background: the title counts what she missed.
        ann.evaluate("window.__hidden = true")
        self.send_with_button(bob, "are you there?")
        self.send_with_button(bob, "hello?")
        self.expect(ann).to_have_title("(2) #lobby — WebChat")
        ann.evaluate(
            "window.__hidden = false;"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        self.expect(ann).to_have_title("#lobby — WebChat")

    def test_page_reconnects_after_a_server_restart(self) -> None:
        a = self.open_tab(name="ann")
        b = self.open_tab(name="bob")
        self.type_message(a, "before the restart")
        self.wait_for_messages(b, 1)
        # Set on the live page: still there afterwards means it never reloaded.
        for page in (a, b):
            page.evaluate("window.__sameDocument = true")

        self.server.stop()
        for page in (a, b):
            # The status line says why, and that it is on it.
            self.expect(page.locator("#status")).to_have_text(
                re.compile(
                    r"^Connection closed \(code \d{4}.*\) — reconnecting in \d+ s…$"
                ),
                timeout=QUICK,
            )
            self.expect(page.locator("#send-button")).to_be_disabled()

        self.server = self.start_server()
        for page in (a, b):
            self.assert_connected(page, timeout=RECONNECT)
            self.assertIs(page.evaluate("window.__sameDocument"), True)
        # Back in the room, both of them, in whichever order they made it.
        self.expect(a.locator("#members > li")).to_have_count(2, timeout=QUICK)

        self.send_with_button(b, "after the restart")
        self.wait_for_delivered(b, 2)
        self.assertEqual(self.wait_for_messages(a, 2)[-1], ("bob", "after the restart"))


@slow
class SmallLimitPageTests(BrowserMixin, SynchronousTestCase):
    """A server with a small --max-message-size, and a page told otherwise."""

    server_args = ("--max-message-size", "2048")

    def test_a_refused_message_is_shown_failed_with_the_reason(self) -> None:
        ann = self.open_tab(name="ann", script=LIE_ABOUT_THE_LIMIT)
        bob = self.open_tab(name="bob")
        limit = ann.evaluate("window.__advertised")

        # Over the text limit but within the frame limit: refused, still connected.
        self.send_with_button(ann, "x" * (limit + 1))
        self.expect(ann.locator("#messages > li.failed")).to_have_count(
            1, timeout=QUICK
        )
        errors = ann.evaluate("window.__errors")
        self.assertEqual([e["code"] for e in errors], ["message_too_big"])
        self.expect(ann.locator("#messages > li.failed .delivery")).to_have_text(
            f"Not sent: {errors[0]['reason']}"
        )
        self.assert_connected(ann)

        # The next one is fine, and bob only ever saw that one.
        self.type_message(ann, "short")
        self.wait_for_messages(ann, 2)
        self.expect(ann.locator("#messages > li.message").last).not_to_have_class(
            re.compile(r"pending|failed"), timeout=QUICK
        )
        self.assertEqual(self.wait_for_messages(bob, 1), [("ann", "short")])

        # Over the frame limit: the server closes; the page says why and that
        # the message was not sent, then comes back.
        self.record_status(ann)
        self.send_with_button(ann, "y" * 4096)
        failed = ann.locator("#messages > li.failed")
        self.expect(failed).to_have_count(2, timeout=QUICK)
        self.expect(failed.last.locator(".delivery")).to_have_text(
            re.compile(r"^Not sent: .*\bcode 1009\b")
        )
        self.assert_connected(ann, timeout=RECONNECT)
        statuses = ann.evaluate("window.__statuses")
        self.assertTrue(
            any(re.match(r"^Connection closed \(code 1009\b", s) for s in statuses),
            statuses,
        )
        self.assertEqual(self.wait_for_messages(bob, 1), [("ann", "short")])
