"""
The page and the room's history (issue #14), in headless Chromium against a
real ``twistd -n webchat``.

What a person sees: the room's earlier messages on joining, in order; after
being offline (the page's socket dropped, or the server stopped and
restarted), every message said meanwhile, in order, exactly once; and when
the server could not give them all back, a quiet "Some messages may be
missing", with a separator where the room's history started again.

Another person, "bob", is a plain JSON client (``websockets``), so messages
can be sent while the page is offline.  While ``window.__offline`` is set,
the page's reconnects are sent to a room name the server refuses (HTTP 400),
so "before the page reconnects" is a certainty, not a race with its backoff.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support import require, slow
from tests.test_page import QUICK, RECONNECT, BrowserMixin

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: Run before the page's own script: keeps every WebSocket the page opens in
#: ``window.__sockets``, and while ``window.__offline`` is true points new
#: ones at a room name the server refuses, so the page stays offline.  It can
#: also play a network that delays and repeats: the event whose text is
#: ``window.__hold`` is held back until ``window.__release()``, and while
#: ``window.__twice`` every event is handed to the page twice.
OFFLINE_SWITCH = """
(() => {
  window.__sockets = [];
  window.__offline = false;
  window.__hold = null;
  window.__twice = false;
  const Real = window.WebSocket;
  window.WebSocket = class extends Real {
    constructor(url, ...rest) {
      super(window.__offline ? url.replace(/\\/ws\\/[^?]*/, '/ws/%25offline') : url,
            ...rest);
      window.__sockets.push(this);
    }
    addEventListener(type, listener, ...rest) {
      if (type !== 'message') return super.addEventListener(type, listener, ...rest);
      return super.addEventListener(type, (event) => {
        if (window.__hold !== null && JSON.parse(event.data).text === window.__hold) {
          window.__release = () => listener(event);
          return;
        }
        listener(event);
        if (window.__twice) listener(event);
      }, ...rest);
    }
  };
})();
"""

MISSING = "Some messages may be missing"
SEPARATOR = "The room's history was reset"


class JsonPeer:
    """bob: a JSON-events client that sends messages and waits for their acks."""

    def __init__(self, port: int, room: str, name: str) -> None:
        try:
            from websockets.sync.client import connect
        except ImportError as e:
            raise require("websockets", f"cannot import websockets ({e})") from e
        self._stack = ExitStack()
        self.socket = self._stack.enter_context(
            connect(
                f"ws://127.0.0.1:{port}/ws/{room}?name={name}",
                subprotocols=["webchat.v1.json"],
                open_timeout=5,
            )
        )
        self.welcome = self.next_event("welcome")
        self.refs = 0

    def next_event(self, kind: str) -> dict[str, Any]:
        """The next event of type ``kind``; the others (join, leave, ...) go by."""
        for _ in range(1000):
            event = json.loads(self.socket.recv(timeout=5))
            if event["type"] == kind:
                return event
        raise AssertionError(f"no {kind} event in 1000")

    def say(self, text: str) -> dict[str, Any]:
        """Send ``text``; its ack (offset and ts) once the server has it."""
        self.refs += 1
        ref = f"b{self.refs}"
        self.socket.send(json.dumps({"type": "message", "text": text, "ref": ref}))
        ack = self.next_event("ack")
        assert ack["ref"] == ref, ack
        return ack

    def close(self) -> None:
        self._stack.close()


class HistoryPageMixin(BrowserMixin):
    """bob, and a page that can be taken offline and brought back."""

    def bob(self, room: str) -> JsonPeer:
        peer = JsonPeer(self.port, room, "bob")
        self.addCleanup(peer.close)
        return peer

    def go_offline(self, page: Page, drop: bool) -> None:
        """From now on the page cannot connect; ``drop``: close its socket too."""
        page.evaluate("window.__offline = true")
        if drop:
            page.evaluate("window.__sockets.at(-1).close()")
            self.assert_closed(page)

    def assert_closed(self, page: Page) -> None:
        self.expect(page.locator("#status")).to_have_attribute(
            "data-state", "closed", timeout=QUICK
        )

    def go_online(self, page: Page) -> None:
        """The network is back: the page reconnects at once (its 'online' event)."""
        page.evaluate(
            "window.__offline = false; window.dispatchEvent(new Event('online'))"
        )
        self.assert_connected(page, timeout=RECONNECT)

    def bob_and_ann_said_before(self) -> tuple[JsonPeer, Page]:
        """
        bob and ann's page (which can go offline) in room team, with one
        message each said and delivered: ("bob", "before") at offset 1 and
        ("ann (you)", "mine before") at 2.
        """
        bob = self.bob("team")
        ann = self.open_tab("/r/team", name="ann", script=OFFLINE_SWITCH)
        bob.say("before")
        self.wait_for_messages(ann, 1)
        self.type_message(ann, "mine before")
        self.wait_for_delivered(ann, 2)
        return bob, ann

    def offsets(self, page: Page) -> list[int]:
        return page.evaluate(
            "() => [...document.querySelectorAll('#messages > li.message')]"
            ".map((li) => Number(li.dataset.offset))"
        )


@slow
class JoinHistoryPageTests(HistoryPageMixin, SynchronousTestCase):
    """Memory history (the default): what was said before you came."""

    def test_joining_shows_the_earlier_messages_in_order_as_they_were(self) -> None:
        bob = self.bob("team")
        acks = [bob.say(text) for text in ("one", "two", "three")]

        ann = self.open_tab("/r/team", name="ann")
        self.assertEqual(
            self.wait_for_messages(ann, 3),
            [("bob", "one"), ("bob", "two"), ("bob", "three")],
        )
        # Like any other message: grouped under bob's name, at the time he
        # said it (the server's ts), numbered by the room's offset.
        kinds = [line["kind"] for line in self.log(ann) if "message" in line["kind"]]
        self.assertEqual(kinds, ["message", "message grouped", "message grouped"])
        times = ann.evaluate(
            "() => [...document.querySelectorAll('#messages > li.message')]"
            ".map((li) => Number(li.dataset.ts))"
        )
        self.assertEqual(times, [ack["ts"] for ack in acks])
        self.assertEqual(self.offsets(ann), [ack["offset"] for ack in acks])
        self.assertEqual(ann.locator("li.notice.missing").count(), 0)
        self.assertEqual(ann.locator("li.separator").count(), 0)

        # Live messages follow them; hers are hers.
        bob.say("four")
        self.wait_for_messages(ann, 4)
        self.type_message(ann, "hi bob")
        self.wait_for_delivered(ann, 5)

        # She leaves the room and comes back: the log is rebuilt from history,
        # her own message (sent from an earlier connection) shown as hers.
        ann.locator("#room-input").fill("elsewhere")
        ann.locator("#room-button").click()
        self.assert_connected(ann)
        self.assertEqual(self.messages(ann), [])
        ann.locator("#room-input").fill("team")
        ann.locator("#room-button").click()
        self.assert_connected(ann)
        self.assertEqual(
            self.wait_for_messages(ann, 5),
            [
                ("bob", "one"),
                ("bob", "two"),
                ("bob", "three"),
                ("bob", "four"),
                ("ann (you)", "hi bob"),
            ],
        )
        self.expect(ann.locator("#messages > li.message").last).to_have_class(
            "message mine"
        )
        self.assertEqual(self.offsets(ann), [1, 2, 3, 4, 5])

    def test_a_dropped_connection_misses_nothing(self) -> None:
        bob, ann = self.bob_and_ann_said_before()

        self.go_offline(ann, drop=True)
        for text in ("while away 1", "while away 2", "while away 3"):
            bob.say(text)
        self.go_online(ann)
        expected = [
            ("bob", "before"),
            ("ann (you)", "mine before"),
            ("bob", "while away 1"),
            ("bob", "while away 2"),
            ("bob", "while away 3"),
        ]
        self.assertEqual(self.wait_for_messages(ann, 5), expected)
        bob.say("after")
        self.assertEqual(self.wait_for_messages(ann, 6), [*expected, ("bob", "after")])
        self.assertEqual(self.offsets(ann), [1, 2, 3, 4, 5, 6])
        self.assertEqual(ann.locator("li.notice.missing").count(), 0)
        self.assertEqual(ann.locator("li.separator").count(), 0)
        # Nothing replayed twice: the page asked from where it stood.
        self.assertRegex(
            ann.evaluate("window.__sockets.at(-1).url"), r"[?&]since=2&epoch=[\w-]+"
        )

    def test_late_and_repeated_messages_are_shown_once_in_offset_order(self) -> None:
        bob = self.bob("team")
        ann = self.open_tab("/r/team", name="ann", script=OFFLINE_SWITCH)
        bob.say("one")
        self.wait_for_messages(ann, 1)

        # "two" is held back on its way (as a message delayed by a Redis
        # outage would be), and every event arrives twice.
        ann.evaluate("window.__hold = 'two'; window.__twice = true")
        bob.say("two")
        bob.say("three")
        self.assertEqual(
            self.wait_for_messages(ann, 2), [("bob", "one"), ("bob", "three")]
        )
        ann.evaluate("window.__release()")
        self.assertEqual(
            self.wait_for_messages(ann, 3),
            [("bob", "one"), ("bob", "two"), ("bob", "three")],
        )
        self.assertEqual(self.offsets(ann), [1, 2, 3])
        kinds = [line["kind"] for line in self.log(ann) if "message" in line["kind"]]
        self.assertEqual(kinds, ["message", "message grouped", "message grouped"])

        # The gap is filled: a reconnect now asks from 3.
        self.go_offline(ann, drop=True)
        bob.say("four")
        self.go_online(ann)
        self.assertEqual(self.wait_for_messages(ann, 4)[-1], ("bob", "four"))
        self.assertEqual(self.offsets(ann), [1, 2, 3, 4])
        self.assertRegex(ann.evaluate("window.__sockets.at(-1).url"), r"since=3&")

    def test_a_message_whose_ack_was_lost_is_shown_sent_once(self) -> None:
        bob = self.bob("team")
        ann = self.open_tab("/r/team", name="ann", script=OFFLINE_SWITCH)
        bob.say("hello")
        self.wait_for_messages(ann, 1)

        # Sent, and the socket closed in the same turn: the server takes the
        # message, but its ack never reaches the page (a closing socket
        # delivers nothing more).
        self.go_offline(ann, drop=False)  # from now on, no way back in
        ann.evaluate(
            """() => {
                 const input = document.getElementById('message-input');
                 input.value = 'did it arrive?';
                 input.dispatchEvent(new Event('input'));
                 document.getElementById('message-form').requestSubmit();
                 window.__sockets.at(-1).close();
               }"""
        )
        self.assert_closed(ann)
        failed = ann.locator("#messages > li.failed")
        self.expect(failed).to_have_count(1, timeout=QUICK)
        self.expect(failed.locator(".delivery")).to_have_text(
            re.compile(r"^Not sent: the connection closed before the server confirmed")
        )
        bob.say("did you say something?")

        # Back: the replay has it under her old id: that item is now sent, and
        # there is no second copy.
        self.go_online(ann)
        self.expect(failed).to_have_count(0, timeout=QUICK)
        self.assertEqual(
            self.wait_for_messages(ann, 3),
            [
                ("bob", "hello"),
                ("ann (you)", "did it arrive?"),
                ("bob", "did you say something?"),
            ],
        )
        self.assertEqual(self.offsets(ann), [1, 2, 3])
        self.expect(ann.locator("#messages > li.message").nth(1)).to_have_class(
            "message mine"
        )


@slow
class RestartPageTests(HistoryPageMixin, SynchronousTestCase):
    """``--history-db``: the server is stopped and started again; the page resumes."""

    def setUp(self) -> None:
        self.db = Path(self.mktemp()).resolve()
        self.db.mkdir(parents=True)
        self.server_args = ("--history-db", str(self.db / "history.sqlite3"))
        super().setUp()

    def test_offline_across_a_restart_every_message_once_in_order(self) -> None:
        bob = self.bob("team")
        ann = self.open_tab("/r/team", name="ann", script=OFFLINE_SWITCH)
        bob.say("one")
        self.type_message(ann, "two (ann)")
        self.wait_for_delivered(ann, 2)
        bob.say("three, just before the stop")
        # The page may or may not have seen "three" before the server went.
        ann.evaluate("window.__offline = true")
        bob.close()
        self.server.stop()
        self.assert_closed(ann)

        self.server = self.start_server()
        bob = self.bob("team")
        self.assertEqual(bob.welcome["offset"], 3)
        bob.say("four, after the restart")
        bob.say("five, after the restart")

        self.go_online(ann)
        expected = [
            ("bob", "one"),
            ("ann (you)", "two (ann)"),
            ("bob", "three, just before the stop"),
            ("bob", "four, after the restart"),
            ("bob", "five, after the restart"),
        ]
        self.assertEqual(self.wait_for_messages(ann, 5), expected)
        self.assertEqual(self.offsets(ann), [1, 2, 3, 4, 5])
        # Same epoch (the database kept it): no break, nothing missing.
        self.assertEqual(ann.locator("li.separator").count(), 0)
        self.assertEqual(ann.locator("li.notice.missing").count(), 0)
        bob.say("six")
        self.assertEqual(self.wait_for_messages(ann, 6), [*expected, ("bob", "six")])


@slow
class LostHistoryPageTests(HistoryPageMixin, SynchronousTestCase):
    """Memory history of 2 messages: what cannot be given back is said so."""

    server_args = ("--history", "2")

    def test_a_restart_is_a_new_epoch_marked_by_a_separator(self) -> None:
        bob = self.bob("team")
        ann = self.open_tab("/r/team", name="ann", script=OFFLINE_SWITCH)
        bob.say("old one")
        bob.say("old two")
        self.wait_for_messages(ann, 2)

        ann.evaluate("window.__offline = true")
        bob.close()
        self.server.stop()
        self.assert_closed(ann)
        self.server = self.start_server()
        bob = self.bob("team")
        bob.say("new one")  # offset 1 again, in the new epoch
        self.go_online(ann)

        self.wait_for_messages(ann, 3)
        self.assertEqual(
            [
                (line["kind"], line["text"])
                for line in self.log(ann)
                if line["kind"] in ("message", "message grouped", "separator")
                or "missing" in line["kind"]
            ],
            [
                ("message", "old one"),
                ("message grouped", "old two"),
                ("separator", SEPARATOR),
                ("notice missing", MISSING),
                ("message", "new one"),
            ],
        )
        self.assertEqual(self.offsets(ann), [1, 2, 1])

    def test_more_missed_than_kept_says_some_may_be_missing(self) -> None:
        bob = self.bob("team")
        ann = self.open_tab("/r/team", name="ann", script=OFFLINE_SWITCH)
        bob.say("seen")
        self.wait_for_messages(ann, 1)

        self.go_offline(ann, drop=True)
        for n in range(1, 6):
            bob.say(f"missed {n}")
        self.go_online(ann)

        # Only the last two were kept: those, after the notice.
        self.wait_for_messages(ann, 3)
        self.assertEqual(
            [
                (line["kind"], line["text"])
                for line in self.log(ann)
                if "message" in line["kind"] or "missing" in line["kind"]
            ],
            [
                ("message", "seen"),
                ("notice missing", MISSING),
                ("message", "missed 4"),
                ("message grouped", "missed 5"),
            ],
        )
        self.assertEqual(ann.locator("li.separator").count(), 0)
        self.assertEqual(self.offsets(ann), [1, 5, 6])
        # Live ones carry on, once each.
        bob.say("live")
        self.assertEqual(self.wait_for_messages(ann, 4)[-1], ("bob", "live"))
        self.assertEqual(ann.locator("li.notice.missing").count(), 1)


@slow
class RedisOutagePageTests(HistoryPageMixin, SynchronousTestCase):
    """
    ``--redis`` and a real redis-server: a message said on the page's node
    while Redis is away reaches the page at once without an offset; once
    Redis is back it is numbered, and a resume brings it again, numbered.
    """

    def setUp(self) -> None:
        from tests.redis_server import RedisServer

        # Redis keeps its data across the restart (as a production one does),
        # so the room's epoch, and what was said before, survive the outage.
        self.redis = RedisServer(
            extra=("--appendonly", "yes", "--appendfsync", "always")
        )
        self.addCleanup(self.redis.stop)
        self.redis.start()
        self.server_args = ("--redis", self.redis.url)
        super().setUp()
        self.server.wait_for_log("Redis link up")

    def unnumbered(self, page: Page) -> int:
        """How many messages the page shows without an offset."""
        return page.locator("#messages > li.message:not([data-offset])").count()

    def stream_offset(self, room: str) -> int:
        """The room's last offset, as a new member is told it."""
        peer = JsonPeer(self.port, room, "probe")
        peer.close()
        return peer.welcome["offset"]

    def stream(self, room: str) -> list[tuple[int, str]]:
        """(offset, text) of the room's history as a new member is sent it."""
        peer = JsonPeer(self.port, room, "carol")
        try:
            count = peer.welcome["offset"]
            return [
                (event["offset"], event["text"])
                for event in (peer.next_event("message") for _ in range(count))
            ]
        finally:
            peer.close()

    def test_a_message_said_in_an_outage_is_shown_once_after_a_resume(self) -> None:
        bob, ann = self.bob_and_ann_said_before()

        self.redis.shutdown()
        self.server.wait_for_log("Redis link lost")
        # Said on ann's node: she sees it at once, without an offset; and
        # hers is acked without one.
        self.assertIsNone(bob.say("said in the outage")["offset"])
        self.wait_for_messages(ann, 3)
        self.type_message(ann, "mine in the outage")
        self.wait_for_delivered(ann, 4)
        self.assertEqual(self.unnumbered(ann), 2)

        self.redis.start()
        # Until both are appended to the room's stream (offsets 3 and 4).
        deadline = time.monotonic() + 15
        while self.stream_offset("team") < 4:
            self.assertLess(time.monotonic(), deadline, self.server.log())
            time.sleep(0.1)
        history = self.stream("team")
        self.assertEqual(len(history), 4)
        bob.say("after")
        self.wait_for_messages(ann, 5)

        # The page's socket drops and it resumes: the two come back numbered.
        self.go_offline(ann, drop=True)
        bob.say("while away")
        self.go_online(ann)
        self.assertRegex(ann.evaluate("window.__sockets.at(-1).url"), r"since=2&")
        texts = [text for _, text in history] + ["after", "while away"]
        self.expect(ann.locator("#messages > li.message .text")).to_have_text(
            texts, timeout=QUICK
        )
        self.assertEqual(self.offsets(ann), [1, 2, 3, 4, 5, 6])
        self.assertEqual(self.unnumbered(ann), 0)
        self.assertEqual(
            [sender for sender, text in self.messages(ann) if text.startswith("mine")],
            ["ann (you)", "ann (you)"],
        )
        self.assertEqual(ann.locator("li.failed, li.pending").count(), 0)
        self.assertEqual(ann.locator("li.notice.missing").count(), 0)
        # Live ones carry on, once each, and a reconnect asks from the end.
        bob.say("live")
        self.assertEqual(self.wait_for_messages(ann, 7)[-1], ("bob", "live"))
        self.go_offline(ann, drop=True)
        self.go_online(ann)
        self.assertRegex(ann.evaluate("window.__sockets.at(-1).url"), r"since=7&")
        self.assertEqual(len(self.messages(ann)), 7)
