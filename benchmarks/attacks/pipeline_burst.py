"""ONE connection sends MB megabytes of pipelined 'GET /healthz' (or PATH) in one go, never reads,
and closes at once.  Measures how long the server stays busy (bystander latency, CPU) afterwards.
usage: pipeline_burst.py [MB] [PATH]"""

import asyncio
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bystanders import bystanders
from srv import start, status, stop

MB = float(sys.argv[1]) if len(sys.argv) > 1 else 1
path = sys.argv[2] if len(sys.argv) > 2 else "/healthz"
proc, port = start()


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


req = b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode()
n = int(MB * 1e6 / len(req))


async def main():
    task = asyncio.create_task(bystanders(port, 8))
    await asyncio.sleep(1)
    c0 = cpu(proc.pid)
    t0 = time.time()
    s = socket.create_connection(("127.0.0.1", port), 3)
    s.settimeout(10)
    await asyncio.get_running_loop().run_in_executor(None, s.sendall, req * n)
    sent_in = time.time() - t0
    s.close()
    r = await task
    print(
        f"{n} requests ({MB} MB) to {path} on one connection, sent in {sent_in:.2f}s, then closed; "
        f"server CPU {cpu(proc.pid) - c0:.1f}s over next {time.time() - t0:.1f}s; bystanders {r}; {status(proc.pid)}"
    )


asyncio.run(asyncio.wait_for(main(), 40))
stop(proc)
