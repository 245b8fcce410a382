"""The chat as a Twisted service: the listeners hang off it, so shutdown can
drain the chat before the ports close."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.chat import WebChatFactory

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
        #: Set by the first stop signal; a second one cuts the grace short.
        self._stopping = False

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
        if self._stopping:
            # Whoever presses Ctrl-C twice does not want to wait out the grace:
            # drop the clients still closing, and the shutdown finishes now.
            log.info(
                "Received {signal} again: not waiting for the remaining clients.",
                signal=name,
            )
            for protocol in list(self.factory.connections):
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
            return
        log.info("Received {signal}, shutting down.", signal=name)
        self._stopping = True
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        self.factory.draining = True
        count = len(self.factory.rooms)
        log.info("Shutting down: closing {count} connection(s)", count=count)
        d = self.factory.close_all()

        def report(clean: int) -> Deferred[None]:
            log.info(
                "Closed {clean} of {count} connection(s) cleanly",
                clean=clean,
                count=count,
            )
            events = self.factory.app_events
            if events is None:
                return MultiService.stopService(self)  # now close the ports
            # Webhooks (--webhook-url): the closed connections' last events
            # are counted (in Redis too, whose link must outlive that) and
            # sent before the other services stop.
            settled = events.stopService()
            return settled.addBoth(lambda _: MultiService.stopService(self))

        return d.addCallback(report)


def _why_not_listening(failure: Failure) -> str:
    """The reason a listen failed, as a person would say it."""
    error = failure.value
    if isinstance(error, CannotListenError) and error.socketError is not None:
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error) or repr(error)


class ListeningService(StreamServerEndpointService):
    """
    Listens on one endpoint, and ends the process if it cannot.

    Twisted's own service logs a listening failure as an unhandled traceback
    and carries on: the server runs, listening nowhere, and looks healthy to
    whoever started it.  A server that cannot take the port it was given
    should say so in one line and exit non-zero, so that the person (or the
    init system) who started it finds out at once.
    """

    def __init__(
        self, reactor: Any, endpoint: Any, factory: Any, description: str
    ) -> None:
        super().__init__(endpoint, factory)
        self.reactor = reactor
        self.description = description

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        failed: list[Failure] = []
        starting = [True]

        def on_failure(failure: Failure) -> None:
            if starting:
                failed.append(failure)
            else:  # a third-party endpoint that fails later still ends it
                self._report(failure)
                self.reactor.callWhenRunning(self.reactor.stop)

        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addErrback(on_failure)
        starting.clear()
        if failed:
            # Every stream endpoint Twisted ships listens synchronously: the
            # reactor is not running yet, so leaving is a plain exit.
            self._report(failed[0])
            raise SystemExit(1)

    def _report(self, failure: Failure) -> None:
        log.critical(
            "Cannot listen on {endpoint}: {why}",
            endpoint=self.description,
            why=_why_not_listening(failure),
        )
