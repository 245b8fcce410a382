"""Several chat processes, one chat: relaying messages through Redis pub/sub.

``url.py``       where Redis is: the ``--redis`` URL, the channel name
``link.py``      one connection kept open (ClientService, handshake, PING)
``protocols.py`` the txredisapi protocols, imported once a connection is made
``envelope.py``  ``wc2 <node> m <room> ...``: one message or presence event
``pubsub.py``    ``RedisRelay``: publish, subscribe, deliver
``presence.py``  ``RemotePresence``: the other nodes' members, with expiry
``ids.py``       connection ids unique across the nodes

Importing this package installs no reactor (txredisapi's import would).
"""

from webchat.redis.envelope import (
    MAX_CHAT_ID,
    Envelope,
    MalformedEnvelopeError,
    check_node_id,
    decode_envelope,
    encode_envelope,
)
from webchat.redis.ids import (
    FALLBACK_PER_NODE,
    PROVISIONAL_BASE,
    REDIS_ID_LIMIT,
    IdAllocator,
)
from webchat.redis.link import RETRY_MAX, STABLE_AFTER, retry_delay
from webchat.redis.pubsub import RedisRelay
from webchat.redis.url import (
    DEFAULT_CHANNEL,
    RedisAddress,
    check_channel,
    parse_redis_url,
)

__all__ = [
    "DEFAULT_CHANNEL",
    "FALLBACK_PER_NODE",
    "MAX_CHAT_ID",
    "PROVISIONAL_BASE",
    "REDIS_ID_LIMIT",
    "RETRY_MAX",
    "STABLE_AFTER",
    "Envelope",
    "IdAllocator",
    "MalformedEnvelopeError",
    "RedisAddress",
    "RedisRelay",
    "check_channel",
    "check_node_id",
    "decode_envelope",
    "encode_envelope",
    "parse_redis_url",
    "retry_delay",
]
