"""History over real sockets: SQLite from its thread, restarts, kill -9,
a database that cannot be written, and messages flowing during a replay.

In-process servers on 127.0.0.1 (tests/support.py) where the reactor's view
is what matters; a real ``twistd`` subprocess where a restart is.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import cooperate
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from websockets.sync.client import connect

from tests.support import LogCapture, ServerMixin, Twistd, deferLater, slow
from tests.test_auth import SECRET, hs256
from tests.test_rooms import SUBPROTOCOL, connect_json
from tests.test_tap import listening_ports
from webchat.auth import TokenVerifier
from webchat.history.sqlite import SQLiteHistory
from webchat.limits import Limits


class SQLiteServerMixin(ServerMixin):
    timeout = 60
    limits = Limits(rate_limit=0, history=1000)
    store = SQLiteHistory

    def db_path(self) -> str:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        return str(directory / "history.db")

    @inlineCallbacks
    def start_with_db(self, path: str, **factory_kwargs):
        # The database is opened before the server starts: log from here on.
        self.db_logs = LogCapture()
        globalLogPublisher.addObserver(self.db_logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.db_logs)
        self.history = self.store(
            reactor, path, limit=self.limits.history, ttl=self.limits.history_ttl
        )
        self.history.startService()
        # Added first, so it runs last: after the server and its clients.
        self.addCleanup(self.history.stopService)
        yield self.start_server(
            limits=self.limits, history=self.history, **factory_kwargs
        )

    @inlineCallbacks
    def json_events_until(self, client, done):
        got = []
        while not got or not done(got):
            got.append(json.loads((yield client.received.get())))
        return got


class SlowDiskHistory(SQLiteHistory):
    """SQLite whose reads take 0.1 s in its thread, as on a busy disk."""

    def _select(self, *args):
        time.sleep(0.1)
        return super()._select(*args)


class SeamOverSocketsTests(SQLiteServerMixin, TestCase):
    store = SlowDiskHistory

    @inlineCallbacks
    def test_messages_flowing_during_the_replay(self):
        """
        A talker sends 300 messages, one every 2 ms; a JSON client joins with
        ``since=`` after the 20th, while SQLite (a thread, 0.1 s a read) is
        reading its history: it gets every offset once, in order.
        """
        yield self.start_with_db(self.db_path())
        talker, listener = yield self.connect_many(2)
        total = 300
        for i in range(20):
            talker.send_text(f"m{i}")
        for _ in range(20):
            yield listener.received.get()
        epoch = self.factory.rooms.get("lobby").epoch

        def talk():
            for i in range(20, total):
                talker.send_text(f"m{i}")
                yield deferLater(0.002)

        talking = cooperate(talk()).whenDone()
        ann = yield connect_json(
            self.port.getHost().port, f"/?name=ann&since=5&epoch={epoch}"
        )
        self.clients.append(ann)
        yield talking
        got = yield self.json_events_until(
            ann,
            lambda got: got[-1].get("offset") == total and got[-1]["type"] == "message",
        )
        welcome = got[0]
        self.assertEqual((welcome["type"], welcome["recovered"]), ("welcome", True))
        said = [e for e in got if e["type"] == "message"]
        self.assertEqual([e["offset"] for e in said], list(range(6, total + 1)))
        self.assertEqual([e["text"] for e in said], [f"m{i}" for i in range(5, total)])
        for event in said:
            self.assertEqual(
                event.get("history", False), event["offset"] <= welcome["offset"]
            )
        self.assertGreater(welcome["offset"], 5)  # some did come from history
        self.assertEqual(self.history.stats.write_failures, 0)


class UnwritableDbTests(SQLiteServerMixin, TestCase):
    @inlineCallbacks
    def test_a_db_that_cannot_be_opened_is_logged_once_and_the_chat_goes_on(self):
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        yield self.start_with_db(str(directory))  # a directory: no database there
        alice, bob = yield self.connect_many(2)
        ann = yield connect_json(self.port.getHost().port, "/?name=ann")
        self.clients.append(ann)
        for i in range(3):
            alice.send_text(f"hi {i}")
            self.assertEqual((yield bob.received.get()), f"id 1: hi {i}")
        carl = yield connect_json(self.port.getHost().port, "/?name=carl")
        self.clients.append(carl)
        welcome = json.loads((yield carl.received.get()))
        self.assertEqual(welcome["offset"], 3)  # still numbered
        bob.send_text("still chatting")
        self.assertEqual((yield alice.received.get()), "id 2: still chatting")
        message = json.loads((yield carl.received.get()))
        self.assertEqual((message["offset"], message.get("history")), (4, None))
        yield deferLater(0.05)
        failures = [line for line in self.db_logs.lines if "history database" in line]
        self.assertEqual(len(failures), 1, failures)
        self.assertIn("the chat goes on without history", failures[0])
        self.assertEqual(self.history.stats.write_failures, 4)
        self.assertIsNone(alice.closed_code)


class WriteFailureTests(SQLiteServerMixin, TestCase):
    @inlineCallbacks
    def test_a_write_that_fails_is_logged_once_and_counted(self):
        path = self.db_path()
        yield self.start_with_db(path)
        alice, bob = yield self.connect_many(2)
        alice.send_text("kept")
        yield bob.received.get()
        yield deferLater(0.2)
        # The disk "fills": every write from now on fails.
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        self.addCleanup(blocker.close)
        self.history._db.execute("PRAGMA busy_timeout = 0")
        for text in ("lost 1", "lost 2"):
            alice.send_text(text)
            self.assertEqual((yield bob.received.get()), f"id 1: {text}")
            yield deferLater(0.2)
        blocker.rollback()
        failures = [line for line in self.db_logs.lines if "history database" in line]
        self.assertEqual(len(failures), 1, failures)
        self.assertEqual(self.history.stats.write_failures, 2)
        bob.send_text("and on")
        self.assertEqual((yield alice.received.get()), "id 2: and on")


class SignedUserTests(SQLiteServerMixin, TestCase):
    @inlineCallbacks
    def test_a_signed_user_s_message_is_replayed_with_its_user(self):
        """
        Issue #15: the same user is the same ``user`` in JSON events, a
        replay from the database included; a database written before the
        ``user`` column existed is given it, and its old rows stay anonymous.
        """
        path = self.db_path()
        now_ms = int(reactor.seconds() * 1000)
        old = sqlite3.connect(path)
        with old:
            old.execute(
                "CREATE TABLE rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL,"
                " last_offset INTEGER NOT NULL, newest_ms INTEGER NOT NULL)"
            )
            old.execute(
                "CREATE TABLE messages (room TEXT NOT NULL, offset INTEGER NOT NULL,"
                " sender_id INTEGER NOT NULL, name TEXT NOT NULL, text BLOB NOT NULL,"
                " ts INTEGER NOT NULL, PRIMARY KEY (room, offset)) WITHOUT ROWID"
            )
            old.execute("INSERT INTO rooms VALUES ('lobby', 'E0', 1, ?)", (now_ms,))
            old.execute(
                "INSERT INTO messages VALUES ('lobby', 1, 3, 'bo', X'6f6c64', ?)",
                (now_ms,),
            )
        old.close()
        verifier = TokenVerifier(secret=SECRET, clock=reactor.seconds)
        yield self.start_with_db(path, auth="optional", verifier=verifier)
        alice, bob = yield self.connect_many(2)  # anonymous bystanders
        port = self.port.getHost().port
        ann = yield connect_json(port, f"/?token={hs256(sub='u-42', name='Ann')}")
        self.clients.append(ann)
        yield self.json_events_until(ann, lambda got: got[-1]["offset"] == 1)
        ann.send_text(json.dumps({"type": "message", "text": "signed"}))
        self.assertRegex((yield alice.received.get()), r"^id \d+: signed$")
        self.assertRegex((yield bob.received.get()), r"^id \d+: signed$")
        alice.send_text("anonymous")
        self.assertEqual((yield bob.received.get()), "id 1: anonymous")
        ann.sendClose()
        yield ann.closed
        carl = yield connect_json(port, "/?name=carl")
        self.clients.append(carl)
        got = yield self.json_events_until(carl, lambda got: len(got) == 4)
        replayed = [
            (e["offset"], e["name"], e.get("user"), e["text"], e["history"])
            for e in got[1:]
        ]
        self.assertEqual(
            replayed,
            [
                (1, "bo", None, "old", True),
                (2, "Ann", "u-42", "signed", True),
                (3, "guest-1", None, "anonymous", True),
            ],
        )
        self.assertEqual(self.history.stats.write_failures, 0)
        self.assertEqual(
            [line for line in self.db_logs.lines if "error" in line.lower()], []
        )


@slow
class RestartTests(SynchronousTestCase):
    """A real twistd with --history-db, stopped and started again."""

    def start(self, db: Path) -> tuple[Twistd, int]:
        workdir = Path(self.mktemp()).resolve()  # a log file of its own
        workdir.mkdir(parents=True)
        server = Twistd(
            workdir, "--port", "tcp:0:interface=127.0.0.1", "--history-db", str(db),
            "--rate-limit", "0",
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        (port,) = listening_ports(server.wait_for_log("Site starting on", timeout=30))
        return server, port

    def say(self, port: int, texts: list[str]) -> str:
        """Send ``texts`` from a JSON client, waiting for each ack; the epoch."""
        with connect(
            f"ws://127.0.0.1:{port}/ws/r", subprotocols=[SUBPROTOCOL], open_timeout=10
        ) as client:
            welcome = json.loads(client.recv(timeout=10))
            for text in texts:
                client.send(json.dumps({"type": "message", "text": text}))
                while json.loads(client.recv(timeout=10))["type"] != "ack":
                    pass
            return welcome["epoch"]

    def history_after(self, port: int, since: int, epoch: str) -> dict:
        with connect(
            f"ws://127.0.0.1:{port}/ws/r?since={since}&epoch={epoch}",
            subprotocols=[SUBPROTOCOL],
            open_timeout=10,
        ) as client:
            welcome = json.loads(client.recv(timeout=10))
            texts = []
            for _ in range(max(welcome["offset"] - since, 0)):
                event = json.loads(client.recv(timeout=10))
                texts.append((event["offset"], event["text"], event["history"]))
            return {"welcome": welcome, "history": texts}

    def test_history_and_epoch_survive_a_restart_and_a_kill_9(self):
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        db = workdir / "history.db"
        server, port = self.start(db)
        epoch = self.say(port, ["one", "two"])
        self.assertEqual(server.stop(signal.SIGTERM), 0, server.log())

        server, port = self.start(db)
        got = self.history_after(port, 0, epoch)
        self.assertEqual((got["welcome"]["epoch"], got["welcome"]["recovered"]),
                         (epoch, True))  # fmt: skip
        self.assertEqual(got["history"], [(1, "one", True), (2, "two", True)])
        self.assertEqual(self.say(port, ["three"]), epoch)
        # Acknowledged, and a moment for the turn's transaction to commit.
        time.sleep(0.5)
        server.stop(signal.SIGKILL)

        server, port = self.start(db)
        got = self.history_after(port, 1, epoch)
        self.assertEqual((got["welcome"]["epoch"], got["welcome"]["offset"],
                          got["welcome"]["recovered"]), (epoch, 3, True))  # fmt: skip
        self.assertEqual(got["history"], [(2, "two", True), (3, "three", True)])
        self.assertEqual(server.stop(signal.SIGTERM), 0, server.log())
        self.assertNotIn("Traceback", server.log())
