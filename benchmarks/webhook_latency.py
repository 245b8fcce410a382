"""
Webhooks never slow the chat (issue #15): the same chat, in the same run,
without webhooks, with ``message`` events to a receiver that answers at
once, and to one that accepts connections and never answers.  Two seed
clients of each node ping-pong messages; medians and p99 of send-to-receipt,
the node's webhook queue and RSS after.

    .venv/bin/python -m benchmarks.webhook_latency [MESSAGES]
"""

from __future__ import annotations

import multiprocessing
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from websockets.sync.client import connect

from benchmarks.helpers import process_rss_kb
from tests.support import Twistd
from tests.webhook_receiver import ThreadedReceiver

SECRET = b"bench webhook secret"

WARMUP = 50


def silent_receiver() -> tuple[str, socket.socket]:
    """A listener that accepts every connection and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/hooks", listener


def _serve(pipe: Any) -> None:
    receiver = ThreadedReceiver(SECRET)
    pipe.send(receiver.url)
    pipe.recv()  # until told to stop
    pipe.send(len(receiver.events))


def answering_receiver() -> tuple[str, Any, multiprocessing.Process]:
    """A receiver that answers 200 at once, in a process of its own (so its
    work does not share this process's GIL with the clients measured)."""
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=_serve, args=(theirs,), daemon=True
    )
    process.start()
    return ours.recv(), ours, process


def node(workdir: Path, *args: str) -> tuple[Twistd, int]:
    server = Twistd(
        workdir, "--port", "tcp:0:interface=127.0.0.1", "--quiet",
        "--rate-limit", "0", *args,
    )  # fmt: skip
    log = server.wait_for_log("Site starting on")
    return server, int(re.search(r"Site starting on (\d+)", log).group(1))


def measure(port: int, count: int) -> list[float]:
    url = f"ws://127.0.0.1:{port}/ws/bench"
    with connect(url) as alice, connect(url) as bob:
        times = []
        for n in range(WARMUP + count):
            start = time.perf_counter()
            alice.send(f"message {n}")
            bob.recv(timeout=5)
            if n >= WARMUP:
                times.append(time.perf_counter() - start)
        return times


def queue_of(port: int) -> str:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r"^webchat_webhook_queue (\S+)", text, re.M)
    return found.group(1) if found else "-"


def main(count: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="webchat-hooks-"))
    secret = workdir / "secret"
    secret.write_bytes(SECRET + b"\n")
    fast_url, fast, fast_process = answering_receiver()
    hung_url, hung = silent_receiver()
    hooks = ("--webhook-secret-file", str(secret), "--webhook-events", "message",
             "--webhook-queue", "1000")  # fmt: skip
    setups = {
        "no webhooks": (),
        "webhooks, receiver answers": ("--webhook-url", fast_url, *hooks),
        "webhooks, receiver never answers": ("--webhook-url", hung_url, *hooks),
    }
    servers = []
    try:
        for name, args in setups.items():
            where = workdir / str(len(servers))
            where.mkdir()
            server, port = node(where, *args)
            servers.append(server)
            times = measure(port, count)
            ms = sorted(t * 1000 for t in times)
            print(
                f"{name:34} median {statistics.median(ms):.3f} ms  "
                f"p99 {ms[int(len(ms) * 0.99)]:.3f} ms  "
                f"queue {queue_of(port)}  "
                f"RSS {process_rss_kb(server.process.pid)} KiB"
            )
        fast.send("stop")
        print(f"events the answering receiver took: {fast.recv()}")
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)
        fast_process.kill()
        hung.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
