"""What the server counts, and how Prometheus reads it.

The hot path only bumps plain integers on a ``ChatStats``; nothing is
formatted or locked per message.  A custom collector turns those numbers
into metric families when ``/metrics`` is scraped, so each server (and each
test) has its own registry and no module-level state exists.  The scrape
runs on the reactor thread (:class:`MetricsPage`), the only thread that
changes those numbers, so it reads them between two events, never during one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from webchat import __version__
from webchat.codecs import JSON, SEED

if TYPE_CHECKING:
    from webchat.chat import WebChatFactory

#: Every reason a handshake can be refused, so each series exists from zero.
REFUSAL_REASONS = (
    "origin",
    "max_connections",
    "max_connections_per_ip",
    "draining",
    "http_version",
    "bad_room",
    "max_rooms",
    # --auth (webchat.auth): 401s, then 403s.
    "missing_token",
    "invalid_token",
    "token_expired",
    "token_not_yet_valid",
    "token_too_long",
    "room_not_granted",
    "private_room",
)
#: Every kind of connection the server ends for cause.
DROP_REASONS = (
    "too_slow",
    "rate_limited",
    "frame_rate_limited",
    "byte_rate_limited",
    "too_many_frames",
    "message_timeout",
    "ping_timeout",
    "handshake_timeout",
    "idle_preconnect",
    "message_too_big",
    "invalid_utf8",
    "protocol_error",
    "unsupported_data",
    "internal_error",
    "response_timeout",
    "request_body",
    "header_too_large",
    "request_limit",
    "bad_events",
)
#: Every error code a JSON client event can earn (docs/protocol.md).
BAD_EVENT_CODES = (
    "bad_json",
    "unknown_type",
    "bad_event",
    "message_too_big",
    "bad_name",
    "name_taken",
    "bad_resume",
)
#: Fan-out time buckets, in seconds: 10 µs .. 1 s.
FANOUT_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


#: Why presence of another node is dropped (webchat_redis_presence_dropped).
PRESENCE_DROP_REASONS = ("over_cap", "malformed", "conflict", "busy")


class ChatStats:
    """The server's counters: plain numbers, cheap to bump."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed: Counter[int] = Counter()
        self.refused: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        #: Bad JSON events answered with an ``error``, by its code.
        self.bad_events: Counter[str] = Counter()
        self.messages_received = 0
        self.deliveries = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        #: Messages sent from history (on join, on resume).
        self.history_replayed = 0
        #: Resumes answered, by whether everything missed was sent ("true").
        self.resumes: Counter[str] = Counter()
        #: Server API answers, by HTTP status and error code ("ok": none).
        self.api: Counter[tuple[int, str]] = Counter()
        # Not registered anywhere: the collector below reports it.
        self.fanout_seconds = Histogram(
            "webchat_fanout_seconds",
            "Time from receiving a message to handing its last copy to the transports.",
            buckets=FANOUT_BUCKETS,
            registry=None,
        )


class ChatCollector(Collector):
    """Reads one factory's ``ChatStats`` at scrape time."""

    def __init__(self, factory: WebChatFactory) -> None:
        self._factory = factory

    def collect(self) -> Iterator[Metric]:
        factory = self._factory
        stats = factory.stats
        yield InfoMetricFamily(
            "webchat_build", "webchat version", {"version": __version__}
        )
        yield GaugeMetricFamily(
            "webchat_connections", "Open WebSocket connections.", len(factory.rooms)
        )
        yield GaugeMetricFamily("webchat_rooms", "Rooms open.", factory.rooms.open)
        members = GaugeMetricFamily(
            "webchat_members", "Room members, by wire format.", labels=["codec"]
        )
        for codec in (SEED, JSON):
            members.add_metric([codec.name], factory.rooms.members(codec))
        yield members
        yield CounterMetricFamily(
            "webchat_connections_opened",
            "WebSocket connections opened (handshake completed).",
            stats.opened,
        )
        closed = CounterMetricFamily(
            "webchat_connections_closed",
            "WebSocket connections closed, by close code (1006: dropped without "
            "a close frame).",
            labels=["code"],
        )
        for code, count in sorted(dict(stats.closed).items()):
            closed.add_metric([str(code)], count)
        yield closed
        yield _by_reason(
            "webchat_handshakes_refused",
            "Opening handshakes refused, by reason.",
            REFUSAL_REASONS,
            stats.refused,
        )
        yield _by_reason(
            "webchat_connections_dropped",
            "Connections the server ended for cause, by reason (too_slow: slow "
            "readers; rate_limited: flooders; idle_preconnect: sent no request "
            "before the handshake deadline, as browsers' spare connections do).",
            DROP_REASONS,
            stats.dropped,
        )
        yield _by_reason(
            "webchat_bad_events",
            "JSON client events answered with an error event, by its code.",
            BAD_EVENT_CODES,
            stats.bad_events,
        )
        yield CounterMetricFamily(
            "webchat_messages_received",
            "Chat messages received.",
            stats.messages_received,
        )
        yield CounterMetricFamily(
            "webchat_deliveries",
            "Copies of chat messages handed to recipients' transports.",
            stats.deliveries,
        )
        yield CounterMetricFamily(
            "webchat_received_bytes",
            "WebSocket bytes received (after the handshake).",
            stats.bytes_received,
        )
        yield CounterMetricFamily(
            "webchat_sent_bytes", "WebSocket bytes sent.", stats.bytes_sent
        )
        yield from stats.fanout_seconds.collect()
        yield from _history_metrics(factory)
        yield _api_metric(factory.stats)
        link = factory.link
        if link is not None:
            yield GaugeMetricFamily(
                "webchat_redis_up",
                "1 while both connections to Redis work, else 0.",
                1 if link.state == "up" else 0,
            )
            yield CounterMetricFamily(
                "webchat_redis_published",
                "Messages published to other nodes.",
                link.published,
            )
            yield CounterMetricFamily(
                "webchat_redis_received",
                "Messages received from other nodes.",
                link.received,
            )
            yield CounterMetricFamily(
                "webchat_redis_relay_failures",
                "Messages that could not be published (Redis down or stalled).",
                link.relay_failures,
            )
            yield CounterMetricFamily(
                "webchat_redis_reconnects",
                "Times a connection to Redis was re-established.",
                link.reconnects,
            )
            yield CounterMetricFamily(
                "webchat_redis_malformed",
                "Payloads on the channel that were not envelopes, dropped.",
                link.malformed,
            )
            yield CounterMetricFamily(
                "webchat_redis_oversized",
                "Envelopes whose text was over --max-message-size, dropped.",
                link.oversized,
            )
            yield GaugeMetricFamily(
                "webchat_outage_buffered",
                "Messages said here while Redis was away, waiting to be kept "
                "(--outage-buffer).",
                len(link.later),
            )
            yield CounterMetricFamily(
                "webchat_outage_dropped",
                "Messages said here while Redis was away past --outage-buffer: "
                "they reached only this node's clients and were not kept.",
                link.outage_dropped,
            )
            yield GaugeMetricFamily(
                "webchat_redis_remote_members",
                "Members of other nodes this node knows of (all rooms).",
                link.presence.members,
            )
            yield _by_reason(
                "webchat_redis_presence_dropped",
                "Presence of other nodes not taken, by reason (over_cap: over "
                "the remote member or node cap; malformed: a bad presence hash "
                "field; conflict: an id another node holds; busy: too many "
                "presence reads at once).",
                PRESENCE_DROP_REASONS,
                link.presence.dropped,
            )


