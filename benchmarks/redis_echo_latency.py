"""
The price of one order with --redis (issue #14): every message goes through
Redis before any node, the sender's included, delivers it.  Two real twistd
nodes on a real redis-server (the test suite's helpers); one JSON client
sends a message at a time and waits for its ack, a client on its node and
one on the other node to get it.  Medians and p90 of the time from send to
each (read in that order, so each is an upper bound).

    .venv/bin/python -m benchmarks.redis_echo_latency [MESSAGES]

Run it on this commit and on one before (git checkout <rev> -- src) for a
baseline from the same machine and the same hour.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

from tests.redis_server import RedisServer
from tests.support import Twistd

WARMUP = 20


def main(count: int) -> None:
    redis = RedisServer()
    redis.start()
    servers: list[Twistd] = []
    ports: list[int] = []
    try:
        for n in range(2):
            workdir = Path(tempfile.mkdtemp(prefix="webchat-echo-"))
            server = Twistd(
                workdir,
                "--port", "tcp:0:interface=127.0.0.1",
                "--redis", redis.url,
                "--node-id", f"n{n}",
                "--quiet",
                "--rate-limit", "0",
            )  # fmt: skip
            servers.append(server)
            log = server.wait_for_log("Redis link up")
            ports.append(int(re.search(r"Site starting on (\d+)", log).group(1)))

        def join(node: int) -> ClientConnection:
            url = f"ws://127.0.0.1:{ports[node]}/ws/r"
            client = connect(url, subprotocols=["webchat.v1.json"])
            client.recv(timeout=5)  # the welcome
            return client

        sender, near, far = join(0), join(0), join(1)
        time.sleep(1)  # presence settles

        def until(client: ClientConnection, kind: str) -> float:
            while json.loads(client.recv(timeout=5))["type"] != kind:
                pass
            return time.perf_counter()

        acks, nears, fars = [], [], []
        for n in range(count + WARMUP):
            start = time.perf_counter()
            sender.send(json.dumps({"type": "message", "text": f"m{n}", "ref": n}))
            acked, heard, heard_far = (
                until(sender, "ack"),
                until(near, "message"),
                until(far, "message"),
            )
            if n >= WARMUP:
                acks.append(acked - start)
                nears.append(heard - start)
                fars.append(heard_far - start)
        for what, times in (("ack", acks), ("same node", nears), ("other node", fars)):
            times.sort()
            print(
                f"{what:11} median {statistics.median(times) * 1e3:.3f} ms, "
                f"p90 {times[int(len(times) * 0.9)] * 1e3:.3f} ms"
            )
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)
        redis.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
