"""The scenarios: fan-out (seed, JSON, rooms), connect, echo (and calibrate).

Each scenario gets a fresh server and a fresh load generator, so no run
inherits another's heap, ids or backlog.  The server is pinned to one CPU
and the load generator to another; the load generator reports its own CPU
use, and a run where it was above :data:`SATURATED` of a core is marked, as
its numbers may then be the generator's and not the server's.  Other work on
either core is measured too, and marks a run as disturbed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from benchmarks.loadgen import LoadGen
from benchmarks.processes import ProcessRegistry, UsageMeter
from benchmarks.servers import Server, external_server, start_server
from benchmarks.tls import TlsFiles

#: Share of a core above which the load generator counts as saturated ...
SATURATED = 0.90
#: ... or above which its whole core (softirq included) was busy.
CORE_SATURATED = 0.95
#: Share of a core used by other tasks than ours (other people's processes,
#: kernel threads) above which a measurement is marked as disturbed, and a
#: failed fan-out step, a connect or an echo run is run once more.
DISTURBED = 0.10
#: The fan-out step's latency bound (issue #5: p99 <= 100 ms).
P99_LIMIT_MS = 100.0


@dataclass
class BenchConfig:
    """Every knob of a run; recorded as-is in the JSON."""

    receivers: int = 1000
    senders: list[int] = field(default_factory=lambda: [1, 10])
    #: json: the JSON codec's fan-out, one room of ``receivers``; its senders.
    json_senders: list[int] = field(default_factory=lambda: [1, 10])
    #: rooms: this many rooms of ``room_members`` (one sender, the rest receivers).
    rooms: int = 1000
    room_members: int = 10
    payload: int = 64
    slow_reader: bool = False
    step_seconds: float = 3.0
    drain_seconds: float = 3.0
    settle_seconds: float = 5.0
    start_rate: float = 10_000.0  # deliveries/s
    max_rate: float = 32_000_000.0
    bisections: int = 3
    p99_limit_ms: float = P99_LIMIT_MS
    connections: int = 15_000
    baseline_connections: int = 15_000
    concurrency: int = 50
    hold_seconds: float = 3.0
    echo_rate: float = 10.0
    echo_seconds: float = 5.0
    #: cluster: the fixed offered rates (deliveries/s), and redis-benchmark's -n.
    cluster_rates: list[float] = field(
        default_factory=lambda: [100_000.0, 1_000_000.0, 5_000_000.0, 20_000_000.0]
    )
    publish_requests: int = 200_000
    #: storm (issue #14): JSON clients that reconnect at once, in how many
    #: rooms, how many messages behind each, and how many handshakes in flight.
    storm_clients: int = 10_000
    storm_rooms: int = 1000
    storm_behind: int = 50
    storm_concurrency: int = 1000
    #: connect-auth (issue #15): rooms the connections are spread over, a
    #: token each.
    auth_tokens: int = 1000
    #: api (issue #15): keep-alive connections publishing, members counting,
    #: and the measured seconds after a warm-up.
    api_connections: int = 32
    api_members: int = 10
    api_seconds: float = 10.0
    api_warmup: float = 1.0
    quick: bool = False

    @classmethod
    def quick_config(cls) -> BenchConfig:
        """Short steps and fewer connections: a smoke run of a minute or two."""
        return cls(
            senders=[1],
            json_senders=[1],
            rooms=100,
            step_seconds=1.0,
            drain_seconds=2.0,
            settle_seconds=2.0,
            bisections=2,
            connections=2000,
            baseline_connections=2000,
            hold_seconds=1.0,
            echo_seconds=2.0,
            cluster_rates=[100_000.0, 1_000_000.0],
            publish_requests=20_000,
            storm_clients=1000,
            storm_rooms=100,
            auth_tokens=100,
            api_connections=16,
            api_seconds=3.0,
            quick=True,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProgressLine:
    """
    One status line: rewritten in place on a terminal, else a line at a time
    (the load generator reports once a second, so that is the pace).
    """

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._width = 0

    def update(self, text: str) -> None:
        if self._tty:
            # A wrapped line could not be rewritten in place: cut it to fit.
            text = text[: shutil.get_terminal_size().columns - 1]
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width) + "\n")
            self._width = 0
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


@dataclass
class Bench:
    """What every scenario needs: where to run, on which CPUs, and who cleans up."""

    config: BenchConfig
    registry: ProcessRegistry
    workdir: Path
    loadgen_binary: Path
    server_cpu: int
    client_cpu: int
    progress: ProgressLine
    url: str | None = None
    pid: int | None = None
    server_args: list[str] = field(default_factory=list)
    #: cluster: node 2's CPU (None: the server's, with node 1 and Redis).
    node2_cpu: int | None = None
    #: ``--tls``: every server speaks TLS with this certificate, and so does
    #: the load generator.
    tls: TlsFiles | None = None

    @property
    def cores(self) -> dict[str, int]:
        return {"server": self.server_cpu, "loadgen": self.client_cpu}

    def meter(self, server: Server, generator: LoadGen) -> UsageMeter:
        """Server CPU, and both cores: busy, and busy with someone else's work."""
        return UsageMeter(server.pid, self.cores, [generator.pid, os.getpid()])

    @contextmanager
    def server(
        self, name: str, extra_args: list[str] | None = None
    ) -> Iterator[Server]:
        """
        A fresh server (or the given URL for webchat), stopped afterwards;
        ``extra_args`` after ``--server-arg``'s (a later option wins).
        """
        if name == "webchat" and self.url:
            yield external_server(self.url, self.pid)
            return
        args = [*self.server_args, *(extra_args or [])] if name == "webchat" else []
        server = start_server(
            name, self.registry, self.workdir, self.server_cpu, args, self.tls
        )
        try:
            yield server
        finally:
            if server.process is not None:
                self.registry.stop(server.process, timeout=15.0)
            for companion in server.companions:
                self.registry.stop(companion, timeout=15.0)

    @contextmanager
    def loadgen(self, server: Server, label: str) -> Iterator[LoadGen]:
        generator = LoadGen(
            self.loadgen_binary,
            self.registry,
            ip=server.ip,
            port=server.port,
            host=server.host_header,
            path=server.path,
            cpu=self.client_cpu,
            stderr_path=self.workdir / f"loadgen-{label}.stderr",
            tls=server.url.startswith("wss:"),
        )
        try:
            yield generator
        finally:
            generator.close()