def _api_metric(stats: ChatStats) -> Metric:
    """The server API's answers (docs/operations.md, "The server API")."""
    api = CounterMetricFamily(
        "webchat_api_requests",
        "Server API requests answered, by HTTP status and error code (ok: none).",
        labels=["status", "error"],
    )
    for (status, error), count in sorted(dict(stats.api).items()):
        api.add_metric([str(status), error], count)
    return api


def _history_metrics(factory: WebChatFactory) -> Iterator[Metric]:
    """History and resuming (docs/operations.md, "History")."""
    stats = factory.stats
    history = factory.rooms.history
    counts = history.stats if history is not None else None
    yield GaugeMetricFamily(
        "webchat_history_rooms",
        "Rooms whose history (or numbering) is kept, open or idle.",
        counts.rooms if counts else 0,
    )
    yield GaugeMetricFamily(
        "webchat_history_messages",
        "Messages of history held in memory.",
        counts.messages if counts else 0,
    )
    yield GaugeMetricFamily(
        "webchat_history_bytes",
        "Bytes of message text of history held in memory.",
        counts.bytes if counts else 0,
    )
    yield CounterMetricFamily(
        "webchat_history_replayed",
        "Messages sent from history (on join and on resume).",
        stats.history_replayed,
    )
    resumes = CounterMetricFamily(
        "webchat_resumes",
        "Resumes answered (URL since= or resume event), by whether every "
        "missed message could be sent.",
        labels=["recovered"],
    )
    for recovered in ("true", "false"):
        resumes.add_metric([recovered], stats.resumes[recovered])
    yield resumes
    yield CounterMetricFamily(
        "webchat_history_write_failures",
        "Messages that could not be written to the history database.",
        counts.write_failures if counts else 0,
    )


def _by_reason(
    name: str, documentation: str, reasons: tuple[str, ...], counts: Counter[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    snapshot = dict(counts)
    for reason in dict.fromkeys((*reasons, *snapshot)):
        family.add_metric([reason], snapshot.get(reason, 0))
    return family


def make_registry(factory: WebChatFactory) -> CollectorRegistry:
    """A registry of this server's metrics plus the process's own (RSS, CPU, fds)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ChatCollector(factory))
    if factory.app_events is not None:
        from webchat.webhooks import WebhookCollector

        registry.register(WebhookCollector(factory.app_events.sender))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """
    ``/metrics``, rendered on the reactor thread.

    prometheus_client's own Twisted resource renders through WSGI in the
    reactor's thread pool, so ``collect()`` would read the chat's counters,
    connection set and Redis link while the reactor thread changes them.
    Rendering here costs the reactor one scrape's formatting (a few ms, every
    few seconds) and buys numbers that agree with each other.  The ``Accept``
    header picks the text format or OpenMetrics, as Prometheus asks;
    ``?name[]=...`` narrows the scrape, as with prometheus_client's exporters.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        registry = self._registry
        names = request.args.get(b"name[]")
        if names:
            registry = registry.restricted_registry(
                [name.decode("utf-8", "replace") for name in names]
            )
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encode(registry)
