"""Every limit the server enforces, with its default, in one place.

The options in ``tap.py``, the code and ``docs/operations.md`` all take their
numbers from here, so a default cannot drift between what the server does and
what the help says.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

#: Connections the kernel holds for us, completed but not yet accepted, on a
#: TCP/TLS --port that does not say ``backlog=``.  Twisted's default is 50;
#: when every page reconnects at once (a restart, a network blip) the kernel
#: silently drops the SYNs beyond it, and those clients retry 1, 3, 7, 15 s
#: later.  The kernel caps it at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 1024
#: Largest message (and single frame) a client may send, in bytes.
MAX_MESSAGE_SIZE = 64 * 1024
#: Messages per second a connection may send, on average ...
RATE_LIMIT = 20.0
#: ... and how many it may send in one burst.
RATE_BURST = 60
#: Most frames one message may arrive in.  Browsers never split a message;
#: a client library that writes 4 KiB frames needs 16 for a 64 KiB message.
#: Without a cap, a message of empty continuation frames never ends and grows
#: the server's memory by every frame (issue #9).
MAX_MESSAGE_FRAMES = 128
#: Frames per second a connection may send, of every kind: text, continuation,
#: ping, pong, close.  A browser at the message rate limit sends at most
#: RATE_LIMIT (20) a second plus one pong per ping: 50 times less.  Each frame
#: costs the server a few microseconds however small it is, so this, not the
#: message rate, is what bounds a flood of tiny frames.
FRAME_RATE_LIMIT = 1000.0
#: Seconds' worth of FRAME_RATE_LIMIT a connection may send in one burst.
FRAME_BURST_SECONDS = 2.0
#: Incoming bytes a connection may send, as a multiple of what --rate-limit
#: messages of --max-message-size a second (a burst: --rate-burst of them)
#: take: the rest covers frame headers and control frames.
BYTE_BUDGET_FACTOR = 2
#: The byte budget's burst is at least one full read from a socket (Twisted
#: reads 64 KiB at a time), so a single read can never exceed it by itself.
MIN_BYTE_BURST = 64 * 1024
#: Unsent bytes the server queues for one client before calling it too slow.
MAX_SEND_BUFFER = 1024 * 1024
#: Seconds between pings to a quiet client.
PING_INTERVAL = 30.0
#: Seconds a client has to show any sign of life after a ping.
PING_TIMEOUT = 10.0
#: Seconds from TCP accept to a complete HTTP request (or WebSocket opening).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a plain HTTP response (the page, /healthz, /metrics) may take to
#: be sent once its request is read; a client that stops reading is cut off.
RESPONSE_TIMEOUT = 30.0
#: Requests one keep-alive HTTP connection may make; the response to the last
#: says ``Connection: close`` and whatever else the client pipelined is never
#: read.  A browser fetches the page and two files; without a cap one
#: connection could pipeline tens of thousands of requests in one write and
#: keep the reactor answering them, in one turn, long after it hung up.  Not
#: an option: nginx's keepalive_requests was 100 for years.
MAX_REQUESTS_PER_CONNECTION = 100
#: Seconds shutdown waits for clients to answer close 1001.
SHUTDOWN_GRACE = 5.0
#: Seconds a client closed for cause (1002, 1008, 1009, ...) has to answer the
#: close frame before its TCP connection is dropped, and what it holds with it.
#: Not an option: short, because such a client is usually hostile or stuck.
CLOSE_TIMEOUT = 1.0
#: How long (seconds) a member may hold more than ``--max-send-buffer``
#: unsent while taking a big turn before it is too slow: a reader drains a
#: turn of MBs in milliseconds on a LAN and in a few seconds on a slow link;
#: one that does not read keeps only views of shared buffers meanwhile.
#: Not an option.
OVER_GRACE = 5.0
#: Connections per client address; 0 = no cap (behind a proxy all share one).
MAX_CONNECTIONS_PER_IP = 0
#: Rooms open at once; a join that would open one more gets HTTP 503.
#: 0 = no cap.  Generous: an empty room costs nothing (it is freed), an open
#: one a few hundred bytes.
MAX_ROOMS = 10000
#: Bytes of a JSON ``message`` event that are not its text (type, room,
#: name, ids, time, escaping slack): a text may be this much shorter than
#: --max-message-size, so its event still fits the frame limit.
JSON_OVERHEAD = 256
#: Bad client events (malformed JSON, unknown types, wrong fields) a JSON
#: connection may send within BAD_EVENTS_WINDOW seconds; one more closes it
#: with 1008 "too many bad events".
BAD_EVENTS_MAX = 10
BAD_EVENTS_WINDOW = 10.0
#: Seconds between two ``typing`` events relayed for one member; the ones in
#: between are dropped without a word.
TYPING_INTERVAL = 2.0
#: Longest name, in characters (after trimming).
MAX_NAME_CHARS = 32
#: Messages each room remembers for joiners and reconnects (--history);
#: 0 = none (messages are still numbered, nothing is kept).
HISTORY = 100
#: Seconds a message is kept and replayed (--history-ttl); 0 = no age limit.
#: An emptied room keeps its history this long after its newest message.
HISTORY_TTL = 86400.0
#: Rooms whose history is kept in memory at once; past it the idle room
#: emptied longest ago is forgotten (open rooms never are: --max-rooms
#: bounds them).  Not an option: with the per-room bound (--history x
#: --max-message-size) it bounds the memory history may take.
MAX_HISTORY_ROOMS = 10000
#: Seconds a node of a cluster (--redis) may go unheard before the other
#: nodes count its members as gone (--presence-timeout); each node beats
#: every third of it, so a live node is heard about three times a timeout.
PRESENCE_TIMEOUT = 30.0
#: Messages a node keeps while Redis is away (--outage-buffer), to append
#: to the rooms' Streams when it is back (marked delayed); past it, what
#: its clients say still reaches this node's members but no other node, is
#: not kept, and is counted (webchat_outage_dropped_total).  At most this
#: many x --max-message-size bytes (10000 x 64 KiB: 640 MB at the very
#: worst; a few MB for ordinary chat lines).
OUTAGE_BUFFER = 10000
#: Members of other nodes a node keeps track of, all rooms together: anyone
#: who can PUBLISH on the channel could otherwise make it hold any number.
#: Not an option: a hundred thousand people are ~20 MB of bookkeeping.
MAX_REMOTE_MEMBERS = 100_000
#: Other nodes a node keeps track of (real or claimed on the channel).
MAX_REMOTE_NODES = 1000
#: Requests per second the server API (--api-key-file) takes from its key,
#: on average (--api-rate-limit); faster gets HTTP 429 with Retry-After.
#: 0 = off.  Generous: the API is the app's, one trusted caller.
API_RATE_LIMIT = 1000.0
#: Seconds' worth of API_RATE_LIMIT the key may spend in one burst.
API_BURST_SECONDS = 2.0
#: Bytes of an API request body beyond --max-message-size (the JSON around
#: the text: "from", "idempotency_key", escaping): bigger gets 413 unread.
API_BODY_OVERHEAD = 4096
#: The cap on an API body when --max-message-size is 0 (no message limit):
#: a body is read into memory, so it is never unbounded.
API_MAX_BODY = 16 * 1024 * 1024
#: Seconds an ``idempotency_key`` of a published message is remembered: a
#: repeat within it gets the first answer and delivers nothing.
API_IDEMPOTENCY_WINDOW = 600.0
#: Seconds a key is claimed while its message is on its way (with --redis):
#: a node that dies meanwhile leaves the key free again this soon, not after
#: the whole window; a repeat within it gets 409 "in_progress".
API_IDEMPOTENCY_CLAIM = 10.0
#: Idempotency keys one node remembers without --redis (the oldest go
#: first past it); with --redis they live in Redis, with their TTL.
API_IDEMPOTENCY_MAX = 100_000

#: Seconds one webhook request may take, connecting to reading the whole
#: answer (--webhook-timeout); past it the attempt counts as failed and is
#: retried.
WEBHOOK_TIMEOUT = 10.0
#: Seconds a user's last connection may stay closed before ``user.offline``
#: is sent (--webhook-offline-delay): a page reload reconnects well within
#: it, and is then neither an offline nor an online.
WEBHOOK_OFFLINE_DELAY = 3.0
#: Webhook events waiting to be sent, at most (--webhook-queue); past it the
#: newest are dropped and counted (webchat_webhook_dropped_total).  Each is
#: a few hundred bytes, or a message's text (--max-message-size) for
#: ``message`` events: 10000 x 64 KiB = 640 MB at the very worst.
WEBHOOK_QUEUE = 10000
#: The first retry of a failed webhook request waits about this long
#: (seconds), each next one twice as long, up to WEBHOOK_RETRY_MAX; each
#: wait is jittered down by up to half so nodes do not retry in step.  Not
#: options: the receiver being down is what they wait out.
WEBHOOK_RETRY_INITIAL = 0.5
WEBHOOK_RETRY_MAX = 60.0
#: How old (seconds) a webhook's Webchat-Timestamp may be before a receiver
#: should refuse it as a replay (docs/webhooks.md; webhooks.signing.verify).
WEBHOOK_SIGNATURE_TOLERANCE = 300.0
#: Seconds of clock skew allowed between the app that signs tokens and this
#: server when checking ``exp`` and ``nbf`` (--auth): a token is refused as
#: expired only this long after its ``exp``, and accepted this long before
#: its ``nbf``.  Not an option: keep the clocks in sync (NTP) instead.
JWT_LEEWAY = 30
#: Longest ``?token=`` accepted, in characters (then HTTP 401 "token too
#: long"): a token with a few claims is 200-1000; the request line must
#: still fit the 16 KB header limit.
JWT_MAX_LENGTH = 4096
#: Longest user id (a token's ``sub``), in characters: it travels in JSON
#: events and between nodes (--redis), so it is bounded and printable.
MAX_USER_CHARS = 256
#: File descriptors kept back from --max-connections for listening sockets,
#: log files, page requests and Redis, so accept() never fails with EMFILE.
FD_RESERVE = 64


def default_max_connections() -> int:
    """The open-file limit (after raising it as far as allowed) minus a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - FD_RESERVE)


