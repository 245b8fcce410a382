"""The processes a benchmark run starts, pinned to their CPUs, and never left behind.

Every child goes through one :class:`ProcessRegistry`, which the command line
closes in a ``finally``: on a normal end, an exception or Ctrl-C, each child
gets SIGTERM, then SIGKILL if it lingers.  Children are also told by the
kernel to die with the driver (``PR_SET_PDEATHSIG``), for the one case no
``finally`` covers: the driver itself being killed.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.helpers import process_cpu_seconds

_PR_SET_PDEATHSIG = 1


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def child_setup(cpu: int | None) -> Callable[[], None]:
    """
    What a child does between fork and exec: pin itself to ``cpu``, raise its
    open-file limit to the hard limit (15,000 connections need 15,000 files),
    and arrange to be killed if the driver dies.

    The C library is loaded here, before the fork, because the child must not
    load anything.
    """
    libc = _libc()

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


class ProcessRegistry:
    """Starts children and stops every one of them, however the run ends."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: Sequence[str | Path], cpu: int | None, **popen: Any
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [str(part) for part in command],
            # preexec_fn is safe here: the driver runs no threads.
            preexec_fn=child_setup(cpu),
            # Its own session: a Ctrl-C at the terminal reaches only the
            # driver, which then stops the children in order.
            start_new_session=True,
            **popen,
        )
        self._children.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL.  Returns the exit status."""
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        finally:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            if process in self._children:
                self._children.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        """Stop the children, newest first (load generators before servers)."""
        for process in reversed(list(self._children)):
            try:
                self.stop(process, timeout=5.0)
            except Exception:  # whatever went wrong, stop the rest too
                if process.poll() is None:
                    process.kill()


def pick_cpus(server_cpu: int | None, client_cpu: int | None) -> tuple[int, int]:
    """
    The server's CPU and the load generator's: by default the first two this
    process may use.  With a single CPU both share it, and the report says so.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if server_cpu is None:
        server_cpu = allowed[0]
    if client_cpu is None:
        others = [cpu for cpu in allowed if cpu != server_cpu]
        client_cpu = others[0] if others else server_cpu
    return server_cpu, client_cpu


def core_times(cpu: int) -> dict[str, int] | None:
    """Jiffies one core spent busy, and in all, since boot (from /proc/stat)."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                v += [0] * (8 - len(v))
                # user nice system idle iowait irq softirq steal (guest is in user)
                total = sum(v)
                return {"busy": total - v[3] - v[4], "total": total}
    except OSError:
        return None
    return None


def task_times() -> dict[tuple[int, int], tuple[float, int]]:
    """
    Every task (thread) on the machine: (CPU seconds so far, core it last
    ran on), by (pid, tid).  Kernel threads included.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    tasks: dict[tuple[int, int], tuple[float, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after the ")": state is 0, utime 11, stime 12, processor 36
            cpu_seconds = (int(fields[11]) + int(fields[12])) / ticks
            tasks[pid, int(tid)] = (cpu_seconds, int(fields[36]))
    return tasks


class UsageMeter:
    """
    Between :meth:`start` and :meth:`read`: the share of one core the measured
    process used (its own time, all threads), and for each core how busy it
    was and how much of that was someone else's work.

    Process time and core time differ: on loopback much of the kernel's TCP
    work runs as softirq, some billed to whichever task it interrupted and
    some to no task at all.  Someone else's work is measured directly: the
    CPU time of every task that is not ours, put on the core it last ran on.
    A step where that exceeds a tenth of a core is disturbed, and the report
    says so.  (A task that starts and ends between two readings is missed.)
    """

    def __init__(
        self,
        pid: int | None,
        cores: dict[str, int],
        ours: list[int] | None = None,
    ) -> None:
        self._pid = pid
        self._cores = cores
        self._ours = set(ours or [])
        if pid is not None:
            self._ours.add(pid)
        self.start()

    def _sample(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "cpu": None if self._pid is None else process_cpu_seconds(self._pid),
            "cores": {name: core_times(cpu) for name, cpu in self._cores.items()},
            "tasks": task_times(),
        }

    def start(self) -> None:
        self._start = self._sample()

    def read(self) -> dict[str, float | None]:
        """
        ``process`` (the measured pid's share of a core), and per core name
        ``<name>_core`` (busy share) and ``<name>_core_other`` (share used by
        tasks not ours); None where unknown.
        """
        a, b = self._start, self._sample()
        wall = b["t"] - a["t"]
        usage: dict[str, float | None] = {"process": None}
        if a["cpu"] is not None and b["cpu"] is not None and wall > 0:
            usage["process"] = round((b["cpu"] - a["cpu"]) / wall, 3)
        foreign: dict[int, float] = {}
        for key, (seconds, core) in b["tasks"].items():
            if key[0] in self._ours:
                continue
            before = a["tasks"].get(key)
            used = seconds - (before[0] if before else 0.0)
            if used > 0:
                foreign[core] = foreign.get(core, 0.0) + used
        for name, cpu in self._cores.items():
            c0, c1 = a["cores"].get(name), b["cores"].get(name)
            busy = None
            if c0 is not None and c1 is not None and c1["total"] > c0["total"]:
                busy = round((c1["busy"] - c0["busy"]) / (c1["total"] - c0["total"]), 3)
            usage[f"{name}_core"] = busy
            usage[f"{name}_core_other"] = (
                round(foreign.get(cpu, 0.0) / wall, 3) if wall > 0 else None
            )
        return usage


def background_load(cores: dict[str, int], seconds: float = 1.0) -> dict[str, float]:
    """How busy each core is before the run starts (someone else's work)."""
    meter = UsageMeter(None, cores)
    time.sleep(seconds)
    usage = meter.read()
    return {name: usage.get(f"{name}_core") or 0.0 for name in cores}
