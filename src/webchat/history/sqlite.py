"""History in a SQLite file (``--history-db``): it survives a restart.

One process only.  The database is opened, and every room's epoch and last
offset read, when the service starts (before the listeners, so nobody waits
on it); from then on the reactor never touches the file.  Each reactor
turn's messages are handed, as one batch, to a single thread that writes
them in one transaction; reads run on that same thread, behind the writes
queued before them, so a read sees every message flushed before it was
asked.  Offsets and epochs stay in memory (one small entry per room) and
are assigned by the node, synchronously, as for the memory store.

A message is kept with what a replay shows of it: the sender's id, name
and user id (``user``: --auth's ``sub``, '' when anonymous), its time and
offset.  A database written before the ``user`` column existed is given
it when opened; its old rows are anonymous.

What a crash can lose: the database is in WAL mode with ``synchronous =
NORMAL``, so a committed batch survives the process being killed (``kill
-9``); what is lost is the batch of the turn in progress and any batch
queued behind the one being written: at most the last turn or two, a few
milliseconds of chat.  (A power cut can also lose the last commits before
the WAL was synced; the database itself stays consistent.)

A database that cannot be opened, is read-only, or fills its disk is
logged once (at error) and the chat goes on without history: offsets and
epochs still count in memory, joins get no history, resumes are
``recovered: false``, and every message that could not be written is
counted in ``webchat_history_write_failures_total``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from webchat.codecs import Message
from webchat.history import HistoryCounts, new_epoch
from webchat.limits import HISTORY, HISTORY_TTL
from webchat.logtext import escape_for_log

log = Logger(namespace="webchat")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL,"
    " last_offset INTEGER NOT NULL, newest_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages (room TEXT NOT NULL,"
    " offset INTEGER NOT NULL, sender_id INTEGER NOT NULL, name TEXT NOT NULL,"
    " text BLOB NOT NULL, ts INTEGER NOT NULL, user TEXT NOT NULL DEFAULT '',"
    " PRIMARY KEY (room, offset)) WITHOUT ROWID",
)
#: A database written before messages kept their sender's user id (--auth)
#: has no ``user`` column: it is added, and its old rows are anonymous ('').
_ADD_USER = "ALTER TABLE messages ADD COLUMN user TEXT NOT NULL DEFAULT ''"


class SQLiteHistory(Service):
    """A ``HistoryStore`` in a SQLite file; see the module's docstring."""

    name = "history"

    def __init__(
        self,
        reactor: Any,
        path: str,
        limit: int = HISTORY,
        ttl: float = HISTORY_TTL,
        connect: Callable[..., sqlite3.Connection] = sqlite3.connect,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self.limit = limit
        self.ttl = ttl
        self._connect = connect
        self._epochs = epochs
        #: Room -> [epoch, last offset, newest message's time (ms)].
        self._rooms: dict[str, list[Any]] = {}
        #: This turn's rows, and the rooms they touched.
        self._batch: list[tuple[Any, ...]] = []
        self._touched: set[str] = set()
        self._write_call: Any = None
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPool(1, 1, name="webchat-history")
        #: Set once the database failed: the chat goes on without it.
        self.broken = False
        self.counts = HistoryCounts()

    # -- service --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        try:
            db = self._connect(self.path, check_same_thread=False)
            self._db = db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                for statement in _SCHEMA:
                    db.execute(statement)
                columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
                if "user" not in columns:
                    db.execute(_ADD_USER)
                if self.ttl:
                    oldest = int((self._reactor.seconds() - self.ttl) * 1000)
                    db.execute("DELETE FROM messages WHERE ts < ?", (oldest,))
            rows = db.execute("SELECT room, epoch, last_offset, newest_ms FROM rooms")
            for room, epoch, last, newest in rows:
                self._rooms[room] = [epoch, last, newest]
        except (sqlite3.Error, OSError) as e:
            self._fail(e)
        else:
            log.info(
                "History in {path}: {rooms} room(s)",
                path=escape_for_log(self.path),
                rooms=len(self._rooms),
            )
        self._pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._write_now()
        # Behind every write queued so far: then the thread can go.
        done = deferToThreadPool(self._reactor, self._pool, lambda: None)

        def stop(_: object) -> None:
            self._pool.stop()
            if self._db is not None:
                self._db.close()
                self._db = None

        return done.addBoth(stop)

    # -- the HistoryStore interface -------------------------------------------------

    def open_room(self, room: str) -> tuple[str, int]:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = [self._epochs(), 0, 0]
        return state[0], state[1]

    def append(self, room: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = [self._epochs(), 0, 0]
        newest = messages[-1]
        state[1] = newest.offset
        state[2] = newest.ts
        if self.broken:
            self.counts.write_failures += len(messages)
            return
        if self.limit:
            self._batch.extend(
                (room, m.offset, m.sender_id, m.name, m.text, m.ts, m.user)
                for m in messages
            )
        self._touched.add(room)
        if self._write_call is None:
            # One transaction per reactor turn, however many rooms spoke.
            self._write_call = self._reactor.callLater(0, self._write_now)

    def read(
        self, room: str, after: int, upto: int
    ) -> Sequence[Message] | Deferred[Sequence[Message]]:
        if self.broken or upto <= after:
            return []
        self._write_now()  # the read queues behind this turn's writes
        oldest = int((self._reactor.seconds() - self.ttl) * 1000) if self.ttl else 0
        return deferToThreadPool(
            self._reactor, self._pool, self._select, room, after, upto, oldest
        )

    def room_closed(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is not None and not state[1]:
            del self._rooms[room]  # nothing said: nothing to remember

    @property
    def stats(self) -> HistoryCounts:
        counts = self.counts
        counts.rooms = len(self._rooms)
        counts.messages = len(self._batch)
        counts.bytes = sum(len(row[4]) for row in self._batch)
        return counts

    # -- writing, on the reactor's side -------------------------------------------

    def _write_now(self) -> None:
        """Hand this turn's batch to the thread."""
        call, self._write_call = self._write_call, None
        if call is not None and call.active():
            call.cancel()
        if self.broken or not (self._batch or self._touched):
            return
        rows, self._batch = self._batch, []
        rooms = [(room, *self._rooms[room]) for room in self._touched]
        self._touched = set()
        deferred = deferToThreadPool(
            self._reactor, self._pool, self._write, rows, rooms
        )
        deferred.addErrback(self._write_failed, len(rows))

    def _write_failed(self, failure: Failure, count: int) -> None:
        self.counts.write_failures += count
        self._fail(failure.value)

    def _fail(self, error: BaseException) -> None:
        """The database failed: say so once, and go on without it."""
        if self.broken:
            return
        self.broken = True
        self._batch = []
        self._touched = set()
        log.error(
            "An error has occurred: history database {path}: {error}; the chat "
            "goes on without history",
            path=escape_for_log(self.path),
            error=escape_for_log(str(error) or type(error).__name__),
        )

    # -- in the thread --------------------------------------------------------------

    def _write(self, rows: list[tuple[Any, ...]], rooms: list[tuple[Any, ...]]) -> None:
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("the database is not open")
        with db:
            db.executemany(
                "INSERT OR REPLACE INTO messages (room, offset, sender_id, name,"
                " text, ts, user) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.executemany("INSERT OR REPLACE INTO rooms VALUES (?, ?, ?, ?)", rooms)
            if self.limit:
                db.executemany(
                    "DELETE FROM messages WHERE room = ? AND offset <= ?",
                    [(room, last - self.limit) for room, _, last, _ in rooms],
                )

    def _select(self, room: str, after: int, upto: int, oldest: int) -> list[Message]:
        db = self._db
        if db is None:
            return []
        rows = db.execute(
            "SELECT sender_id, text, name, ts, offset, user FROM messages"
            " WHERE room = ? AND offset > ? AND offset <= ? AND ts >= ?"
            " ORDER BY offset",
            (room, after, upto, oldest),
        ).fetchall()
        return [
            Message(sender_id, bytes(text), 0.0, 0, room, name, ts, offset, user=user)
            for sender_id, text, name, ts, offset, user in rows
        ]
