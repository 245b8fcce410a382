"""K keep-alive connections each pipelining many GETs of the page and /metrics and never reading.
Measures server RSS and fds, bystanders, then closes and checks fds come back."""

import asyncio
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bystanders import bystanders
from srv import start, status, stop

K = int(sys.argv[1]) if len(sys.argv) > 1 else 100
path = sys.argv[2] if len(sys.argv) > 2 else "/"
proc, port = start()
before = status(proc.pid)
req = b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode()
socks = []
for _ in range(K):
    s = socket.create_connection(("127.0.0.1", port), 3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    socks.append(s)
t0 = time.time()
sent = 0
while time.time() - t0 < 4:
    for s in socks:
        try:
            sent += s.send(req * 200)
        except (BlockingIOError, OSError):
            pass
    time.sleep(0.01)
mid = status(proc.pid)
r = asyncio.run(asyncio.wait_for(bystanders(port, 1.5), 10))
print(
    f"K={K} path={path} sent {sent / 1e6:.1f} MB; before {before}; during {mid}; bystanders {r}"
)
for s in socks:
    s.close()
t1 = time.time()
while time.time() - t1 < 30 and status(proc.pid)["fds"] > 12:
    time.sleep(0.2)
print(
    f"after close: fds back to {status(proc.pid)['fds']} after {time.time() - t1:.1f}s",
    status(proc.pid),
)
log = stop(proc)
print([l[25:200] for l in log.splitlines() if "rror" in l][:3])
