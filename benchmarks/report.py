"""The end of a run: webchat's ratio to each baseline, the issue's targets, a table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.integration import api_lines, connect_auth_lines, integration_checks
from benchmarks.storm import storm_lines

#: Issue #5's targets for webchat (1000 receivers, 64 B, server on one core).
TARGET_FANOUT_DELIVERIES = 2_000_000
#: Issue #13: the JSON codec's one-room fan-out, and rooms against the naive server.
TARGET_JSON_DELIVERIES = 5_000_000
TARGET_ROOMS_RATIO = 10.0
#: Issue #14: fan-out with history on at most 15% below history off, same run.
TARGET_HISTORY_RATIO = 0.85
#: Issue #13: the seed fan-out no more than 10% below this (docs/benchmarks.md).
REFERENCE_FANOUT_DELIVERIES = 20_460_000
TARGET_ECHO_P50_MS = 1.0
TARGET_ECHO_P99_MS = 5.0
TARGET_RSS_PER_CONN = 8 * 1024
TARGET_RSS_CONNECTIONS = 15_000
TARGET_CONN_PER_S = 3_000
TARGET_HANDSHAKE_P99_MS = 50.0

SATURATION_MARK = "!"
DISTURBED_MARK = "~"


def run_metadata() -> dict[str, Any]:
    """What a reader needs to tell two result files apart: machine, versions, commit."""
    meta: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "versions": {},
    }
    for package in ("webchat", "twisted", "autobahn", "websockets"):
        try:
            meta["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            meta["versions"][package] = None
    meta["git"] = _git_describe(Path(__file__).resolve().parents[3])
    return meta


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_describe(tree: Path) -> dict[str, Any] | None:
    if not (tree / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def fanout_key(run: dict[str, Any]) -> str:
    """The table's row: the variant (seed fan-out, JSON, rooms) and its shape."""
    variant = run.get("variant", "fanout")
    if variant == "rooms":
        return f"rooms {run.get('rooms')}x{run.get('room_members') or '?'}"
    return f"{variant} S={run['senders']}" + (
        " +slow" if run.get("slow_reader") else ""
    )


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0 or ours < 0:
        return None
    return round(ours / theirs, 3)


