"""The webhook sender: a bounded queue of events, POSTed one at a time.

Delivery is at least once: the event at the head of the queue stays there
until the receiver answers 2xx, and is retried with capped exponential
backoff (jittered) after a 5xx, 408, 429, a timeout or a connection error.
A 429 or 503 with a ``Retry-After`` (seconds, or an HTTP date) is retried
no sooner than it asks, up to the backoff's cap: a receiver that says when
it can take more is not hammered before then, nor can it park the queue.
Any other answer (a 3xx, a 4xx) means the receiver will never take it: it is
dropped and counted, so one bad event cannot hold up the rest forever.  One
request at a time keeps the events of one node in order.

Nothing here blocks the chat: ``enqueue`` appends and returns.  A full queue
keeps what matters most: a new event evicts the oldest waiting event of a
lesser kind (``room.vacated``, then ``message``; ``user.*`` events are never
evicted), else the new event is dropped (counted, logged once per episode),
so a flood of cheap events (anyone may open and leave rooms) cannot crowd
out a user's ``user.offline``.  The sender is a
``Service``: stopping it gives the queue ``drain_grace`` seconds to empty,
then counts what is left as dropped.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import stringToDatetime

from webchat.limits import (
    SHUTDOWN_GRACE,
    WEBHOOK_QUEUE,
    WEBHOOK_RETRY_INITIAL,
    WEBHOOK_RETRY_MAX,
    WEBHOOK_TIMEOUT,
)
from webchat.logtext import escape_for_log
from webchat.webhooks.signing import request_headers

log = Logger(namespace="webchat")


class Answer(NamedTuple):
    """What the sender needs of a receiver's answer."""

    #: The HTTP status.
    status: int
    #: Its ``Retry-After`` header as sent ("": none), read on 429 and 503.
    retry_after: str = ""


#: Posts ``body`` with ``headers`` to ``url``; fires with the ``Answer``
#: once the whole answer is read.  Cancelling it abandons the request.
Post = Callable[[str, bytes, dict[str, str]], Deferred[Answer]]

#: Why events are dropped (webchat_webhook_dropped_total), each from zero.
DROP_REASONS = ("queue_full", "rejected", "shutdown", "redis")
#: What a full queue keeps: a new event evicts the oldest waiting one of a
#: lower rank, lowest first (a kind not listed ranks with ``user.*``).
EVICTION_RANK = {"room.vacated": 0, "message": 1}
TOP_RANK = 2
#: Statuses worth another try: the receiver may take the event later.
RETRY_STATUSES = frozenset({408, 429})
#: Statuses whose ``Retry-After`` says when to try again (RFC 9110, 6585).
RETRY_AFTER_STATUSES = frozenset({429, 503})


def retry_after_seconds(value: str, now: float) -> float | None:
    """
    A ``Retry-After`` header as seconds from ``now``: a whole number of
    seconds, or an HTTP date (0 if it is past); None if it is neither, and
    the answer is then retried as any other.
    """
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        try:
            return float(int(value))
        except (ValueError, OverflowError):  # too many digits: capped anyway
            return float("inf")
    try:
        when = stringToDatetime(value.encode("latin-1", "replace"))
    except (ValueError, IndexError, OverflowError):
        return None
    return max(when - now, 0.0)


def safe_url(url: str) -> str:
    """
    ``url`` as log lines show it: scheme, host, port and path only.  A
    receiver's URL often carries a credential (``user:pass@``, ``?token=``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1/x": nothing of it can be shown safely
        return "(an unparsable URL)"
    # The netloc after its userinfo, as given: parsing the port (.port) may
    # raise, and a log line must never be what fails.
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


class _Discard(Protocol):
    """Reads an answer's body to its end, keeping none of it."""

    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # Not after a cancel (a timeout): ``done`` has fired already.
        if not self.done.called:
            self.done.callback(None)


