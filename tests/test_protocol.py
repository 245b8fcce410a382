"""The chat on the wire: real Autobahn clients, real sockets, in-process server."""

from __future__ import annotations

import itertools

from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from tests.support import (
    HANDSHAKE,
    ServerMixin,
    client_frame,
    close_code_of,
    connect_raw,
    deferLater,
    parse_server_frames,
    take,
)
from webchat.limits import Limits
from webchat.room import Room
from webchat.service import ChatService


class RelayTests(ServerMixin, TestCase):
    timeout = 20

    def setUp(self):
        # These tests send faster than any person types.
        return self.start_server(limits=Limits(rate_limit=0))

    @inlineCallbacks
    def test_message_goes_to_everyone_but_the_sender(self):
        a, b, c = yield self.connect_many(3)
        a.send_text("hello")
        self.assertEqual((yield b.received.get()), "id 1: hello")
        self.assertEqual((yield c.received.get()), "id 1: hello")
        # If the sender had been sent a copy it would arrive before this one.
        b.send_text("back")
        self.assertEqual((yield a.received.get()), "id 2: back")
        self.assertEqual((yield c.received.get()), "id 2: back")
        self.assertEqual(a.pending(), [])

    @inlineCallbacks
    def test_ids_count_up_from_one_and_are_never_reused(self):
        a, b = yield self.connect_many(2)
        a.sendClose()
        yield a.closed
        c = yield self.connect()
        c.send_text("who am i")
        self.assertEqual((yield b.received.get()), "id 3: who am i")

    @inlineCallbacks
    def test_order_is_the_order_the_server_received(self):
        a, b, c = yield self.connect_many(3)
        for n in range(200):
            a.send_text(f"m{n}")
        got_b = yield take(b, 200)
        got_c = yield take(c, 200)
        expected = [f"id 1: m{n}" for n in range(200)]
        self.assertEqual(got_b, expected)
        self.assertEqual(got_c, expected)

    @inlineCallbacks
    def test_unicode_and_empty_messages_are_relayed_exactly(self):
        a, b = yield self.connect_many(2)
        text = "héllo wörld — 你好 🌍 \u202e <b>x</b>\n\t"
        a.send_text(text)
        a.send_text("")
        self.assertEqual((yield b.received.get()), "id 1: " + text)
        self.assertEqual((yield b.received.get()), "id 1: ")

    @inlineCallbacks
    def test_a_60_kb_message_arrives_whole(self):
        a, b = yield self.connect_many(2)
        text = ("0123456789abcdef" * 3750)[:60_000]
        a.send_text(text)
        self.assertEqual((yield b.received.get()), "id 1: " + text)

    @inlineCallbacks
    def test_binary_message_closes_only_its_sender_with_1003(self):
        a, b, c = yield self.connect_many(3)
        b.sendMessage(b"\x00\x01binary", isBinary=True)
        code, _ = yield b.closed
        self.assertEqual(code, 1003)
        a.send_text("still here")
        self.assertEqual((yield c.received.get()), "id 1: still here")
        self.assertEqual(b.pending(), [])

    @inlineCallbacks
    def test_invalid_utf8_closes_only_its_sender_with_1007(self):
        a, b, c = yield self.connect_many(3)
        b.sendMessage(b"ok \xff\xfe not utf-8", isBinary=False)
        code, _ = yield b.closed
        self.assertEqual(code, 1007)
        a.send_text("carry on")
        self.assertEqual((yield c.received.get()), "id 1: carry on")

    @inlineCallbacks
    def test_peers_leaving_mid_stream_cost_the_sender_and_bystanders_nothing(self):
        sender, bystander, closer, vanisher = yield self.connect_many(4)
        for n in range(100):
            sender.send_text(f"n{n}")
            if n == 30:
                closer.sendClose()
            if n == 60:
                vanisher.transport.abortConnection()  # no close frame, no FIN
            if n % 10 == 0:
                yield deferLater(0)
        got = yield take(bystander, 100)
        self.assertEqual(got, [f"id 1: n{n}" for n in range(100)])
        # The sender still has its connection and can still be reached.
        bystander.send_text("you there?")
        self.assertEqual((yield sender.received.get()), "id 2: you there?")
        self.assertIsNone(sender.closed_code)

    @inlineCallbacks
    def test_shutdown_says_going_away(self):
        a, b = yield self.connect_many(2)
        clean = yield self.factory.close_all()
        self.assertEqual(clean, 2)
        self.assertEqual((yield a.closed)[0], 1001)
        self.assertEqual((yield b.closed)[0], 1001)


