"""Rooms' history in Redis: one Stream per room, offsets the same on every node.

Issue #14's Redis part, the Redis side of it (docs/protocol.md, "Between
nodes" has the keys).  Per room, two keys that expire together when the
room has been idle for ``--history-ttl``:

* ``webchat:<channel>:room:<room>``: a hash, ``epoch`` (the room's current
  epoch, ``webchat.history``) and ``offset`` (the last offset given out);
* ``webchat:<channel>:stream:<room>``: a Stream of the room's messages,
  entry id ``<offset>-0`` (so a range of offsets is one ``XRANGE``), fields
  ``id``, ``name``, ``ts``, ``text`` and, for a signed sender only (--auth),
  ``user`` (an anonymous one's entry is as it always was, and an entry
  without ``user`` reads as anonymous), trimmed ``MAXLEN ~ --history``.

``APPEND`` is one Lua script per message: it bumps the room's offset, adds
the entry and PUBLISHes the caller's envelope with the offset (and epoch)
spliced in, so the channel's order *is* the offset order on every node.  A
room whose hash is gone (never used, expired, Redis lost it) starts a new
epoch (the caller's fresh candidate) at offset 1, and the old stream goes
with it: an epoch never mixes two histories.

``RoomStreams`` only talks to Redis (through ``execute``, the relay's
command connection); ``StreamHistory`` is the chat's history store on top
of it (``webchat.history``): with ``--redis`` every message is numbered and
kept by Redis, and every node, the sender's included, delivers it when its
envelope comes back on the channel (``WebChatFactory.deliver_kept``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from webchat.auth import is_user_id
from webchat.codecs import Message
from webchat.history import EPOCH, HistoryCounts, new_epoch
from webchat.limits import HISTORY, HISTORY_TTL, MAX_HISTORY_ROOMS

#: Append one message.  KEYS: the room's hash, its stream.  ARGV: the
#: epoch to start if the room has none, MAXLEN, TTL (s, 0 = none), the
#: sender's id, name, ts, the text, the channel, then the envelope in three
#: parts: before the offset, between offset and epoch, after the epoch
#: ('' channel: publish nothing), then the sender's user id ('': anonymous,
#: and the entry has no ``user`` field).  Returns {offset, epoch}.
_APPEND = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
if tonumber(ARGV[2]) > 0 then
  if ARGV[12] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0',
               'id', ARGV[4], 'name', ARGV[5], 'ts', ARGV[6], 'text', ARGV[7],
               'user', ARGV[12])
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0',
               'id', ARGV[4], 'name', ARGV[5], 'ts', ARGV[6], 'text', ARGV[7])
  end
end
if ARGV[3] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
if ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[8], ARGV[9] .. offset .. ARGV[10] .. epoch .. ARGV[11])
end
return {offset, epoch}
"""