def treq_post(reactor: Any) -> Post:
    """
    A ``Post`` on treq, over a pool of kept-alive connections (one request
    at a time goes out, so one connection is all it ever uses).
    """
    from treq.client import HTTPClient
    from twisted.web.client import (
        Agent,
        HTTPConnectionPool,
        RequestTransmissionFailed,
        ResponseNeverReceived,
    )

    class QuietFactory(HTTPConnectionPool._factory):  # type: ignore[name-defined]
        # Not two "Starting factory" lines in the log per connection.
        noisy = False

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = QuietFactory
    pool.maxPersistentPerHost = 1
    client = HTTPClient(Agent(reactor, pool=pool))

    def read(response: Any) -> Deferred[Answer]:
        # Read to the end: a connection whose answer is unread cannot
        # carry the next request.
        # Cancelling (a timeout) closes the connection: a receiver that
        # drips an endless body would otherwise keep it, and its fd, open
        # for ever, one more at each retry.
        def abort(_: Deferred[None]) -> None:
            if discard.transport is not None:
                discard.transport.loseConnection()

        done: Deferred[None] = Deferred(abort)
        discard = _Discard(done)
        response.deliverBody(discard)
        retry_after = response.headers.getRawHeaders(b"retry-after") or [b""]
        answer = Answer(response.code, retry_after[0].decode("latin-1"))
        return done.addCallback(lambda _: answer)

    def post(url: str, body: bytes, headers: dict[str, str]) -> Deferred[Answer]:
        def send() -> Deferred[Answer]:
            return client.post(url, data=body, headers=headers).addCallback(read)

        def once_more(failure: Failure) -> Deferred[Answer]:
            # A kept-alive connection the receiver had closed meanwhile:
            # Twisted retries only idempotent methods on a fresh one, and a
            # webhook is one (its event id makes a repeat harmless).
            failure.trap(ResponseNeverReceived, RequestTransmissionFailed)
            if any(r.check(CancelledError) for r in failure.value.reasons):
                # Timed out (or shutting down): not again, and a plain
                # CancelledError so that the timeout reads as one.
                raise CancelledError()
            return send()

        return send().addErrback(once_more)

    post.pool = pool  # type: ignore[attr-defined]
    return post