def _fmt_rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.0f}%"


def _usage_text(usage: dict[str, float | None], loadgen_cpu: float) -> str:
    text = (
        f"server {_pct(usage['process'])} (core {_pct(usage['server_core'])})"
        f" loadgen {_pct(loadgen_cpu)} (core {_pct(usage['loadgen_core'])})"
    )
    if _disturbed(usage):
        foreign = _foreign(usage)
        text += (
            f" | DISTURBED: others used {_pct(foreign['server_core'])}"
            f" / {_pct(foreign['loadgen_core'])} of the cores"
        )
    return text


def _latency_text(lat: dict[str, float]) -> str:
    return f"p50 {lat['p50_ms']:.1f} p99 {lat['p99_ms']:.1f} max {lat['max_ms']:.1f} ms"


# -- fan-out ---------------------------------------------------------------------


def ramp(
    run_step: Callable[[float], dict[str, Any]],
    start: float,
    limit: float,
    bisections: int,
    closeness: float = 1.1,
    max_halvings: int = 3,
) -> list[dict[str, Any]]:
    """
    Find the highest passing rate: double from ``start`` until a step fails
    (or ``limit``, or the load generator saturates: above that only its own
    ceiling would be measured), then bisect between the last pass and the
    first failure.
    Doubling means a failing step overshoots the capacity by at most 2x, so
    the backlog it leaves behind stays bounded.  If the very first step
    fails, halve (at most ``max_halvings`` times) to find any passing rate.
    A step that returns ``fatal`` (connections lost) ends the ramp.

    Every loop here is bounded: at most log2(limit/start) + 1 doublings,
    ``max_halvings`` halvings and ``bisections`` bisections.
    """
    steps: list[dict[str, Any]] = []
    passed: float | None = None
    failed: float | None = None

    def attempt(rate: float) -> bool:
        result = run_step(rate)
        steps.append(result)
        return bool(result["passed"])

    rate = start
    while rate <= limit:
        ok = attempt(rate)
        if steps[-1].get("fatal"):
            return steps
        if not ok:
            failed = rate
            break
        passed = rate
        if steps[-1].get("loadgen_saturated"):
            break
        rate *= 2
    if passed is None and failed is not None:
        rate = failed
        for _ in range(max_halvings):
            rate /= 2
            ok = attempt(rate)
            if steps[-1].get("fatal"):
                return steps
            if ok:
                passed = rate
                break
            failed = rate
    if passed is not None and failed is not None:
        for _ in range(bisections):
            if failed / passed < closeness:
                break
            middle = (passed + failed) / 2
            ok = attempt(middle)
            if steps[-1].get("fatal"):
                return steps
            if ok:
                passed = middle
            else:
                failed = middle
    return steps


