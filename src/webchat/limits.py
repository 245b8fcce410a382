"""Every limit the server enforces, with its default, in one place.

The options in ``tap.py``, the code and ``docs/operations.md`` all take their
numbers from here, so a default cannot drift between what the server does and
what the help says.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

#: Largest message (and single frame) a client may send, in bytes.
MAX_MESSAGE_SIZE = 64 * 1024
#: Messages per second a connection may send, on average ...
RATE_LIMIT = 20.0
#: ... and how many it may send in one burst.
RATE_BURST = 60
#: Unsent bytes the server queues for one client before calling it too slow.
MAX_SEND_BUFFER = 1024 * 1024
#: Seconds between pings to a quiet client.
PING_INTERVAL = 30.0
#: Seconds a client has to show any sign of life after a ping.
PING_TIMEOUT = 10.0
#: Seconds from TCP accept to a complete HTTP request (or WebSocket opening).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds shutdown waits for clients to answer close 1001.
SHUTDOWN_GRACE = 5.0
#: Seconds a client closed for cause (1002, 1008, 1009, ...) has to answer the
#: close frame before its TCP connection is dropped, and what it holds with it.
#: Not an option: short, because such a client is usually hostile or stuck.
CLOSE_TIMEOUT = 1.0
#: Connections per client address; 0 = no cap (behind a proxy all share one).
MAX_CONNECTIONS_PER_IP = 0
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
    rate_limit: float = RATE_LIMIT
    rate_burst: int = RATE_BURST
    max_send_buffer: int = MAX_SEND_BUFFER
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    #: 0 here means "no cap"; the command line fills in default_max_connections().
    max_connections: int = 0
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
