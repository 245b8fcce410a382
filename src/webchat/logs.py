"""Log formats for ``twistd --logger``.

``twistd --logger webchat.logs.json webchat ...`` writes one JSON object per
line to standard output, for log shippers (journald, Vector, Fluent Bit,
Loki).  The default text log is untouched by this module.
"""

from __future__ import annotations

import json as _json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

#: Event keys that are Twisted's bookkeeping, not the event's own fields.
_PRIVATE_PREFIX = "log_"
_SCALARS = (str, int, float, bool, type(None))


def event_as_dict(event: dict[str, Any]) -> dict[str, Any]:
    """
    The fields a log shipper wants: when, how bad, from where, the formatted
    line, and the event's own scalar fields (``id``, ``count``, ``peer``...).
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith(_PRIVATE_PREFIX) or key in record:
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


def json_observer(out: IO[str]) -> Callable[[dict[str, Any]], None]:
    """An observer writing each event to ``out`` as one line of JSON."""

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        out.write(_json.dumps(event_as_dict(event), ensure_ascii=False) + "\n")
        out.flush()

    return observe


def json() -> Callable[[dict[str, Any]], None]:
    """The observer factory ``twistd --logger webchat.logs.json`` calls."""
    return json_observer(sys.stdout)
