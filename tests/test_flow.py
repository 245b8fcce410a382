"""Flow control: the Twisted internals it relies on, and failures kept to one member."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from webchat.flow import TRANSPORT_INTERNALS
from webchat.testing import ChatPump


class TwistedInternalsTests(SynchronousTestCase):
    """
    ``webchat.flow`` reads private attributes of Twisted's TCP transport.
    If a Twisted upgrade renames or drops one, this fails, naming it, long
    before a slow reader goes unnoticed in production.
    """

    def setUp(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        # A memory reactor: the transport registers for writing, never writes.
        self.transport = tcp.Connection(ours, Protocol(), reactor=MemoryReactor())
        self.transport.connected = True

    def test_every_internal_flow_reads_exists(self):
        missing = [n for n in TRANSPORT_INTERNALS if not hasattr(self.transport, n)]
        self.assertEqual(
            missing, [], f"Twisted's tcp.Connection no longer has {missing}"
        )
        self.assertIsInstance(self.transport.socket, socket.socket)
        self.assertFalse(self.transport.TLS)
        self.assertIsInstance(self.transport.bufferSize, int)

    def test_what_flow_counts_as_unsent_grows_with_a_write(self):
        def unsent():
            t = self.transport
            return len(t.dataBuffer) - t.offset + t._tempDataLen

        self.assertEqual(unsent(), 0)
        self.transport.write(b"x" * 1000)  # buffered: no reactor to send it
        self.assertEqual(unsent(), 1000)


class DeliveryFailureTests(SynchronousTestCase):
    def test_a_connection_whose_delivery_raises_does_not_cost_the_others(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pump = ChatPump(quiet=True)
        alice, bob, carol = pump.connect(), pump.connect(), pump.connect()
        (on_server,) = [p for p in pump.factory.rooms if p.chat_id == 2]

        def broken(data):
            raise RuntimeError("a bug in delivering")

        on_server.deliver = broken
        alice.send_text("one")
        pump.pump()
        alice.send_text("two")
        pump.pump()
        self.assertEqual(carol.texts, ["id 1: one", "id 1: two"])  # after bob
        self.assertEqual(bob.close_code, 1011)
        self.assertEqual(bob.texts, [])
        failures = [
            formatEvent(e)
            for e in events
            if formatEvent(e).startswith("An error has occurred: delivering")
        ]
        self.assertEqual(
            failures, ["An error has occurred: delivering to connection 2 failed"]
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(pump.factory.dropped["internal_error"], 1)