class WebhookSender(Service):
    """
    Sends the events handed to ``enqueue`` to ``url``, signed with
    ``secret``, in order, each until it is taken (2xx) or refused (4xx).

    ``clock`` times the requests and the backoff; ``post`` makes the
    requests (``treq_post`` in production, a fake in tests); ``rng`` draws
    the jitter.  Counters for /metrics: ``sent`` (attempts by status:
    the HTTP code, ``timeout`` or ``error``), ``dropped`` (by reason).
    """

    def __init__(
        self,
        clock: IReactorTime,
        url: str,
        secret: bytes,
        post: Post,
        *,
        queue_size: int = WEBHOOK_QUEUE,
        timeout: float = WEBHOOK_TIMEOUT,
        retry_initial: float = WEBHOOK_RETRY_INITIAL,
        retry_max: float = WEBHOOK_RETRY_MAX,
        drain_grace: float = SHUTDOWN_GRACE,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self.clock = clock
        self.url = url
        #: The URL as log lines show it (no credentials).
        self.shown_url = safe_url(url)
        self._secret = secret
        self._post = post
        self.queue_size = queue_size
        self.timeout = timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.drain_grace = drain_grace
        self._rng = rng or random.random
        #: Events waiting: (id, body, kind), the head being the one tried now.
        self.queue: deque[tuple[str, bytes, str]] = deque()
        #: How many events of each rank wait behind the head: a full queue
        #: looks for one to evict only if there is one (a flood of messages
        #: into a full queue must not scan it for each).
        self._behind_head: Counter[int] = Counter()
        self.sent: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        #: Failed attempts in a row (the backoff's exponent).
        self.failures = 0
        self._in_flight: Deferred[Answer] | None = None
        self._retry: IDelayedCall | None = None
        #: Events dropped since the queue filled up (0: not full).
        self._overflow = 0
        self._drained: Deferred[None] | None = None

    # -- what the chat calls ----------------------------------------------------------

    def enqueue(self, event_id: str, body: bytes, kind: str = "") -> bool:
        """
        Queue one event of type ``kind`` (never waits).  A full queue evicts
        the oldest waiting event of a lower rank for it; ``False``: there
        was none, the new event was dropped.  Either way one is counted.
        """
        if len(self.queue) >= self.queue_size:
            self._overflowed()
            if not self._evict_for(EVICTION_RANK.get(kind, TOP_RANK)):
                return False
        if self.queue:
            self._behind_head[_rank(kind)] += 1
        self.queue.append((event_id, body, kind))
        self._next()
        return True

    def _overflowed(self) -> None:
        """One event dropped for a full queue: counted, logged once an episode."""
        self.dropped["queue_full"] += 1
        if not self._overflow:
            log.warn(
                "Webhook queue full ({size} events): dropping room.vacated, "
                "then message, then new events until {url} takes some",
                size=self.queue_size,
                url=self.shown_url,
            )
        self._overflow += 1

    def _evict_for(self, rank: int) -> bool:
        """Remove the oldest waiting event ranked below ``rank``, lowest first."""
        # The head is being tried (or waits to be retried): never evicted.
        for lower in range(rank):
            if not self._behind_head[lower]:
                continue
            for index in range(1, len(self.queue)):
                if _rank(self.queue[index][2]) == lower:
                    del self.queue[index]
                    self._behind_head[lower] -= 1
                    return True
        return False

    # -- lifetime -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._next()

    def stopService(self) -> Deferred[None]:
        """Give the queue ``drain_grace`` seconds to empty, then drop the rest."""
        super().stopService()
        if not self.queue and self._in_flight is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._drained = done
        if self._retry is not None and self._retry.active():
            # A receiver that failed a moment ago gets one more try now.
            self._retry.cancel()
            self._retry = None
        self._next()
        timer = self.clock.callLater(self.drain_grace, self._give_up)
        return done.addBoth(lambda result: _cancel(timer) or result)

    def _give_up(self) -> None:
        left = len(self.queue)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        in_flight, self._in_flight = self._in_flight, None
        self.queue.clear()
        self._behind_head.clear()
        if in_flight is not None:
            in_flight.cancel()
        self.dropped["shutdown"] += left
        if left:
            log.warn(
                "Shutting down: {count} webhook event(s) not delivered to {url}",
                count=left,
                url=self.shown_url,
            )
        self._finish_drain()

    def _finish_drain(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    # -- sending --------------------------------------------------------------------

    def _next(self) -> None:
        """Send the head of the queue, unless one is under way or waiting."""
        if self._in_flight is not None or self._retry is not None:
            return
        if not self.queue:
            if self._drained is not None:
                self._finish_drain()
            return
        if not self.running and self._drained is None:
            return  # not started yet (or stopped and drained)
        self._attempt()

    def _attempt(self) -> None:
        event_id, body, _ = self.queue[0]
        timestamp = int(self.clock.seconds())
        headers = request_headers(self._secret, event_id, timestamp, body)
        try:
            d = self._post(self.url, body, headers)
        except Exception:
            d = fail()  # a bad URL, say: fails like a refused connection
        if self.timeout:
            # Whatever a cancelled request fails with, it timed out.
            d.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timed_out)
        self._in_flight = d
        d.addCallbacks(
            self._answered, self._failed, callbackArgs=(d,), errbackArgs=(d,)
        )
        d.addErrback(
            lambda failure: log.failure(
                "An error has occurred: a webhook answer", failure
            )
        )

    def _answered(self, answer: Answer, d: Deferred[Answer]) -> None:
        if self._in_flight is not d:
            return  # given up on at shutdown
        self._in_flight = None
        status = answer.status
        self.sent[str(status)] += 1
        if 200 <= status < 300:
            self._done()
        elif status >= 500 or status in RETRY_STATUSES:
            wait = None
            if status in RETRY_AFTER_STATUSES:
                wait = retry_after_seconds(answer.retry_after, self.clock.seconds())
            if wait is None:
                self._back_off(f"HTTP {status}")
            else:
                wait = min(wait, self.retry_max)
                self._back_off(f"HTTP {status}, Retry-After {wait:g} s", wait)
        else:
            event_id = self.queue[0][0]
            self.dropped["rejected"] += 1
            log.warn(
                "Webhook event {id} refused by {url} with HTTP {status}: dropped",
                id=event_id,
                url=self.shown_url,
                status=status,
            )
            self._done()

    def _failed(self, failure: Failure, d: Deferred[Answer]) -> None:
        if self._in_flight is not d:
            return
        self._in_flight = None
        if failure.check(DeferTimeoutError, TwistedTimeoutError):
            self.sent["timeout"] += 1
            why = f"no answer within {self.timeout:g} s"
        else:
            self.sent["error"] += 1
            error = failure.value
            # ResponseNeverReceived and the like wrap the failure that matters.
            reasons = getattr(error, "reasons", None)
            if reasons and isinstance(reasons[0], Failure):
                error = reasons[0].value
            why = escape_for_log(self._without_userinfo(str(error)))
            why = why or type(error).__name__
        self._back_off(why)

    def _without_userinfo(self, text: str) -> str:
        """``text`` (an error's words) with the URL's ``user:pass@`` taken out."""
        try:
            netloc = urlsplit(self.url).netloc
        except ValueError:
            return text
        userinfo, at, host = netloc.rpartition("@")
        if at:
            text = text.replace(self.url, self.shown_url).replace(netloc, host)
            text = text.replace(userinfo + at, "")
        return text

    def _done(self) -> None:
        """The head is settled (taken, or refused for good): on to the next."""
        self.queue.popleft()
        if self.queue:  # the next is the head now
            self._behind_head[_rank(self.queue[0][2])] -= 1
        if self.failures:
            log.info(
                "Webhooks to {url} delivered again after {count} failed attempt(s)",
                url=self.shown_url,
                count=self.failures,
            )
            self.failures = 0
        if self._overflow:
            log.info(
                "Webhook queue has room again: {count} event(s) were dropped",
                count=self._overflow,
            )
            self._overflow = 0
        self._next()

    def _back_off(self, why: str, at_least: float = 0.0) -> None:
        """
        The head failed: try it again after the backoff, and no sooner than
        ``at_least`` seconds (the receiver's Retry-After, already capped).
        """
        if not self.failures:
            # Once per episode; _done says when it is over.
            log.warn(
                "Webhook delivery to {url} failing ({why}): retrying with backoff",
                url=self.shown_url,
                why=why,
            )
        delay = max(self.delay(self.failures), at_least)
        self.failures += 1
        if self._drained is not None:
            delay = min(delay, self.retry_initial)  # shutting down: no long waits
        self._retry = self.clock.callLater(delay, self._retry_now)

    def delay(self, failures: int) -> float:
        """
        The wait after ``failures`` failures before this one: twice the last
        each time, capped, and jittered down by up to half (so nodes whose
        receiver came back do not all retry in the same instant).
        """
        full = min(self.retry_max, self.retry_initial * 2.0 ** min(failures, 64))
        return full * (1.0 - 0.5 * self._rng())

    def _retry_now(self) -> None:
        self._retry = None
        if self.queue:
            self._attempt()
        else:
            self._next()


def _rank(kind: str) -> int:
    """How much an event of type ``kind`` is kept when the queue is full."""
    return EVICTION_RANK.get(kind, TOP_RANK)


def _timed_out(result: Any, timeout: float) -> Failure:
    """A request cancelled by its timeout, as a timeout (not an error)."""
    return Failure(DeferTimeoutError(timeout, "webhook request timed out"))


def _cancel(call: IDelayedCall) -> None:
    if call.active():
        call.cancel()


class WebhookCollector(Collector):
    """The sender's counters at scrape time (docs/operations.md, "Webhooks")."""

    def __init__(self, sender: WebhookSender) -> None:
        self._sender = sender

    def collect(self) -> Iterator[Metric]:
        sender = self._sender
        sent = CounterMetricFamily(
            "webchat_webhook_sent",
            "Webhook requests made, by outcome: the HTTP status, timeout "
            "(no answer within --webhook-timeout) or error (no connection).",
            labels=["status"],
        )
        for status, count in sorted(dict(sender.sent).items()):
            sent.add_metric([status], count)
        yield sent
        dropped = CounterMetricFamily(
            "webchat_webhook_dropped",
            "Webhook events given up on, by reason (queue_full: over "
            "--webhook-queue; rejected: a 4xx answer other than 408/429; "
            "shutdown: still queued when the drain ran out; redis: a change "
            "Redis could not count, whose event may be lost).",
            labels=["reason"],
        )
        counts = dict(sender.dropped)
        for reason in dict.fromkeys((*DROP_REASONS, *counts)):
            dropped.add_metric([reason], counts.get(reason, 0))
        yield dropped
        yield GaugeMetricFamily(
            "webchat_webhook_queue",
            "Webhook events waiting to be sent (the one being tried included).",
            len(sender.queue),
        )