def compute_ratios(results: dict[str, Any], baselines: list[str]) -> dict[str, Any]:
    """webchat / baseline for each headline metric (>1 is better for ↑ metrics)."""
    ratios: dict[str, Any] = {}
    fanout = results.get("fanout", {})
    ours_runs = {fanout_key(r): r for r in fanout.get("webchat", [])}
    for baseline in baselines:
        for run in fanout.get(baseline, []):
            key = fanout_key(run)
            ours = ours_runs.get(key)
            if ours is None:
                continue
            ratios.setdefault(key, {})[baseline] = {
                "deliveries_per_s": _ratio(
                    ours.get("deliveries_per_s"), run.get("deliveries_per_s")
                ),
            }
    for scenario, metrics in (
        ("connect", ("conn_per_s", "handshake_p99_ms", "rss_per_conn_bytes")),
        ("echo", ("p50_ms", "p99_ms")),
    ):
        table = results.get(scenario, {})
        ours = table.get("webchat")
        for baseline in baselines:
            theirs = table.get(baseline)
            if not ours or not theirs:
                continue
            ratios.setdefault(scenario, {})[baseline] = {
                m: _ratio(ours.get(m), theirs.get(m)) for m in metrics
            }
    return ratios


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issues #5, #13 and #14: the targets for webchat that this run measured."""
    checks: list[dict[str, Any]] = []

    def check(
        name: str, value: Any, shown: str, met: bool | None, note: str = ""
    ) -> None:
        checks.append(
            {"target": name, "value": value, "shown": shown, "met": met, "note": note}
        )

    fanout = results.get("fanout", {})
    for run in fanout.get("webchat", []):
        if run.get("slow_reader") or "error" in run:
            continue
        variant = run.get("variant", "fanout")
        value = run.get("deliveries_per_s")
        saturated = "load generator saturated" if run.get("loadgen_saturated") else ""
        if variant == "json" and run.get("receivers") == 1000:
            check(
                f"JSON fan-out S={run['senders']} >= 5,000,000 deliveries/s"
                " (p99 <= 100 ms, no loss)",
                value,
                f"{_rate(value)} deliveries/s",
                value is not None and value >= TARGET_JSON_DELIVERIES,
                saturated,
            )
        if variant == "rooms":
            naive = next(
                (
                    r
                    for r in fanout.get("autobahn", [])
                    if fanout_key(r) == fanout_key(run)
                ),
                None,
            )
            ratio = _ratio(value, (naive or {}).get("deliveries_per_s"))
            check(
                f"{fanout_key(run)} >= 10x the naive Autobahn server",
                ratio,
                f"{_times(ratio)} ({_rate(value)} vs"
                f" {_rate((naive or {}).get('deliveries_per_s'))} deliveries/s)",
                None if ratio is None else ratio >= TARGET_ROOMS_RATIO,
                saturated or ("" if naive else "no baseline in this run"),
            )
        if variant == "history-on":
            off = next(
                (
                    r
                    for r in fanout.get("webchat", [])
                    if r.get("variant") == "history-off"
                    and r.get("senders") == run.get("senders")
                    and "error" not in r
                ),
                None,
            )
            ratio = _ratio(value, (off or {}).get("deliveries_per_s"))
            check(
                f"JSON fan-out S={run['senders']} with history on >= 85% of"
                " history off (same run)",
                ratio,
                f"{_times(ratio)} ({_rate(value)} vs"
                f" {_rate((off or {}).get('deliveries_per_s'))} deliveries/s)",
                None if ratio is None else ratio >= TARGET_HISTORY_RATIO,
                saturated or ("" if off else "no history-off run"),
            )
        if variant != "fanout" or run.get("receivers") != 1000:
            continue
        value = run.get("deliveries_per_s")
        check(
            f"fan-out S={run['senders']} >= 2,000,000 deliveries/s"
            " (p99 <= 100 ms, no loss)",
            value,
            f"{_rate(value)} deliveries/s",
            value is not None and value >= TARGET_FANOUT_DELIVERIES,
            "load generator saturated" if run.get("loadgen_saturated") else "",
        )
        check(
            f"fan-out S={run['senders']} within 10% of docs/benchmarks.md's"
            f" {_rate(REFERENCE_FANOUT_DELIVERIES)}",
            value,
            f"{_rate(value)} deliveries/s",
            value is not None and value >= 0.9 * REFERENCE_FANOUT_DELIVERIES,
            "load generator saturated" if run.get("loadgen_saturated") else "",
        )
    echo = results.get("echo", {}).get("webchat")
    if echo and "error" not in echo:
        check(
            "echo p50 <= 1 ms",
            echo["p50_ms"],
            f"{echo['p50_ms']:.3f} ms",
            0 <= echo["p50_ms"] <= TARGET_ECHO_P50_MS,
        )
        check(
            "echo p99 <= 5 ms",
            echo["p99_ms"],
            f"{echo['p99_ms']:.3f} ms",
            0 <= echo["p99_ms"] <= TARGET_ECHO_P99_MS,
        )
    connect = results.get("connect", {}).get("webchat")
    if connect and "error" not in connect:
        per_conn = connect.get("rss_per_conn_bytes")
        full = connect["opened"] >= TARGET_RSS_CONNECTIONS
        check(
            "<= 8 KiB RSS per idle connection, 15,000 held",
            per_conn,
            "-" if per_conn is None else f"{per_conn / 1024:.1f} KiB",
            (per_conn is not None and per_conn <= TARGET_RSS_PER_CONN)
            if full
            else None,
            "" if full else f"only {connect['opened']:,} held: not comparable",
        )
        check(
            ">= 3,000 new connections/s",
            connect["conn_per_s"],
            f"{connect['conn_per_s']:,.0f}/s",
            connect["conn_per_s"] >= TARGET_CONN_PER_S,
        )
        check(
            "handshake p99 <= 50 ms at 50 in flight",
            connect["handshake_p99_ms"],
            f"{connect['handshake_p99_ms']:.1f} ms",
            0 <= connect["handshake_p99_ms"] <= TARGET_HANDSHAKE_P99_MS,
        )
    for name, value, shown, met, note in integration_checks(results):
        check(name, value, shown, met, note)
    return checks


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)


# -- the table -------------------------------------------------------------------


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:,.0f}"


def _ms(value: float | None) -> str:
    if value is None or value < 0:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cell(entry: dict[str, Any] | None, render: Any) -> str:
    if entry is None:
        return ""
    if "error" in entry and entry.get("deliveries_per_s") is None:
        return "error"
    text = render(entry)
    if entry.get("loadgen_saturated"):
        text += SATURATION_MARK
    if entry.get("disturbed"):
        text += DISTURBED_MARK
    return text