class RawFrameTests(ServerMixin, TestCase):
    """The same rules, checked byte for byte with hand-built frames."""

    timeout = 20

    def setUp(self):
        return self.start_server()

    @inlineCallbacks
    def test_relay_bytes_on_the_wire(self):
        sender = yield self.open_raw()
        receiver = yield self.open_raw()
        sender.transport.write(client_frame(0x1, "né".encode()))
        yield receiver.wait_for(lambda _: parse_server_frames(receiver.body()))
        self.assertEqual(
            parse_server_frames(receiver.body()), [(0x1, "id 1: né".encode())]
        )

    @inlineCallbacks
    def test_a_compression_offer_is_declined_not_fatal(self):
        # Browsers offer permessage-deflate; the server answers without it.
        peer = yield connect_raw(self.port.getHost().port, self.client_tls)
        self.addCleanup(peer.transport.abortConnection)
        offer = (
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        )
        peer.transport.write(HANDSHAKE.replace(b"\r\n\r\n", b"\r\n" + offer + b"\r\n"))
        head = yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertNotIn(b"sec-websocket-extensions", head.lower())

    @inlineCallbacks
    def test_nothing_is_relayed_from_a_connection_closed_for_cause(self):
        offender = yield self.open_raw()
        listener = yield self.connect()
        # Binary (close 1003), then text in the same write: the text must
        # not reach anyone, and the 1003 must reach the offender even though
        # its own close frame follows right behind.
        offender.transport.write(
            client_frame(0x2, b"bin")
            + client_frame(0x1, b"after")
            + client_frame(0x8, b"")
        )
        yield offender.lost
        frames = parse_server_frames(offender.body())
        self.assertEqual([(op, close_code_of(p)) for op, p in frames], [(0x8, 1003)])
        other = yield self.connect()
        other.send_text("next")
        self.assertEqual((yield listener.received.get()), "id 3: next")

    @inlineCallbacks
    def test_a_ping_gets_its_pong(self):
        peer = yield self.open_raw()
        peer.transport.write(client_frame(0x9, b"are you there?"))
        yield peer.wait_for(lambda _: parse_server_frames(peer.body()))
        self.assertEqual(parse_server_frames(peer.body()), [(0xA, b"are you there?")])

    @inlineCallbacks
    def test_invalid_utf8_across_fragments_gets_1007(self):
        peer = yield self.open_raw()
        # "€" is E2 82 AC; split it and then break it.
        peer.transport.write(client_frame(0x1, b"ok \xe2\x82", fin=False))
        peer.transport.write(client_frame(0x0, b"\x28", fin=True))
        yield peer.wait_for(lambda _: parse_server_frames(peer.body()))
        opcode, payload = parse_server_frames(peer.body())[0]
        self.assertEqual((opcode, close_code_of(payload)), (0x8, 1007))

    # -- the small-message fast path (WebChatProtocol._whole_small_messages) ----

    @inlineCallbacks
    def test_frames_coalesced_and_split_across_reads_are_relayed_in_order(self):
        sender = yield self.open_raw()
        receiver = yield self.open_raw()
        texts = [b"a", b"", b"x" * 125, "né".encode(), b"w" * 10, b"z" * 70]
        texts += [b"y" * 126, b"end"]
        frames = [client_frame(0x1, text) for text in texts]
        wire = b"".join(frames)
        ends = list(itertools.accumulate(len(frame) for frame in frames))
        # Reads: frames 1-2 and frame 3 cut inside its mask; the rest of it and
        # frame 4; frame 5 and frame 6 cut inside its payload; the rest.
        cuts = [0, ends[1] + 4, ends[3], ends[4] + 20, len(wire)]
        for start, end in itertools.pairwise(cuts):
            sender.transport.write(wire[start:end])
            yield deferLater(0.05)
        yield receiver.wait_for(
            lambda _: len(parse_server_frames(receiver.body())) >= 8
        )
        self.assertEqual(
            parse_server_frames(receiver.body()),
            [(0x1, b"id 1: " + text) for text in texts],
        )

    @inlineCallbacks
    def test_invalid_utf8_behind_good_frames_in_one_read_gets_1007(self):
        sender = yield self.open_raw()
        receiver = yield self.open_raw()
        sender.transport.write(
            client_frame(0x1, b"good")
            + client_frame(0x1, b"bad \xff")
            + client_frame(0x1, b"never")
        )
        yield sender.wait_for(lambda _: parse_server_frames(sender.body()))
        opcode, payload = parse_server_frames(sender.body())[0]
        self.assertEqual((opcode, close_code_of(payload)), (0x8, 1007))
        yield deferLater(0.1)
        self.assertEqual(parse_server_frames(receiver.body()), [(0x1, b"id 1: good")])

    @inlineCallbacks
    def test_an_unmasked_small_text_frame_gets_1002(self):
        peer = yield self.open_raw()
        peer.transport.write(client_frame(0x1, b"plain", mask=False))
        yield peer.wait_for(lambda _: parse_server_frames(peer.body()))
        opcode, payload = parse_server_frames(peer.body())[0]
        self.assertEqual((opcode, close_code_of(payload)), (0x8, 1002))

    @inlineCallbacks
    def test_a_whole_text_frame_inside_a_fragmented_message_gets_1002(self):
        sender = yield self.open_raw()
        receiver = yield self.open_raw()
        sender.transport.write(client_frame(0x1, b"part", fin=False))
        yield deferLater(0.05)
        sender.transport.write(client_frame(0x1, b"whole"))
        yield sender.wait_for(lambda _: parse_server_frames(sender.body()))
        opcode, payload = parse_server_frames(sender.body())[0]
        self.assertEqual((opcode, close_code_of(payload)), (0x8, 1002))
        self.assertEqual(parse_server_frames(receiver.body()), [])


