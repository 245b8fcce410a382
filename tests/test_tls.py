"""wss:// over an ``ssl:`` port (issue #16): the TLS fan-out path, and TLS
clients that misbehave, each with bystanders over TLS chatting throughout.

The limits, sizes and ordering tests of ``test_limits`` and ``test_protocol``
run here again over TLS (``tls = True``: the server listens as
``--port ssl:...`` does, the clients speak TLS).  The raw TLS clients below
drive OpenSSL through memory BIOs, so the test controls every byte on the
socket: a client can stop reading in the middle of a TLS record, send
garbage once the handshake is over, ask to renegotiate, or never finish its
handshake.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from OpenSSL import SSL
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

import tests.test_limits as limits_tests
import tests.test_protocol as protocol_tests
from tests.support import HANDSHAKE, deferLater, parse_server_frames, take
from webchat.flow import TLS_DIRECT_MAX
from webchat.limits import Limits


class RawTlsClient:
    """
    A TLS client on a blocking socket (use it from a thread), OpenSSL
    through memory BIOs: what reaches the socket, and when, is the test's.
    """

    def __init__(
        self, port: int, rcvbuf: int | None = None, max_version: int | None = None
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        context = SSL.Context(SSL.TLS_METHOD)
        if max_version is not None:
            context.set_max_proto_version(max_version)
        self.tls = SSL.Connection(context, None)
        self.tls.set_connect_state()
        self.tls.set_tlsext_host_name(b"localhost")
        self.plain = b""

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        """Send what OpenSSL has written."""
        while True:
            try:
                data = self.tls.bio_read(65536)
            except SSL.WantReadError:
                return
            self.sock.sendall(data)

    def feed(self) -> None:
        """Hand OpenSSL what the socket has; EOFError once the server closed."""
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.tls.bio_write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except SSL.WantReadError:
                self.flush()
                self.feed()
        self.flush()

    def send(self, data: bytes) -> None:
        self.tls.send(data)
        self.flush()

    def read_until(self, test: Callable[[bytes], bool]) -> bytes:
        while not test(self.plain):
            try:
                self.plain += self.tls.recv(65536)
            except SSL.WantReadError:
                self.flush()
                self.feed()
        return self.plain

    def open_websocket(self) -> None:
        self.handshake()
        self.send(HANDSHAKE)
        head = self.read_until(lambda data: b"\r\n\r\n" in data)
        if not head.startswith(b"HTTP/1.1 101 "):
            raise AssertionError(f"handshake refused: {head[:200]!r}")
        self.plain = self.plain.split(b"\r\n\r\n", 1)[1]

    def closed_by_server(self, seconds: float = 10.0) -> bool:
        """Whether the server ends the TCP connection within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
        return False


class TlsMixin(limits_tests.LimitsMixin):
    tls = True
    timeout = 60

    @inlineCallbacks
    def flood_until_too_slow(self):
        """
        Alice says 60 kB messages until the server closes a member as too
        slow (at most 500: 30 MB); Bob must have every one, in order.

        Bob decrypts in this very process, in the server's reactor thread:
        each round waits for him, or on a busy machine he would fall behind
        for seconds and be, rightly, closed as too slow himself.
        """
        chunk = "z" * 60000
        got: list[str] = []
        sent = 0
        while not self.factory.dropped["too_slow"] and sent < 500:
            for _ in range(10):
                self.alice.send_text(f"{sent} {chunk}")
                sent += 1
            got += yield take(self.bob, sent - len(got))
        self.assertEqual(
            [g.split(" ", 3)[2] for g in got], [str(n) for n in range(sent)]
        )
        self.assertEqual(self.factory.dropped["too_slow"], 1)
        self.assertTrue(
            [x for x in self.logs.lines if x.endswith("1008 too slow")], self.logs.lines
        )
        for _ in range(50):  # gone, and its buffers with it, soon after
            if len(self.factory.connections) == 2:
                break
            yield deferLater(0.1)
        self.assertEqual(sorted(p.chat_id for p in self.factory.connections), [1, 2])
        yield self.assert_bystanders_chat()

    def raw_tls(self, **kwargs) -> RawTlsClient:
        client = RawTlsClient(self.port.getHost().port, **kwargs)
        self.addCleanup(client.close)
        return client