def raise_open_file_limit() -> int:
    """
    Raise the soft open-file limit to the hard one and return the new soft limit.

    Every WebSocket is a file descriptor; the usual soft limit of 1024 would cap
    a chat server long before memory does.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


@dataclass(frozen=True)
class Limits:
    """What one connection may do and hold; 0 turns a limit off."""

    max_message_size: int = MAX_MESSAGE_SIZE
    max_message_frames: int = MAX_MESSAGE_FRAMES
    rate_limit: float = RATE_LIMIT
    rate_burst: int = RATE_BURST
    frame_rate_limit: float = FRAME_RATE_LIMIT
    max_send_buffer: int = MAX_SEND_BUFFER
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    #: Not on the command line (see CLOSE_TIMEOUT); tests on a loaded machine
    #: may need longer.
    close_timeout: float = CLOSE_TIMEOUT
    #: 0 here means "no cap"; the command line fills in default_max_connections().
    max_connections: int = 0
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    max_rooms: int = MAX_ROOMS
    history: int = HISTORY
    history_ttl: float = HISTORY_TTL

    @property
    def max_text_bytes(self) -> int:
        """Longest text a JSON ``message`` event may carry (0 = no limit)."""
        if not self.max_message_size:
            return 0
        return max(self.max_message_size - JSON_OVERHEAD, 1)

    @property
    def frame_burst(self) -> int:
        """Frames a connection may send at once (FRAME_BURST_SECONDS' worth)."""
        return max(int(self.frame_rate_limit * FRAME_BURST_SECONDS), 1)

    @property
    def byte_rate(self) -> float:
        """
        Incoming bytes a second one connection may send; 0 = no byte budget.

        Derived from the message limits, so raising those never makes the
        byte budget trip first: off with ``--rate-limit 0`` or
        ``--max-message-size 0``.
        """
        return BYTE_BUDGET_FACTOR * self.rate_limit * self.max_message_size

    @property
    def byte_burst(self) -> int:
        """Incoming bytes one connection may send at once."""
        burst = BYTE_BUDGET_FACTOR * max(self.rate_burst, 1) * self.max_message_size
        return max(burst, MIN_BYTE_BURST)
