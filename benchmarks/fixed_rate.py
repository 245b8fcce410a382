"""A fixed-rate run of one fan-out shape: server CPU per delivery, for A/B.

The ramp (``python -m benchmarks``) finds the highest rate that passes,
which on a shared machine moves with everyone else's load.  Comparing two
versions of the server needs something steadier: the same offered rate,
well below what either saturates at, and the server's own CPU time (from
/proc, so other processes' load changes it little) divided by what it
delivered.  ``--src`` runs the server from another checkout's ``src/``
(e.g. ``git archive COMMIT src | tar -x -C /tmp/base``), so two commits can
be run alternately with the same command::

    python -m benchmarks.fixed_rate --rooms 1000 --rate 15000 --runs 3
    python -m benchmarks.fixed_rate --src /tmp/base/src --rooms 1000 ...

``--profile FILE`` records the server with py-spy during the first run
(``pip install py-spy``; speedscope format), to see where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.helpers import free_port
from benchmarks.loadgen import LoadGen, build
from benchmarks.processes import ProcessRegistry, pick_cpus
from benchmarks.servers import webchat_command
from benchmarks.tls import make_tls_files


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start listening within 30 s")


def _cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (0, 0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=1000, help="rooms (0: lobby)")
    parser.add_argument("--members", type=int, default=10, help="per room [10]")
    parser.add_argument(
        "--receivers", type=int, default=1000, help="--rooms 0: receivers [1000]"
    )
    parser.add_argument("--senders", type=int, default=1, help="--rooms 0 [1]")
    parser.add_argument("--codec", default="seed", choices=("seed", "json"))
    parser.add_argument("--rate", type=float, default=15000, help="deliveries/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run [10]")
    parser.add_argument("--runs", type=int, default=2, help="runs, one server [2]")
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--src", help="run the server from this src/ directory")
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--profile", help="py-spy speedscope output of run 1")
    parser.add_argument("--label", default="", help="a name for the output lines")
    parser.add_argument(
        "--tls", action="store_true", help="--port ssl:..., the load generator too"
    )
    args = parser.parse_args(argv)

    if args.rooms:
        senders = args.rooms
        per_message = args.members - 1
        receivers = args.rooms * per_message
    else:
        senders = args.senders
        per_message = receivers = args.receivers
    server_cpu, client_cpu = pick_cpus(None, None)
    registry = ProcessRegistry()
    workdir = Path(tempfile.mkdtemp(prefix="webchat-fixed-"))
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(args.src).resolve()), env.get("PYTHONPATH")])
        )
    port = free_port()
    tls = make_tls_files(workdir) if args.tls else None
    command = webchat_command(port, workdir / "server.log", args.server_arg, tls)
    try:
        server = registry.start(
            command,
            server_cpu,
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_listening(port, server)
        print(f"server pid {server.pid}", file=sys.stderr, flush=True)
        generator = LoadGen(
            build(),
            registry,
            ip="127.0.0.1",
            port=port,
            host=f"127.0.0.1:{port}",
            path="/",
            cpu=client_cpu,
            stderr_path=workdir / "loadgen.err",
            tls=args.tls,
        )
        generator.codec(args.codec)
        generator.rooms(args.rooms)
        for role, count in (("recv", receivers), ("send", senders)):
            opened = generator.open(role, count, 50, max(30.0, count / 100.0))
            if opened["ok"] < count:
                raise RuntimeError(f"opened {opened['ok']} of {count} {role}")
        messages = args.rate / per_message
        generator.step(messages, 1.0, args.payload, 2.0, 0.5)  # warm-up
        for run in range(1, args.runs + 1):
            spy = None
            spy_path = shutil.which("py-spy", path=str(Path(sys.executable).parent))
            if args.profile and run == 1:
                spy = subprocess.Popen(
                    [
                        spy_path or "py-spy",
                        "record",
                        "--native",
                        "-r",
                        "200",
                        "-d",
                        str(int(args.seconds)),
                        "--format",
                        "speedscope",
                        "-o",
                        args.profile,
                        "-p",
                        str(server.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(workdir / "py-spy.err").open("wb"),
                )
            user0, system0 = _cpu_times(server.pid)
            wall = time.monotonic()
            raw = generator.step(messages, args.seconds, args.payload, 5.0, 0.5)
            wall = time.monotonic() - wall
            user1, system1 = _cpu_times(server.pid)
            user, system = user1 - user0, system1 - system0
            cpu = user + system
            if spy is not None and spy.wait(60) != 0:
                print((workdir / "py-spy.err").read_text()[-2000:], file=sys.stderr)
            received = raw["received"]
            record: dict[str, Any] = {
                "label": args.label or (args.src or "worktree"),
                "run": run,
                "offered_deliveries_per_s": args.rate,
                "expected": raw["expected"],
                "received": received,
                "lost": raw["lost"],
                "p50_ms": raw["latency"]["p50_ms"],
                "p99_ms": raw["latency"]["p99_ms"],
                "send_lag_p99_ms": raw["send_lag"]["p99_ms"],
                "loadgen_cpu": raw["loadgen_cpu"],
                "server_cpu_s": round(cpu, 3),
                "server_cpu_pct": round(100 * cpu / wall, 1),
                "us_per_delivery": round(1e6 * cpu / max(received, 1), 3),
                "user_us_per_delivery": round(1e6 * user / max(received, 1), 3),
                "system_us_per_delivery": round(1e6 * system / max(received, 1), 3),
                "load": os.getloadavg()[0],
            }
            print(json.dumps(record), flush=True)
        generator.close()
    finally:
        registry.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