class LogTests(ServerMixin, TestCase):
    timeout = 20

    def setUp(self):
        return self.start_server()

    @inlineCallbacks
    def test_the_seeds_log_lines(self):
        a, b, c = yield self.connect_many(3)
        a.send_text("hi there")
        yield b.received.get()
        yield c.received.get()
        c.sendClose()
        yield c.closed
        yield deferLater(0.05)
        lines = self.logs.lines
        # The seed's words first; then who, and (on leaving) how and how long.
        self.assertEqual(
            lines[:4],
            [
                "New connection! (1) from 127.0.0.1 in room lobby",
                "New connection! (2) from 127.0.0.1 in room lobby",
                "New connection! (3) from 127.0.0.1 in room lobby",
                "Connection 1 sending message hi there to 2 other connection(s) "
                "in room lobby",
            ],
        )
        # The log capture hears every server in the process, so a connection
        # an earlier test left closing may log in between: ours is among them.
        self.assertRegex(
            "\n".join(lines[4:]),
            r"(?m)^Connection 3 has disconnected: 127\.0\.0\.1, code 1000, "
            r"after \d+\.\d s$",
        )

    @inlineCallbacks
    def test_user_text_cannot_forge_a_log_line(self):
        a, b = yield self.connect_many(2)
        forged = (
            "x\n2026-01-01T00:00:00+0000 [webchat#info] New connection! (99)\r\x1b[2J"
        )
        a.send_text(forged)
        yield b.received.get()
        line = next(x for x in self.logs.lines if x.startswith("Connection 1 sending"))
        self.assertNotIn("\n", line)
        self.assertNotIn("\r", line)
        self.assertNotIn("\x1b", line)
        self.assertIn(
            r"x\n2026-01-01T00:00:00+0000 [webchat#info] New connection! (99)\r\x1b[2J",
            line,
        )
        self.assertNotIn("New connection! (99)", [x for x in self.logs.lines])

    @inlineCallbacks
    def test_a_typed_backslash_and_bidi_controls_are_escaped(self):
        a, b = yield self.connect_many(2)
        typed = "one\\ntwo"  # a backslash and an "n", as a user can type them
        newline = "one\ntwo"
        bidi = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
        for text in (typed, newline, f"invoice{bidi}exe.pdf"):
            a.send_text(text)
        yield take(b, 3)
        lines = [x for x in self.logs.lines if x.startswith("Connection 1 sending")]
        self.assertEqual(
            lines,
            [
                r"Connection 1 sending message one\\ntwo to 1 other connection(s) "
                "in room lobby",
                r"Connection 1 sending message one\ntwo to 1 other connection(s) "
                "in room lobby",
                r"Connection 1 sending message invoice\u202a\u202b\u202c\u202d"
                r"\u202e\u2066\u2067\u2068\u2069\u2028\u2029exe.pdf to 1 other "
                "connection(s) in room lobby",
            ],
        )
        for char in bidi:
            self.assertFalse([x for x in self.logs.lines if char in x], hex(ord(char)))

    @inlineCallbacks
    def test_user_text_is_cut_at_200_characters(self):
        a, b = yield self.connect_many(2)
        a.send_text("a" * 199 + "Z" + "b" * 5000)
        yield b.received.get()
        line = next(x for x in self.logs.lines if x.startswith("Connection 1 sending"))
        self.assertIn("a" * 199 + "Z…[5200 chars]", line)
        self.assertNotIn("b", line.split("Z", 1)[1].split(" to ")[0])

    @inlineCallbacks
    def test_errors_are_logged_once_with_their_reason(self):
        _a, b = yield self.connect_many(2)
        b.sendMessage(b"\x01", isBinary=True)
        yield b.closed
        yield deferLater(0.05)
        errors = [x for x in self.logs.lines if x.startswith("An error has occurred")]
        self.assertEqual(
            errors,
            [
                "An error has occurred: connection 2 from 127.0.0.1: "
                "1003 binary messages are not supported"
            ],
        )
        self.assertIn(
            "Connection 2 has disconnected: 127.0.0.1, code 1003",
            "\n".join(self.logs.lines),
        )

    @inlineCallbacks
    def test_client_mistakes_are_warnings_server_faults_errors(self):
        a, b, _c = yield self.connect_many(3)
        b.sendMessage(b"\x01", isBinary=True)  # the client's mistake: 1003
        yield b.closed

        def broken(*args):
            raise RuntimeError("a bug in the relay")

        self.patch(Room, "publish", broken)
        a.send_text("this finds the bug")  # the server's fault: 1011
        yield a.closed
        yield deferLater(0.05)
        self.flushLoggedErrors(RuntimeError)
        levels = {
            formatEvent(e): e["log_level"]
            for e in self.logs.events
            if formatEvent(e).startswith("An error has occurred: connection")
        }
        self.assertEqual(
            levels,
            {
                "An error has occurred: connection 2 from 127.0.0.1: "
                "1003 binary messages are not supported": LogLevel.warn,
                "An error has occurred: connection 1 from 127.0.0.1: "
                "1011 internal error": LogLevel.error,
            },
        )
        self.assertEqual((a.closed_code, b.closed_code), (1011, 1003))


