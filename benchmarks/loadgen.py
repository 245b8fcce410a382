"""Build the C load generator (``loadgen.c``) and talk to it.

The binary is compiled with gcc on first use into a cache directory, named by
a hash of its source and of the compiler, so an edited ``loadgen.c`` or a new
gcc gets a fresh build and nothing stale is ever run.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.processes import ProcessRegistry

SOURCE = Path(__file__).with_name("loadgen.c")
CFLAGS = ("-O2", "-Wall", "-std=gnu11")
#: OpenSSL, for ``client ... tls`` (Debian: libssl-dev).
LIBS = ("-lssl", "-lcrypto")

Progress = Callable[[dict[str, Any]], None]


class LoadGenError(RuntimeError):
    """The load generator failed, or stopped answering."""


def cache_dir() -> Path:
    """``$WEBCHAT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/webchat-bench`` (~/.cache)."""
    explicit = os.environ.get("WEBCHAT_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "webchat-bench"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def build(
    directory: Path | None = None, source_path: Path = SOURCE, selftest: bool = True
) -> Path:
    """
    Compile ``loadgen.c`` (or another of our C programs, ``httpload.c``)
    unless this very source is built already; the binary.
    """
    cc = compiler()
    if cc is None:
        raise LoadGenError(
            "no C compiler: install gcc (or set CC) to build the load generator"
        )
    version = subprocess.run(
        [cc, "--version"], capture_output=True, check=False
    ).stdout.splitlines()[:1]
    source = source_path.read_bytes()
    digest = hashlib.sha256(
        source + b"\0" + b"".join(version) + " ".join(CFLAGS + LIBS).encode()
    )
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / f"{source_path.stem}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    partial = directory / f".{binary.name}.{os.getpid()}"
    result = subprocess.run(
        [cc, *CFLAGS, "-o", str(partial), str(source_path), *LIBS],
        capture_output=True,
        check=False,
    )
    name = source_path.name
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise LoadGenError(f"building {name} failed:\n{result.stderr.decode()}")
    if selftest:
        check = subprocess.run(
            [str(partial), "selftest"], capture_output=True, check=False
        )
        if check.returncode != 0:
            partial.unlink(missing_ok=True)
            raise LoadGenError(f"{name} self-test failed: {check.stdout.decode()}")
    os.replace(partial, binary)  # atomic: a concurrent run sees all of it or none
    return binary


class LoadGen:
    """
    One running load generator: a command line in, JSON lines out.

    Every read has a deadline, so a wedged generator ends the run with an
    error instead of hanging it.
    """

    def __init__(
        self,
        binary: Path,
        registry: ProcessRegistry,
        *,
        ip: str,
        port: int,
        host: str,
        path: str,
        cpu: int | None,
        stderr_path: Path,
        tls: bool = False,
    ) -> None:
        self._registry = registry
        self._stderr_path = stderr_path
        with stderr_path.open("wb") as stderr:
            self.process = registry.start(
                [
                    binary,
                    "client",
                    ip,
                    str(port),
                    host,
                    path,
                    *(["tls"] if tls else []),
                ],
                cpu,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._next_step = 1
        ready = self._read_message(time.monotonic() + 10.0)
        if ready.get("type") != "ready":
            raise LoadGenError(f"load generator did not start: {ready}")

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- commands ---------------------------------------------------------------

    def open(
        self,
        role: str,
        count: int,
        concurrency: int,
        timeout: float,
        on_progress: Progress | None = None,
        port: int | None = None,
    ) -> dict[str, Any]:
        """
        Open ``count`` connections of ``role`` (recv, send, slow or resume), to ``port``
        on the same IP if given (another node), else to the generator's server.
        """
        target = "" if port is None else f" {port}"
        return self.command(
            f"open {role} {count} {concurrency} {timeout:g}{target}",
            timeout + 30,
            on_progress,
        )

    def step(
        self,
        rate: float,
        seconds: float,
        payload: int,
        drain: float,
        settle: float,
        on_progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Send ``rate`` messages/s (all senders together) for ``seconds``; drain."""
        step_id = self._next_step
        self._next_step += 1
        return self.command(
            f"step {step_id} {rate:.3f} {seconds:g} {payload} {drain:g} {settle:g}",
            seconds + drain + settle + 60,
            on_progress,
        )

    def codec(self, name: str) -> dict[str, Any]:
        """The wire format of the connections opened next: ``seed`` or ``json``."""
        return self.command(f"codec {name}", 10)

    def rooms(self, count: int, prefix: str = "/ws/r") -> dict[str, Any]:
        """
        Spread the connections opened next over ``count`` rooms, paths
        ``prefix0`` .. ``prefix<count-1>``, in turn; 0: the one path given.
        """
        return self.command(f"rooms {count} {prefix if count else '-'}", 10)

    def query(self, room: int, query: str) -> dict[str, Any]:
        """
        Connections opened next to room ``room`` (0 with one room) add
        ``query`` (``?since=10&epoch=abc``, no spaces) to their path.
        """
        if not query or any(ch.isspace() for ch in query):
            raise ValueError(f"a query needs no spaces: {query!r}")
        return self.command(f"query {room} {query}", 10)

    def query_clear(self) -> dict[str, Any]:
        return self.command("query clear", 10)

    def catchup(self, expect: int, timeout: float) -> dict[str, Any]:
        """
        Wait until every open ``resume`` connection has had ``expect`` message
        events; when each had its last one, and what its welcome said.
        """
        return self.command(f"catchup {expect} {timeout:g}", timeout + 30)

    def check(self) -> dict[str, Any]:
        return self.command("check", 30)

    def reset(self) -> dict[str, Any]:
        """Drop every connection (TCP reset), keeping the process."""
        return self.command("reset", 60)

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.command("quit", 30)
        except (LoadGenError, OSError):
            pass
        finally:
            self._selector.close()
            self._registry.stop(self.process, timeout=5.0)

    def command(
        self, line: str, timeout: float, on_progress: Progress | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise LoadGenError(f"load generator is gone: {self._stderr()}") from None
        while True:
            message = self._read_message(deadline)
            kind = message.get("type")
            if kind == "progress":
                if on_progress is not None:
                    on_progress(message)
                continue
            if kind == "error":
                raise LoadGenError(f"{line!r}: {message.get('error')}")
            return message

    # -- plumbing ---------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadGenError("load generator stopped answering")
            if not self._selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise LoadGenError(
                    f"load generator exited ({self.process.poll()}): {self._stderr()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError as e:
            raise LoadGenError(f"unreadable load generator output {line!r}") from e

    def _stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""