# -- the existing limits and relay tests, over TLS --------------------------------


class TlsSlowReaderTests(TlsMixin, limits_tests.SlowReaderTests):
    """A TLS reader that never reads is closed 1008; the others get everything."""

    @inlineCallbacks
    def test_a_reader_that_never_reads_is_dropped_and_others_get_everything(self):
        yield self.open_unread_socket()  # kept open (and unread) until cleanup
        yield deferLater(0.1)
        yield self.flood_until_too_slow()


class TlsMessageSizeTests(TlsMixin, limits_tests.MessageSizeTests):
    """Message and frame sizes over TLS: 1009 as over TCP."""


class TlsRelayTests(protocol_tests.RelayTests):
    """Order, exact text, big messages and closes over TLS."""

    tls = True
    timeout = 60


class TlsRawFrameTests(protocol_tests.RawFrameTests):
    """Byte for byte on the wire, inside TLS."""

    tls = True
    timeout = 60


# -- what only TLS has -------------------------------------------------------------


class TlsFanOutTests(TlsMixin, TestCase):
    limits = Limits(rate_limit=0, max_message_size=256 * 1024)

    @inlineCallbacks
    def test_small_and_big_turns_interleaved_arrive_in_order(self):
        # Small turns take the direct path (one SSL_write, straight to the
        # socket), turns over TLS_DIRECT_MAX go through Twisted's TLS layer,
        # and a member's later turns queue behind whatever that layer holds.
        carol = yield self.connect()
        big = "b" * (TLS_DIRECT_MAX + 1000)
        said = []
        for n in range(60):
            text = f"{n} " + (big if n % 7 == 3 else "small")
            self.alice.send_text(text)
            said.append(f"id 1: {text}")
            if n % 10 == 0:
                yield deferLater(0)
        self.assertEqual((yield take(self.bob, len(said))), said)
        self.assertEqual((yield take(carol, len(said))), said)
        yield self.assert_bystanders_chat()


class TlsReusedBufferTests(TlsMixin, TestCase):
    # A kernel share of 256 kB (SO_SNDBUF 128 kB, doubled): 360 kB of
    # turns overflow it and stay within the 512 kB allowance.
    limits = Limits(rate_limit=0, max_send_buffer=512 * 1024)

    @inlineCallbacks
    def test_a_member_behind_mid_turn_decrypts_everything_the_next_one_took(self):
        # The server reads every member's ciphertext into one buffer it
        # reuses for the next member.  A member whose kernel buffer fills
        # keeps the unsent rest in Twisted's buffer: that rest must be its
        # own copy, not a view the next member's ciphertext overwrites.
        reader = self.raw_tls(rcvbuf=4096)
        yield deferToThread(reader.open_websocket)
        carol = yield self.connect()  # after the reader in the room's order
        # Turns of at most TLS_DIRECT_MAX (four of these), the direct path's.
        said = [f"{n} " + "r" * 15000 for n in range(24)]
        for text in said:
            self.alice.send_text(text)
            yield deferLater(0)
        for member in (self.bob, carol):
            self.assertEqual(
                (yield take(member, len(said))), [f"id 1: {t}" for t in said]
            )

        def read_everything() -> bytes:
            # The frames, once all have come (each holds its text in full).
            return reader.read_until(
                lambda data: (
                    data.count(b"id 1: ") >= len(said)
                    and data.endswith(said[-1].encode())
                )
            )

        frames = parse_server_frames((yield deferToThread(read_everything)))
        self.assertEqual(
            [payload.decode() for _, payload in frames], [f"id 1: {t}" for t in said]
        )
        yield self.assert_bystanders_chat()


