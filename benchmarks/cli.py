"""``python -m benchmarks``: options, the run, and what it leaves behind.

Run from a checkout's root (the wheel does not ship the benchmarks)::

    python -m benchmarks                  # everything, with both baselines (~10 min)
    python -m benchmarks --quick          # a smoke run (~1-2 min)
    python -m benchmarks --scenario fanout --senders 1,10 --slow-reader
    python -m benchmarks --scenario json,rooms   # the JSON codec; 1,000 rooms x 10
    python -m benchmarks --scenario cluster   # 2 nodes + Redis vs 1 node (~1 min)
    python -m benchmarks --scenario history,storm  # issue #14: history on vs off;
                                          # 10,000 clients resume at once
    python -m benchmarks --scenario connect-auth,api  # issue #15: handshakes
                                          # with a token vs without; the publish API
    python -m benchmarks --url ws://127.0.0.1:8080/ --pid 1234 --no-baselines

Progress goes to stderr, the table to stdout, everything measured to the
JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.cluster import run_cluster
from benchmarks.integration import run_api, run_connect_auth
from benchmarks.processes import ProcessRegistry, background_load, pick_cpus
from benchmarks.report import (
    check_targets,
    compute_ratios,
    render_table,
    run_metadata,
    write_json,
)
from benchmarks.scenarios import (
    Bench,
    BenchConfig,
    ProgressLine,
    run_connect,
    run_echo,
    run_fanout,
)
from benchmarks.servers import BASELINES, EXTRA_BASELINES, TLS_EXTRA_TARGETS
from benchmarks.storm import run_storm
from benchmarks.tls import make_tls_files

SCENARIOS = (
    "fanout", "json", "rooms", "history", "storm", "connect", "echo",
    "connect-auth", "api",
)  # fmt: skip
#: Scenarios that start their own servers with options of their own.
OWN_SERVERS = ("cluster", "history", "connect-auth", "api")
#: Fan-out variants whose baselines cannot take part: they speak no JSON
#: (and keep no history).
WEBCHAT_ONLY = ("json", "history")
#: history: each JSON fan-out twice, with these options after --server-arg's.
HISTORY_VARIANTS = (("history-off", ["--history", "0"]), ("history-on", []))
#: Run only when named: not part of "all" (``make bench``).
EXTRA_SCENARIOS = ("calibrate", "cluster")
DEFAULT_OUT = Path("bench-results") / "bench.json"

#: Why the load generator is a C program, for the JSON.
LOADGEN_CHOICE = (
    "C (loadgen.c: epoll, one thread), compiled at run time with gcc. Measured on "
    "the development machine against the C fan-out server: 1000 picows+uvloop "
    "receivers saturate one core at ~1.35M deliveries/s, below the 2M target; the "
    "C receivers took 10M deliveries/s at ~55% of a core."
)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rate_list(text: str) -> list[float]:
    """``100k,1M,2.5M``: deliveries/s."""
    scale = {"k": 1e3, "m": 1e6}
    try:
        values = [
            float(part[:-1]) * scale[part[-1].lower()]
            if part[-1].lower() in scale
            else float(part)
            for part in _csv(text)
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"need rates > 0: {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need numbers >= 1: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark webchat (issue #5) against naive baselines.",
        epilog=__doc__.split("\n\n", 1)[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--scenario",
        default="all",
        help="fanout, json (the JSON codec's fan-out), rooms (1,000 rooms x 10), "
        "history (the JSON fan-out with --history 0 and with history on), "
        "storm (10,000 JSON clients resume at once, 50 messages behind), "
        "connect, echo, connect-auth (connect with --auth required and an HS256 "
        "token vs --auth off, issue #15), api (publishing through POST "
        "/api/rooms/r/messages, issue #15), all (= those nine), calibrate (the load "
        "generator against the C server) or cluster (2 nodes + Redis vs 1 node, "
        "issue #6); comma-separated [all]",
    )
    what.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="baselines to run too, of "
        f"{', '.join(BASELINES + EXTRA_BASELINES + TLS_EXTRA_TARGETS)}"
        " [%(default)s]",
    )
    what.add_argument("--no-baselines", action="store_true", help="run webchat only")
    what.add_argument(
        "--tls",
        action="store_true",
        help="every server speaks TLS (wss://, a self-signed certificate made for "
        "the run; webchat on --port ssl:...) and so does the load generator; "
        "baseline nginx = a plain webchat behind nginx terminating TLS (issue #16)",
    )
    what.add_argument(
        "--quick", action="store_true", help="short steps, fewer connections"
    )
    what.add_argument(
        "--url",
        help="measure the webchat already serving this ws:// or wss:// URL "
        "(none is started)",
    )
    what.add_argument(
        "--pid", type=int, help="with --url: the server's pid, for its RSS and CPU"
    )
    what.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'twistd webchat' (repeatable), e.g."
        " --server-arg=--no-metrics",
    )

    fan = parser.add_argument_group("fanout")
    fan.add_argument("--receivers", type=int, help="receiving connections [1000]")
    fan.add_argument(
        "--senders", type=_int_list, help="sender counts to run [1,10; quick: 1]"
    )
    fan.add_argument(
        "--json-senders",
        type=_int_list,
        help="json: sender counts to run [1,10; quick: 1]",
    )
    fan.add_argument("--rooms", type=int, help="rooms: how many [1000; quick: 100]")
    fan.add_argument(
        "--room-members",
        type=int,
        help="rooms: members per room, one a sender, >= 2 [10]",
    )
    fan.add_argument("--payload", type=int, help="payload bytes, >= 30 [64]")
    fan.add_argument(
        "--slow-reader",
        action="store_true",
        help="also run each fan-out with one extra receiver that never reads",
    )
    fan.add_argument(
        "--step-seconds", type=float, help="seconds per ramp step [3; quick: 1]"
    )
    fan.add_argument(
        "--start-rate", type=float, help="first step, deliveries/s [10000]"
    )
    fan.add_argument("--max-rate", type=float, help="highest step, deliveries/s [32M]")
    fan.add_argument(
        "--bisections", type=int, help="bisection steps after doubling [3; quick: 2]"
    )
    fan.add_argument("--p99-limit-ms", type=float, help="a step's p99 bound [100]")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--cluster-rates",
        type=_rate_list,
        help="fixed offered rates, deliveries/s [100k,1M,5M,20M; quick: 100k,1M]",
    )
    cluster.add_argument(
        "--publish-requests",
        type=int,
        help="redis-benchmark -n [200000; quick: 20000]",
    )
    cluster.add_argument(
        "--node2-cpu",
        type=int,
        help="CPU for node 2 [the server's, with node 1 and Redis]",
    )

    storm = parser.add_argument_group("storm (issue #14)")
    storm.add_argument(
        "--storm-clients", type=int, help="clients reconnecting [10000; quick: 1000]"
    )
    storm.add_argument(
        "--storm-rooms", type=int, help="rooms they are spread over [1000; quick: 100]"
    )
    storm.add_argument("--storm-behind", type=int, help="messages each has missed [50]")
    storm.add_argument(
        "--storm-concurrency", type=int, help="handshakes in flight [1000]"
    )

    conn = parser.add_argument_group("connect / echo")
    conn.add_argument(
        "--connections", type=int, help="for webchat [15000; quick: 2000]"
    )
    conn.add_argument(
        "--baseline-connections",
        type=int,
        help="for the baselines [15000; quick: 2000]",
    )
    conn.add_argument("--concurrency", type=int, help="handshakes in flight [50]")
    conn.add_argument(
        "--hold", type=float, help="seconds to hold them idle [3; quick: 1]"
    )
    conn.add_argument("--echo-seconds", type=float, help="echo duration [5; quick: 2]")

    app = parser.add_argument_group("connect-auth / api (issue #15)")
    app.add_argument(
        "--auth-tokens",
        type=int,
        help="connect-auth: rooms, a token each [1000; quick: 100]",
    )
    app.add_argument(
        "--api-connections",
        type=int,
        help="api: keep-alive connections publishing [32; quick: 16]",
    )
    app.add_argument(
        "--api-members", type=int, help="api: members counting deliveries [10]"
    )
    app.add_argument(
        "--api-seconds", type=float, help="api: measured seconds [10; quick: 3]"
    )

    run = parser.add_argument_group("where")
    run.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON results [%(default)s]"
    )
    run.add_argument(
        "--server-cpu", type=int, help="CPU for the server [first allowed]"
    )
    run.add_argument(
        "--client-cpu", type=int, help="CPU for the load generator [second allowed]"
    )
    run.add_argument(
        "--keep-logs", action="store_true", help="keep server logs (path printed)"
    )
    return parser


def make_config(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig.quick_config() if args.quick else BenchConfig()
    overrides = {
        "receivers": args.receivers,
        "senders": args.senders,
        "json_senders": args.json_senders,
        "rooms": args.rooms,
        "room_members": args.room_members,
        "payload": args.payload,
        "step_seconds": args.step_seconds,
        "start_rate": args.start_rate,
        "max_rate": args.max_rate,
        "bisections": args.bisections,
        "p99_limit_ms": args.p99_limit_ms,
        "connections": args.connections,
        "baseline_connections": args.baseline_connections,
        "concurrency": args.concurrency,
        "hold_seconds": args.hold,
        "echo_seconds": args.echo_seconds,
        "cluster_rates": args.cluster_rates,
        "publish_requests": args.publish_requests,
        "storm_clients": args.storm_clients,
        "storm_rooms": args.storm_rooms,
        "storm_behind": args.storm_behind,
        "storm_concurrency": args.storm_concurrency,
        "auth_tokens": args.auth_tokens,
        "api_connections": args.api_connections,
        "api_members": args.api_members,
        "api_seconds": args.api_seconds,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.slow_reader = args.slow_reader
    if args.step_seconds is not None:
        config.drain_seconds = max(2.0, args.step_seconds)
        config.settle_seconds = args.step_seconds + 2.0
    return config


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    scenarios: list[str] = []
    for name in _csv(args.scenario):
        if name == "all":
            scenarios.extend(SCENARIOS)
        elif name in (*SCENARIOS, *EXTRA_SCENARIOS):
            scenarios.append(name)
        else:
            parser.error(f"unknown scenario {name!r}")
    if args.pid is not None and not args.url:
        parser.error("--pid only goes with --url")
    if args.url and "cluster" in scenarios:
        parser.error("the cluster scenario starts its own nodes: not with --url")
    for name in OWN_SERVERS[1:]:
        if args.url and name in scenarios:
            parser.error(
                f"the {name} scenario starts servers with its own options:"
                " not with --url"
            )
    for name in ("auth_tokens", "api_connections", "api_seconds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.api_members is not None and args.api_members < 0:
        parser.error("--api-members must be >= 0")
    for name in ("storm_clients", "storm_rooms", "storm_behind", "storm_concurrency"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.payload is not None and not 30 <= args.payload <= 60000:
        parser.error(
            "--payload must be 30..60000 (it carries a step id and a timestamp)"
        )
    if args.rooms is not None and args.rooms < 1:
        parser.error("--rooms must be >= 1")
    if args.room_members is not None and args.room_members < 2:
        parser.error("--room-members must be >= 2 (a sender and a receiver)")
    for name in [] if args.no_baselines else _csv(args.baselines):
        if name in TLS_EXTRA_TARGETS and not args.tls:
            parser.error(f"baseline {name!r} only goes with --tls")
        elif name == "c" and args.tls:
            parser.error("the C server has no TLS: not with --tls")
        elif name not in BASELINES + EXTRA_BASELINES + TLS_EXTRA_TARGETS:
            parser.error(f"unknown baseline {name!r}")
    if args.tls and {"cluster", "calibrate"} & set(scenarios):
        parser.error("the cluster and calibrate scenarios have no --tls")
    return list(dict.fromkeys(scenarios))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    scenarios = _validate(parser, args)
    config = make_config(args)
    baselines = [] if args.no_baselines else _csv(args.baselines)
    targets = ["webchat", *baselines]
    server_cpu, client_cpu = pick_cpus(args.server_cpu, args.client_cpu)
    # The driver is idle most of the time, but whatever it does stays off the
    # server's core.
    os.sched_setaffinity(0, {client_cpu})
    progress = ProgressLine()
    if server_cpu == client_cpu:
        progress.done(
            f"warning: only CPU {server_cpu} is available: server and load generator "
            "share it, and the numbers mean little"
        )
    document: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "scenarios": scenarios,
        "targets": targets,
        "config": config.as_dict(),
        "tls": args.tls,
        "cpus": {"server": server_cpu, "loadgen": client_cpu},
        "loadgen": {"choice": LOADGEN_CHOICE},
        "meta": run_metadata(),
        "results": {},
        "status": "running",
    }
    cores = {"server": server_cpu, "loadgen": client_cpu}
    document["background_load"] = background_load(cores, 0.5)
    busy = {k: v for k, v in document["background_load"].items() if v > 0.10}
    if busy:
        progress.done(
            "warning: before starting, something else keeps the benchmark cores busy ("
            + ", ".join(f"{k} core {v * 100:.0f}%" for k, v in busy.items())
            + "): results will be disturbed"
        )
    registry = ProcessRegistry()
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="webchat-bench-"))
    status = 0
    try:
        binary = loadgen.build()
        document["loadgen"]["binary"] = str(binary)
        bench = Bench(
            config=config,
            registry=registry,
            workdir=workdir,
            loadgen_binary=binary,
            server_cpu=server_cpu,
            client_cpu=client_cpu,
            progress=progress,
            url=args.url,
            pid=args.pid,
            server_args=args.server_arg,
            node2_cpu=args.node2_cpu,
            tls=make_tls_files(workdir) if args.tls else None,
        )
        for scenario in scenarios:
            _run_scenario(bench, scenario, targets, document, args.out)
        document["status"] = "complete"
    except KeyboardInterrupt:
        progress.done("interrupted: stopping every process started")
        document["status"] = "interrupted"
        status = 130
    except (loadgen.LoadGenError, RuntimeError, OSError) as e:
        progress.done(f"error: {e}")
        document["status"] = f"error: {e}"
        status = 1
    finally:
        registry.stop_all()
        signal.signal(signal.SIGTERM, previous_term)
        document["duration_s"] = round(time.monotonic() - started, 1)
        _finish(document, baselines)
        write_json(args.out, document)
        if args.keep_logs:
            progress.done(f"logs kept in {workdir}")
        else:
            _remove_tree(workdir)
    print(render_table(document))
    print(f"\nResults: {args.out} ({document['duration_s']:.0f} s)")
    return status


def _run_scenario(
    bench: Bench, scenario: str, targets: list[str], document: dict[str, Any], out: Path
) -> None:
    results = document["results"]
    if scenario == "calibrate":
        results["calibrate"] = _guarded(
            run_fanout, bench, "c", 1, start_rate=250_000, max_rate=64_000_000
        )
        write_json(out, document)
        return
    if scenario == "cluster":
        results["cluster"] = _guarded(run_cluster, bench)
        write_json(out, document)
        return
    if scenario == "storm":
        results["storm"] = _guarded(run_storm, bench)
        write_json(out, document)
        return
    if scenario == "connect-auth":
        results["connect-auth"] = _guarded(run_connect_auth, bench)
        write_json(out, document)
        return
    if scenario == "api":
        results["api"] = _undisturbed(run_api, bench)
        write_json(out, document)
        return
    if scenario in ("json", "rooms", "history"):
        # Fan-out variants: their runs join the fan-out table, keyed by variant.
        table = results.setdefault("fanout", {})
        if scenario in WEBCHAT_ONLY:
            targets = ["webchat"]
    else:
        table = results.setdefault(scenario, {})
    for target in targets:
        _run_target(bench, scenario, target, table, document, out)


def _run_target(
    bench: Bench,
    scenario: str,
    target: str,
    table: dict[str, Any],
    document: dict[str, Any],
    out: Path,
) -> None:
    config = bench.config
    if scenario == "fanout":
        runs = table.setdefault(target, [])
        variants = [(s, False) for s in config.senders]
        if config.slow_reader:
            variants += [(s, True) for s in config.senders]
        for senders, slow in variants:
            run = _guarded(run_fanout, bench, target, senders, slow)
            run.setdefault("senders", senders)
            run.setdefault("slow_reader", slow)
            runs.append(run)
            write_json(out, document)  # an interrupted run still leaves its data
    elif scenario == "json":
        runs = table.setdefault(target, [])
        for senders in config.json_senders:
            run = _guarded(run_fanout, bench, target, senders, codec="json")
            run.setdefault("senders", senders)
            run.setdefault("variant", "json")
            runs.append(run)
            write_json(out, document)
    elif scenario == "history":
        # Off, then on, for each sender count: the same run, one after the other.
        runs = table.setdefault(target, [])
        for senders in config.json_senders:
            for variant, extra in HISTORY_VARIANTS:
                run = _guarded(
                    run_fanout,
                    bench,
                    target,
                    senders,
                    codec="json",
                    variant=variant,
                    server_args=extra,
                )
                run.setdefault("senders", senders)
                run.setdefault("variant", variant)
                runs.append(run)
                write_json(out, document)
    elif scenario == "rooms":
        runs = table.setdefault(target, [])
        run = _guarded(run_fanout, bench, target, config.rooms, rooms=config.rooms)
        run.setdefault("senders", config.rooms)
        run.setdefault("variant", "rooms")
        run.setdefault("rooms", config.rooms)
        runs.append(run)
        write_json(out, document)
    elif scenario == "connect":
        webchat = target == "webchat"
        count = config.connections if webchat else config.baseline_connections
        table[target] = _undisturbed(run_connect, bench, target, count)
    else:
        table[target] = _undisturbed(run_echo, bench, target)
    write_json(out, document)


def _undisturbed(run: Any, bench: Bench, *args: Any) -> dict[str, Any]:
    """Run; if other processes used our cores meanwhile, once more (that one counts)."""
    result = _guarded(run, bench, *args)
    if result.get("disturbed"):
        bench.progress.done("disturbed by other processes: running it once more")
        again = _guarded(run, bench, *args)
        again["disturbed_attempt"] = result
        result = again
    return result


def _guarded(run: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One target's run: its failure is recorded and the others still run."""
    try:
        return run(*args, **kwargs)
    except (loadgen.LoadGenError, RuntimeError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}


def _finish(document: dict[str, Any], baselines: list[str]) -> None:
    results = document["results"]
    document["ratios"] = compute_ratios(results, baselines)
    document["issue_targets"] = check_targets(results)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