def render_table(document: dict[str, Any]) -> str:
    results = document["results"]
    targets = document["targets"]
    baselines = [t for t in targets if t != "webchat"]
    ratios = document.get("ratios", {})
    head = ["scenario", "metric", *targets, *(f"webchat/{b}" for b in baselines)]
    rows: list[list[str]] = []

    def add(
        scenario: str,
        metric: str,
        cells: list[str],
        ratio_key: str | None,
        key: str | None,
        lower_bound: bool = False,
    ):
        ratio_cells = []
        for b in baselines:
            r = (
                ratios.get(ratio_key or "", {}).get(b, {}).get(key or "")
                if key
                else None
            )
            text = _times(r) if key else ""
            # webchat's number was the load generator's ceiling: it did at least that.
            ratio_cells.append(">=" + text if lower_bound and r is not None else text)
        rows.append([scenario, metric, *cells, *ratio_cells])

    cfg = document["config"]
    fanout = results.get("fanout", {})
    keys: list[str] = []
    for runs in fanout.values():
        for run in runs:
            if fanout_key(run) not in keys:
                keys.append(fanout_key(run))
    for key in keys:
        by_target = {
            t: next((r for r in fanout.get(t, []) if fanout_key(r) == key), None)
            for t in targets
        }
        add(
            key,
            "deliveries/s (higher better)",
            [
                _cell(by_target[t], lambda r: _rate(r.get("deliveries_per_s")))
                for t in targets
            ],
            key,
            "deliveries_per_s",
            lower_bound=(by_target["webchat"] or {}).get("limited_by") == "loadgen",
        )
        shape = next((r for r in by_target.values() if r), {})
        add(
            f"  C={shape.get('receivers', cfg['receivers'])}, {cfg['payload']} B",
            "  p50 / p99 / max ms",
            [
                _cell(
                    by_target[t],
                    lambda r: (
                        f"{_ms(r.get('p50_ms'))}/{_ms(r.get('p99_ms'))}/{_ms(r.get('max_ms'))}"
                    ),
                )
                for t in targets
            ],
            None,
            None,
        )
        add(
            "",
            "  CPU server (core) / loadgen",
            [
                _cell(
                    by_target[t],
                    lambda r: (
                        f"{_pct(r.get('server_cpu'))}"
                        f" ({_pct(r.get('server_core_busy'))})"
                        f"/{_pct(r.get('loadgen_cpu'))}"
                    ),
                )
                for t in targets
            ],
            None,
            None,
        )
        add(
            "",
            "  limited by",
            [
                _cell(by_target[t], lambda r: r.get("limited_by") or "-")
                for t in targets
            ],
            None,
            None,
        )
        slow_cells = [_slow_cell(by_target[t]) for t in targets]
        if any(slow_cells):
            add("", "  slow reader", slow_cells, None, None)
    connect = results.get("connect", {})
    if connect:
        c = {t: connect.get(t) for t in targets}
        add(
            "connect",
            "connections held",
            [
                _cell(c[t], lambda r: f"{r['opened']:,}/{r['requested']:,}")
                for t in targets
            ],
            None,
            None,
        )
        add(
            f"  {cfg['concurrency']} in flight",
            "conn/s (higher better)",
            [_cell(c[t], lambda r: _rate(r["conn_per_s"])) for t in targets],
            "connect",
            "conn_per_s",
        )
        add(
            "",
            "handshake p50 / p99 ms",
            [
                _cell(
                    c[t],
                    lambda r: (
                        f"{_ms(r['handshake_p50_ms'])}/{_ms(r['handshake_p99_ms'])}"
                    ),
                )
                for t in targets
            ],
            "connect",
            "handshake_p99_ms",
        )
        add(
            "",
            "RSS per idle conn KiB",
            [
                _cell(
                    c[t],
                    lambda r: (
                        "-"
                        if r["rss_per_conn_bytes"] is None
                        else f"{r['rss_per_conn_bytes'] / 1024:.1f}"
                    ),
                )
                for t in targets
            ],
            "connect",
            "rss_per_conn_bytes",
        )
    echo = results.get("echo", {})
    if echo:
        e = {t: echo.get(t) for t in targets}
        add(
            f"echo {cfg['echo_rate']:g} msg/s",
            "p50 ms",
            [_cell(e[t], lambda r: f"{r['p50_ms']:.3f}") for t in targets],
            "echo",
            "p50_ms",
        )
        add(
            "",
            "p99 / max ms",
            [
                _cell(e[t], lambda r: f"{r['p99_ms']:.3f}/{r['max_ms']:.3f}")
                for t in targets
            ],
            "echo",
            "p99_ms",
        )
    calibrate = results.get("calibrate")
    cluster = results.get("cluster")
    lines = [_format_rows(head, rows)] if rows else []
    if calibrate:
        lines.append(_calibration_line(calibrate))
    cells = [cell for row in rows for cell in row[2 : 2 + len(targets)]]
    if any(SATURATION_MARK in cell for cell in cells):
        lines.append(
            f"{SATURATION_MARK} the load generator was saturated (> 90% of a core, or"
            " its core > 95% busy): that number may be its limit, not the server's."
        )
    if any(DISTURBED_MARK in cell for cell in cells):
        lines.append(
            f"{DISTURBED_MARK} other processes used > 10% of a benchmark core during"
            " (some of) that run: its numbers are disturbed."
        )
    background = document.get("background_load") or {}
    if any(v > 0.10 for v in background.values()):
        lines.append(
            "Warning: the cores were already busy before the run: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in background.items())
        )
    if rows:
        lines.append(
            "Ratios are webchat / baseline: above 1 is better for rates, below 1 for "
            "latency and memory."
        )
    if cluster:
        lines.append(render_cluster(cluster))
    storm = results.get("storm")
    if storm:
        lines.extend(storm_lines(storm))
    if results.get("connect-auth"):
        lines.extend(connect_auth_lines(results["connect-auth"]))
    if results.get("api"):
        lines.extend(api_lines(results["api"]))
    checks = document.get("issue_targets") or []
    if checks:
        lines.append("Targets (webchat; issues #5, #13, #14 and #15):")
        for item in checks:
            verdict = {True: "met", False: "NOT met", None: "n/a"}[item["met"]]
            note = f" ({item['note']})" if item["note"] else ""
            lines.append(f"  {verdict:8} {item['target']}: {item['shown']}{note}")
    return "\n".join(lines)


