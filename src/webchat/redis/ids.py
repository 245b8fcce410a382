"""Connection ids that are unique across every node of one chat.

A connection gets its id when it opens, and the chat cannot wait for Redis
then, so ``IdAllocator.next_id()`` is synchronous.  It hands out ids from
blocks reserved ahead of need with ``INCRBY webchat:<channel>:ids <block>``
(the next block is reserved when half of the current one is used), so ids are
unique across nodes and roughly increasing.  When Redis is unreachable and
the blocks at hand run out, ids come from ranges no Redis-allocated id and no
other node can reach (all ids stay below 2**53, exact in JavaScript too):

* ``1 .. 2**52 - 1``: reserved from Redis.
* ``2**52 + n * 2**32 + c``: fallback ids of node number ``n`` (1 .. 2**19 - 1,
  from ``INCR webchat:<channel>:nodes`` when the node first reaches Redis), ``c``
  counting up from 0 for the life of the process.
* ``2**52 + 2**51 + r * 2**32 + c``: fallback ids of a node that has not
  reached Redis once since it started, so has no node number: ``r`` is drawn
  at random (0 .. 2**19 - 1) at start.  Only here can two nodes collide, and
  only if two such nodes draw the same ``r`` (for 4 nodes, about 1 in 90,000).

If Redis loses the counter (a restart without persistence), ``INCRBY`` starts
over at 1.  A node notices when a block comes back at or below the highest id
it was ever given, says so in the log, and moves the counter (atomically, in
a small Lua script) past ``unix time * 2**20``: above every id ever reserved,
as long as the cluster opened fewer than a million connections a second.  Ids
are long after that, but never repeat.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.redis.link import RETRY_MAX, failure_reason, is_refusal
from webchat.redis.url import DEFAULT_CHANNEL

#: Connection ids reserved from Redis at a time.
ID_BLOCK = 100
#: Ids reserved from Redis stay below this; fallback ids start here.
REDIS_ID_LIMIT = 1 << 52
#: Fallback ids of a node without a node number start here.
PROVISIONAL_BASE = REDIS_ID_LIMIT + (1 << 51)
#: Node numbers and random provisional slots are below this.
NODE_SLOTS = 1 << 19
#: Fallback ids one node can hand out in each slot.
FALLBACK_PER_NODE = 1 << 32


#: Move a counter up to at least ARGV[1] (never down), then INCRBY ARGV[2].
#: ARGV[1] is SET as the string it came as: Lua would print a large number as
#: 1.8e+15, which INCRBY would then refuse.
_RAISE_COUNTER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('INCRBY', KEYS[1], ARGV[2])
"""


