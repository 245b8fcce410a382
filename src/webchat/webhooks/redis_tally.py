"""The counts behind webhook events, shared by the nodes of a cluster.

Each event must be sent by one node only, and a node that dies must not
leave its users online (or its rooms occupied) for ever.  So each node
keeps its own *contribution* in Redis, under the chat's key prefix
(``webchat:<channel>:``):

* ``hooks:user:<user>``: a hash, field ``<node>`` = that node's open
  connections of the user, and ``_online`` while the app has been told
  ``user.online`` and not yet ``user.offline``;
* ``hooks:room:<room>``: a hash, field ``<node>`` = its members there;
* ``hooks:node-users:<node>``, ``hooks:node-rooms:<node>``: the users and
  rooms a node has a contribution to, and ``hooks:nodes``: such nodes.

Every change is one Lua script, so Redis decides alone, atomically, who
saw a user come online (``HSETNX _online``), who emptied a room, and who
found a user still offline after the delay (``HDEL _online``): each answer
"yes" is given once, to one node, which sends the event.

A node is alive while its presence hash (``presence:<node>``, kept by
``RedisRelay`` with a TTL of --presence-timeout, deleted on a clean stop)
exists.  Every node runs ``reap`` every third of that timeout: the
contributions of nodes without a presence hash are removed, and the users
and rooms this leaves empty are announced, once, by the node whose script
removed them.  A user who had reconnected to another node meanwhile stays
online: nothing is sent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

#: A Lua function the user scripts open with: whether any node holds a
#: connection of the user whose hash is ``key`` (every field but
#: ``_online`` is a node's count).  One definition, so "online" means the
#: same when a connection closes, after the delay and when a node is reaped.
_CONNECTED = """
local function connected(key)
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i] ~= '_online' and tonumber(all[i + 1]) > 0 then return true end
  end
  return false
end
"""
#: KEYS: user hash, node's users, nodes.  ARGV: node, user.
#: 1 if the user was not online: this node announces it.
_USER_OPEN = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return redis.call('HSETNX', KEYS[1], '_online', '1')
"""
#: KEYS: user hash, node's users.  ARGV: node, user.
#: 1 if no node has a connection of the user now (check again later).  The
#: user stays in the node's users until that check: should the node stop
#: (or die) first, the reaping node does it.
_USER_CLOSE = (
    _CONNECTED
    + """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if connected(KEYS[1]) then return 0 end
return 1
"""
)
#: KEYS: user hash, node's users.  ARGV: node, user.  1 if still no
#: connection and still announced online: the caller announces
#: user.offline (and nobody else will).
_USER_CHECK = (
    _CONNECTED
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
end
if connected(KEYS[1]) then return 0 end
if redis.call('HDEL', KEYS[1], '_online') == 1 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
)
#: KEYS: room hash, node's rooms, nodes.  ARGV: node, room.
_ROOM_OPEN = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""
#: KEYS: room hash, node's rooms.  ARGV: node, room.  1: the room is empty
#: in the whole cluster now (this node announces room.vacated).
_ROOM_CLOSE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[1]) == 0 then return 1 end
return 0
"""
#: KEYS: nodes.  ARGV: key prefix, this node.  The contributions of every
#: node without a presence hash go; returns {users now offline, rooms now
#: empty}, each to announce by the caller alone.
_REAP = (
    _CONNECTED
    + """
local prefix = ARGV[1]
local offline, vacated = {}, {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[2] and redis.call('EXISTS', prefix .. 'presence:' .. node) == 0 then
    local users = prefix .. 'hooks:node-users:' .. node
    for _, user in ipairs(redis.call('SMEMBERS', users)) do
      local key = prefix .. 'hooks:user:' .. user
      redis.call('HDEL', key, node)
      if not connected(key) and redis.call('HDEL', key, '_online') == 1 then
        redis.call('DEL', key)
        table.insert(offline, user)
      end
    end
    redis.call('DEL', users)
    local rooms = prefix .. 'hooks:node-rooms:' .. node
    for _, room in ipairs(redis.call('SMEMBERS', rooms)) do
      local key = prefix .. 'hooks:room:' .. room
      if redis.call('HDEL', key, node) == 1 and redis.call('HLEN', key) == 0 then
        table.insert(vacated, room)
      end
    end
    redis.call('DEL', rooms)
    redis.call('SREM', KEYS[1], node)
  end
end
return {offline, vacated}
"""
)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisTally:
    """
    The ``Tally`` of a node of a cluster: ``link`` is its ``RedisRelay``
    (its command connection, channel and node id).  Every answer is a
    Deferred; while Redis is away they fail at once, and those events are
    lost (docs/webhooks.md).
    """

    #: Other nodes settle what this one leaves pending (``reap``).
    shared = True

    def __init__(self, link: Any) -> None:
        self._link = link
        self.node = link.node_id.encode("utf-8")
        self.prefix = f"webchat:{link.channel}:".encode()
        self._nodes = self.prefix + b"hooks:nodes"
        self._node_users = self.prefix + b"hooks:node-users:" + self.node
        self._node_rooms = self.prefix + b"hooks:node-rooms:" + self.node

    def _user(self, user: str) -> bytes:
        return self.prefix + b"hooks:user:" + user.encode("utf-8")

    def _room(self, room: str) -> bytes:
        return self.prefix + b"hooks:room:" + room.encode("utf-8")

    def _eval(self, script: str, keys: list[bytes], *args: bytes) -> Deferred[Any]:
        return self._link.command(b"EVAL", script, len(keys), *keys, *args)

    def user_opened(self, user: str) -> Deferred[bool]:
        keys = [self._user(user), self._node_users, self._nodes]
        d = self._eval(_USER_OPEN, keys, self.node, user.encode("utf-8"))
        return d.addCallback(lambda reply: int(reply) == 1)

    def user_closed(self, user: str) -> Deferred[bool]:
        keys = [self._user(user), self._node_users]
        d = self._eval(_USER_CLOSE, keys, self.node, user.encode("utf-8"))
        return d.addCallback(lambda reply: int(reply) == 1)

    def user_check(self, user: str) -> Deferred[bool]:
        keys = [self._user(user), self._node_users]
        d = self._eval(_USER_CHECK, keys, self.node, user.encode("utf-8"))
        return d.addCallback(lambda reply: int(reply) == 1)

    def room_opened(self, room: str) -> Deferred[None]:
        keys = [self._room(room), self._node_rooms, self._nodes]
        d = self._eval(_ROOM_OPEN, keys, self.node, room.encode("utf-8"))
        return d.addCallback(lambda _: None)

    def room_closed(self, room: str) -> Deferred[bool]:
        keys = [self._room(room), self._node_rooms]
        d = self._eval(_ROOM_CLOSE, keys, self.node, room.encode("utf-8"))
        return d.addCallback(lambda reply: int(reply) == 1)

    def reap(self) -> Deferred[tuple[list[str], list[str]]]:
        d = self._eval(_REAP, [self._nodes], self.prefix, self.node)

        def parse(reply: Any) -> tuple[list[str], list[str]]:
            users, rooms = reply
            return [_text(u) for u in users or []], [_text(r) for r in rooms or []]

        return d.addCallback(parse)