class QuietTests(ServerMixin, TestCase):
    timeout = 20
    quiet = True

    def setUp(self):
        return self.start_server()

    @inlineCallbacks
    def test_quiet_drops_only_the_per_message_line(self):
        a, b = yield self.connect_many(2)
        a.send_text("psst")
        self.assertEqual((yield b.received.get()), "id 1: psst")
        self.assertEqual(
            self.logs.lines,
            [
                "New connection! (1) from 127.0.0.1 in room lobby",
                "New connection! (2) from 127.0.0.1 in room lobby",
            ],
        )


class ShutdownTests(ServerMixin, TestCase):
    """Shutdown through the service, as SIGTERM does it, with a slow client."""

    timeout = 20

    def setUp(self):
        return self.start_server()  # the default --shutdown-grace (5 s)

    @inlineCallbacks
    def test_a_client_answering_after_1_5_s_closes_cleanly(self):
        peer = yield self.open_raw()
        stopped = ChatService(self.factory).stopService()

        def has_close(_: bytes) -> bool:
            return any(op == 0x8 for op, _ in parse_server_frames(peer.body()))

        yield peer.wait_for(has_close)
        yield deferLater(1.5)
        self.assertFalse(peer.lost.called, "dropped before the grace ran out")
        peer.transport.write(client_frame(0x8, b"\x03\xe9"))
        yield stopped
        yield peer.lost
        self.assertIn("Closed 1 of 1 connection(s) cleanly", self.logs.lines)


class LogLineTests(ServerMixin, TestCase):
    timeout = 20

    def setUp(self):
        return self.start_server()

    @inlineCallbacks
    def test_invisible_characters_are_escaped_in_the_log_line(self):
        a, b = yield self.connect_many(2)
        # Marks that reorder or hide text in a log viewer, and a separator
        # some viewers break the line at.
        a.send_text("ok\u200e\u200f\u061c\u200b\ufeff\u2028New connection! (9)")
        yield b.received.get()
        self.assertIn(
            "Connection 1 sending message ok\\u200e\\u200f\\u061c\\u200b\\ufeff"
            "\\u2028New connection! (9) to 1 other connection(s) in room lobby",
            self.logs.lines,
        )
