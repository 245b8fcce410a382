"""The chat as a Twisted service, so shutdown is part of the service tree."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from webchat.protocol import SHUTDOWN_GRACE, WebChatFactory


class ChatService(Service):
    """
    Owns the chat's factory for the life of the process.

    Stopping it (SIGTERM, SIGINT) tells every client "going away" (1001)
    and holds the reactor until they answer or ``grace`` runs out, so
    browsers see a proper close instead of a reset.
    """

    log = Logger()

    def __init__(self, factory: WebChatFactory, grace: float = SHUTDOWN_GRACE) -> None:
        self.factory = factory
        self.grace = grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        count = len(self.factory.hub)
        self.log.info("Shutting down: closing {count} connection(s)", count=count)
        d = self.factory.close_all(grace=self.grace)

        def report(clean: int) -> None:
            self.log.info(
                "Closed {clean} of {count} connection(s) cleanly",
                clean=clean,
                count=count,
            )

        return d.addCallback(report)