def render_cluster(cluster: dict[str, Any]) -> str:
    """The cluster scenario: each rate on both setups, then Redis's PUBLISH rate."""
    if "error" in cluster and not cluster.get("setups"):
        return f"cluster: error: {cluster['error']}"
    cpus = cluster["cpus"]
    setups = cluster.get("setups", {})
    split = next(
        (s["receivers_per_node"] for s in setups.values() if len(s["nodes"]) > 1),
        None,
    )
    lines = [
        "",
        f"Cluster (issue #6): {cluster['receivers']} receivers"
        + (f" ({' + '.join(map(str, split))} on 2 nodes)" if split else "")
        + f", {cluster['senders']} sender(s) on node 1, {cluster['payload_bytes']} B,"
        f" {cluster['step_seconds']:g} s per rate.  CPUs: node 1 + Redis"
        f" {cpus['redis']}, node 2 {cpus['node2']}, load generator {cpus['loadgen']}.",
    ]
    head = [
        "offered/s",
        "setup",
        "deliveries/s",
        "lost",
        "p50/p99/max ms",
        "local p50/p99/max",
        "remote (Redis) p50/p99/max",
        "CPU node1/node2/redis (core)",
        "loadgen",
        "",
    ]
    rows: list[list[str]] = []
    rates = cluster.get("rates", [])
    by_rate = {
        name: {s["offered_deliveries_per_s"]: s for s in setup.get("steps", [])}
        for name, setup in setups.items()
    }
    for rate in rates:
        for n, name in enumerate(setups):
            step = by_rate[name].get(round(rate, 1))
            rows.append(_cluster_row(_rate(rate) if n == 0 else "", name, step))
    for n, (name, setup) in enumerate(setups.items()):
        if "error" in setup:
            rows.append(["max passing" if n == 0 else "", name, "error"])
            continue
        rows.append(
            _cluster_row(
                "max passing" if n == 0 else "", name, setup.get("max_passing")
            )
        )
    width = len(head)
    lines.append(_format_rows(head, [r + [""] * (width - len(r)) for r in rows]))
    marks = [c for r in rows for c in r[2:3]]
    if any(SATURATION_MARK in c for c in marks):
        lines.append(
            f"{SATURATION_MARK} the load generator was saturated: that rate may be its"
            " limit, not the servers'."
        )
    if any(DISTURBED_MARK in c for c in marks):
        lines.append(
            f"{DISTURBED_MARK} other processes used > 10% of a benchmark core."
        )
    lines.append(
        "deliveries/s: the step's deliveries over the time they took (sending, then"
        " draining); max passing: the highest rate with p99 <= 100 ms, nothing lost."
    )
    lines.extend(_publish_lines(cluster.get("publish") or {}))
    lines.append(cluster["note"])
    return "\n".join(lines)


