"""
What the fan-out hot path costs in Python, per member, without sockets.

Run from the repository root::

    .venv/bin/python -m benchmarks.flush_cost

One reactor turn's flush (``Rooms.flush``: the seed codec encoding the
turn once, then the room's fan-out) to 1000 members whose ``deliver`` is the
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

from webchat.connection import _OPEN, WebChatProtocol
from webchat.limits import Limits
from webchat.metrics import ChatStats
from webchat.rooms import LOBBY, Rooms

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
    _queue = None  # views of a big turn waiting for Twisted (none here)
    _draining = False

    def __init__(self, chat_id: int) -> None:
        self.chat_id = chat_id
        self.state = _OPEN
        self.transport = SimpleNamespace(_tempDataLen=0, dataBuffer=b"")
        self._socket = TakesEverything()
        self.factory = SimpleNamespace(limits=Limits())
        self._sure_fit = Limits().max_send_buffer - KERNEL_SHARE


# The helpers deliver calls on its slow paths, where this version has them.
for _name in ("_room", "_buffered", "_backlog_limit", "_too_slow", "_take_later"):
    if hasattr(WebChatProtocol, _name):
        setattr(Member, _name, getattr(WebChatProtocol, _name))


def main() -> None:
    rooms = Rooms(Clock(), ChatStats(), release_memory=lambda: None)
    members = [Member(chat_id) for chat_id in range(1, MEMBERS + 1)]
    for member in members:
        room = rooms.join(LOBBY, member)
    text = b"x" * 64

    def turn(senders: int) -> None:
        for member in members[:senders]:
            room.publish(member, text)
        rooms.flush()

    for senders in (1, 10):
        runs = timeit.repeat(functools.partial(turn, senders), number=100, repeat=60)
        best = min(runs) / 100
        print(
            f"S={senders:<2}: {best * 1e6:7.1f} us a turn to {MEMBERS} members, "
            f"{best / MEMBERS * 1e9:.0f} ns a member"
        )


if __name__ == "__main__":
    main()
