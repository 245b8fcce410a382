"""What the benchmark, the soak, the floods and the tests all need: one copy each.

A free port on 127.0.0.1, the ``twistd`` to start, and a process's CPU time
and resident memory as Linux's /proc reports them.  Kept free of any
benchmark-only import, so ``tests/support.py`` can use it too.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

#: The checkout the benchmarks run from: ``python -m benchmarks...`` finds
#: this package only with it on ``sys.path`` (the wheel does not ship it).
CHECKOUT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (as of now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd_path() -> str:
    """
    The twistd next to this Python (the venv's, whose webchat is the one
    meant), else the one on PATH.
    """
    found = shutil.which("twistd", path=str(Path(sys.executable).parent))
    found = found or shutil.which("twistd")
    if found is None:
        raise RuntimeError("twistd is not installed next to this Python nor on PATH")
    return found


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (all its threads); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # After the ")" ending the command name: state is field 0, utime 11, stime 12.
    return (int(fields[11]) + int(fields[12])) / ticks


def process_rss_kb(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (VmRSS); None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