def judge_step(raw: dict[str, Any], p99_limit_ms: float) -> tuple[bool, list[str]]:
    """A step passes with zero loss, nothing held back, and p99 within the limit."""
    reasons = []
    if raw["lost"] != 0:
        reasons.append(f"lost {raw['lost']:,} of {raw['expected']:,}")
    if raw["overflow"]:
        reasons.append(f"{raw['overflow']:,} msgs not sent (server not reading)")
    closed = sum(raw["closed"].values()) - raw["closed"].get("slow", 0)
    if closed:
        reasons.append(f"{closed} connection(s) closed")
    p99 = raw["latency"]["p99_ms"]
    if raw["expected"] and (p99 < 0 or p99 > p99_limit_ms):
        reasons.append(f"p99 {p99:.1f} ms > {p99_limit_ms:g} ms")
    if raw["bad"]:
        reasons.append(f"{raw['bad']} malformed frame(s)")
    return not reasons, reasons


def run_fanout(
    bench: Bench,
    name: str,
    senders: int,
    slow_reader: bool = False,
    start_rate: float | None = None,
    max_rate: float | None = None,
    codec: str = "seed",
    rooms: int = 0,
    variant: str | None = None,
    server_args: list[str] | None = None,
) -> dict[str, Any]:
    """
    C receivers, S senders, an offered-rate ramp; the highest passing rate.

    ``codec`` ``json``: every connection offers webchat.v1.json.  ``rooms``
    R > 0: R rooms (``/ws/r0`` ..) of ``room_members``, one of them the
    room's sender, so a message has ``room_members - 1`` receivers and
    ``senders`` is R.  ``variant`` names the run in the table (else it
    follows from the codec and rooms); ``server_args`` are added to the
    server's command line (``--history 0``).
    """
    cfg = bench.config
    receivers = cfg.receivers
    per_message = receivers  # deliveries a message makes
    if rooms:
        senders = rooms
        per_message = cfg.room_members - 1
        receivers = rooms * per_message
    variant = variant or ("rooms" if rooms else "json" if codec == "json" else "fanout")
    label = f"{name} {variant} S={senders}" + (" +slow" if slow_reader else "")
    result: dict[str, Any] = {
        "target": name,
        "variant": variant,
        "codec": codec,
        "rooms": rooms,
        "room_members": cfg.room_members if rooms else None,
        "senders": senders,
        "receivers": receivers,
        "payload_bytes": cfg.payload,
        "slow_reader": slow_reader,
        "step_seconds": cfg.step_seconds,
        "p99_limit_ms": cfg.p99_limit_ms,
        "server_args": server_args or [],
    }
    with bench.server(name, server_args) as server:
        result["server"] = server.describe()
        with bench.loadgen(server, label.replace(" ", "-")) as generator:
            generator.codec(codec)
            generator.rooms(rooms)
            if not _open_all(
                bench, generator, label, result, receivers, senders, slow_reader
            ):
                return result
            meter = bench.meter(server, generator)

            def run_step(deliveries: float, warmup: bool = False) -> dict[str, Any]:
                """One step; once more if it failed while others used our cores."""
                step = run_step_once(deliveries, warmup)
                if not step["passed"] and step["disturbed"] and not step["fatal"]:
                    again = run_step_once(deliveries, warmup, retry=True)
                    again["disturbed_attempt"] = step
                    step = again
                return step

            def run_step_once(
                deliveries: float, warmup: bool, retry: bool = False
            ) -> dict[str, Any]:
                messages = deliveries / per_message
                kind = "warm-up" if warmup else "retry" if retry else "step"
                title = f"{label} | {kind} {_fmt_rate(deliveries)} deliveries/s"
                state: dict[str, Any] = {}
                meter.start()

                def on_progress(p: dict[str, Any]) -> None:
                    # The send phase's usage is the step's; the drain is not.
                    if p["phase"] == "drain" and "usage" not in state:
                        state["usage"] = meter.read()
                    usage = state.get("usage") or meter.read()
                    bench.progress.update(
                        f"{title} | {p['phase']} {p['elapsed_s']:.0f}s"
                        f" sent {p['sent']:,} recv {p['received']:,}"
                        f" | {_usage_text(usage, p['loadgen_cpu'])}"
                    )

                seconds = 1.0 if warmup else cfg.step_seconds
                raw = generator.step(
                    messages,
                    seconds,
                    cfg.payload,
                    cfg.drain_seconds,
                    cfg.settle_seconds,
                    on_progress,
                )
                passed, reasons = judge_step(raw, cfg.p99_limit_ms)
                usage = state.get("usage") or meter.read()
                step = _step_record(
                    raw, deliveries, per_message, passed, reasons, usage
                )
                step["fatal"] = raw["closed"]["recv"] + raw["closed"]["send"] > 0
                lat = raw["latency"]
                bench.progress.done(
                    f"{title}: {'PASS' if passed else 'FAIL'} {_latency_text(lat)}"
                    f" | {_usage_text(usage, raw['loadgen_cpu'])}"
                    + (f" | {'; '.join(reasons)}" if reasons else "")
                )
                return step

            start = start_rate or cfg.start_rate
            result["warmup"] = run_step(start, warmup=True)
            steps = ramp(run_step, start, max_rate or cfg.max_rate, cfg.bisections)
            result["steps"] = steps
            result["check"] = generator.check()
            result["server_rss_kb"] = server.rss_kb()
            if slow_reader:
                result["slow"] = _slow_reader_report(server, result["check"], steps)
    _summarise_fanout(result, max_rate or cfg.max_rate)
    return result


