"""Webhooks: signed, retried, bounded events from the chat to the app.

* ``signing``: the request's headers and HMAC signature (and ``verify``,
  what a receiver does);
* ``sender``: the bounded queue and the ``WebhookSender`` service that
  POSTs it through treq, retrying with capped backoff;
* ``events``: ``AppEvents``, which turns connections and messages into
  ``user.online``, ``user.offline``, ``room.vacated`` and ``message``;
* ``redis_tally``: the counts shared by the nodes of a cluster (--redis),
  so each event is sent by one node only.

docs/webhooks.md describes what the app receives.
"""

from webchat.webhooks.events import (
    DEFAULT_EVENTS,
    EVENT_TYPES,
    AppEvents,
    LocalTally,
    parse_event_types,
)
from webchat.webhooks.sender import WebhookCollector, WebhookSender, treq_post
from webchat.webhooks.signing import sign, verify

__all__ = [
    "DEFAULT_EVENTS",
    "EVENT_TYPES",
    "AppEvents",
    "LocalTally",
    "WebhookCollector",
    "WebhookSender",
    "parse_event_types",
    "sign",
    "treq_post",
    "verify",
]