def _cluster_row(rate: str, name: str, step: dict[str, Any] | None) -> list[str]:
    if step is None:
        return [rate, name, "-"]

    def latency(r: dict[str, Any] | None) -> str:
        if not r:
            return "-"
        return f"{_ms(r['p50_ms'])}/{_ms(r['p99_ms'])}/{_ms(r['max_ms'])}"

    by_node = step.get("by_node", {})
    cpu = step.get("cpu", {})
    shares = "/".join(
        "-" if cpu.get(k) is None else _pct(cpu[k]) for k in ("node1", "node2", "redis")
    )
    rate_cell = _rate(step["deliveries_per_s"])
    if step.get("loadgen_saturated"):
        rate_cell += SATURATION_MARK
    if step.get("disturbed"):
        rate_cell += DISTURBED_MARK
    lost = step["lost"]
    return [
        rate,
        name,
        rate_cell,
        f"{lost:,}" if lost else "0",
        latency(step),
        latency(by_node.get("local")),
        latency(by_node.get("remote")),
        f"{shares} ({_pct(step.get('server_core_busy'))})",
        _pct(step.get("loadgen_cpu")),
        "pass" if step["passed"] else "FAIL",
    ]


def _publish_lines(publish: dict[str, Any]) -> list[str]:
    if not publish:
        return []
    if "error" in publish and not publish.get("runs"):
        return [f"redis-benchmark: {publish['error']}"]
    lines = [
        f"Redis PUBLISH, {publish['message_bytes']} B messages, redis-benchmark -q -n"
        f" {publish['requests']:,} (Redis on CPU {publish['redis_cpu']},"
        f" redis-benchmark and subscribers on CPU {publish['benchmark_cpu']}):"
    ]
    for run in publish["runs"]:
        how = f"-P {run['pipeline']}" if run["pipeline"] else "no -P (50 clients)"
        rate = run.get("requests_per_s")
        shown = "?" if rate is None else f"{_rate(rate)}/s"
        note = f" ({run['error']})" if "error" in run else ""
        lines.append(f"  {how:18} {run['subscribers']} subscriber(s): {shown}{note}")
    if "publish_per_subscriber_us" in publish:
        lines.append(
            f"  -> Redis spends ~{publish['publish_base_us']:.2f} µs per PUBLISH"
            f" + {publish['publish_per_subscriber_us']:.2f} µs per subscriber"
            " (pipelined)"
        )
    return lines


def _slow_cell(run: dict[str, Any] | None) -> str:
    if not run or not run.get("slow"):
        return ""
    slow = run["slow"]
    # Its TCP state as the client sees it (it never reads, so never sees a frame).
    state = {
        "established": "still open",
        "close_wait": "closed by server",
        "closed": "reset by server",
    }.get(slow.get("tcp_state"), slow.get("tcp_state") or "?")
    if slow.get("server_log_too_slow"):
        state += " (1008 too slow)"
    return f"{state}, {slow['owed_bytes'] / 1048576:.1f} MiB sent its way"


def _calibration_line(calibrate: dict[str, Any]) -> str:
    best = calibrate.get("deliveries_per_s") or 0
    cpu = calibrate.get("loadgen_cpu") or 0
    estimate = best / cpu if cpu else None
    return (
        f"Load generator calibration (C fan-out server): {_rate(best)} deliveries/s"
        f" passed at {_pct(cpu)} loadgen CPU"
        + (f" -> ceiling ~{_rate(estimate)} deliveries/s at 100%" if estimate else "")
    )


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.0f}%"


def _format_rows(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = []
    for n, row in enumerate([head, *rows]):
        out.append(
            "  ".join(
                cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
