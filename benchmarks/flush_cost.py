"""
What the fan-out hot path costs in Python, per member, without sockets.

Run from the repository root::

    .venv/bin/python -m benchmarks.flush_cost

One reactor turn's ``Hub.flush`` to 1000 members whose ``deliver`` is the
real ``WebChatProtocol.deliver``, on a stand-in socket that takes everything
(so the system call is left out and only our own code is timed): one small
message a turn (S=1, the common case) and ten (S=10).  Best of 60 x 100
turns, because on a shared machine only the fastest run means anything.
End to end figures come from ``webchat-bench``; this is for comparing two
versions of the code on the same machine, one after the other.
"""

from __future__ import annotations

import functools
import timeit
from types import SimpleNamespace

from twisted.internet.task import Clock

from webchat.hub import Hub
from webchat.limits import Limits
from webchat.metrics import ChatStats
from webchat.protocol import _OPEN, WebChatProtocol

MEMBERS = 1000
#: What ``connectionMade`` sets up for the default 1 MiB allowance.
KERNEL_SHARE = 512 * 1024


class TakesEverything:
    """A socket whose kernel buffer is never full."""

    def send(self, data: bytes) -> int:
        return len(data)


class Member:
    """Just enough of a connection for ``WebChatProtocol.deliver``."""

    deliver = WebChatProtocol.deliver
    _paused = False
    _backlog = 0
    _kernel_share = KERNEL_SHARE

    def __init__(self, chat_id: int) -> None:
        self.chat_id = chat_id
        self.state = _OPEN
        self.transport = SimpleNamespace(_tempDataLen=0, dataBuffer=b"")
        self._socket = TakesEverything()
        self.factory = SimpleNamespace(limits=Limits())
        self._sure_fit = Limits().max_send_buffer - KERNEL_SHARE


# The helpers deliver calls on its slow paths, where this version has them.
for _name in ("_room", "_buffered", "_backlog_limit", "_too_slow"):
    if hasattr(WebChatProtocol, _name):
        setattr(Member, _name, getattr(WebChatProtocol, _name))


def main() -> None:
    hub = Hub(Clock(), ChatStats())
    members = [Member(hub.allocate_id()) for _ in range(MEMBERS)]
    for member in members:
        hub.join(member)
    frame = b"\x81\x46id 1: " + b"x" * 64

    def turn(senders: int) -> None:
        for member in members[:senders]:
            hub.broadcast(member, frame)
        hub.flush()

    for senders in (1, 10):
        runs = timeit.repeat(functools.partial(turn, senders), number=100, repeat=60)
        best = min(runs) / 100
        print(
            f"S={senders:<2}: {best * 1e6:7.1f} us a turn to {MEMBERS} members, "
            f"{best / MEMBERS * 1e9:.0f} ns a member"
        )


if __name__ == "__main__":
    main()
