"""``twistd webchat``: options, and a real twistd process started from the install."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect, unix_connect

from tests.support import Twistd, twistd_command
from webchat.tap import DEFAULT_PORT, Options
from webchat.web import default_web_root


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        options = self.parse()
        self.assertEqual(options["port"], [DEFAULT_PORT])
        self.assertFalse(options["quiet"])
        self.assertEqual(Path(options["web-root"]), default_web_root())

    def test_bare_number_means_tcp_and_port_repeats(self):
        options = self.parse(
            "--port", "9000", "--port", "unix:/tmp/chat.sock", "-p", "1"
        )
        self.assertEqual(options["port"], ["tcp:9000", "unix:/tmp/chat.sock", "tcp:1"])

    def test_envelopes_from_redis_get_the_message_size_limit(self):
        from webchat.relay import RedisRelay
        from webchat.tap import makeService

        options = self.parse(
            "--redis", "redis://127.0.0.1:1/0", "--max-message-size", "1000",
            "--max-connections", "10",
        )  # fmt: skip
        relays = [s for s in makeService(options) if isinstance(s, RedisRelay)]
        self.assertEqual([r.max_text_size for r in relays], [1000])

    def test_shipped_page_is_found(self):
        self.assertTrue((default_web_root() / "index.html").is_file())


def listening_ports(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"Site starting on (\d+)", log)]


class TwistdTests(SynchronousTestCase):
    """The plugin as an operator runs it: a real twistd subprocess."""

    def start(self, *args: str) -> Twistd:
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        server = Twistd(workdir, *args)
        self.addCleanup(server.stop, signal.SIGKILL)
        return server

    def test_help_lists_every_option(self):
        import subprocess

        out = subprocess.run(
            [*twistd_command(), "webchat", "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for option in ("--port", "--web-root", "--quiet", "--version"):
            self.assertIn(option, out)

    def test_chat_log_lines_and_sigterm(self):
        server = self.start("--port", "tcp:0:interface=127.0.0.1")
        (port,) = listening_ports(server.wait_for_log("Site starting on"))
        url = f"ws://127.0.0.1:{port}"  # the seed's URL: no path at all
        with connect(url) as a, connect(url + "/ws") as b:
            a.send("hello\nNew connection! (42)")
            self.assertEqual(b.recv(timeout=5), "id 1: hello\nNew connection! (42)")
            server.wait_for_log("Connection 1 sending message")
            code = server.stop(signal.SIGTERM)
            self.assertEqual(code, 0, server.log())
            for client in (a, b):
                with self.assertRaises(ConnectionClosed) as caught:
                    client.recv(timeout=5)
                self.assertEqual(caught.exception.rcvd.code, 1001)
        log = server.log()
        self.assertIn("New connection! (1)", log)
        self.assertIn("New connection! (2)", log)
        self.assertIn(
            r"Connection 1 sending message hello\nNew connection! (42) to 1 other "
            "connection(s)",
            log,
        )
        # The forged line never starts a line of its own.
        self.assertIsNone(re.search(r"^New connection! \(42\)", log, re.M))
        self.assertNotIn("] New connection! (42)", log)
        self.assertIn("Closed 2 of 2 connection(s) cleanly", log)
        self.assertNotIn("Traceback", log)

    def test_listens_on_several_endpoints_and_serves_another_web_root(self):
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        site = workdir / "site"
        site.mkdir()
        (site / "index.html").write_text("<p>another page</p>")
        # AF_UNIX paths are short (108 bytes); trial's temp paths are not.
        sockdir = Path(tempfile.mkdtemp(prefix="webchat-"))
        self.addCleanup(shutil.rmtree, sockdir, True)
        sock = sockdir / "chat.sock"
        server = Twistd(
            workdir,
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--port",
            f"unix:{sock}",
            "--web-root",
            str(site),
        )
        self.addCleanup(server.stop, signal.SIGKILL)
        server.wait_for_log("Site starting on")
        (port,) = listening_ports(server.wait_for_log(str(sock)))
        with connect(f"ws://127.0.0.1:{port}/") as a, unix_connect(str(sock)) as b:
            b.send("over unix")
            self.assertEqual(a.recv(timeout=5), "id 2: over unix")
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := raw.recv(4096):
                reply += chunk
        self.assertIn(b"<p>another page</p>", reply)

    def test_sigint_also_exits_zero(self):
        server = self.start("--port", "tcp:0:interface=127.0.0.1")
        server.wait_for_log("Site starting on")
        self.assertEqual(server.stop(signal.SIGINT), 0, server.log())
        self.assertIn("Received SIGINT, shutting down.", server.log())

    def test_version_is_the_package_version(self):
        import subprocess
        from importlib.metadata import version

        import webchat

        out = subprocess.run(
            [*twistd_command(), "webchat", "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertEqual(out.strip(), f"webchat {version('webchat')}")
        self.assertEqual(webchat.__version__, version("webchat"))


class TlsTests(SynchronousTestCase):
    """wss:// through the ssl: endpoint: the path that must use transport.write."""

    def test_chat_and_page_over_tls(self):
        import ssl
        from urllib.request import urlopen

        from tests.tls_cert import make_certificate

        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        cert = make_certificate(workdir)
        server = Twistd(
            workdir, "--port",
            f"ssl:0:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}",
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        log = server.wait_for_log("Site (TLS) starting on")
        port = int(re.search(r"\(TLS\) starting on (\d+)", log).group(1))
        context = ssl.create_default_context(cafile=str(cert.ca))
        url = f"wss://localhost:{port}/ws"
        with connect(url, ssl=context) as a, connect(url, ssl=context) as b:
            a.send("over tls " + "x" * 60000)  # several TLS records
            self.assertEqual(b.recv(timeout=5), "id 1: over tls " + "x" * 60000)
            b.send("and back")
            self.assertEqual(a.recv(timeout=5), "id 2: and back")
        with urlopen(f"https://localhost:{port}/", context=context, timeout=5) as page:
            self.assertEqual(page.status, 200)
        self.assertEqual(server.stop(signal.SIGTERM), 0)
