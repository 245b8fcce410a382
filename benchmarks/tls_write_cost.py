"""The floor of a TLS member's turn: SSL_write, reading the ciphertext, send().

A micro-benchmark for issue #16: what one member's turn costs over TLS at
the bottom, without the server around it, so the fan-out figures can be
read against a wall.  ``--connections`` loopback TCP connections, each with
its own OpenSSL connection in memory-BIO mode made from Twisted's
``CertificateOptions`` (so ``SSL_MODE_RELEASE_BUFFERS`` as in the server),
handshaken in memory; a child process drains every socket (epoll), as the
load generator would.  Then, for each turn size, rounds over all
connections of:

* ``pyopenssl``: ``Connection.send`` + ``bio_read`` + ``socket.send``
  (webchat's fast path before the direct calls);
* ``direct``: ``SSL_write`` and ``BIO_read`` through the bindings, into one
  reused buffer, and ``socket.send`` of a view of it (``flow.TlsWriter``);
* ``direct-keep``: the same with ``SSL_MODE_RELEASE_BUFFERS`` cleared;
* ``flow``: webchat's own ``FlowControl._send_tls`` making those calls, its
  TLS layer stood in for (the Python the server adds around them);
* ``encrypt``: ``direct`` without the ``send`` (OpenSSL and Python only);
* ``send``: ``socket.send`` of as many bytes as the ciphertext, no TLS;
* ``loop``: the Python loop alone.

Last, the memory that keeping the buffers costs (RSS after a turn to
every connection, released vs kept, per connection).  Printed:
microseconds per member-turn (the fastest of ``--rounds``), one JSON line
per size and way.  Run it on a quiet machine; the numbers are a floor, the
server adds its room loop and flow-control checks on top::

    python -m benchmarks.tls_write_cost --connections 1000 --sizes 70,3300,7000
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib
from twisted.internet import ssl as twisted_ssl

from benchmarks.tls import make_tls_files
from webchat.flow import FlowControl


def _count_short(short: list[int]) -> None:
    short[0] += 1


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _drain(listener: socket.socket, count: int) -> None:
    """The child: accept ``count`` connections and read them until they close."""
    selector = selectors.DefaultSelector()
    for _ in range(count):
        conn, _ = listener.accept()
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
    listener.close()
    sink = bytearray(1 << 20)
    open_ = count
    while open_:
        for key, _ in selector.select(5.0):
            try:
                got = key.fileobj.recv_into(sink)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if not got:
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                open_ -= 1
    os._exit(0)


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    """Move whatever ``a`` has written into ``b``."""
    try:
        while True:
            b.bio_write(a.bio_read(65536))
    except SSL.WantReadError:
        pass


def _handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> SSL.Connection:
    """A server-side connection with its handshake done in memory."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    for _ in range(10):  # a TLS 1.3 handshake takes 2 flights each way
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        _pump(client, server)
        _pump(server, client)
    try:
        while True:
            server.bio_read(65536)  # session tickets, meant for the client
    except SSL.WantReadError:
        pass
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--sizes", default="70,700,3300,7000,14000")
    parser.add_argument("--rounds", type=int, default=30, help="per way and size")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(args.connections)
    pid = os.fork()
    if pid == 0:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:  # the reader on a core of its own, as the load generator
            os.sched_setaffinity(0, cpus[1:])
        _drain(listener, args.connections)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    socks = []
    for _ in range(args.connections):
        sock = socket.create_connection(listener.getsockname())
        sock.setblocking(False)
        socks.append(sock)
    listener.close()

    with tempfile.TemporaryDirectory() as directory:
        files = make_tls_files(Path(directory))
        options = twisted_ssl.CertificateOptions(
            privateKey=twisted_ssl.PrivateCertificate.loadPEM(
                files.key.read_text() + files.cert.read_text()
            ).privateKey.original,
            certificate=twisted_ssl.Certificate.loadPEM(
                files.cert.read_text()
            ).original,
        )
    server_ctx = options.getContext()
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    conns = [_handshake(server_ctx, client_ctx) for _ in socks]
    buffer = _ffi.new("char[]", 65536 + 4096)
    view = memoryview(_ffi.buffer(buffer))
    from_buffer = _ffi.from_buffer
    ssl_write, bio_read = _lib.SSL_write, _lib.BIO_read
    pairs = [
        (sock.send, conn._ssl, conn._from_ssl)
        for sock, conn in zip(socks, conns, strict=True)
    ]
    plain_pairs = [(sock.send, conn) for sock, conn in zip(socks, conns, strict=True)]
    short = [0]

    def pyopenssl(data: bytes, cap: int) -> None:
        for send, conn in plain_pairs:
            conn.send(data)
            cipher = conn.bio_read(cap)
            if send(cipher) < len(cipher):
                short[0] += 1

    def direct(data: bytes, cap: int) -> None:
        size = len(data)
        for send, ssl, bio in pairs:
            ssl_write(ssl, from_buffer(data), size)
            got = bio_read(bio, buffer, cap)
            if send(view[:got]) < got:
                short[0] += 1

    def encrypt(data: bytes, cap: int) -> None:
        size = len(data)
        for _send, ssl, bio in pairs:
            ssl_write(ssl, from_buffer(data), size)
            bio_read(bio, buffer, cap)

    def send_only(data: bytes, cap: int) -> None:
        block = data + bytes(22)  # as long as the ciphertext
        for send, _ssl, _bio in pairs:
            if send(block) < len(block):
                short[0] += 1

    # webchat's own ``FlowControl._send_tls`` on the same connections, its
    # TLS layer and the factory stood in for by plain objects: the Python
    # the server wraps around the direct calls.
    factory = SimpleNamespace(reactor=None)
    members = []
    for sock, conn in zip(socks, conns, strict=True):
        member = FlowControl()
        member._socket = sock
        member._draining = True  # a short send is counted, never scheduled
        member.factory = factory  # type: ignore[attr-defined]
        member._tls = SimpleNamespace(  # type: ignore[assignment]
            _appSendBuffer=[],
            disconnecting=False,
            _handshakeDone=True,
            _aggregator=SimpleNamespace(_buffer=[]),
            _tlsConnection=conn,
            transport=SimpleNamespace(write=lambda rest: _count_short(short)),
        )
        members.append(member)

    def flow(data: bytes, cap: int) -> None:
        for member in members:
            member._send_tls(data)

    def loop(data: bytes, cap: int) -> None:
        for _send, _ssl, _bio in pairs:
            pass

    def keep_buffers(on: bool) -> None:
        for conn in conns:
            if on:
                _lib.SSL_clear_mode(conn._ssl, _lib.SSL_MODE_RELEASE_BUFFERS)
            else:
                _lib.SSL_set_mode(conn._ssl, _lib.SSL_MODE_RELEASE_BUFFERS)

    ways: list[tuple[str, Any, bool]] = [
        ("loop", loop, False),
        ("send", send_only, False),
        ("encrypt", encrypt, False),
        ("pyopenssl", pyopenssl, False),
        ("direct", direct, False),
        ("flow", flow, False),
        ("direct-keep", direct, True),
    ]
    # What keeping the buffers costs in memory: RSS after a 7 KB turn to
    # every connection, first of all (before freed buffers pad the heap),
    # with them released after each write (one buffer in use at a time),
    # then after one with them kept (one each).
    data = os.urandom(7000)
    before = _rss_kib()
    direct(data, 7064)
    time.sleep(0.05)
    released = _rss_kib()
    keep_buffers(True)
    direct(data, 7064)
    kept = _rss_kib()
    keep_buffers(False)
    print(
        json.dumps(
            {
                "rss_kib_before": before,
                "rss_kib_released": released,
                "rss_kib_kept": kept,
                "kib_per_connection_kept": round((kept - released) / len(pairs), 1),
            }
        ),
        flush=True,
    )
    for size in sizes:
        data = os.urandom(size)
        cap = size + 64
        # The ways take turns, round by round, and each keeps its fastest
        # round: other processes on the machine only ever slow a round down.
        best = dict.fromkeys([name for name, _, _ in ways], float("inf"))
        shorts = dict.fromkeys(best, 0)
        for _ in range(args.rounds):
            for name, way, keep in ways:
                keep_buffers(keep)
                short[0] = 0
                start = time.perf_counter()
                way(data, cap)
                elapsed = time.perf_counter() - start
                best[name] = min(best[name], elapsed)
                shorts[name] += short[0]
                keep_buffers(False)
                time.sleep(0.005)  # let the reader catch up, as between turns
        for name in best:
            print(
                json.dumps(
                    {
                        "size": size,
                        "way": name,
                        "us_per_member_turn": round(1e6 * best[name] / len(pairs), 2),
                        "short_sends": shorts[name],
                    }
                ),
                flush=True,
            )
    for sock in socks:
        sock.close()
    os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