#: A room's epoch and last offset, starting an epoch (the candidate,
#: ARGV[1]) if it has none.  KEYS: the hash, the stream.  ARGV[2]: TTL.
_OPEN = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
end
return {epoch, redis.call('HGET', KEYS[1], 'offset')}
"""


class RoomStreams:
    """The rooms' hashes and Streams of one chat (one channel) in Redis."""

    def __init__(
        self,
        execute: Callable[..., Deferred[Any]],
        channel: str,
        *,
        limit: int = HISTORY,
        ttl: float = HISTORY_TTL,
        clock: Callable[[], float] | None = None,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        #: Runs one Redis command (the relay's command connection).
        self._execute = execute
        self._prefix = f"webchat:{channel}:".encode("ascii")
        #: Messages kept per room (MAXLEN ~: Redis may keep a few more).
        self.limit = limit
        self.ttl = ttl
        self._clock = clock
        self._epochs = epochs

    def _keys(self, room: str) -> tuple[bytes, bytes]:
        name = room.encode("ascii")
        return self._prefix + b"room:" + name, self._prefix + b"stream:" + name

    def open_room(self, room: str) -> Deferred[tuple[str, int]]:
        """The room's epoch and last offset (a new epoch at 0 if it had none)."""
        keys = self._keys(room)
        d = self._execute(b"EVAL", _OPEN, 2, *keys, self._epochs(), int(self.ttl))
        return d.addCallback(lambda reply: (_epoch(reply[0]), _int(reply[1])))

    def append(
        self,
        room: str,
        sender_id: int,
        name: str,
        ts: int,
        text: bytes,
        channel: bytes = b"",
        envelope: tuple[bytes, bytes, bytes] = (b"", b"", b""),
        user: str = "",
    ) -> Deferred[tuple[int, str]]:
        """
        Give ``text`` the room's next offset, keep it (with the sender's
        ``user`` id if signed, for a replay to show), and PUBLISH
        ``envelope[0] + offset + envelope[1] + epoch + envelope[2]`` on
        ``channel`` (none if empty), all at once; fires with (offset, epoch).
        """
        keys = self._keys(room)
        before, between, after = envelope
        d = self._execute(
            b"EVAL",
            _APPEND,
            2,
            *keys,
            self._epochs(),
            self.limit,
            int(self.ttl),
            sender_id,
            name.encode("utf-8"),
            ts,
            text,
            channel,
            before,
            between,
            after,
            user.encode("utf-8"),
        )
        return d.addCallback(lambda reply: (_int(reply[0]), _epoch(reply[1])))

    def read(self, room: str, after: int, upto: int) -> Deferred[Sequence[Message]]:
        """
        The kept messages of ``room`` with ``after < offset <= upto``, oldest
        first, younger than the TTL (by their ``ts``).
        """
        _, stream = self._keys(room)
        d = self._execute(b"XRANGE", stream, b"%d-0" % (after + 1), b"%d-0" % upto)
        oldest = 0
        if self.ttl and self._clock is not None:
            oldest = int((self._clock() - self.ttl) * 1000)
        return d.addCallback(_messages, room, oldest)


class StreamHistory:
    """
    The history store of a chat whose rooms are kept in Redis Streams.

    Redis numbers and keeps every message (``RoomStreams.append``, called by
    the chat itself), so ``append`` has nothing to do.  A room's epoch and
    last offset are known from the kept messages this node has heard on the
    channel (``seen``: every room's, not only its open ones); a room not
    heard of since the link came up is asked of Redis, and its joiners wait
    for the answer (``Room.opening``).
    """

    def __init__(self, streams: RoomStreams, max_rooms: int = MAX_HISTORY_ROOMS):
        self.streams = streams
        self.limit = streams.limit
        self.max_rooms = max_rooms
        #: Room -> (epoch, last offset) heard, least recently heard first.
        self._heard: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def seen(self, room: str, epoch: str, offset: int) -> None:
        """A kept message of ``room`` came on the channel."""
        heard = self._heard
        heard[room] = (epoch, offset)
        heard.move_to_end(room)
        if len(heard) > self.max_rooms:
            heard.popitem(last=False)

    def forget(self) -> None:
        """
        The link was down: messages may have been kept without this node
        hearing them, so rooms are asked of Redis again.
        """
        self._heard.clear()

    def open_room(self, room: str) -> tuple[str, int] | Deferred[tuple[str, int]]:
        known = self._heard.get(room)
        if known is not None:
            return known
        return self.streams.open_room(room)

    def append(self, room: str, messages: Sequence[Message]) -> None:
        """Nothing: Redis kept them when it numbered them."""

    def read(self, room: str, after: int, upto: int) -> Deferred[Sequence[Message]]:
        return self.streams.read(room, after, upto)

    def room_closed(self, room: str) -> None:
        """Nothing: Redis keeps an idle room for the TTL by itself."""

    @property
    def stats(self) -> HistoryCounts:
        return HistoryCounts(rooms=len(self._heard))


def _messages(reply: Any, room: str, oldest: int) -> list[Message]:
    out = []
    for entry_id, fields in reply or ():
        values = dict(zip(fields[::2], fields[1::2], strict=False))
        ts = _int(values.get(b"ts", b"0"))
        if ts < oldest:
            continue
        out.append(
            Message(
                _int(values.get(b"id", b"0")),
                values.get(b"text", b""),
                0.0,
                0,
                room,
                _text(values.get(b"name", b"")),
                ts,
                _int(entry_id.split(b"-", 1)[0]),
                user=_user(values.get(b"user", b"")),
            )
        )
    return out


def _int(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, bytes) and value.isdigit():
        return int(value)
    return 0


def _text(value: Any) -> str:
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return text


def _user(value: Any) -> str:
    """
    A kept message's user id: "" (anonymous) if the entry has none (kept
    anonymously, or before entries carried it) or one admission would not
    have given out.
    """
    try:
        user = _text(value)
    except UnicodeDecodeError:
        return ""
    return user if is_user_id(user) else ""


def _epoch(value: Any) -> str:
    """An epoch read back from Redis, as ``webchat.history`` makes them."""
    epoch = _text(value)
    if EPOCH.fullmatch(epoch) is None:
        raise ValueError(f"invalid epoch in Redis: {epoch[:80]!r}")
    return epoch
