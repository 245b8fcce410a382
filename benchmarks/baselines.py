"""Baselines: the chat's wire protocol, served the obvious way.

The benchmark runs the same scenarios against these and reports webchat's
ratio to each, so a number means something on any machine::

    python -m benchmarks.baselines autobahn --port 9001
    python -m benchmarks.baselines websockets --port 9002
    python -m benchmarks.baselines c --port 9003

* ``autobahn``: a plain Autobahn (Twisted) server whose ``onMessage`` loops
  over the other clients calling ``sendMessage`` on each: the naive fan-out,
  framing the message once per recipient.
* ``websockets``: the ``websockets`` library (asyncio, default event loop)
  with ``websockets.broadcast()``, its own fan-out helper.
* ``c``: the C load generator's trivial fan-out server (one epoll loop, a
  frame built once and copied to each buffer).  Not a chat anyone should run:
  it is there to measure the load generator against something faster than
  any Python server (``python -m benchmarks --scenario calibrate``).

All speak the same protocol as webchat: a text message M from connection N
goes to every *other* connection of its room as ``id N: M``; ids count up
from 1.  The room is the path, as webchat's (``/ws/<room>``; ``/``, ``/ws``
and ``/ws/`` are the lobby), so the rooms scenario measures both the same
way; the C server has one room.  Only 127.0.0.1 is listened on.  Each keeps
its library's defaults otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
from typing import Any


def room_of(path: str) -> str:
    """The room a request path joins: ``/ws/<room>``, else the lobby."""
    if path.startswith("/ws/") and len(path) > 4:
        return path[4:]
    return "lobby"


def serve_autobahn(reactor: Any, port: int, tls: tuple[str, str] | None = None) -> None:
    """Listen with the naive Autobahn chat; ``reactor.run()`` is the caller's."""
    from autobahn.twisted.websocket import (
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )

    class NaiveChatProtocol(WebSocketServerProtocol):
        chat_id = 0
        room = "lobby"

        def onConnect(self, request: Any) -> None:
            self.room = room_of(request.path)

        def onOpen(self) -> None:
            self.chat_id = next(self.factory.ids)
            self.factory.rooms.setdefault(self.room, {})[self.chat_id] = self

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if isBinary:
                return
            message = b"id %d: %b" % (self.chat_id, payload)
            for client in list(self.factory.rooms.get(self.room, {}).values()):
                if client is not self:
                    client.sendMessage(message)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            members = self.factory.rooms.get(self.room, {})
            members.pop(self.chat_id, None)
            if not members:
                self.factory.rooms.pop(self.room, None)

    factory = WebSocketServerFactory(f"{'wss' if tls else 'ws'}://127.0.0.1:{port}")
    factory.protocol = NaiveChatProtocol
    factory.ids = itertools.count(1)
    factory.rooms = {}
    if tls:
        # Twisted's own TLS (its memory-BIO protocol), as anyone would write it.
        from twisted.internet import ssl

        cert, key = tls
        context = ssl.DefaultOpenSSLContextFactory(key, cert)
        reactor.listenSSL(port, factory, context, interface="127.0.0.1")
    else:
        reactor.listenTCP(port, factory, interface="127.0.0.1")


async def serve_websockets(port: int, tls: tuple[str, str] | None = None) -> None:
    """Run the ``websockets`` chat until cancelled."""
    from websockets.asyncio.server import broadcast, serve

    ids = itertools.count(1)
    rooms: dict[str, dict[Any, int]] = {}

    async def chat(connection: Any) -> None:
        chat_id = next(ids)
        room = room_of(connection.request.path)
        clients = rooms.setdefault(room, {})
        clients[connection] = chat_id
        try:
            async for message in connection:
                if isinstance(message, str):
                    others = [c for c in clients if c is not connection]
                    broadcast(others, f"id {chat_id}: {message}")
        finally:
            del clients[connection]
            if not clients:
                rooms.pop(room, None)

    context = None
    if tls:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
    async with serve(chat, "127.0.0.1", port, ssl=context) as server:
        await server.serve_forever()


def exec_c_server(port: int) -> None:
    """Replace this process with the C fan-out server (same pid: /proc stays right)."""
    from benchmarks.loadgen import build

    binary = str(build())
    os.execv(binary, [binary, "serve", str(port)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baselines", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("server", choices=["autobahn", "websockets", "c"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", help="speak TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="... and this key (PEM)")
    args = parser.parse_args(argv)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert and args.tls_key else None
    print(f"baseline {args.server} on ws://127.0.0.1:{args.port}/", flush=True)
    if args.server == "autobahn":
        from twisted.internet import reactor

        serve_autobahn(reactor, args.port, tls)
        reactor.run()
    elif args.server == "websockets":
        try:
            asyncio.run(serve_websockets(args.port, tls))
        except KeyboardInterrupt:
            pass
    else:
        exec_c_server(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