class IdAllocator:
    """
    Connection ids that are unique across every node on one channel, handed
    out synchronously (the module docstring has the scheme).

    The relay tells it when its command connection comes and goes
    (``connected(execute)`` / ``disconnected()``); ``next_id()`` never waits.
    """

    def __init__(
        self,
        reactor: Any,
        channel: str = DEFAULT_CHANNEL,
        *,
        block_size: int = ID_BLOCK,
        rng: random.Random | None = None,
    ) -> None:
        if block_size < 2:
            raise ValueError("block_size must be at least 2")
        self._reactor = reactor
        self._log = Logger(namespace="webchat", source=self)
        self._block_size = block_size
        self._ids_key = f"webchat:{channel}:ids".encode()
        self._nodes_key = f"webchat:{channel}:nodes".encode()
        #: This node's number (1 .. 2**19 - 1), once Redis has given it one.
        self.node_number: int | None = None
        #: Fallback ids handed out so far.
        self.fallbacks = 0
        self._next = self._end = 0  # the block in use: [next, end)
        self._spare: tuple[int, int] | None = None
        self._highest = 0  # the highest id Redis ever gave this node
        self._execute: Callable[..., Deferred[Any]] | None = None
        self._requesting = False
        self._asking_number = False
        self._refused_until = 0.0
        self._slot = (
            PROVISIONAL_BASE
            + (rng or random.SystemRandom()).randrange(NODE_SLOTS) * FALLBACK_PER_NODE
        )
        self._fallback_count = 0
        self._falling_back = False

    @property
    def ready(self) -> bool:
        """Whether ids reserved from Redis are at hand."""
        return self._next < self._end or self._spare is not None

    def next_id(self) -> int:
        """The next connection id: a reserved one while they last, else a fallback."""
        chat_id = self._next
        if chat_id < self._end:
            self._next = chat_id + 1
            if self._spare is None and self._end - self._next <= self._block_size // 2:
                self._reserve()
            return chat_id
        if self._spare is not None:
            (self._next, self._end), self._spare = self._spare, None
            return self.next_id()
        self._reserve()
        return self._fallback_id()

    def _fallback_id(self) -> int:
        if not self._falling_back:
            self._falling_back = True
            self._log.warn(
                "No connection ids reserved from Redis at hand: handing out "
                "fallback ids until Redis answers"
            )
        count = self._fallback_count % FALLBACK_PER_NODE
        self._fallback_count += 1
        self.fallbacks += 1
        if self.node_number is not None:
            return REDIS_ID_LIMIT + self.node_number * FALLBACK_PER_NODE + count
        return self._slot + count

    # -- talking to Redis ---------------------------------------------------------

    def connected(self, execute: Callable[..., Deferred[Any]]) -> None:
        """The command connection is up; ``execute(*args)`` runs a command on it."""
        self._execute = execute
        self._refused_until = 0.0
        if self.node_number is None and not self._asking_number:
            self._asking_number = True
            d = execute(b"INCR", self._nodes_key)
            d.addCallbacks(self._numbered, self._not_numbered)
        if self._spare is None and self._end - self._next <= self._block_size // 2:
            self._reserve()

    def disconnected(self) -> None:
        self._execute = None

    def _numbered(self, value: int) -> None:
        self._asking_number = False
        # Wraps after 524,287 starts: a clash then needs a node that old
        # still running, and both falling back in the same outage.
        self.node_number = (value - 1) % (NODE_SLOTS - 1) + 1

    def _not_numbered(self, failure: Failure) -> None:
        self._asking_number = False
        if is_refusal(failure):
            self._log.error(
                "Redis refused a node number: {error}", error=failure_reason(failure)
            )

    def _reserve(self) -> None:
        execute = self._execute
        if execute is None or self._requesting or self._spare is not None:
            return
        if self._reactor.seconds() < self._refused_until:
            return
        self._requesting = True
        d = execute(b"INCRBY", self._ids_key, self._block_size)
        d.addCallbacks(self._reserved, self._not_reserved)

    def _reserved(self, end: int) -> None:
        self._requesting = False
        start = end - self._block_size + 1
        if start <= self._highest:
            self._counter_lost(end)
            return
        self._install(start, end)

    def _not_reserved(self, failure: Failure) -> None:
        self._requesting = False
        if is_refusal(failure):
            # A persistent error (a key of the wrong type, an ACL) must not
            # turn every new connection into a command and a log line.
            self._refused_until = self._reactor.seconds() + RETRY_MAX
            self._log.error(
                "Redis refused to reserve connection ids: {error}",
                error=failure_reason(failure),
            )

    def _install(self, start: int, end: int) -> None:
        if end >= REDIS_ID_LIMIT:
            self._log.error(
                "Redis's connection id counter {key} is past 2**52; "
                "using fallback ids only",
                key=self._ids_key.decode(),
            )
            self._refused_until = float("inf")
            return
        self._highest = end
        if self._next >= self._end:
            self._next, self._end = start, end + 1
        else:
            self._spare = (start, end + 1)
        if self._falling_back:
            self._falling_back = False
            self._log.info(
                "Connection ids reserved from Redis again ({count} fallback id(s) "
                "handed out so far)",
                count=self.fallbacks,
            )

    def _counter_lost(self, end: int) -> None:
        """
        Redis answered a block at or below ids it gave this node before: it
        has lost the counter.  Other nodes may hold ids above this node's
        highest too, so the counter moves past a bound of every id ever
        reserved (unix time * 2**20) as well.
        """
        execute = self._execute
        floor = max(self._highest, int(self._reactor.seconds()) << 20)
        self._log.warn(
            "Redis has lost the connection id counter {key} (it answered {end}, "
            "this node has had ids up to {highest}); moving it past {floor} so "
            "that no id repeats.  Give Redis persistence to keep ids short.",
            key=self._ids_key.decode(),
            end=end,
            highest=self._highest,
            floor=floor,
        )
        if execute is None:
            return  # gone meanwhile; the next block is checked again
        self._requesting = True
        d = execute(b"EVAL", _RAISE_COUNTER, 1, self._ids_key, floor, self._block_size)
        d.addCallbacks(self._reserved, self._not_reserved)
        if self.node_number is not None:
            # The node counter went with it: claim this node's number again
            # so that nodes started from now on do not draw it.
            claim = execute(b"EVAL", _RAISE_COUNTER, 1, self._nodes_key,
                            self.node_number, 0)  # fmt: skip
            claim.addErrback(lambda _: None)
