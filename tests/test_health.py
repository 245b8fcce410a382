"""/healthz before, during and after SIGTERM, on a real twistd process."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

from twisted.trial.unittest import SynchronousTestCase

from tests.support import HANDSHAKE, Twistd, slow


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except HTTPError as e:
        return e.code, json.loads(e.read())


@slow
class HealthDuringShutdownTests(SynchronousTestCase):
    def test_healthz_before_during_and_after_sigterm(self):
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        server = Twistd(
            workdir, "--port", "tcp:0:interface=127.0.0.1", "--shutdown-grace", "3"
        )
        self.addCleanup(server.stop, signal.SIGKILL)
        log = server.wait_for_log("Site starting on")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))

        # A client that never answers the closing handshake holds the grace open.
        stubborn = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(stubborn.close)
        stubborn.sendall(HANDSHAKE)
        self.assertIn(b" 101 ", stubborn.recv(4096))

        status, body = healthz(port)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["connections"], 1)
        self.assertIn("version", body)

        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log("Shutting down")
        status, body = healthz(port)
        self.assertEqual((status, body["status"]), (503, "shutting_down"))
        # New chats are turned away while draining, the page still loads.
        with socket.create_connection(("127.0.0.1", port)) as late:
            late.sendall(HANDSHAKE)
            self.assertTrue(late.recv(4096).startswith(b"HTTP/1.1 503 "))
        with urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            self.assertEqual(page.status, 200)

        self.assertEqual(server.process.wait(15), 0)
        self.assertIn("Closed 0 of 1 connection(s) cleanly", server.log())
        with self.assertRaises(OSError):
            healthz(port)
        started = time.monotonic()
        self.assertLess(time.monotonic() - started, 5)
