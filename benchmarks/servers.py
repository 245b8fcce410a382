"""The servers a benchmark measures: webchat itself, the baselines, or a given URL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.helpers import CHECKOUT, free_port, process_rss_kb, twistd_path
from benchmarks.processes import ProcessRegistry
from benchmarks.tls import TlsFiles

#: How long a freshly started server has to start accepting connections.
STARTUP_TIMEOUT = 30.0

#: The baselines ``benchmarks.baselines`` can run, in report order.
BASELINES = ("autobahn", "websockets")
#: Also runnable, but not a default baseline: the C fan-out server that
#: ``--scenario calibrate`` uses to find the load generator's own ceiling.
EXTRA_BASELINES = ("c",)
#: With ``--tls``, also runnable: nginx terminating TLS in front of a plain
#: webchat (docs/deploy.md's alternative), both on the server's core.
TLS_EXTRA_TARGETS = ("nginx",)


@dataclass
class Server:
    """A server under test, and what can be observed of it."""

    name: str
    url: str
    pid: int | None = None
    command: list[str] = field(default_factory=list)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    #: Started with it and stopped after it (nginx: the plain webchat behind).
    companions: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ip(self) -> str:
        host = urlsplit(self.url).hostname or "127.0.0.1"
        return socket.gethostbyname(host)

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "wss" else 80)

    @property
    def host_header(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"

    def rss_kb(self) -> int | None:
        return None if self.pid is None else process_rss_kb(self.pid)

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "pid": self.pid,
            "command": self.command,
        }


def webchat_command(
    port: int, logfile: Path, extra: list[str], tls: TlsFiles | None = None
) -> list[str]:
    """
    ``twistd webchat`` with only what the load would trip turned off: the
    per-connection message and frame rate limits (senders far exceed 20
    msg/s, and 1000 frames/s) and the log line
    per relayed message (a benchmark of the log file is not the point).  Every
    other default — ping, timeouts, send-buffer cap, metrics — stays on.
    """
    return [
        twistd_path(),
        "-n",
        "--pidfile=",
        f"--logfile={logfile}",
        "webchat",
        "--port",
        tls.endpoint(port) if tls else f"tcp:{port}:interface=127.0.0.1",
        "--rate-limit",
        "0",
        "--frame-rate-limit",
        "0",
        "--quiet",
        *extra,
    ]


def baseline_command(name: str, port: int, tls: TlsFiles | None = None) -> list[str]:
    """``python -m benchmarks.baselines NAME``: to be run from the checkout."""
    command = [sys.executable, "-m", "benchmarks.baselines", name, "--port", str(port)]
    if tls:
        command += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    return command


def nginx_config(workdir: Path, port: int, upstream: int, tls: TlsFiles) -> str:
    """
    nginx as a deployment would put it in front of webchat: TLS on ``port``,
    WebSockets proxied to the plain webchat on ``upstream``; one worker (the
    server's one core), no access log, no proxy buffering.
    """
    return f"""daemon off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 40000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} ssl backlog=1024;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""


def start_server(
    name: str,
    registry: ProcessRegistry,
    workdir: Path,
    cpu: int | None,
    extra_args: list[str] | None = None,
    tls: TlsFiles | None = None,
) -> Server:
    """
    Start ``webchat`` or a baseline on a free port, pinned to ``cpu``; await
    it.  With ``tls`` it speaks TLS (``wss://``); ``nginx`` (``tls`` only) is
    a plain webchat behind nginx terminating TLS, both on ``cpu``.
    """
    if name == "nginx":
        if tls is None:
            raise ValueError("the nginx target needs --tls")
        return _start_nginx(registry, workdir, cpu, extra_args or [], tls)
    port = free_port()
    log_path = workdir / f"{name}-{port}.log"
    if name == "webchat":
        command = webchat_command(port, log_path, extra_args or [], tls)
        stdout = subprocess.DEVNULL
    else:
        command = baseline_command(name, port, tls)
        stdout = log_path.open("wb")
    try:
        process = registry.start(
            command,
            cpu,
            # ``-m benchmarks.baselines`` imports from the current directory
            # (the wheel does not ship the benchmarks); twistd needs no cwd.
            cwd=workdir if name == "webchat" else CHECKOUT,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    finally:
        if stdout is not subprocess.DEVNULL:
            stdout.close()
    server = Server(
        name=name,
        url=f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/",
        pid=process.pid,
        command=command,
        log_path=log_path,
        process=process,
    )
    wait_until_listening(server)
    return server


def _start_nginx(
    registry: ProcessRegistry,
    workdir: Path,
    cpu: int | None,
    extra_args: list[str],
    tls: TlsFiles,
) -> Server:
    """A plain webchat, and nginx with TLS in front of it; the Server is nginx's."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("the nginx target needs nginx (Debian: nginx)")
    inner = start_server("webchat", registry, workdir, cpu, extra_args)
    port = free_port()
    conf = workdir / f"nginx-{port}.conf"
    conf.write_text(nginx_config(workdir, port, inner.port, tls))
    log_path = workdir / f"nginx-{port}.log"
    command = [nginx, "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    with log_path.open("wb") as out:
        process = registry.start(command, cpu, stdout=out, stderr=subprocess.STDOUT)
    server = Server(
        name="nginx",
        url=f"wss://127.0.0.1:{port}/",
        # The memory and CPU that /proc is asked for are webchat's; nginx's
        # worker is another process on the same core (the core's busy share
        # counts both).
        pid=inner.pid,
        command=command,
        log_path=log_path,
        process=process,
        companions=[inner.process] if inner.process is not None else [],
    )
    wait_until_listening(server)
    return server


def external_server(url: str, pid: int | None) -> Server:
    """A server someone else runs: measured over the wire, and via /proc if ``pid``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"--url must be a ws:// or wss:// URL: {url}")
    return Server(name="webchat", url=url, pid=pid)


def wait_until_listening(server: Server, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited with status {server.process.returncode} "
                f"before listening:\n{server.log_text()[-2000:]}"
            )
        try:
            with socket.create_connection((server.ip, server.port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"{server.name} did not listen on {server.url} within {timeout} s"
    )
