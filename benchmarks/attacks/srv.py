"""Start a webchat server on a free 127.0.0.1 port, return (proc, port). Helpers for attacks."""

import os
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(*opts, log=None):
    port = free_port()
    log = log or open(f"/tmp/attack-{port}.log", "w+")
    proc = subprocess.Popen(
        [
            f"{ROOT}/.venv/bin/twistd",
            "-n",
            "--pidfile=",
            "webchat",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            *opts,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd="/tmp",
    )
    proc.logpath = log.name
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start: " + open(log.name).read()[-2000:])


def status(pid):
    d = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "Threads"):
            d[k] = v.strip()
    d["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return d


def stop(proc):
    proc.terminate()
    try:
        proc.wait(8)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return open(proc.logpath).read()
