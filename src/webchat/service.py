"""The chat as a Twisted service: the listeners hang off it, so shutdown can
drain the chat before the ports close."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from webchat.protocol import WebChatFactory

log = Logger(namespace="webchat")

#: Signals that mean "shut down cleanly" to this server.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ChatService(MultiService):
    """
    Owns the chat's factory, and the listening services as its children.

    Stopping it first marks the node as draining (``/healthz`` answers 503,
    new WebSockets get 503), tells every client "going away" (1001) and waits
    until they answer or the shutdown grace runs out; only then do the ports
    close.  Browsers see a proper close instead of a reset, and a balancer
    polling ``/healthz`` sees the node leave before its port does.

    With ``handle_signals`` it also takes SIGTERM and SIGINT over from the
    reactor.  Twisted's own handlers make twistd re-raise the signal after a
    clean stop, so the process ends "killed by SIGTERM"; a server that closed
    every connection properly has succeeded, and says so with exit status 0.
    """

    def __init__(self, factory: WebChatFactory, handle_signals: bool = False) -> None:
        super().__init__()
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
        self.factory.draining = True
        count = len(self.factory.hub)
        log.info("Shutting down: closing {count} connection(s)", count=count)
        d = self.factory.close_all()

        def report(clean: int) -> Deferred[None]:
            log.info(
                "Closed {clean} of {count} connection(s) cleanly",
                clean=clean,
                count=count,
            )
            return MultiService.stopService(self)  # now close the ports

        return d.addCallback(report)