def _open_all(
    bench: Bench,
    generator: LoadGen,
    label: str,
    result: dict[str, Any],
    receivers: int,
    senders: int,
    slow_reader: bool,
) -> bool:
    cfg = bench.config
    roles = [("recv", receivers), ("send", senders)]
    if slow_reader:
        roles.append(("slow", 1))
    result["opened"] = {}
    for role, count in roles:
        opened = generator.open(
            role,
            count,
            cfg.concurrency,
            _open_timeout(count),
            lambda p, role=role: bench.progress.update(
                f"{label} | opening {role}: {p['opened']:,} open,"
                f" {p['failed']:,} failed"
            ),
        )
        result["opened"][role] = opened
        if opened["ok"] < count:
            result["error"] = (
                f"only {opened['ok']} of {count} {role} connections opened:"
                f" {opened['errors']}"
            )
            bench.progress.done(f"{label} | {result['error']}")
            return False
    bench.progress.done(
        f"{label} | {receivers} receivers, {senders} sender(s) connected"
    )
    return True


def _open_timeout(count: int) -> float:
    # Generous (a slow server may manage only a few hundred a second) but bounded.
    return max(30.0, count / 100.0)


def _saturated(process: float | None, usage: dict[str, float | None]) -> bool:
    """
    The load generator's own time above 90% of a core, or its core busy above
    95% with work that is ours (its own, the driver's, interrupts) — busy with
    someone else's work is "disturbed", not "saturated".
    """
    core = (usage.get("loadgen_core") or 0) - (usage.get("loadgen_core_other") or 0)
    return (process or 0) > SATURATED or core > CORE_SATURATED


def _foreign(usage: dict[str, float | None]) -> dict[str, float | None]:
    return {
        "server_core": usage.get("server_core_other"),
        "loadgen_core": usage.get("loadgen_core_other"),
    }


def _disturbed(usage: dict[str, float | None]) -> bool:
    return any((v or 0) > DISTURBED for v in _foreign(usage).values())


def _step_record(
    raw: dict[str, Any],
    offered: float,
    per_message: int,
    passed: bool,
    reasons: list[str],
    usage: dict[str, float | None],
) -> dict[str, Any]:
    seconds = raw["seconds"] or 1.0
    lat = raw["latency"]
    return {
        "offered_deliveries_per_s": round(offered, 1),
        "offered_messages_per_s": round(offered / per_message, 3),
        # what the sent messages owed the receivers (in their senders' rooms)
        "deliveries_per_s": round(raw["expected"] / seconds, 1),
        "messages_per_s": round(raw["sent"] / seconds, 3),
        "received_per_s": round(raw["received"] / seconds, 1),
        "passed": passed,
        "reasons": reasons,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "send_lag_p99_ms": raw["send_lag"]["p99_ms"],
        "server_cpu": usage["process"],
        "server_core_busy": usage["server_core"],
        "loadgen_cpu": raw["loadgen_cpu"],
        "loadgen_core_busy": usage["loadgen_core"],
        "loadgen_saturated": _saturated(raw["loadgen_cpu"], usage),
        "foreign_cpu": _foreign(usage),
        "disturbed": _disturbed(usage),
        "raw": raw,
    }


