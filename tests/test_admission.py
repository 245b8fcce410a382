"""Admission without sockets: who a handshake is, where it goes, or the HTTP refusal."""

from __future__ import annotations

from collections import Counter

from autobahn.websocket.types import ConnectionDeny
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from webchat.access import AccessPolicy
from webchat.admission import Admission
from webchat.codecs import SEED
from webchat.limits import Limits
from webchat.rooms import LOBBY
from webchat.testing import ChatPump

HOST = {"host": "chat.example:8080"}


class AdmissionTests(SynchronousTestCase):
    def setUp(self):
        self.lines: list[str] = []

        def observe(event):
            if event.get("log_namespace") == "webchat":
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.refused: Counter[str] = Counter()

    def admission(self, **limits) -> Admission:
        policy = AccessPolicy.from_options(proxies=["10.0.0.0/8"])
        return Admission(policy, Limits(**limits), self.refused)

    def admit(self, admission: Admission, peer="192.0.2.1", **options):
        headers = {**HOST, **options.pop("headers", {})}
        options = {"tls": False, "draining": False, "connections": 1, **options}
        return admission.admit(peer, headers, **options)

    def test_an_admitted_handshake_is_an_address_a_room_and_a_codec(self):
        admitted = self.admit(self.admission())
        self.assertEqual(admitted, ("192.0.2.1", LOBBY, SEED, None))

    def test_behind_a_trusted_proxy_the_forwarded_client_is_who_it_is(self):
        admission = self.admission()
        admitted = self.admit(
            admission,
            peer="10.1.2.3",
            headers={
                "x-forwarded-for": "203.0.113.9",
                "x-forwarded-proto": "https",
                "origin": "https://chat.example:8080",
            },
        )
        self.assertEqual(admitted.address, "203.0.113.9")
        self.assertEqual(admission.per_address, Counter({"203.0.113.9": 1}))

    def test_each_refusal_has_its_status_its_count_and_one_log_line(self):
        cases = [
            ({"draining": True}, {}, 503, "draining"),
            ({}, {"origin": "http://evil.example"}, 403, "origin"),
            ({"connections": 3}, {}, 503, "max_connections"),
        ]
        admission = self.admission(max_connections=2)
        for options, headers, status, kind in cases:
            with self.assertRaises(ConnectionDeny) as raised:
                self.admit(admission, headers=headers, **options)
            self.assertEqual(raised.exception.code, status)
            self.assertEqual(self.refused[kind], 1)
        self.assertEqual(len(self.lines), 3)
        self.assertEqual(
            self.lines[1],
            "Refused connection from 192.0.2.1: origin http://evil.example not "
            "allowed (HTTP 403; start webchat with --allowed-origin "
            "http://evil.example to allow it)",
        )
        self.assertEqual(admission.per_address, Counter())  # nothing held

    def test_the_per_address_cap_counts_admitted_connections_until_released(self):
        admission = self.admission(max_connections_per_ip=2)
        self.admit(admission)
        self.admit(admission)
        with self.assertRaises(ConnectionDeny) as raised:
            self.admit(admission)
        self.assertEqual(raised.exception.code, 429)
        admission.release("192.0.2.1")
        self.admit(admission)
        self.assertEqual(self.refused["max_connections_per_ip"], 1)


class HandshakeTests(SynchronousTestCase):
    """The same rules through a whole opening handshake, in memory."""

    def test_admitted_clients_chat_and_a_refused_one_gets_its_status(self):
        pump = ChatPump(quiet=True)
        alice, bob = pump.connect(), pump.connect()
        eve = pump.connect(Origin="http://evil.example")
        self.assertEqual((alice.status, bob.status, eve.status), (101, 101, 403))
        self.assertTrue(eve.response.startswith(b"HTTP/1.1 403 origin not allowed"))
        alice.send_text("hi")
        pump.pump()
        self.assertEqual((alice.texts, bob.texts), ([], ["id 1: hi"]))
        self.assertEqual(pump.factory.refused["origin"], 1)
        self.assertEqual(pump.factory.rooms.names, [LOBBY])
        self.assertEqual(pump.factory.per_address, Counter({"127.0.0.1": 2}))

    def test_a_refused_handshake_holds_no_place(self):
        pump = ChatPump(quiet=True, limits=Limits(max_connections_per_ip=1))
        first = pump.connect()
        second = pump.connect()
        self.assertEqual((first.status, second.status), (101, 429))
        first.send_frame(0x8, b"\x03\xe8")  # a client's clean close
        pump.pump()
        self.assertTrue(first.lost)
        self.assertEqual(pump.factory.per_address, Counter())
        self.assertEqual(pump.connect().status, 101)
