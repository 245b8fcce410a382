"""
The systemd units in contrib/systemd, checked without systemd as PID 1.

Two checks stand in for a real ``systemctl start``: a real ``twistd`` run
with the service's own ExecStart line and handed a listening socket the way
systemd hands one over, and ``systemd-analyze verify`` on the shipped files.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support import ROOT, Twistd, require, slow, twistd_command
from webchat.limits import SHUTDOWN_GRACE
from webchat.web import default_web_root

UNITS = ROOT / "contrib" / "systemd"
SERVICE = UNITS / "webchat.service"
SOCKET = UNITS / "webchat.socket"

#: Long enough for twistd to start: clients connect before it is up, and the
#: kernel holds them in the socket's backlog meanwhile.
STARTUP_TIMEOUT = 20.0


def unit_values(text: str, key: str) -> list[str]:
    """Every value given to ``key=`` in a unit file's text."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=(.*)$", re.MULTILINE)
    return [value.strip() for value in pattern.findall(text)]


def shipped_exec_start() -> list[str]:
    (line,) = unit_values(SERVICE.read_text(), "ExecStart")
    return shlex.split(line)


def with_local_binary(service: str) -> str:
    """A service unit's text with only ExecStart's binary swapped for this venv's."""
    (line,) = unit_values(service, "ExecStart")
    binary = shlex.split(line)[0]
    local = line.replace(binary, twistd_command()[0], 1)
    return service.replace(f"ExecStart={line}", f"ExecStart={local}", 1)