def _slow_reader_report(
    server: Server, check: dict[str, Any], steps: list[dict[str, Any]]
) -> dict[str, Any]:
    slow = check.get("slow") or [{}]
    frame_bytes = [
        s["raw"]["bytes"] / s["raw"]["received"] for s in steps if s["raw"]["received"]
    ]
    sent = steps[-1]["raw"]["total_sent"] if steps else 0
    owed = int(sent * (frame_bytes[-1] if frame_bytes else 0))
    log = server.log_text()
    return {
        "tcp_state": slow[0].get("tcp_state"),
        "state": slow[0].get("state"),
        # What the server was asked to send it over the run, all unread.
        "owed_bytes": owed,
        "server_log_too_slow": len(re.findall(r"1008 too slow", log)),
    }


def _limited_by(
    best: dict[str, Any] | None, first_fail: dict[str, Any] | None, limit: float
) -> str:
    """What ended the climb: the server failing, or a ceiling of the tool."""
    if best and best["loadgen_saturated"]:
        return "loadgen"  # the server did at least this much
    if first_fail:
        return "loadgen?" if first_fail["loadgen_saturated"] else "server"
    if best and best["offered_deliveries_per_s"] * 2 > limit:
        return "max-rate"
    return "-"


def _summarise_fanout(result: dict[str, Any], limit: float) -> None:
    steps = result.get("steps") or []
    passing = [s for s in steps if s["passed"]]
    best = max(passing, key=lambda s: s["offered_deliveries_per_s"], default=None)
    failing = [s for s in steps if not s["passed"]]
    first_fail = min(failing, key=lambda s: s["offered_deliveries_per_s"], default=None)
    result["best"] = best
    result["deliveries_per_s"] = best["deliveries_per_s"] if best else 0.0
    for key in (
        "p50_ms",
        "p99_ms",
        "max_ms",
        "server_cpu",
        "server_core_busy",
        "loadgen_cpu",
        "loadgen_core_busy",
    ):
        result[key] = best.get(key) if best else None
    # The load generator, not the server, may be what failed (or what capped
    # the rate): say so rather than let its ceiling pass for the server's.
    result["loadgen_saturated"] = bool(
        (best and best["loadgen_saturated"])
        or (first_fail and first_fail["loadgen_saturated"])
    )
    result["disturbed"] = any(s.get("disturbed") for s in steps)
    result["limited_by"] = _limited_by(best, first_fail, limit)
    result["first_failure"] = (
        {
            "offered_deliveries_per_s": first_fail["offered_deliveries_per_s"],
            "reasons": first_fail["reasons"],
        }
        if first_fail
        else None
    )


# -- connect ---------------------------------------------------------------------


