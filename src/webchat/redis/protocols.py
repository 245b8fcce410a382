"""The txredisapi protocols a link speaks through.

Imported by ``link.py`` only once a connection is made: txredisapi's own
import installs the global reactor, which must wait until twistd has chosen
one (``--reactor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import txredisapi
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from webchat.redis.link import Link


class PublisherProtocol(txredisapi.RedisProtocol):
    """
    The command connection: the handshake, PUBLISH, the id allocator's INCR,
    INCRBY and EVAL, PING.  Tells its link when it comes and goes.
    """

    link: Link

    def connectionMade(self) -> Any:
        # Given no password and no db, txredisapi's own part is done at once.
        result = super().connectionMade()
        self.link.connection_made(self)
        return result

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.link.connection_lost(self, why)


class SubscriberProtocol(txredisapi.SubscriberProtocol):
    """Subscribed to the channel; hands each message to the relay."""

    link: Link

    def connectionMade(self) -> Any:
        result = super().connectionMade()
        self.link.connection_made(self)
        return result

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.link.relay.message_received(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.link.connection_lost(self, why)