class TlsSessionTests(TlsMixin, TestCase):
    @inlineCallbacks
    def test_a_returning_client_resumes_its_session(self):
        port = self.port.getHost().port
        context = self.client_ssl_context()

        def connect_twice() -> tuple[bool, bool]:
            session = None
            reused = []
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    with context.wrap_socket(
                        s, server_hostname="localhost", session=session
                    ) as tls:
                        tls.sendall(HANDSHAKE)
                        tls.recv(4096)  # the 101
                        # TLS 1.3's session tickets come after the handshake
                        # (here: with the server's first write); read them.
                        tls.settimeout(0.5)
                        try:
                            tls.recv(4096)
                        except TimeoutError:
                            pass
                        reused.append(tls.session_reused)
                        session = tls.session
                        # A clean TLS close: OpenSSL forgets the session of a
                        # connection that just drops (an unexpected EOF).
                        tls.unwrap()
            return reused[0], reused[1]

        first, second = yield deferToThread(connect_twice)
        self.assertFalse(first)
        self.assertTrue(second, "the second connection did a full handshake")
        yield self.assert_bystanders_chat()


class TlsHostileClientTests(TlsMixin, TestCase):
    limits = Limits(rate_limit=0, max_send_buffer=256 * 1024, handshake_timeout=1.0)

    @inlineCallbacks
    def test_a_client_that_stops_reading_mid_record_is_closed_as_too_slow(self):
        reader = self.raw_tls(rcvbuf=4096)
        yield deferToThread(reader.open_websocket)
        self.alice.send_text("x" * 60000)  # four TLS records' worth
        yield self.bob.received.get()

        def read_part_of_a_record() -> bytes:
            # 5 bytes of record header and a few of its ciphertext, and not
            # one more byte ever after.
            return reader.sock.recv(100)

        part = yield deferToThread(read_part_of_a_record)
        self.assertEqual(part[:1], b"\x17")  # an application-data record
        yield self.flood_until_too_slow()

    @inlineCallbacks
    def test_garbage_after_the_tls_handshake_ends_only_that_connection(self):
        hostile = self.raw_tls()
        yield deferToThread(hostile.open_websocket)
        yield self.wait_for_connections(3)
        # Not a TLS record: the server's TLS layer fails it and hangs up.
        yield deferToThread(hostile.sock.sendall, b"GET / HTTP/1.1\r\n" * 8)
        closed = yield deferToThread(hostile.closed_by_server)
        self.assertTrue(closed)
        yield self.wait_for_connections(2)
        self.assertTrue(
            [x for x in self.logs.lines if "has disconnected" in x], self.logs.lines
        )
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_renegotiation_is_refused_and_the_others_chat_on(self):
        hostile = self.raw_tls(max_version=SSL.TLS1_2_VERSION)
        yield deferToThread(hostile.open_websocket)
        yield self.wait_for_connections(3)

        def renegotiate() -> str:
            hostile.tls.renegotiate()
            try:
                hostile.handshake()
            except (SSL.Error, EOFError, OSError) as e:
                return f"refused: {e!r}"
            return "renegotiated"

        outcome = yield deferToThread(renegotiate)
        self.assertTrue(outcome.startswith("refused"), outcome)
        yield self.assert_bystanders_chat()
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_client_that_never_finishes_the_handshake_is_cut_at_the_timeout(self):
        stalled = self.raw_tls()

        def half_a_client_hello() -> bytes:
            try:
                stalled.tls.do_handshake()
            except SSL.WantReadError:
                pass
            hello = stalled.tls.bio_read(65536)
            stalled.sock.sendall(hello[: len(hello) // 2])
            return hello

        yield deferToThread(half_a_client_hello)
        started = time.monotonic()
        for _ in range(3):
            yield self.assert_bystanders_chat()
        closed = yield deferToThread(stalled.closed_by_server, 10.0)
        self.assertTrue(closed)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 1)
        self.assertTrue(
            [x for x in self.logs.lines if "no complete TLS handshake within 1 s" in x],
            self.logs.lines,
        )
        yield self.assert_bystanders_chat()