def run_connect(
    bench: Bench,
    name: str,
    count: int,
    *,
    variant: str = "",
    server_args: list[str] | None = None,
    prepare: Callable[[LoadGen], None] | None = None,
) -> dict[str, Any]:
    """
    Open ``count`` connections, 50 handshakes in flight; hold; RSS per connection.

    A ``variant`` (issue #15's ``auth-required``) starts webchat with
    ``server_args`` too, and ``prepare`` sets up the load generator (rooms,
    a token per room) before the first connection.
    """
    cfg = bench.config
    label = f"{name}{' ' + variant if variant else ''} connect {count:,}"
    result: dict[str, Any] = {
        "target": name,
        "requested": count,
        "concurrency": cfg.concurrency,
        "hold_seconds": cfg.hold_seconds,
    }
    if variant:
        result["variant"] = variant
    with bench.server(name, server_args) as server:
        result["server"] = server.describe()
        with bench.loadgen(server, f"{name}-connect{variant}") as generator:
            if prepare is not None:
                prepare(generator)
            # Warm up: the first connections pay one-time costs (imports,
            # caches, arena growth) that are not a per-connection cost.
            generator.open("recv", min(50, count), cfg.concurrency, 30)
            generator.reset()
            time.sleep(1.0)
            rss_before = server.rss_kb()
            meter = bench.meter(server, generator)

            def on_progress(p: dict[str, Any]) -> None:
                usage = meter.read()
                bench.progress.update(
                    f"{label} | {p['elapsed_s']:.0f}s {p['opened']:,} open,"
                    f" {p['failed']:,} failed | {_usage_text(usage, p['loadgen_cpu'])}"
                )

            opened = generator.open(
                "recv", count, cfg.concurrency, _open_timeout(count), on_progress
            )
            usage = meter.read()
            deadline = time.monotonic() + cfg.hold_seconds
            rss_peak = server.rss_kb()
            while time.monotonic() < deadline:
                bench.progress.update(
                    f"{label} | holding {opened['ok']:,} idle,"
                    f" server RSS {_kib(server.rss_kb())}"
                )
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
                rss = server.rss_kb()
                if rss is not None and (rss_peak is None or rss > rss_peak):
                    rss_peak = rss
            rss_held = server.rss_kb()
            check = generator.check()
            generator.reset()
    handshake = opened["handshake"]
    per_conn = None
    if rss_before is not None and rss_held is not None and opened["ok"]:
        per_conn = round((rss_held - rss_before) * 1024 / opened["ok"], 1)
    result.update(
        opened=opened["ok"],
        failed=opened["failed"],
        errors=opened["errors"],
        elapsed_s=opened["elapsed_s"],
        conn_per_s=opened["per_s"],
        handshake_p50_ms=handshake["p50_ms"],
        handshake_p99_ms=handshake["p99_ms"],
        handshake_max_ms=handshake["max_ms"],
        still_open_after_hold=check["open"]["recv"],
        rss_before_kb=rss_before,
        rss_held_kb=rss_held,
        rss_peak_kb=rss_peak,
        rss_per_conn_bytes=per_conn,
        server_cpu=usage["process"],
        server_core_busy=usage["server_core"],
        loadgen_cpu=opened["loadgen_cpu"],
        loadgen_core_busy=usage["loadgen_core"],
        loadgen_saturated=_saturated(opened["loadgen_cpu"], usage),
        foreign_cpu=_foreign(usage),
        disturbed=_disturbed(usage),
    )
    bench.progress.done(
        f"{label}: {opened['ok']:,} open ({opened['failed']:,} failed) at"
        f" {opened['per_s']:,.0f}/s, handshake p50 {handshake['p50_ms']:.1f}"
        f" p99 {handshake['p99_ms']:.1f} ms, RSS/conn "
        + ("?" if per_conn is None else f"{per_conn / 1024:.1f} KiB")
    )
    return result


def _kib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f} MiB"


# -- echo ------------------------------------------------------------------------


def run_echo(bench: Bench, name: str) -> dict[str, Any]:
    """One sender, one receiver, 10 msg/s: one-way latency at low load."""
    cfg = bench.config
    label = f"{name} echo"
    with bench.server(name) as server:
        with bench.loadgen(server, f"{name}-echo") as generator:
            for role in ("recv", "send"):
                opened = generator.open(role, 1, 1, 30)
                if opened["ok"] != 1:
                    raise RuntimeError(
                        f"{label}: could not connect: {opened['errors']}"
                    )

            def on_progress(p: dict[str, Any]) -> None:
                bench.progress.update(
                    f"{label} | {p['phase']} {p['elapsed_s']:.0f}s sent {p['sent']:,}"
                    f" recv {p['received']:,}"
                )

            # A first half second warms up code paths that run once.
            warmup = generator.step(cfg.echo_rate, 0.5, cfg.payload, 2.0, 0.0)
            meter = bench.meter(server, generator)
            raw = generator.step(
                cfg.echo_rate, cfg.echo_seconds, cfg.payload, 2.0, 0.0, on_progress
            )
            usage = meter.read()
    lat = raw["latency"]
    result = {
        "target": name,
        "server": server.describe(),
        "rate": cfg.echo_rate,
        "seconds": raw["seconds"],
        "payload_bytes": cfg.payload,
        "sent": raw["sent"],
        "received": raw["received"],
        "lost": raw["lost"],
        "p50_ms": lat["p50_ms"],
        "p90_ms": lat["p90_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "send_lag_p99_ms": raw["send_lag"]["p99_ms"],
        "loadgen_cpu": raw["loadgen_cpu"],
        "warmup_received": warmup["received"],
        "foreign_cpu": _foreign(usage),
        "disturbed": _disturbed(usage),
        "raw": raw,
    }
    bench.progress.done(
        f"{label}: {raw['received']}/{raw['expected']} received,"
        f" p50 {lat['p50_ms']:.3f} p99 {lat['p99_ms']:.3f} max {lat['max_ms']:.3f} ms"
    )
    return result
