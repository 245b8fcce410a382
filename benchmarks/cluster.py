"""The ``cluster`` scenario (issue #6): two nodes and Redis against one node.

The same fan-out load as ``fanout`` (1000 receivers, S senders, 64 B
payloads carrying their send time) at a few fixed offered rates, run twice:

* ``1 node``: one webchat, every receiver and the senders on it;
* ``2 nodes + Redis``: a redis-server and two webchats sharing one channel
  (``--redis``), the receivers split evenly between the nodes and the
  senders on node 1, so half the deliveries cross Redis: node 1 publishes
  each message once, node 2 gets it from Redis and writes it to its own
  receivers.

One load generator opens every connection (node 2's through ``open ...
PORT``) and keeps latencies per node, so "local" (node 1's receivers) and
"remote" (node 2's, via Redis) come from the same clock and the same step.
After the fixed rates, the highest passing rate (p99 <= 100 ms, no loss) is
searched between the fixed rates that passed and failed, as the fan-out ramp
does.

Where things run: the load generator needs a core of its own, and this is a
2-core machine, so node 1, node 2 and Redis share the server's core (node 2
can be moved with ``--node2-cpu``).  Both setups then have the same CPU
budget, and the comparison shows what the Redis hop costs; it says nothing
about what N machines would carry (see docs/benchmarks.md for that estimate).

Redis's own PUBLISH rate is measured with ``redis-benchmark`` before the
nodes start: pipelined and not, and with a few idle subscribers
(``redis-cli SUBSCRIBE``) to see what each subscriber costs per PUBLISH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.helpers import free_port, process_cpu_seconds
from benchmarks.loadgen import LoadGen
from benchmarks.processes import ProcessRegistry, UsageMeter
from benchmarks.scenarios import (
    Bench,
    _disturbed,
    _fmt_rate,
    _foreign,
    _latency_text,
    _open_timeout,
    _saturated,
    judge_step,
)
from benchmarks.servers import Server, start_server

#: What the table says about the CPUs, every time.
CPU_NOTE = (
    "On this 2-core machine both nodes and Redis share one core and the load "
    "generator has the other: the comparison mostly shows the cost of the Redis "
    "hop, not the capacity of N machines."
)
#: The nodes' channel (and key prefix), apart from redis-benchmark's.
NODE_CHANNEL = "webchat-bench-cluster"
#: redis-benchmark's channel and message (64 bytes, like the chat payloads).
PUBLISH_CHANNEL = "webchat-bench"
PUBLISH_MESSAGE = "0123456789" * 6 + "0123"
#: Idle subscribers for the pipelined PUBLISH runs: each costs Redis a write.
SUBSCRIBER_COUNTS = (0, 2, 8)
#: How long Redis and the nodes' Redis links have to come up.
READY_TIMEOUT = 20.0


# -- Redis -------------------------------------------------------------------------


@dataclass
class RedisProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_command(port: int, *args: str, timeout: float = 2.0) -> Any:
    """One command on a fresh connection; its reply (RESP2, enough of it for us)."""
    request = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%b\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(request)
        return _read_reply(sock.makefile("rb"))


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise OSError(f"Redis: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2]
    if kind == b"*":
        return [_read_reply(reader) for _ in range(max(int(rest), 0))]
    raise OSError(f"unexpected reply from Redis: {line!r}")


def start_redis(registry: ProcessRegistry, workdir: Path, cpu: int) -> RedisProcess:
    """A redis-server on a free loopback port, nothing saved, pinned to ``cpu``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed (apt-get install redis-server)"
        )
    port = free_port()
    log_path = workdir / f"redis-{port}.log"
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(log_path),
    ]  # fmt: skip
    process = registry.start(
        command, cpu, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    redis = RedisProcess(port, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {_tail(log_path)}")
        try:
            if redis_command(port, "PING", timeout=0.5) == b"PONG":
                return redis
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer PING within {READY_TIMEOUT} s")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


# -- redis-benchmark ---------------------------------------------------------------


def publish_command(port: int, requests: int, pipeline: int | None) -> list[str]:
    """``redis-benchmark -p PORT -q -n N [-P 16] PUBLISH webchat-bench <64 B>``."""
    command = ["redis-benchmark", "-p", str(port), "-q", "-n", str(requests)]
    if pipeline:
        command += ["-P", str(pipeline)]
    return [*command, "PUBLISH", PUBLISH_CHANNEL, PUBLISH_MESSAGE]


def parse_requests_per_second(output: str) -> float | None:
    """The final ``N requests per second`` of ``redis-benchmark -q`` (after its \\r)."""
    found = re.findall(r"([\d.]+) requests per second", output)
    return float(found[-1]) if found else None


def run_publish_benchmark(
    bench: Bench, redis: RedisProcess, requests: int
) -> dict[str, Any]:
    """Redis's PUBLISH rate: -P 16 with 0/2/8 idle subscribers, then without -P."""
    if shutil.which("redis-benchmark") is None:
        return {
            "error": "redis-benchmark is not installed (apt-get install redis-tools)"
        }
    cases: list[tuple[int | None, int]] = [(16, n) for n in SUBSCRIBER_COUNTS]
    cases.append((None, 0))
    if shutil.which("redis-cli") is None:
        cases = [(p, n) for p, n in cases if n == 0]
    runs = []
    for pipeline, subscribers in cases:
        runs.append(_publish_once(bench, redis, requests, pipeline, subscribers))
        bench.progress.done(f"cluster | redis-benchmark {_publish_label(runs[-1])}")
    result: dict[str, Any] = {
        "requests": requests,
        "message_bytes": len(PUBLISH_MESSAGE),
        "runs": runs,
        "redis_cpu": bench.server_cpu,
        "benchmark_cpu": bench.client_cpu,
    }
    result.update(publish_cost(runs))
    return result


def _publish_once(
    bench: Bench,
    redis: RedisProcess,
    requests: int,
    pipeline: int | None,
    subscribers: int,
) -> dict[str, Any]:
    command = publish_command(redis.port, requests, pipeline)
    run: dict[str, Any] = {
        "command": " ".join([*command[:-1], "<64 B>"]),
        "pipeline": pipeline,
        "subscribers": subscribers,
    }
    with ExitStack() as stack:
        for _ in range(subscribers):
            listener = bench.registry.start(
                ["redis-cli", "-p", str(redis.port), "SUBSCRIBE", PUBLISH_CHANNEL],
                bench.client_cpu,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(bench.registry.stop, listener, 5.0)
        run["subscribed_before"] = _await_subscribers(redis.port, subscribers)
        process = bench.registry.start(
            command,
            bench.client_cpu,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = process.communicate(timeout=300)
        finally:
            bench.registry.stop(process, timeout=5.0)
        run["subscribed_after"] = _numsub(redis.port)
    text = output.decode(errors="replace")
    run["requests_per_s"] = parse_requests_per_second(text)
    run["output"] = text.replace("\r", "\n").strip().splitlines()[-1:]
    if run["requests_per_s"] is None:
        run["error"] = f"no rate in redis-benchmark's output: {text[-500:]!r}"
    if run["subscribed_after"] != subscribers:
        run["error"] = (
            f"{subscribers - run['subscribed_after']} subscriber(s) dropped by Redis"
        )
    return run


def _numsub(port: int) -> int:
    reply = redis_command(port, "PUBSUB", "NUMSUB", PUBLISH_CHANNEL)
    return int(reply[1])


def _await_subscribers(port: int, count: int) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    while (seen := _numsub(port)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def _publish_label(run: dict[str, Any]) -> str:
    how = f"-P {run['pipeline']}" if run["pipeline"] else "no pipelining (50 clients)"
    rate = run.get("requests_per_s")
    shown = "?" if rate is None else f"{_fmt_rate(rate)} PUBLISH/s"
    return f"{how}, {run['subscribers']} subscriber(s): {shown}"


def publish_cost(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Redis's time per PUBLISH as ``base + per_subscriber * subscribers``: a
    least-squares line through the pipelined runs' 1/rate.
    """
    points = [
        (r["subscribers"], 1e6 / r["requests_per_s"])
        for r in runs
        if r["pipeline"] and r.get("requests_per_s") and "error" not in r
    ]
    if len({n for n, _ in points}) < 2:
        return {}
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / sum(
        (n - mean_n) ** 2 for n, _ in points
    )
    return {
        "publish_base_us": round(mean_t - slope * mean_n, 3),
        "publish_per_subscriber_us": round(slope, 3),
    }


# -- the nodes ---------------------------------------------------------------------


@dataclass
class Setup:
    """One side of the comparison: its nodes (node 1 first) and Redis, if any."""

    name: str
    nodes: list[Server]
    redis: RedisProcess | None

    def pids(self) -> dict[str, int]:
        pids = {f"node{i}": n.pid for i, n in enumerate(self.nodes, 1) if n.pid}
        if self.redis is not None:
            pids["redis"] = self.redis.process.pid
        return pids


@contextmanager
def started_setup(
    bench: Bench, redis: RedisProcess | None, node2_cpu: int
) -> Iterator[Setup]:
    """One node alone, or (with ``redis``) two nodes on one channel; stopped after."""
    nodes: list[Server] = []
    try:
        if redis is None:
            nodes.append(_start_node(bench, bench.server_cpu, []))
        else:
            for number, cpu in ((1, bench.server_cpu), (2, node2_cpu)):
                relay = ["--redis", redis.url, "--redis-channel", NODE_CHANNEL]
                relay += ["--node-id", f"bench-node-{number}"]
                nodes.append(_start_node(bench, cpu, relay))
            _await_links(nodes)
        name = "1 node" if redis is None else "2 nodes + Redis"
        yield Setup(name, nodes, redis)
    finally:
        for node in reversed(nodes):
            if node.process is not None:
                bench.registry.stop(node.process, timeout=15.0)


def _start_node(bench: Bench, cpu: int, extra: list[str]) -> Server:
    return start_server(
        "webchat", bench.registry, bench.workdir, cpu, [*bench.server_args, *extra]
    )


def _await_links(nodes: list[Server]) -> None:
    """Until every node says (``/healthz``) that both its Redis connections are up."""
    deadline = time.monotonic() + READY_TIMEOUT
    for node in nodes:
        url = f"http://127.0.0.1:{node.port}/healthz"
        state = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2.0) as answer:
                    state = json.loads(answer.read()).get("redis")
            except (OSError, ValueError):
                state = None
            if state == "up":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(
                f"node on port {node.port}: Redis link not up within"
                f" {READY_TIMEOUT} s (state {state!r}):\n{node.log_text()[-2000:]}"
            )


class _ProcessClocks:
    """Each process's share of a core between :meth:`start` and :meth:`read`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self.start()

    def _sample(self) -> tuple[float, dict[str, float | None]]:
        return time.monotonic(), {
            name: process_cpu_seconds(pid) for name, pid in self._pids.items()
        }

    def start(self) -> None:
        self._start = self._sample()

    def read(self) -> dict[str, float | None]:
        (t0, a), (t1, b) = self._start, self._sample()
        wall = t1 - t0
        return {
            name: None
            if a[name] is None or b[name] is None or wall <= 0
            else round((b[name] - a[name]) / wall, 3)
            for name in self._pids
        }


# -- the scenario ------------------------------------------------------------------


def run_cluster(bench: Bench) -> dict[str, Any]:
    """Redis's PUBLISH rate, then 1 node and 2 nodes + Redis at the same rates."""
    cfg = bench.config
    node2_cpu = bench.server_cpu if bench.node2_cpu is None else bench.node2_cpu
    senders = cfg.senders[0]
    result: dict[str, Any] = {
        "receivers": cfg.receivers,
        "senders": senders,
        "payload_bytes": cfg.payload,
        "rates": list(cfg.cluster_rates),
        "step_seconds": cfg.step_seconds,
        "p99_limit_ms": cfg.p99_limit_ms,
        "cpus": {
            "node1": bench.server_cpu,
            "node2": node2_cpu,
            "redis": bench.server_cpu,
            "loadgen": bench.client_cpu,
        },
        "note": CPU_NOTE,
        "setups": {},
    }
    redis = start_redis(bench.registry, bench.workdir, bench.server_cpu)
    try:
        result["redis"] = {"port": redis.port, "version": _redis_version(redis)}
        result["publish"] = run_publish_benchmark(bench, redis, cfg.publish_requests)
        for with_redis in (None, redis):
            with started_setup(bench, with_redis, node2_cpu) as setup:
                result["setups"][setup.name] = _run_setup(bench, setup, senders)
    finally:
        bench.registry.stop(redis.process, timeout=10.0)
    return result


def _redis_version(redis: RedisProcess) -> str | None:
    try:
        info = redis_command(redis.port, "INFO", "server").decode()
    except OSError:
        return None
    found = re.search(r"redis_version:(\S+)", info)
    return found.group(1) if found else None


def _run_setup(bench: Bench, setup: Setup, senders: int) -> dict[str, Any]:
    cfg = bench.config
    label = f"cluster {setup.name}"
    node1 = setup.nodes[0]
    result: dict[str, Any] = {
        "nodes": [n.describe() for n in setup.nodes],
        "receivers_per_node": [],
    }
    # Receivers split evenly, node 1 taking the odd one; senders on node 1.
    shares = [cfg.receivers - cfg.receivers // 2, cfg.receivers // 2]
    if len(setup.nodes) == 1:
        shares = [cfg.receivers]
    names = {node1.port: "local"}
    if len(setup.nodes) > 1:
        names[setup.nodes[1].port] = "remote"
    with bench.loadgen(node1, label.replace(" ", "-")) as generator:
        plan = [("recv", n, node) for n, node in zip(shares, setup.nodes, strict=True)]
        plan.append(("send", senders, node1))
        for role, count, node in plan:
            opened = generator.open(
                role,
                count,
                cfg.concurrency,
                _open_timeout(count),
                lambda p, role=role: bench.progress.update(
                    f"{label} | opening {role}: {p['opened']:,} open"
                ),
                port=None if node is node1 else node.port,
            )
            if opened["ok"] < count:
                raise RuntimeError(
                    f"{label}: only {opened['ok']} of {count} {role} connections"
                    f" opened: {opened['errors']}"
                )
        result["receivers_per_node"] = shares
        pids = setup.pids()
        ours = [*pids.values(), generator.pid, os.getpid()]
        meter = UsageMeter(node1.pid, bench.cores, ours)
        clocks = _ProcessClocks(pids)

        def run_step(rate: float, warmup: bool = False) -> dict[str, Any]:
            """One step; once more if it failed while others used our cores."""
            step = _step(bench, generator, meter, clocks, names, label, rate, warmup)
            if not step["passed"] and step["disturbed"] and not step["fatal"]:
                again = _step(
                    bench, generator, meter, clocks, names, label, rate, warmup, True
                )
                again["disturbed_attempt"] = step
                step = again
            return step

        rates = sorted(cfg.cluster_rates)
        result["warmup"] = run_step(rates[0], warmup=True)
        steps: list[dict[str, Any]] = []
        for rate in rates:
            steps.append(run_step(rate))
            if steps[-1]["fatal"]:
                break
        result["steps"] = steps
        result["search"] = (
            []
            if steps[-1]["fatal"]
            else search_max(run_step, steps, cfg.max_rate, cfg.bisections)
        )
        result["check"] = generator.check()
    passing = [s for s in steps + result["search"] if s["passed"]]
    best = max(passing, key=lambda s: s["offered_deliveries_per_s"], default=None)
    result["max_passing"] = best and {
        k: v for k, v in best.items() if k not in ("raw", "disturbed_attempt")
    }
    return result


def search_max(
    run_step: Callable[[float], dict[str, Any]],
    steps: list[dict[str, Any]],
    limit: float,
    bisections: int,
    closeness: float = 1.1,
) -> list[dict[str, Any]]:
    """
    The highest passing rate above the fixed ones: between the highest that
    passed and the next that failed, bisect; if none failed, double first
    (as the fan-out ramp does).  Nothing if nothing passed, or if the load
    generator was already saturated at the best pass (its ceiling, not the
    servers', would be measured).  Bounded: log2(limit) doublings at most,
    then ``bisections``.
    """
    good = [s for s in steps if s["passed"]]
    if not good:
        return []
    best = max(good, key=lambda s: s["offered_deliveries_per_s"])
    if best["loadgen_saturated"]:
        return []
    passed = best["offered_deliveries_per_s"]
    above = [
        s["offered_deliveries_per_s"]
        for s in steps
        if not s["passed"] and s["offered_deliveries_per_s"] > passed
    ]
    failed = min(above, default=None)
    found: list[dict[str, Any]] = []
    while failed is None and passed * 2 <= limit:
        step = run_step(passed * 2)
        found.append(step)
        if step["fatal"]:
            return found
        if not step["passed"]:
            failed = passed * 2
            break
        passed *= 2
        if step["loadgen_saturated"]:
            return found
    for _ in range(bisections):
        if failed is None or failed / passed < closeness:
            break
        middle = (passed + failed) / 2
        step = run_step(middle)
        found.append(step)
        if step["fatal"]:
            break
        if step["passed"]:
            passed = middle
        else:
            failed = middle
    return found


def _step(
    bench: Bench,
    generator: LoadGen,
    meter: UsageMeter,
    clocks: _ProcessClocks,
    names: dict[int, str],
    label: str,
    deliveries: float,
    warmup: bool,
    retry: bool = False,
) -> dict[str, Any]:
    cfg = bench.config
    kind = "warm-up" if warmup else "retry" if retry else "step"
    title = f"{label} | {kind} {_fmt_rate(deliveries)} deliveries/s"
    state: dict[str, Any] = {}
    meter.start()
    clocks.start()

    def on_progress(p: dict[str, Any]) -> None:
        # The send phase's usage is the step's; the drain is not.
        if p["phase"] == "drain" and "usage" not in state:
            state["usage"] = meter.read()
            state["cpu"] = clocks.read()
        bench.progress.update(
            f"{title} | {p['phase']} {p['elapsed_s']:.0f}s sent {p['sent']:,}"
            f" recv {p['received']:,} | loadgen {p['loadgen_cpu'] * 100:.0f}%"
        )

    raw = generator.step(
        deliveries / cfg.receivers,
        1.0 if warmup else cfg.step_seconds,
        cfg.payload,
        cfg.drain_seconds,
        cfg.settle_seconds,
        on_progress,
    )
    usage = state.get("usage") or meter.read()
    cpu = state.get("cpu") or clocks.read()
    passed, reasons = judge_step(raw, cfg.p99_limit_ms)
    step = step_record(raw, deliveries, names, passed, reasons, usage, cpu)
    by_node = "  ".join(
        f"{name} {_latency_text(n)}" for name, n in step["by_node"].items()
    )
    cpus = " ".join(f"{k} {v * 100:.0f}%" for k, v in cpu.items() if v is not None)
    verdict = "PASS" if passed else "FAIL"
    bench.progress.done(
        f"{title}: {verdict} {_fmt_rate(step['deliveries_per_s'])}/s"
        f" lost {step['lost']:,} | {by_node} | {cpus}"
        f" loadgen {raw['loadgen_cpu'] * 100:.0f}%"
        + (f" | {'; '.join(reasons)}" if reasons else "")
    )
    return step


def step_record(
    raw: dict[str, Any],
    offered: float,
    names: dict[int, str],
    passed: bool,
    reasons: list[str],
    usage: dict[str, float | None],
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    """
    One step: offered and achieved deliveries/s, loss, latency overall and
    per node, CPU.  Achieved is the step's deliveries over the time it took
    to make them (sending, plus the drain until the last one arrived): a
    server that falls behind delivers everything late, and this shows it.
    """
    seconds = (raw["seconds"] + raw["drain_s"]) or 1.0
    by_node = {}
    for target in raw.get("targets", []):
        expected = raw["sent"] * target["receivers"]
        lat = target["latency"]
        by_node[names.get(target["port"], str(target["port"]))] = {
            "port": target["port"],
            "receivers": target["receivers"],
            "expected": expected,
            "received": target["received"],
            "lost": expected - target["received"],
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "max_ms": lat["max_ms"],
        }
    lat = raw["latency"]
    return {
        "offered_deliveries_per_s": round(offered, 1),
        "offered_messages_per_s": round(raw["rate"], 3),
        "deliveries_per_s": round(raw["received"] / seconds, 1),
        "sent": raw["sent"],
        "expected": raw["expected"],
        "received": raw["received"],
        "lost": raw["lost"],
        "passed": passed,
        "reasons": reasons,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "by_node": by_node,
        "cpu": cpu,
        "server_core_busy": usage["server_core"],
        "loadgen_cpu": raw["loadgen_cpu"],
        "loadgen_core_busy": usage["loadgen_core"],
        "loadgen_saturated": _saturated(raw["loadgen_cpu"], usage),
        "foreign_cpu": _foreign(usage),
        "disturbed": _disturbed(usage),
        "fatal": raw["closed"]["recv"] + raw["closed"]["send"] > 0,
        "raw": raw,
    }
