"""``GET /healthz``: is this node fit to take new chats?

Load balancers and Kubernetes probes poll it.  It answers 503 from the
moment shutdown begins, while the node is still closing its chats, so a
balancer stops sending new users here before the port goes away.
"""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import Request

from webchat import __version__
from webchat.chat import WebChatFactory


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, factory: WebChatFactory) -> None:
        super().__init__()
        self._factory = factory

    def render_HEAD(self, request: Request) -> bytes:
        # The headers a GET would get, its length included, and no body:
        # returning one makes twisted.web log a warning on every probe.
        body = self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""

    def render_GET(self, request: Request) -> bytes:
        factory = self._factory
        body = {
            "status": "shutting_down" if factory.draining else "ok",
            "connections": len(factory.rooms),
            "uptime": round(factory.reactor.seconds() - factory.started_at, 3),
            "version": __version__,
        }
        if factory.link is not None:
            # Reported, not judged: with Redis down the node still serves
            # its own clients, so it stays "ok" for a balancer.
            body["redis"] = factory.link.state
        request.setResponseCode(503 if factory.draining else 200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body).encode() + b"\n"
