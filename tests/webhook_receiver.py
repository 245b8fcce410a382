"""A real webhook receiver for the tests: a twisted.web site on a free port
of 127.0.0.1 that checks every request's signature as an app would."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from webchat.webhooks import verify


class Receiver(Resource):
    """
    Takes webhook requests: a bad signature gets 401 (and is recorded in
    ``bad``); otherwise the answer is ``status`` (200), or none at all while
    ``hang`` is set (the request is held open, as by a receiver that stalls).
    Each event taken (2xx) goes to ``events``; ``requests`` counts attempts.
    ``first_answers``: (status, headers) to answer the next requests with,
    one each, before any of that (a receiver that is busy for a moment).
    """

    isLeaf = True

    def __init__(self, secret: bytes) -> None:
        super().__init__()
        self.secret = secret
        self.status = 200
        self.hang = False
        self.requests = 0
        self.bad: list[bytes] = []
        self.events: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.taken: list[dict[str, Any]] = []
        self.held: list[Request] = []
        #: Take this many events, then hold their requests open anyway (the
        #: answer is lost: the sender must try again, the app sees it twice).
        self.stall_after_taking = 0
        self.first_answers: list[tuple[int, dict[bytes, bytes]]] = []

    def render_POST(self, request: Request) -> bytes | int:
        self.requests += 1
        body = request.content.read()
        timestamp = (request.getHeader(b"webchat-timestamp") or b"").decode()
        signature = (request.getHeader(b"webchat-signature") or b"").decode()
        event_id = (request.getHeader(b"webchat-event-id") or b"").decode()
        content_type = request.getHeader(b"content-type")
        if (
            not verify(self.secret, timestamp, signature, body, now=time.time())
            or content_type != b"application/json"
        ):
            self.bad.append(body)
            request.setResponseCode(401)
            return b"bad signature"
        event = json.loads(body)
        if event["id"] != event_id:
            self.bad.append(body)
            request.setResponseCode(400)
            return b"id mismatch"
        if self.first_answers:
            status, headers = self.first_answers.pop(0)
            request.setResponseCode(status)
            for name, value in headers.items():
                request.setHeader(name, value)
            return b"busy"
        if self.stall_after_taking > 0:
            self.stall_after_taking -= 1
            self.taken.append(event)
            self.events.put(event)
            self.held.append(request)
            return NOT_DONE_YET
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        if 200 <= self.status < 300:
            self.taken.append(event)
            self.events.put(event)
        return b"ok"

    def release(self) -> None:
        """Answer the held requests (503), so nothing is left open."""
        for request in self.held:
            if not request.finished and not request._disconnected:
                request.setResponseCode(503)
                request.finish()
        self.held.clear()


@inlineCallbacks
def start_receiver(test: Any, secret: bytes, port: int = 0):
    """A ``Receiver`` listening on 127.0.0.1 (``port``, else a free one)."""
    receiver = Receiver(secret)
    site = Site(receiver)
    site.displayTracebacks = False
    endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    listening = yield endpoint.listen(site)
    receiver.port = listening.getHost().port
    receiver.url = f"http://127.0.0.1:{receiver.port}/hooks"

    @inlineCallbacks
    def stop() -> Any:
        receiver.release()
        yield listening.stopListening()

    receiver.stop = stop
    test.addCleanup(stop)
    return receiver


class ThreadedReceiver:
    """A webhook receiver on its own thread: records the events it takes."""

    def __init__(self, secret: bytes) -> None:
        self.events: list[dict] = []
        self.bad = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as an app server would

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(
                    secret,
                    self.headers.get("Webchat-Timestamp", ""),
                    self.headers.get("Webchat-Signature", ""),
                    body,
                    now=time.time(),
                )
                with receiver.lock:
                    if ok:
                        receiver.events.append(json.loads(body))
                    else:
                        receiver.bad += 1
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self) -> list[tuple[str, str]]:
        with self.lock:
            return [
                (e["type"], e["data"].get("user") or e["data"].get("room"))
                for e in self.events
            ]

    def wait_for(self, predicate: Callable[[list], bool], timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not predicate(self.seen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the receiver has {self.seen()}")
            time.sleep(0.05)


def settle() -> Deferred[None]:
    """One reactor turn."""
    from twisted.internet import task

    return task.deferLater(reactor, 0, lambda: None)
