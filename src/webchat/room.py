"""One room: its members, and sender-excluded fan-out batched per reactor turn.

A room knows nothing about WebSockets: a member is anything with a
``chat_id`` and a ``deliver(data)`` method, and the bytes it is sent come
from a codec (``webchat.codecs``).  That keeps the one rule of the chat —
every message goes to everyone in the room *but* its sender, in the order
it arrived — in one small place that a test can drive without a socket;
the WebSocket connection, an HTTP API, a history replay or another node
all reach it through ``publish``.

Why batching: a chat server's real work is fan-out, one message in and N
copies out, and per copy the cost is the write and its system call, not the
bytes.  So messages are not sent as they arrive.  They are queued, and at
the end of the current reactor iteration (``Rooms`` runs one
``callLater(0)`` for every room with messages: after every socket that was
readable in this turn has been read, before the reactor waits again) each
member is handed, in one write, everything it is owed.  Under light load
that is one message and this adds no latency; under heavy load it is many,
and the cost per delivery falls with every message that shares the write.

Why a pass in slices: under heavy load one pass over a big room takes a
while (T: 1,000 members over TLS, tens of ms), and nothing is read while it
runs.  If a pass only sent what was queued when it began, a message that
arrived during it would wait for the rest of that pass and then for its
member's place in the next (p99 about 2.5-3 T).  So a pass yields to the
reactor once a slice has taken ``SLICE_SECONDS`` of CPU; what was read
meanwhile is sealed as the room's next *chunk* when the next slice begins,
and each member, when its turn in the rotation comes, is sent every chunk
it has not had: members later in the pass get the new messages in this pass, the
ones served already in the next, each about one pass after it arrived.  A
member remembers the first chunk it has not been sent (joining: the first
one not yet sealed, i.e. not in the history it is replayed); chunks are
let go at the end of a pass once every member has passed them.  A pass
that fits in a slice is one flush, exactly as if there were no slicing.

Memory: the chunks not yet sent to everyone (about one pass's worth) plus,
per codec, their encodings; a sender's share (what it is owed less its own
messages) is worked out when its delivery comes and let go before the next
member's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from time import perf_counter, thread_time
from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from webchat.codecs import SEED, Codec, Message

if TYPE_CHECKING:
    from webchat.history import HistoryStore
    from webchat.metrics import ChatStats

#: Turns bigger than this (bytes) reach their senders as views of the one
#: joined buffer, a write per run of other people's frames, instead of as a
#: copy without the sender's own: below it a copy costs less than the extra
#: writes, above it the copies are what costs (in memory and in time).
SLICE_ABOVE = 64 * 1024
#: After a turn bigger than this (bytes) the C heap's free memory is handed
#: back to the system (``webchat.memory``): a chat turn is rarely more than a
#: few KB, and after a burst of MBs glibc would keep tens of MB resident.
RELEASE_ABOVE = 4 * 1024 * 1024
#: A pass over a room's members yields to the reactor after this much of the
#: server's CPU time (seconds), so what arrives meanwhile is read and
#: reaches the members not yet served in the same pass: a message's wait is
#: about one pass, not the rest of the pass it arrived in plus its member's
#: place in the next.  A pass that fits is one slice, as if there were no
#: slicing at all.  CPU time, not wall time: a server that other processes
#: keep waiting would otherwise cut its passes into ever smaller slices,
#: each paying for a round of reads, and fall further behind.
SLICE_SECONDS = 0.005
#: The slice's clock is read once per this many members (reading the CPU
#: clock is a system call, about 0.7 µs: per member it would cost 2-3%).
SLICE_CHECK = 8

log = Logger(namespace="webchat")


class Member(Protocol):
    """What a room needs from a connection."""

    chat_id: int
    #: The name others see (``guest-N`` unless it chose one), unique in its
    #: room case-insensitively; set by the room.
    chat_name: str

    def deliver(self, data: bytes | memoryview) -> bool:
        """
        Send ``data`` (one or more whole frames); return ``False`` if it could
        not be taken because the member is on its way out (or is now).
        """


def member_entry(member: Member) -> dict[str, object]:
    """
    A member as JSON events show one: ``id``, ``name``, and ``user`` when
    it has an identity (--auth); anonymous members have no ``user`` field.
    """
    entry: dict[str, object] = {"id": member.chat_id, "name": member.chat_name}
    identity = getattr(member, "identity", None)
    if identity is not None:
        entry["user"] = identity.user
    return entry


class Room:
    """
    The members of one room, by codec, and the messages that some of them
    have not been sent yet.

    Rooms are made by ``Rooms``, which also runs their end-of-turn flush.
    """

    def __init__(
        self,
        name: str,
        stats: ChatStats,
        schedule: Callable[[Room], object],
        release_memory: Callable[[], object],
        delivery_failed: Callable[[Member], bool] | None = None,
        clock: Callable[[], float] | None = None,
        history: HistoryStore | None = None,
        epoch: str = "",
        offset: int = 0,
        timer: Callable[[], float] = thread_time,
        slice_seconds: float = SLICE_SECONDS,
        slice_check: int = SLICE_CHECK,
    ) -> None:
        self.name = name
        #: What a slice of a pass is timed with, how long one may take, and
        #: every how many members its clock is read.
        self._timer = timer
        self._slice_seconds = slice_seconds
        self._slice_check = slice_check
        #: The server's clock (seconds), for a message's ``ts``.
        self._clock = clock
        self._stats = stats
        self._schedule = schedule
        self._release_memory = release_memory
        self._delivery_failed = delivery_failed
        # dicts keep insertion order: members hear messages in join order,
        # which makes fan-out deterministic for tests and logs.
        self._members: dict[int, Member] = {}
        self._codec_of: dict[int, Codec] = {}
        self._by_codec: dict[Codec, dict[int, Member]] = {}
        #: Messages (and events) not yet sent to anyone: sealed into a chunk
        #: when the next slice of a pass begins.
        self._pending: list[Message] = []
        #: Sealed chunks some member is still owed; ``_chunks[0]`` is chunk
        #: number ``_base`` (numbers only grow).
        self._chunks: list[_Chunk] = []
        self._base = 0
        #: Per member id: the number of the first chunk it has not been sent
        #: (it has had every chunk before).
        self._served: dict[int, int] = {}
        #: The pass in progress: (codec, member id) in serving order, taken
        #: when it began, and the index of the next to serve; empty: none.
        self._order: list[tuple[Codec, int]] = []
        self._next = 0
        #: Whether ``Rooms`` will call ``flush`` at the end of this turn.
        self._scheduled = False
        #: Names in use here, case-folded, to the member id holding each.
        self._names: dict[str, int] = {}
        #: Members that share a name held by another (a signed user's name,
        #: on each of their tabs), by case-folded name: one of them holds it
        #: when its holder leaves.
        #: (Ordered sets, as dicts: a user may hold many connections.)
        self._sharing: dict[str, dict[int, None]] = {}
        #: The room's last offset (message number: 1, 2, ... within its
        #: epoch, webchat.history), and the server time (ms) it arrived at.
        self.offset = offset
        self.ts = 0
        #: The epoch those offsets belong to.
        self.epoch = epoch
        #: The last offset sent out (and handed to the history): a member
        #: joining now is owed history up to here, and live traffic after it.
        self.flushed = offset
        self._history = history
        #: Whether a member elsewhere (another node, --redis) has a name in
        #: this room: (room name, case-folded name) -> bool; set by ``Rooms``.
        self.names_elsewhere: Callable[[str, str], bool] | None = None
        #: While the room's epoch and offset are being fetched (a store that
        #: answers later: Redis), what to do once they are known (``Rooms``);
        #: None once they are.
        self.opening: list[Callable[[], object]] | None = None

    def join(
        self, member: Member, codec: Codec, name: str = "", exact: bool = False
    ) -> None:
        """
        Add ``member`` speaking ``codec``, named ``name`` (default
        ``guest-N``), or that name with the first free suffix (``-2``, ...).
        ``exact``: the name is the member's own (signed by the app, --auth)
        and kept as it is, even if someone here has it already.
        """
        if exact and name:
            member.chat_name = name
            folded = name.casefold()
            if folded in self._names:
                self._sharing.setdefault(folded, {})[member.chat_id] = None
            else:
                self._names[folded] = member.chat_id
        else:
            member.chat_name = self.free_name(name or f"guest-{member.chat_id}")
            self._names[member.chat_name.casefold()] = member.chat_id
        self._members[member.chat_id] = member
        self._codec_of[member.chat_id] = codec
        self._by_codec.setdefault(codec, {})[member.chat_id] = member
        # Owed what is not yet sealed (not yet kept: it is not in the history
        # a joiner is sent), nothing sealed before.
        self._served[member.chat_id] = self._base + len(self._chunks)

    def free_name(self, wanted: str) -> str:
        """``wanted``, or ``wanted-2``, ``wanted-3``, ...: the first not in use here."""
        name = wanted
        suffix = 1
        while self._taken(name.casefold()):
            suffix += 1
            name = f"{wanted}-{suffix}"
        return name

    def _taken(self, folded: str) -> bool:
        elsewhere = self.names_elsewhere
        return folded in self._names or (
            elsewhere is not None and elsewhere(self.name, folded)
        )

    def holder(self, name: str) -> Member | None:
        """The member here holding ``name`` (any case), if any."""
        chat_id = self._names.get(name.casefold())
        return self._members.get(chat_id) if chat_id is not None else None

    def rename(self, member: Member, name: str) -> bool:
        """Give ``member`` ``name``; False if someone here (or elsewhere) has it."""
        key = name.casefold()
        holder = self._names.get(key)
        if holder is not None and holder != member.chat_id:
            return False
        if holder is None and self._taken(key):
            return False
        self._release_name(member)
        self._names[key] = member.chat_id
        member.chat_name = name
        return True

    def _release_name(self, member: Member) -> None:
        """``member`` no longer has its name: one of those sharing it holds it."""
        chat_id = member.chat_id
        folded = member.chat_name.casefold()
        sharing = self._sharing.get(folded)
        if self._names.get(folded) == chat_id:
            del self._names[folded]
            if sharing:
                heir = next(iter(sharing))
                del sharing[heir]
                self._names[folded] = heir
        elif sharing:
            sharing.pop(chat_id, None)
        if sharing is not None and not sharing:
            del self._sharing[folded]

    def roster(self) -> list[dict[str, object]]:
        """Everyone here, in join order, as the JSON events list them."""
        return [member_entry(member) for member in self._members.values()]

    def count(self, codec: Codec) -> int:
        """Members here that speak ``codec``."""
        return len(self._by_codec.get(codec, ()))

    def leave(self, member: Member) -> bool:
        """Forget ``member``; return whether it was still here."""
        chat_id = member.chat_id
        if self._members.pop(chat_id, None) is None:
            return False
        codec = self._codec_of.pop(chat_id)
        del self._served[chat_id]
        self._release_name(member)
        same = self._by_codec[codec]
        del same[chat_id]
        if not same:
            del self._by_codec[codec]
        return True

    def member(self, chat_id: int) -> Member | None:
        """The member here with id ``chat_id``, if any."""
        return self._members.get(chat_id)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._members.values()))

    @property
    def idle(self) -> bool:
        """Nobody here and nothing owed: the room can go."""
        return not self._members and not self._pending

    def publish(
        self,
        sender: Member | None,
        text: bytes,
        sender_id: int | None = None,
        *,
        name: str = "",
        offset: int | None = None,
        ts: int | None = None,
        delayed: bool = False,
        user: str = "",
    ) -> int:
        """
        Queue ``text`` from ``sender`` (``None``: the server, an API, another
        node) for every member except ``sender``, to go out at the end of
        this reactor turn, as the room's next message (``offset``); return how
        many members that is now.

        ``sender_id`` is the id it is shown as from when that is not the
        sender's own (a client of another node); default: ``sender``'s, or 0.
        ``name`` is the sender's name (default: its own, else ``guest-N``),
        for the JSON events; its time (``ts``, ms) is the room's clock's
        unless given (another node's, when it received the message), and
        its ``offset`` the room's next, unless given: a message numbered
        elsewhere (a history shared by several nodes) keeps its own, and
        one said while that history is out of reach has none (0: the room's
        numbering does not move).  ``delayed``: held up by a Redis outage.
        ``user``: the sender's user id (default: ``sender``'s identity's).
        """
        member_id = sender.chat_id if sender is not None else 0
        if sender_id is None:
            sender_id = member_id
        if not name:
            name = sender.chat_name if sender is not None else f"guest-{sender_id}"
        if not user and sender is not None:
            identity = getattr(sender, "identity", None)
            if identity is not None:
                user = identity.user
        self._wake()
        if offset is None:
            offset = self.offset + 1
        if offset:
            self.offset = offset
        if ts is None:
            ts = int(self._clock() * 1000) if self._clock is not None else 0
        self.ts = ts
        self._pending.append(
            Message(
                sender_id,
                text,
                perf_counter(),
                member_id,
                self.name,
                name,
                ts,
                offset,
                delayed=delayed,
                user=user,
            )
        )
        members = len(self._members)
        return members - 1 if member_id in self._members else members

    def publish_event(self, frame: bytes, member_id: int = 0) -> None:
        """
        Queue a presence event (one whole frame) for this turn, for every
        member whose codec has events except ``member_id``: in the turn, so
        it keeps its order with the messages.  Nothing at all when only the
        seed's codec is spoken here.
        """
        by_codec = self._by_codec
        if not by_codec or (len(by_codec) == 1 and SEED in by_codec):
            return
        self._wake()
        self._pending.append(Message(0, b"", perf_counter(), member_id, event=frame))

    def _wake(self) -> None:
        """Have ``Rooms`` flush this room at the end of the turn, once."""
        if not self._scheduled:
            self._scheduled = True
            self._schedule(self)

    def _same_codec(self, member: Member) -> dict[int, Member] | None:
        """The members speaking ``member``'s codec, ``member`` among them."""
        codec = self._codec_of.get(member.chat_id)
        return self._by_codec.get(codec) if codec is not None else None

    def hold(self, member: Member, most: int = 0) -> None:
        """
        Keep what turns owe ``member`` instead of sending it, until
        ``release``: while its history is being read, live traffic must not
        overtake the replay.  ``most``: bytes to hold before giving up on it
        (0 = no cap).  Costs the fan-out nothing: the member's place in its
        codec's list is taken by a stand-in that keeps the frames (shared
        bytes, no copies).
        """
        same = self._same_codec(member)
        if same is not None and member.chat_id in same:
            if not isinstance(same[member.chat_id], _Held):  # held already: keep it
                same[member.chat_id] = _Held(member, most)

    def holding(self, member: Member) -> bool:
        """Whether ``member``'s traffic is being held (``hold``)."""
        same = self._same_codec(member)
        return same is not None and isinstance(same.get(member.chat_id), _Held)

    def tell(self, member: Member, frame: bytes) -> bool:
        """
        Queue ``frame`` (an event for ``member`` alone: an ack, an error)
        behind what is held for it; False when nothing is held: send it now.
        """
        same = self._same_codec(member)
        held = same.get(member.chat_id) if same is not None else None
        if isinstance(held, _Held):
            held.deliver(frame)
            return True
        return False

    def release(self, member: Member, first: Sequence[bytes] = ()) -> bool:
        """
        Send ``member`` ``first`` (its welcome or resumed and its history),
        then what was held for it, and deliver to it directly again; False if
        it could not all be sent (closing, or past the hold's cap).
        """
        chunks: list[bytes | memoryview] = []
        overflowed = False
        same = self._same_codec(member)
        if same is not None:
            held = same.get(member.chat_id)
            if isinstance(held, _Held):
                same[member.chat_id] = member
                chunks = held.chunks
                overflowed = held.overflowed
        if first and not member.deliver(b"".join(first)):  # one write, not one each
            return False
        for data in chunks:
            if not member.deliver(data):
                return False
        return not overflowed

    def advance(self, offset: int) -> None:
        """
        The room's history has ``offset`` without a member here being sent
        it (a message of this node's kept late, after a Redis outage: its
        members had it at once): a joiner is owed it as history.
        """
        self.offset = offset
        if not self._pending:
            self.flushed = offset

    def flush(self) -> int:
        """
        Serve the next slice of the pass over the members (a new pass if none
        is in progress): each member, in turn, is sent in one write (a sender
        in a big turn: one per run of other people's frames) everything it
        is owed up to now, what arrived since the pass began included.  A
        slice ends when the pass does or after ``slice_seconds``; the room
        asks to be flushed again while anything is owed.  Return deliveries.
        """
        self._scheduled = False
        if self._pending:
            self._seal()
        if not self._order:
            if not self._chunks:
                return 0
            self._order = [
                (codec, chat_id)
                for codec, members in self._by_codec.items()
                for chat_id in members
            ]
            self._next = 0
        copies = self._slice()
        if self._next >= len(self._order):
            self._order = []
            self._let_go()
        if self._pending or self._chunks:
            self._wake()
        return copies

    def _seal(self) -> None:
        """What arrived since the last slice becomes the room's next chunk."""
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            said = pending if pending[0].event is None else ()
        else:
            said = [message for message in pending if message.event is None]
        if said:
            # Kept once, before anyone is sent it: a member joining after
            # this is owed it as history, never live.
            self.flushed = self.offset
            if self._history is not None:
                self._history.append(self.name, said)
        self._chunks.append(_Chunk(pending))

    def _slice(self) -> int:
        """Serve members of the pass until it ends or the slice's time is up."""
        timer = self._timer
        deadline = timer() + self._slice_seconds
        end = self._base + len(self._chunks)
        order = self._order
        served = self._served
        by_codec = self._by_codec
        check = self._slice_check
        # What a member that was last served at chunk N is owed now, per codec:
        # members served together are owed the same, and are mostly served
        # together again.
        owed: dict[tuple[Codec, int], _Owed] = {}
        copies = sent = 0
        index = self._next
        while index < len(order):
            codec, chat_id = order[index]
            index += 1
            start = served.get(chat_id)
            if start is None or start >= end:
                continue  # gone, or had everything already
            members = by_codec.get(codec)
            member = members.get(chat_id) if members is not None else None
            if member is None:
                continue
            served[chat_id] = end
            share = owed.get((codec, start))
            if share is None:
                share = owed[codec, start] = self._owed(codec, start)
            try:
                if not share.everything:
                    pass  # nothing this codec speaks (presence, for the seed's)
                elif chat_id in share.senders:
                    # A sender is owed everything but its own frames.  That is
                    # worked out here, when its turn comes, and let go before
                    # the next member's: a copy per sender held for the whole
                    # pass grows with senders x bytes (150 x 60 KB: 1.3 GB).
                    if len(share.frames) > 1:
                        got, size = _deliver_without(
                            member,
                            chat_id,
                            share.messages,
                            share.frames,
                            share.everything,
                        )
                        copies += got
                        sent += size
                elif member.deliver(share.everything):
                    sent += len(share.everything)
                    copies += share.total
            except Exception:
                # One member's failure must not cost the members after it
                # their turn.
                self._failed(member)
            if not index % check and timer() > deadline:
                break
        self._next = index
        stats = self._stats
        stats.deliveries += copies
        stats.bytes_sent += sent
        return copies

    def _owed(self, codec: Codec, start: int) -> _Owed:
        """Chunks ``start`` onwards, encoded in ``codec`` (once per chunk)."""
        chunks = self._chunks[start - self._base :]
        if len(chunks) == 1:
            return chunks[0].encoded(codec)
        shares = [chunk.encoded(codec) for chunk in chunks]
        return _Owed(
            [m for share in shares for m in share.messages],
            [f for share in shares for f in share.frames],
            b"".join(share.everything for share in shares),
            set().union(*(share.senders for share in shares)),
            sum(share.total for share in shares),
        )

    def _let_go(self) -> None:
        """
        A pass has ended: the chunks every member has been sent are let go
        (and their messages' fan-out times taken: sent to everyone now).
        """
        served = self._served
        end = self._base + len(self._chunks)
        upto = min(served.values()) if served else end
        done, self._chunks = (
            self._chunks[: upto - self._base],
            self._chunks[upto - self._base :],
        )
        self._base = upto
        if not done:
            return
        stats = self._stats
        now = perf_counter()
        biggest = 0
        for chunk in done:
            biggest = max(biggest, chunk.biggest)
            for message in chunk.messages:
                if message.event is None:
                    stats.fanout_seconds.observe(now - message.arrived)
        if biggest > RELEASE_ABOVE:
            del done, chunk  # the turn's messages go first
            self._release_memory()

    def _failed(self, member: Member) -> None:
        """A delivery raised: log it once, and see that it is not tried again."""
        log.failure(
            "An error has occurred: delivering to connection {id} failed",
            id=member.chat_id,
        )
        handled = False
        if self._delivery_failed is not None:
            # The owner ends the member (the server: close 1011), which takes
            # it out of the room the way every other ending does.
            try:
                handled = bool(self._delivery_failed(member))
            except Exception:
                log.failure(
                    "An error has occurred: ending connection {id} failed",
                    id=member.chat_id,
                )
        if not handled:
            self.leave(member)


class _Owed:
    """What a member last served at a given chunk is owed, in one codec."""

    __slots__ = ("everything", "frames", "messages", "senders", "total")

    def __init__(
        self,
        messages: list[Message],
        frames: list[bytes],
        everything: bytes,
        senders: set[int],
        total: int,
    ) -> None:
        self.messages = messages
        self.frames = frames
        #: The frames joined: what a member that sent none of them is sent.
        self.everything = everything
        #: The ids of those not to be sent some of them (their own).
        self.senders = senders
        #: Frames in ``everything`` (a codec may encode a message as none).
        self.total = total


class _Chunk:
    """
    Messages sealed together at the start of a slice, and their encoding
    in each codec that has been asked for it (once, shared by every member).
    """

    __slots__ = ("biggest", "by_codec", "messages")

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.by_codec: dict[Codec, _Owed] = {}
        #: The size of its biggest encoding (bytes), for ``RELEASE_ABOVE``.
        self.biggest = 0

    def encoded(self, codec: Codec) -> _Owed:
        owed = self.by_codec.get(codec)
        if owed is None:
            messages = self.messages
            encode = codec.encode
            frames = [encode(message) for message in messages]
            everything = frames[0] if len(frames) == 1 else b"".join(frames)
            if len(messages) == 1:
                senders = {messages[0].member_id}
            else:
                senders = {message.member_id for message in messages}
            total = len(frames) - frames.count(b"")
            owed = self.by_codec[codec] = _Owed(
                messages, frames, everything, senders, total
            )
            self.biggest = max(self.biggest, len(everything))
        return owed


class _Held:
    """A member's stand-in in the fan-out while its history is read."""

    __slots__ = ("chat_id", "chunks", "member", "most", "overflowed", "size")

    def __init__(self, member: Member, most: int) -> None:
        self.member = member
        self.chat_id = member.chat_id
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self.most = most
        self.overflowed = False

    def deliver(self, data: bytes | memoryview) -> bool:
        if self.overflowed:
            return False
        self.size += len(data)
        if self.most and self.size > self.most:
            # Too much to hold for one member: it is closed on release.
            self.overflowed = True
            self.chunks = []
            return False
        self.chunks.append(data)
        return True


def _deliver_without(
    member: Member,
    sender_id: int,
    pending: list[Message],
    frames: list[bytes],
    everything: bytes,
) -> tuple[int, int]:
    """
    Give ``member`` this turn's frames except those from ``sender_id``;
    return (frames, bytes) it took.

    A small turn is copied without the sender's frames, one write as for
    everybody else.  A big one is not copied at all: the member is handed
    the runs of ``everything`` between its own frames, as views, a write
    each.  Either way the turn's memory stays what was received plus one
    sender's share at a time.
    """
    if len(everything) <= SLICE_ABOVE:
        others = [
            frame
            for message, frame in zip(pending, frames, strict=True)
            if message.member_id != sender_id and frame
        ]
        data = b"".join(others)
        if data and member.deliver(data):
            return len(others), len(data)
        return 0, 0
    view = memoryview(everything)
    copies = size = 0
    start = end = count = 0
    for message, frame in zip(pending, frames, strict=True):
        if message.member_id != sender_id:
            end += len(frame)
            count += 1 if frame else 0
            continue
        if end > start:
            if not member.deliver(view[start:end]):
                return copies, size
            copies += count
            size += end - start
        start = end = end + len(frame)
        count = 0
    if end > start and member.deliver(view[start:end]):
        copies += count
        size += end - start
    return copies, size
