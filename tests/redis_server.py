"""A real redis-server for the tests, on 127.0.0.1 and a free port.

Each test starts its own, with nothing saved to disk, and may kill it,
freeze it, or start it again on the same port to play an outage.  The
server's own answers are read with a small blocking RESP client: a loopback
round trip to Redis takes well under a millisecond, so the tests can use it
between reactor turns without stalling the relays they watch.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.support import free_port, require

#: How long a starting redis-server may take to answer PING.
START_TIMEOUT = 10.0


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise require("redis-server", "apt-get install redis-server")
    return binary


class RedisError(Exception):
    """An error reply from Redis."""


class RedisServer:
    """
    One redis-server process.  ``stop()`` it in a cleanup (it is safe to call
    twice); ``kill()`` and ``start()`` again play a crash and a restart on the
    same port (with an empty data set, as a server without persistence has).
    """

    def __init__(
        self,
        password: str | None = None,
        unix_socket: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.password = password
        # Short: a unix socket path must fit in 108 bytes, and trial's
        # working directory is deep.
        self.workdir = Path(tempfile.mkdtemp(prefix="wc-redis-", dir="/tmp"))
        self.socket_path = str(self.workdir / "redis.sock") if unix_socket else None
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.logfile = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command_line(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.logfile),
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.socket_path is not None:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        return args + list(self.extra)

    # -- lifetime -------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process; ``start()`` also waits until it answers."""
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            self.command_line(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def start(self) -> None:
        """Start it and block until it answers PING (for setUp)."""
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start:\n{self.log()}")
            time.sleep(0.02)

    def restart(self):
        """Start it again on the same port; a Deferred that fires once it answers."""
        self.spawn()
        return self.wait_until_ready()

    async def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not restart:\n{self.log()}")
            await deferLater(reactor, 0.02, lambda: None)

    def wait_until_ready(self):
        """A Deferred that fires once the server answers PING, without blocking."""
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._wait())

    def kill(self) -> None:
        """SIGKILL, as a crash: connections drop, nothing is saved."""
        self._signal(signal.SIGKILL)
        self._reap()

    def shutdown(self) -> None:
        """SIGTERM, as a clean stop: Redis saves what its persistence keeps."""
        self._signal(signal.SIGTERM)
        self._reap()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a dead link)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill it if it runs and remove its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def _reap(self) -> None:
        assert self.process is not None
        self.process.wait(timeout=10)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"redis-server exited with {self.process.returncode}:\n{self.log()}"
            )

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return "(no log)"

    # -- talking to it ----------------------------------------------------------------

    def answers(self) -> bool:
        """Whether it is up and answers PING (after AUTH, when it has a password)."""
        try:
            return self.command("PING", timeout=0.5) == b"PONG"
        except (OSError, RedisError):
            return False

    def command(self, *args: Any, timeout: float = 5.0) -> Any:
        """Run one command on a fresh TCP connection; its reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout) as sock:
            reader = sock.makefile("rb")
            if self.password is not None:
                sock.sendall(encode_command("AUTH", self.password))
                read_reply(reader)
            sock.sendall(encode_command(*args))
            return read_reply(reader)


def encode_command(*args: Any) -> bytes:
    """A command as RESP, the way every Redis client sends one."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def read_reply(reader: Any) -> Any:
    """One RESP2 reply: status and bulk strings as bytes, errors raised."""
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed by redis-server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = reader.read(length + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [read_reply(reader) for _ in range(count)]
    raise OSError(f"unexpected reply from redis-server: {line!r}")
