"""The chat as a Twisted service, so shutdown is part of the service tree."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from webchat.protocol import WebChatFactory

log = Logger(namespace="webchat")

#: Signals that mean "shut down cleanly" to this server.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ChatService(Service):
    """
    Owns the chat's factory for the life of the process.

    Stopping it tells every client "going away" (1001) and holds the reactor
    until they answer or the shutdown grace runs out, so browsers see a proper close
    instead of a reset.

    With ``handle_signals`` it also takes SIGTERM and SIGINT over from the
    reactor.  Twisted's own handlers make twistd re-raise the signal after a
    clean stop, so the process ends "killed by SIGTERM"; a server that closed
    every connection properly has succeeded, and says so with exit status 0.
    """

    def __init__(self, factory: WebChatFactory, handle_signals: bool = False) -> None:
        self.factory = factory
        self.reactor: Any = factory.reactor
        self.handle_signals = handle_signals

    def startService(self) -> None:
        super().startService()
        if self.handle_signals:
            # After startup, so these replace the handlers the reactor installs.
            self.reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_stop_signal)

    def _on_stop_signal(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        self.reactor.callFromThread(self._stop_for, name)

    def _stop_for(self, name: str) -> None:
        log.info("Received {signal}, shutting down.", signal=name)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        count = len(self.factory.hub)
        log.info("Shutting down: closing {count} connection(s)", count=count)
        d = self.factory.close_all()

        def report(clean: int) -> None:
            log.info(
                "Closed {clean} of {count} connection(s) cleanly",
                clean=clean,
                count=count,
            )

        return d.addCallback(report)