def seconds(timespan: str) -> float:
    """A systemd time span of the simple kinds used in our units: 15, 15s, 1min."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", timespan)
    if match is None:
        raise ValueError(f"unsupported time span {timespan!r}")
    number, unit = match.groups()
    return float(number) * (60 if unit == "min" else 1)


# -- socket activation ------------------------------------------------------------

#: What systemd does between fork and exec, in sh: the listening socket (given
#: to sh as its stdin) becomes fd 3, stdin goes back to /dev/null, and the
#: LISTEN_* variables describe fd 3 to the process about to be exec'd, whose
#: pid is this shell's own.  systemd (since 227) always sets LISTEN_FDNAMES,
#: to the socket unit's name unless FileDescriptorName= says otherwise, and
#: Twisted ignores LISTEN_FDS without it.
ACTIVATE = (
    "exec 3<&0 </dev/null; "
    "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=webchat.socket; "
    'export LISTEN_PID LISTEN_FDS LISTEN_FDNAMES; exec "$@"'
)


class ActivatedTwistd(Twistd):
    """
    The service's ExecStart command, started as systemd would start it on
    webchat.socket: ``listener`` arrives as fd 3.  Only the binary's path
    changes (this venv's twistd) and a log file is added for the test.
    Spawned its own way; ``log()`` and ``stop()`` are Twistd's.
    """

    def __init__(self, workdir: Path, listener: socket.socket) -> None:
        self.logfile = workdir / "twistd.log"
        _, *args = shipped_exec_start()
        self.command = [twistd_command()[0], f"--logfile={self.logfile}", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", ACTIVATE, "sh", *self.command],
            cwd=workdir,
            env=env,
            stdin=listener.fileno(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    @contextmanager
    def explaining_failures(self) -> Iterator[None]:
        """Add what twistd logged and printed to any failure inside."""
        try:
            yield
        except Exception as e:
            if self.process.poll() is None:
                self.process.kill()
            output, _ = self.process.communicate(timeout=15)
            raise AssertionError(
                f"{e!r}\n--- twistd exited {self.process.returncode}; its log:\n"
                f"{self.log()}\n--- its output:\n{output.decode(errors='replace')}"
            ) from e


def dual_stack_listener() -> socket.socket:
    """
    The kind of socket ``ListenStream=8080`` + ``BindIPv6Only=both`` makes: one
    IPv6 socket that IPv4 clients reach too.  Bound to the IPv4-mapped
    loopback address so it takes 127.0.0.1 clients (as behind nginx) and
    nothing from the network.  Left blocking, as systemd leaves it by default.
    """
    try:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as e:
        raise require("IPv6 sockets", str(e)) from e
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::ffff:127.0.0.1", 0))
    listener.listen(16)
    return listener


def ipv4_listener() -> socket.socket:
    """What systemd binds for ``ListenStream=8080`` on a host without IPv6."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def get_page(port: int) -> tuple[int, str | None, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=STARTUP_TIMEOUT)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def close_code(client: ClientConnection) -> int | None:
    """Wait for the server to close ``client``; the code it sent."""
    try:
        message = client.recv(timeout=SHUTDOWN_GRACE * 2)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    raise AssertionError(f"expected a close, got a message: {message!r}")


@slow
class SocketActivationTests(SynchronousTestCase):
    def start(self, listener: socket.socket) -> tuple[ActivatedTwistd, int]:
        port = listener.getsockname()[1]
        workdir = Path(tempfile.mkdtemp(prefix="webchat-systemd-"))
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        try:
            twistd = ActivatedTwistd(workdir, listener)
        finally:
            # The server owns the socket now, as it would under systemd
            # (which keeps a copy; the test has no need to).
            listener.close()
        self.addCleanup(twistd.stop)
        return twistd, port

    def assert_exits_cleanly(self, twistd: ActivatedTwistd) -> None:
        """
        After the one SIGTERM systemd sends, twistd must end by itself, with
        0, within TimeoutStopSec (a second signal would not be systemd's way).
        """
        try:
            code = twistd.process.wait(timeout=SHUTDOWN_GRACE + 10)
        except subprocess.TimeoutExpired:
            code = None
        self.assertEqual(code, 0, twistd.log())

    def assert_serves_page(self, port: int) -> None:
        status, content_type, body = get_page(port)
        self.assertEqual(status, 200)
        self.assertIn("text/html", content_type or "")
        self.assertEqual(body, (default_web_root() / "index.html").read_bytes())

    def test_chat_page_and_shutdown_on_inherited_socket(self) -> None:
        """
        On the socket systemd hands over, the chat relays, the page is
        served, and SIGTERM (systemd's KillSignal) closes clients with 1001
        and exits 0, which Restart=on-failure takes as a deliberate stop.
        """
        twistd, port = self.start(dual_stack_listener())
        url = f"ws://127.0.0.1:{port}/"
        # twistd may not have adopted the socket yet: the connection waits
        # in its backlog meanwhile, which is the point of socket activation.
        with (
            twistd.explaining_failures(),
            connect(url, open_timeout=STARTUP_TIMEOUT) as first,
            connect(url, open_timeout=STARTUP_TIMEOUT) as second,
        ):
            first.send("hi")
            self.assertEqual(second.recv(timeout=10), "id 1: hi")

            self.assert_serves_page(port)

            twistd.process.send_signal(signal.SIGTERM)
            self.assertEqual(close_code(first), 1001)
            self.assertEqual(close_code(second), 1001)
        self.assert_exits_cleanly(twistd)

    def test_ipv4_only_socket(self) -> None:
        """
        Without IPv6 systemd binds ``ListenStream=8080`` as IPv4; the same
        ``domain=INET6`` command line must still serve it.
        """
        twistd, port = self.start(ipv4_listener())
        with twistd.explaining_failures():
            self.assert_serves_page(port)
        twistd.process.send_signal(signal.SIGTERM)
        self.assert_exits_cleanly(twistd)


# -- the unit files ------------------------------------------------------------------


class UnitFileTests(SynchronousTestCase):
    def test_stop_timeout_outlasts_shutdown_grace(self) -> None:
        """systemd must not SIGKILL the server while it is still saying goodbye."""
        text = SERVICE.read_text()
        (timeout,) = unit_values(text, "TimeoutStopSec")
        self.assertGreater(seconds(timeout), SHUTDOWN_GRACE)
        self.assertEqual(unit_values(text, "KillSignal"), ["SIGTERM"])

    @slow
    def test_systemd_analyze_verify_accepts_units(self) -> None:
        code, output, ours = self.verify(SERVICE.read_text(), SOCKET.read_text())
        self.assertEqual(ours, [], output)
        self.assertEqual(code, 0, output)

    @slow
    def test_systemd_analyze_verify_catches_a_misspelt_setting(self) -> None:
        """The check above would notice a broken unit: it is not vacuous."""
        service = SERVICE.read_text().replace(
            "NoNewPrivileges=yes", "NoNewPrivilege=yes"
        )
        self.assertNotEqual(service, SERVICE.read_text())
        _, output, ours = self.verify(service, SOCKET.read_text())
        self.assertTrue(
            any("NoNewPrivilege" in line for line in ours), f"not caught:\n{output}"
        )

    def verify(self, service: str, socket_unit: str) -> tuple[int, str, list[str]]:
        """
        Run ``systemd-analyze verify`` on the two units' texts.

        verify checks that ExecStart's binary exists, so the copies point it
        at this venv's twistd; nothing else in them changes.  An unknown or
        unparsable setting is only a warning, printed with the unit's path,
        and verify still exits 0: so the warnings that name our units are
        returned for the caller to check, while lines about other units
        (multi-user.target and friends, pulled in as dependencies from the
        host, whatever state they are in) are not our concern.
        ``--man=no``: whether Documentation='s man pages are installed is a
        property of the host, not of the unit.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise require("systemd-analyze", "install systemd to check the units")
        workdir = Path(tempfile.mkdtemp(prefix="webchat-units-"))
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        service = with_local_binary(service)
        (workdir / "webchat.service").write_text(service)
        (workdir / "webchat.socket").write_text(socket_unit)
        result = subprocess.run(
            [
                analyze,
                "verify",
                "--man=no",
                str(workdir / "webchat.socket"),
                str(workdir / "webchat.service"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        ours = [
            line
            for line in output.splitlines()
            if "webchat.service" in line or "webchat.socket" in line
        ]
        return result.returncode, output, ours
