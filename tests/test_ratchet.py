"""
Coming from Ratchet: the seed's own page, unchanged, chatting through webchat.

The page is served the way a Ratchet user serves it: by their own app, on
another origin (here a tiny static HTTP server on another port), with the
WebSocket URL hard-coded as ``ws://127.0.0.1:PORT`` and every message
appended with ``innerHTML +=``.  webchat runs as the README says to run it
for them, ``make serve ARGS="--allowed-origin ..."``; headless Chromium does
the typing.  Without the option the page is refused, and the log says which
option would let it in.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ROOT, free_port, require, slow
from tests.test_page import CHROMIUM_ARGS, QUICK, chromium_path

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: The seed's websocket.js, word for word but for the port it hard-codes.
SEED_JS = """\
'use strict'

let websocketURL = '127.0.0.1:PORT';

let elementConnectionStatus = document.getElementById('websocket-connection-status')
let elementMessageReceive = document.getElementById('websocket-message-receive')
let elementForm = document.getElementById('form-message-sender')
let elementMessageSend = document.getElementById('websocket-message-send')

let websocket = new WebSocket('ws://' + websocketURL)

websocket.onopen = () => {
    //websocket.send('Hello')

    elementConnectionStatus.innerHTML = "Connected !"
};

websocket.onmessage = (event) => {
    elementConnectionStatus.innerHTML = "Connected - Message receive"
    elementMessageReceive.innerHTML += event.data + "<br \\>"
};

websocket.onclose = () => {
    elementConnectionStatus.innerHTML = "Connection closed"
};

websocket.onerror = () => {
    elementConnectionStatus.innerHTML = "An error occured!"
};

elementForm.addEventListener('submit', (event) => {
    event.preventDefault();

    websocket.send(elementMessageSend.value)
});
"""

#: The body of the seed's webchat.html.twig, rendered.
SEED_HTML = """\
<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Ratchet page</title></head>
<body>
  <div class="container">
    <h1>Test WebSockets and Symfony</h1>
    <dl>
        <dt>Status de la connexion :</dt>
        <dd id="websocket-connection-status">Non connecté</dd>
        <dt>Message reçu :</dt>
        <dd id="websocket-message-receive"></dd>
    </dl>
    <form id="form-message-sender">
        <input type="text" id="websocket-message-send"
               name="websocket-message-send" placeholder="Message to send">
        <button type="submit">Send message</button>
    </form>
  </div>
  <script src="websocket.js" defer></script>
</body></html>
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@slow
class RatchetPageTests(SynchronousTestCase):
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
        if shutil.which("make") is None:
            raise require("make", "no make on PATH")
        self.expect = expect
        self.chat_port = free_port()

        # The user's own app: serves the seed's page on another origin.
        app_root = Path(self.mktemp()).resolve()
        app_root.mkdir(parents=True)
        (app_root / "index.html").write_text(SEED_HTML)
        (app_root / "websocket.js").write_text(
            SEED_JS.replace("PORT", str(self.chat_port))
        )
        handler = functools.partial(_QuietHandler, directory=str(app_root))
        app = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=app.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(app.server_close)
        self.addCleanup(app.shutdown)
        self.app_origin = f"http://127.0.0.1:{app.server_address[1]}"

        playwright = sync_playwright().start()
        self.addCleanup(playwright.stop)
        self.browser = playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        self.addCleanup(self.browser.close)

    def make_serve(self, args: str) -> Path:
        """``make serve PORT=... ARGS=...`` as the README says; returns its log."""
        log = Path(self.mktemp()).resolve()
        log.parent.mkdir(parents=True, exist_ok=True)
        venv = Path(sys.prefix)
        out = log.open("wb")
        self.addCleanup(out.close)
        process = subprocess.Popen(
            [
                "make", "-s", "-C", str(ROOT),
                # This test's own venv, installed already: no reinstall.
                f"VENV={venv}", "-o", f"{venv}/bin/.installed",
                "serve", f"PORT={self.chat_port}", f"ARGS={args}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

        def stop() -> None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

        self.addCleanup(stop)
        self.wait_for(log, "Site starting on", process)
        return log

    def wait_for(
        self, log: Path, needle: str, process: subprocess.Popen | None = None
    ) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if needle in text:
                return text
            if process is not None and process.poll() is not None:
                self.fail(f"make serve exited {process.returncode}:\n{text}")
            time.sleep(0.05)
        self.fail(f"timed out waiting for {needle!r} in:\n{log.read_text()}")

    def open_seed_page(self) -> Page:
        page = self.browser.new_page()
        page.goto(self.app_origin + "/")
        return page

    def status(self, page: Page):
        return page.locator("#websocket-connection-status")

    def test_the_seed_page_chats_with_allowed_origin(self) -> None:
        self.make_serve(f"--allowed-origin {self.app_origin}")
        a = self.open_seed_page()
        b = self.open_seed_page()
        for page in (a, b):
            self.expect(self.status(page)).to_have_text("Connected !", timeout=QUICK)

        a.locator("#websocket-message-send").fill("hello from the seed page")
        a.locator("button[type=submit]").click()
        received = b.locator("#websocket-message-receive")
        self.expect(received).to_have_text(
            re.compile(r"^id \d+: hello from the seed page$"), timeout=QUICK
        )
        self.expect(self.status(b)).to_have_text("Connected - Message receive")

        b.locator("#websocket-message-send").fill("and back")
        b.locator("button[type=submit]").click()
        self.expect(a.locator("#websocket-message-receive")).to_have_text(
            re.compile(r"^id \d+: and back$"), timeout=QUICK
        )
        # The sender hears nothing of its own (the seed's rule).
        self.assertEqual(received.inner_html().count("<br>"), 1, received.inner_html())

    def test_without_the_option_the_log_names_it(self) -> None:
        log = self.make_serve("")
        page = self.open_seed_page()
        self.expect(self.status(page)).to_have_text(
            re.compile(r"^(Connection closed|An error occured!)$"), timeout=QUICK
        )
        text = self.wait_for(log, "Refused connection")
        self.assertIn(
            f"Refused connection from 127.0.0.1: origin {self.app_origin} not "
            f"allowed (HTTP 403; start webchat with --allowed-origin "
            f"{self.app_origin} to allow it)",
            text,
        )
