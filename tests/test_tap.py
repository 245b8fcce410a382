"""``twistd webchat``: options, and a real twistd process started from the install."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect, unix_connect

from tests.support import HANDSHAKE, Twistd, slow, twistd_command
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
        from webchat.redis import RedisRelay
        from webchat.tap import makeService

        options = self.parse(
            "--redis", "redis://127.0.0.1:1/0", "--max-message-size", "1000",
            "--max-connections", "10",
        )  # fmt: skip
        relays = [s for s in makeService(options) if isinstance(s, RedisRelay)]
        self.assertEqual([r.max_text_size for r in relays], [1000])

    def test_shipped_page_is_found(self):
        self.assertTrue((default_web_root() / "index.html").is_file())


class NoReactorAtImportTests(SynchronousTestCase):
    def test_importing_the_plugin_installs_no_reactor(self):
        """
        ``twistd --reactor=...`` must be able to choose: nothing the plugin
        imports may install the global reactor (a fresh interpreter, since
        this one's tests have one).
        """
        check = (
            "import sys, webchat.tap, twisted.plugins.webchat_plugin\n"
            "leaked = 'twisted.internet.reactor' in sys.modules\n"
            "print('reactor installed' if leaked else 'no reactor')"
        )
        out = subprocess.run(
            [sys.executable, "-c", check],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        self.assertEqual(out.strip(), "no reactor")


class InProcessServiceTreeTests(SynchronousTestCase):
    """``makeService(options, reactor)`` on fake reactors: no socket, no twistd."""

    def build(self, node: str) -> tuple[MemoryReactorClock, MultiService]:
        from webchat.tap import makeService

        reactor = MemoryReactorClock()
        options = Options(environ={})
        options.parseOptions(
            ["--redis", "redis://127.0.0.1:6379/0", "--node-id", node,
             "--max-connections", "10", "--port", "tcp:8080"]
        )  # fmt: skip
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        return reactor, top

    def test_two_service_trees_in_one_process(self):
        from webchat.redis import RedisRelay

        (first, first_top), (second, second_top) = self.build("a"), self.build("b")
        for reactor, top in [(first, first_top), (second, second_top)]:
            # Each tree listens and dials Redis on its own reactor, and only there.
            self.assertEqual([port for port, *_ in reactor.tcpServers], [8080])
            dialled = [(host, port) for host, port, *_ in reactor.tcpClients]
            self.assertEqual(dialled, [("127.0.0.1", 6379)] * 2)
            (relay,) = [s for s in top if isinstance(s, RedisRelay)]
            self.assertEqual(relay.state, "connecting")
        # Redis refuses the first tree's links: only its clock gets the retries.
        for _host, _port, factory, *_ in first.tcpClients:
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        # Two retries, and each tree's presence heartbeat on its own clock.
        self.assertEqual(len([c for c in first.getDelayedCalls() if c.active()]), 3)
        self.assertEqual(len([c for c in second.getDelayedCalls() if c.active()]), 1)
        first.advance(5.0)
        self.assertEqual(len(first.tcpClients), 4)
        self.assertEqual(len(second.tcpClients), 2)
        # Stopping drains the chat (nobody here) and closes the relay at once.
        self.assertTrue(first_top.stopService().called)
        (relay,) = [s for s in first_top if isinstance(s, RedisRelay)]
        self.assertEqual(relay.state, "down")


def listening_ports(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"Site starting on (\d+)", log)]


@slow
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

    def test_a_reactor_chosen_on_the_command_line_runs_chat_and_relay(self):
        """
        ``twistd --reactor=poll``: nothing installed a reactor before twistd
        did, and the chat and its Redis links run on the one it chose.
        """
        from tests.redis_server import RedisServer

        out = subprocess.run(
            [*twistd_command(), "--reactor=poll", "webchat", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        self.assertIn("--redis=URL", out)
        redis = RedisServer()
        self.addCleanup(redis.stop)
        redis.start()
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        server = Twistd(
            workdir,
            "--port", "tcp:0:interface=127.0.0.1", "--redis", redis.url,
            twistd_args=("--reactor=poll",),
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        server.wait_for_log("Redis link up")
        (port,) = listening_ports(server.wait_for_log("Site starting on"))
        with (
            connect(f"ws://127.0.0.1:{port}") as a,
            connect(f"ws://127.0.0.1:{port}") as b,
        ):
            a.send("polled")
            # The id may come from Redis or, before its first block, a fallback.
            self.assertRegex(b.recv(timeout=5), r"^id \d+: polled$")
        self.assertEqual(server.stop(signal.SIGTERM), 0, server.log())
        log = server.log()
        self.assertIn("reactor class: twisted.internet.pollreactor.PollReactor", log)
        self.assertNotIn("Traceback", log)

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
            "connection(s) in room lobby",
            log,
        )
        # The forged line never starts a line of its own.
        self.assertIsNone(re.search(r"^New connection! \(42\)", log, re.M))
        self.assertNotIn("] New connection! (42)", log)
        self.assertIn("Closed 2 of 2 connection(s) cleanly", log)
        self.assertNotIn("Traceback", log)

    def test_a_reconnect_storm_is_not_dropped_by_the_listen_backlog(self):
        # After a restart or a network blip every page reconnects in the same
        # instant.  Connections the kernel has no room for are not refused:
        # their SYN is dropped and retried 1, 3, 7, 15 s later, so a small
        # listen backlog (Twisted's default is 50) turns one blip into a
        # quarter of a minute of "reconnecting" for the unlucky ones.
        server = self.start("--port", "tcp:0:interface=127.0.0.1")
        (port,) = listening_ports(server.wait_for_log("Site starting on"))
        storm = 300
        server.process.send_signal(signal.SIGSTOP)  # accepts nothing meanwhile
        sockets = []
        try:
            for _ in range(storm):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                sockets.append(s)
            deadline = time.monotonic() + 0.5
            pending = list(sockets)
            while pending and time.monotonic() < deadline:
                _, ready, _ = select.select([], pending, [], 0.05)
                pending = [s for s in pending if s not in ready]
            connected = sum(
                1
                for s in sockets
                if s not in pending
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            )
        finally:
            server.process.send_signal(signal.SIGCONT)
            for s in sockets:
                s.close()
        self.assertEqual(connected, storm)

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

    def test_second_ctrl_c_during_the_grace_exits_quietly(self):
        server = self.start(
            "--port", "tcp:0:interface=127.0.0.1", "--shutdown-grace", "60"
        )  # fmt: skip
        (port,) = listening_ports(server.wait_for_log("Site starting on"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
            # A client that completes the handshake, then never answers a close.
            silent.sendall(HANDSHAKE)
            self.assertTrue(silent.recv(4096).startswith(b"HTTP/1.1 101 "))
            server.wait_for_log("New connection! (1)")
            server.process.send_signal(signal.SIGINT)
            server.wait_for_log("Shutting down: closing 1 connection(s)")
            started = time.monotonic()
            code = server.stop(signal.SIGINT, timeout=10)
        log = server.log()
        self.assertEqual(code, 0, log)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("Received SIGINT again: not waiting", log)
        self.assertIn("Closed 0 of 1 connection(s) cleanly", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("ReactorNotRunning", log)

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


@slow
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


def run_twistd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``twistd -n --pidfile= webchat ARGS``, to completion (it must not start)."""
    return subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "webchat", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


@slow
class CommandLineErrorTests(SynchronousTestCase):
    """A mistyped option: one line naming it, the value and what is expected."""

    def assertOneLine(self, args: tuple[str, ...], expected: str) -> None:
        result = run_twistd(*args)
        self.assertEqual(result.returncode, 2, result)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, f"webchat: {expected}\n")

    def test_unknown_endpoint_type(self):
        self.assertOneLine(
            ("--port", "abc"),
            "--port: unknown endpoint type 'abc' (use 8080, "
            "tcp:8080:interface=127.0.0.1, ssl:..., unix:...)",
        )

    def test_port_out_of_range(self):
        self.assertOneLine(("--port", "-5"), "--port: port must be 0-65535, got -5")
        self.assertOneLine(
            ("--port", "99999"), "--port: port must be 0-65535, got 99999"
        )
        self.assertOneLine(
            ("--port", "tcp:70000:interface=127.0.0.1"),
            "--port: port must be 0-65535, got 70000",
        )

    def test_webhook_url_that_cannot_be_parsed_or_holds_credentials(self):
        # With a secret: these used to pass the checks, then crash start-up
        # with a traceback (ValueError from the URL's port) or never deliver.
        secret = Path(self.mktemp())
        secret.write_text("the secret\n")
        given = ("--webhook-secret-file", str(secret))
        expected = "expected http://host[:port]/path or https://host[:port]/path"
        for url, shown in [
            ("http://127.0.0.1:99999/x", "http://127.0.0.1:99999/x"),
            ("http://127.0.0.1:abc/x", "http://127.0.0.1:abc/x"),
            ("http://[::1/x", "(an unparsable URL)"),
        ]:
            self.assertOneLine(
                ("--webhook-url", url, *given),
                f"--webhook-url: {shown}: not a valid URL ({expected})",
            )
        self.assertOneLine(
            ("--webhook-url", "http://hookuser:pw@127.0.0.1:9/x", *given),
            "--webhook-url: http://127.0.0.1:9/x: no credentials in the URL "
            "(user:pass@); requests are signed with --webhook-secret-file",
        )

    def test_misspelt_endpoint_parameter(self):
        self.assertOneLine(
            ("--port", "tcp:8080:interfac=x"),
            "--port: tcp:8080:interfac=x: unknown parameter 'interfac' (use 8080, "
            "tcp:8080:interface=127.0.0.1, ssl:..., unix:...)",
        )

    def test_metrics_port_is_checked_too(self):
        self.assertOneLine(
            ("--metrics-port", "abc"),
            "--metrics-port: unknown endpoint type 'abc' (use 8080, "
            "tcp:8080:interface=127.0.0.1, ssl:..., unix:...)",
        )

    def test_every_numeric_option_names_itself(self):
        for option in (
            "max-connections",
            "max-connections-per-ip",
            "max-message-size",
            "rate-limit",
            "rate-burst",
            "max-send-buffer",
            "ping-interval",
            "ping-timeout",
            "handshake-timeout",
            "shutdown-grace",
        ):
            self.assertOneLine(
                (f"--{option}", "-3"), f"--{option}: must not be negative, got -3"
            )
            self.assertOneLine(
                (f"--{option}", "lots"),
                f"--{option}: expected a number >= 0, got 'lots'",
            )

    def test_no_decimal_option_takes_a_non_finite_number(self):
        # float() reads all three; each broke the server in its own way.
        for option in ("frame-rate-limit", "handshake-timeout", "rate-limit"):
            for value in ("inf", "nan", "1e309"):
                self.assertOneLine(
                    (f"--{option}", value),
                    f"--{option}: expected a finite number >= 0, got {value!r}",
                )

    def test_an_ipv6_interface_must_be_escaped(self):
        self.assertOneLine(
            ("--port", "tcp:18836:interface=::1"),
            "--port: tcp:18836:interface=::1: unknown parameter 'interface' "
            "(escape every ':' of an IPv6 address: tcp:8080:interface=\\:\\:1)",
        )

    def test_web_root_must_hold_a_page(self):
        empty = Path(self.mktemp()).resolve()
        empty.mkdir(parents=True)
        self.assertOneLine(
            ("--web-root", str(empty / "missing")),
            f"--web-root: {empty / 'missing'}: no such directory",
        )
        self.assertOneLine(
            ("--web-root", str(empty)), f"--web-root: {empty}: has no index.html"
        )

    def test_usage_line_names_twistd_and_webchat(self):
        out = subprocess.run(
            [*twistd_command(), "webchat", "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertTrue(
            out.startswith("Usage: twistd [options] webchat [options]\n"), out[:200]
        )

    def test_help_shows_placeholders_and_what_0_means(self):
        out = subprocess.run(
            [*twistd_command(), "webchat", "--help"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "COLUMNS": "400"},
        ).stdout
        for placeholder in (
            "--port=ENDPOINT",
            "--metrics-port=ENDPOINT",
            "--rate-limit=N",
            "--max-message-size=BYTES",
            "--shutdown-grace=S",
            "--web-root=DIR",
            "--redis=URL",
        ):
            self.assertIn(placeholder, out)
        # COLUMNS=400: each option's help is on its own line.
        entries = {
            line.split("--", 1)[1].split()[0]: line
            for line in out.splitlines()
            if line.lstrip().startswith("-")
        }
        for option, zero in (
            ("max-connections=N", "0 = no cap"),
            ("max-connections-per-ip=N", "0 = off"),
            ("max-message-size=BYTES", "0 = no limit"),
            ("rate-limit=N", "0 = off"),
            ("rate-burst=N", "0 counts as 1"),
            ("max-send-buffer=BYTES", "0 = off"),
            ("ping-interval=S", "0 = off"),
            ("ping-timeout=S", "turn pings off with --ping-interval 0"),
            ("handshake-timeout=S", "0 = off"),
            ("shutdown-grace=S", "0 = do not wait"),
        ):
            self.assertIn(zero, entries[option], option)


@slow
class ListeningFailureTests(SynchronousTestCase):
    """A port that cannot be opened ends the process: one line, exit non-zero."""

    def assertCannotListen(self, args: tuple[str, ...], expected: str) -> None:
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        server = Twistd(workdir, *args)
        self.addCleanup(server.stop, signal.SIGKILL)
        try:
            code = server.process.wait(30)
        except subprocess.TimeoutExpired:
            self.fail(f"still running, listening nowhere:\n{server.log()}")
        log = server.log()
        out = server.process.stdout.read().decode()
        self.assertEqual(code, 1, log + out)
        failures = [line for line in log.splitlines() if "Cannot listen" in line]
        self.assertEqual(len(failures), 1, log)
        self.assertTrue(failures[0].endswith(expected), log)
        self.assertNotIn("Traceback", log + out)

    def test_port_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            endpoint = f"tcp:{port}:interface=127.0.0.1"
            self.assertCannotListen(
                ("--port", endpoint),
                f"[webchat#critical] Cannot listen on --port {endpoint}: "
                "address already in use",
            )

    def test_second_port_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            endpoint = f"tcp:{port}:interface=127.0.0.1"
            self.assertCannotListen(
                ("--port", "tcp:0:interface=127.0.0.1", "--port", endpoint),
                f"Cannot listen on --port {endpoint}: address already in use",
            )

    def test_metrics_port_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            endpoint = f"tcp:{port}:interface=127.0.0.1"
            self.assertCannotListen(
                ("--port", "tcp:0:interface=127.0.0.1", "--metrics-port", endpoint),
                f"Cannot listen on --metrics-port {endpoint}: address already in use",
            )

    def test_unix_socket_in_a_missing_directory(self):
        self.assertCannotListen(
            ("--port", "unix:/nonexistent-webchat-dir/chat.sock"),
            "Cannot listen on --port unix:/nonexistent-webchat-dir/chat.sock: "
            "no such file or directory",
        )

    def test_address_not_on_this_machine(self):
        # 192.0.2.0/24 is TEST-NET-1: never assigned to a local interface.
        self.assertCannotListen(
            ("--port", "tcp:0:interface=192.0.2.1"),
            "Cannot listen on --port tcp:0:interface=192.0.2.1: "
            "cannot assign requested address",
        )
