"""The task records and the change log in SQLite: the only module that speaks SQL.

One database, `DIR/tasks.sqlite3` with --state-dir (WAL, synchronous=NORMAL), else in memory;
the same code either way. Every method blocks: the feed (feed.py) calls them in a worker
thread, one at a time (a single connection, used serially).

- `tasks`: one row per task, the TaskInfo as JSON, and the columns queries filter and sort on.
  Finished tasks live only here, not in the daemon's memory.
- `changes`: one row per task, its latest change (add, mod, del; a del is a tombstone). The
  changes after a sequence number are the rows with a larger seq. Rows whose seq is more than
  `changes_kept` behind the last one are dropped; a `since` older than that (the floor) can no
  longer be served.
- `meta`: the last sequence number used, the floor, the count of finished tasks.

The file's `application_id` says it is ours and `user_version` which layout it has: a newer
layout, a file that is not ours, or a damaged one is refused with a StoreError naming it, and
nothing is written to it; an older layout is migrated in place. A lock on `DIR/tasks.lock`
keeps a second daemon off the same state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

import orjson

from .errors import StoreError
from .model import parse_timestamp

DATABASE: Final = "tasks.sqlite3"
LOCK: Final = "tasks.lock"
APPLICATION_ID: Final = 0x716A6264  # "qjbd"
# The first layout; each later one is the one before and its migration (_MIGRATIONS).
_LAYOUT: Final = """
CREATE TABLE tasks (
    uuid TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    type TEXT NOT NULL,
    name_label TEXT NOT NULL,
    job_id TEXT,
    subtask_of TEXT,
    live INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX tasks_by_creation ON tasks (created DESC, seq DESC);
CREATE INDEX tasks_live ON tasks (created) WHERE live;
CREATE INDEX tasks_by_finish ON tasks (finished) WHERE finished IS NOT NULL;
CREATE INDEX tasks_by_parent ON tasks (subtask_of) WHERE subtask_of IS NOT NULL;
CREATE TABLE changes (
    uuid TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    change TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('last_seq', 0), ('floor', 0), ('finished', 0);
"""
# Layout N's changes to layout N - 1, applied in place.
_MIGRATIONS: Final = {
    # query-tasks' filters on type, name label, status and job id take an index each.
    2: """
CREATE INDEX tasks_by_type ON tasks (type, created DESC, seq DESC);
CREATE INDEX tasks_by_label ON tasks (name_label, created DESC, seq DESC);
CREATE INDEX tasks_by_status ON tasks (status, created DESC, seq DESC);
CREATE INDEX tasks_by_job ON tasks (job_id) WHERE job_id IS NOT NULL;
""",
}
VERSION: Final = max(_MIGRATIONS)


class Change(NamedTuple):
    """One change to commit: SEQ, its KIND (add, mod, del; or rec: the record stored, not a
    change of the log), the task's UUID and its record (None for del). FINISHED_DELTA: +1 when
    the change finishes the task, -1 when it removes a finished one (the count retention works
    with)."""

    seq: int
    kind: str
    uuid: str
    record: dict[str, Any] | None
    finished_delta: int = 0


class Loaded(NamedTuple):
    """What the daemon needs at start-up: the counters, and the live tasks (not finished, or
    with a job that existed)."""

    last_seq: int
    floor: int
    finished: int
    live: list[dict[str, Any]]


class Query(NamedTuple):
    """query-tasks' filters, already checked; None: no filter."""

    statuses: Sequence[str] | None = None
    type: str | None = None
    name_label: str | None = None
    job_id: str | None = None
    subtask_of: str | None = None
    other_config: dict[str, str] | None = None
    created_after: float | None = None
    created_before: float | None = None
    limit: int = 1000
    # (created, seq) of the record the page comes after.
    after: tuple[float, int] | None = None


class TaskStore:
    """The database. NOT thread-safe: one caller at a time (feed.py's limiter)."""

    def __init__(self, directory: str | None, changes_kept: int) -> None:
        self.changes_kept = changes_kept
        self.path = os.path.join(directory, DATABASE) if directory is not None else ":memory:"
        self._lock_fd = -1
        if directory is not None:
            self._lock_fd = _lock(directory)
        try:
            self._db = self._open()
        except BaseException:
            self._unlock()
            raise

    def _open(self) -> sqlite3.Connection:
        existed = self.path != ":memory:" and os.path.exists(self.path)
        try:
            # Autocommit mode: transactions are explicit (BEGIN ... COMMIT).
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the task database: {e}") from None
        try:
            self._check(db, existed)
        except BaseException:
            db.close()
            raise
        return db

    def _check(self, db: sqlite3.Connection, existed: bool) -> None:
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a task database, or damaged ({e}); "
                             "left as it is") from None
        if existed and (tables or app) and app != APPLICATION_ID:
            raise StoreError(f"{self.path}: not a qmpjobd task database; left as it is")
        if version > VERSION:
            raise StoreError(
                f"{self.path}: written by a newer qmpjobd (layout {version}, this one knows "
                f"{VERSION}); left as it is"
            )
        try:
            if self.path != ":memory:":
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot use a write-ahead log ({mode})")
            # Committed changes survive a crash of the process (they are in the WAL, in the
            # page cache); a power failure may lose the last ones (docs/tasks.md).
            db.execute("PRAGMA synchronous=NORMAL")
            if not tables:
                _create(db)
            elif version < VERSION:
                _migrate(db, version, self.path)
            db.execute("SELECT uuid, seq, record FROM tasks LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot use the task database ({e})") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- start-up ------------------------------------------------------------------------

    def load(self) -> Loaded:
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = db.execute(
            "SELECT record FROM tasks WHERE live ORDER BY created"
        ).fetchall()
        return Loaded(
            meta["last_seq"], meta["floor"], meta["finished"],
            [orjson.loads(record) for (record,) in rows],
        )

    # -- writing -------------------------------------------------------------------------

    def commit(self, changes: Iterable[Change]) -> None:
        """Make CHANGES durable, in one transaction."""
        db = self._db
        last = 0
        finished = 0
        upserts: list[tuple[Any, ...]] = []
        deletes: list[tuple[str]] = []
        logged: list[tuple[str, int, str]] = []
        for change in changes:
            record = change.record
            if change.kind == "rec":  # the record only, not a change of the log
                assert record is not None
                upserts.append(_row(record))
                continue
            last = max(last, change.seq)
            finished += change.finished_delta
            logged.append((change.uuid, change.seq, change.kind))
            if record is None:
                deletes.append((change.uuid,))
                upserts = [u for u in upserts if u[0] != change.uuid]
                continue
            upserts.append(_row(record))
        if not logged and not upserts:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO tasks (uuid, seq, created, finished, status, type, name_label, "
                "job_id, subtask_of, live, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (uuid) DO UPDATE SET seq = excluded.seq, "
                "finished = excluded.finished, status = excluded.status, "
                "type = excluded.type, name_label = excluded.name_label, "
                "job_id = excluded.job_id, subtask_of = excluded.subtask_of, "
                "live = excluded.live, record = excluded.record",
                upserts,
            )
            db.executemany("DELETE FROM tasks WHERE uuid = ?", deletes)
            db.executemany(
                "INSERT INTO changes (uuid, seq, change) VALUES (?, ?, ?) "
                "ON CONFLICT (uuid) DO UPDATE SET seq = excluded.seq, change = excluded.change",
                logged,
            )
            if logged:
                floor = max(0, last - self.changes_kept)
                db.execute("DELETE FROM changes WHERE seq <= ?", (floor,))
                db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'last_seq'",
                           (last,))
                db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'floor'", (floor,))
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'finished'",
                           (finished,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    # -- reading -------------------------------------------------------------------------

    def get(self, uuid: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT record FROM tasks WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def position(self, uuid: str) -> tuple[float, int] | None:
        """Where a record stands in query-tasks' order: (created, seq)."""
        row = self._db.execute("SELECT created, seq FROM tasks WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else (row[0], row[1])

    def query(self, query: Query) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[Any] = []
        if query.statuses is not None:
            where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            args += query.statuses
        for column, value in (("type", query.type), ("name_label", query.name_label),
                              ("job_id", query.job_id), ("subtask_of", query.subtask_of)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.created_after is not None:
            where.append("created > ?")
            args.append(query.created_after)
        if query.created_before is not None:
            where.append("created < ?")
            args.append(query.created_before)
        for key, value in (query.other_config or {}).items():
            where.append(
                "EXISTS (SELECT 1 FROM json_each(record, '$.\"other-config\"') "
                "WHERE key = ? AND value = ?)"
            )
            args += [key, value]
        if query.after is not None:
            where.append("(created, seq) < (?, ?)")
            args += query.after
        sql = "SELECT record FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, seq DESC LIMIT ?"
        args.append(query.limit)
        return [orjson.loads(record) for (record,) in self._db.execute(sql, args)]

    def changes_since(
        self, since: int, limit: int
    ) -> tuple[int, int, list[tuple[int, str, str, dict[str, Any] | None]]]:
        """(last seq, floor, changes after SINCE): each task's latest change, in seq order, with
        its record as it is now (None for del)."""
        db = self._db
        db.execute("BEGIN")  # one snapshot for the counters and the changes
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute(
                "SELECT c.seq, c.change, c.uuid, t.record FROM changes c "
                "LEFT JOIN tasks t ON t.uuid = c.uuid WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
                (since, limit),
            ).fetchall()
        finally:
            db.execute("COMMIT")
        changes = [
            (seq, kind, uuid, None if record is None else orjson.loads(record))
            for seq, kind, uuid, record in rows
        ]
        return meta["last_seq"], meta["floor"], changes

    def expired(self, before: float, max_finished: int, finished: int) -> list[str]:
        """Finished tasks to expire: those finished before BEFORE, and the oldest beyond
        MAX_FINISHED of the FINISHED there are; at most 10000 at a time."""
        db = self._db
        uuids = [uuid for (uuid,) in db.execute(
            "SELECT uuid FROM tasks WHERE finished IS NOT NULL AND finished < ? "
            "ORDER BY finished LIMIT 10000", (before,)
        )]
        excess = min(finished - len(uuids) - max_finished, 10000 - len(uuids))
        if excess > 0:
            taken = set(uuids)
            for (uuid,) in db.execute(
                "SELECT uuid FROM tasks WHERE finished IS NOT NULL ORDER BY finished LIMIT ?",
                (excess + len(uuids),),
            ):
                if uuid not in taken:
                    uuids.append(uuid)
        return uuids

    def subtasks(self, uuid: str) -> list[str]:
        return [u for (u,) in self._db.execute(
            "SELECT uuid FROM tasks WHERE subtask_of = ?", (uuid,)
        )]

    def integrity(self) -> str:
        """SQLite's own check of the whole file ("ok")."""
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    finished = record.get("finished")
    # Live: the daemon keeps it in memory (not finished, or its job still exists).
    live = finished is None or "job-status" in record
    return (
        record["uuid"], record["seq"], parse_timestamp(record["created"]),
        parse_timestamp(finished) if finished is not None else None, record["status"],
        record["type"], record["name-label"], record.get("job-id"), record.get("subtask-of"),
        int(live), orjson.dumps(record),
    )


def _lock(directory: str) -> int:
    """Hold DIR/tasks.lock for as long as the daemon runs (released when it exits, however)."""
    path = os.path.join(directory, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"{path}: cannot open: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"{path} is locked: another qmpjobd uses the state directory {directory}"
        ) from None
    return fd


def _create(db: sqlite3.Connection, version: int = VERSION) -> None:
    """A new database at layout VERSION: the first layout, then each migration."""
    steps = "".join(_MIGRATIONS[n] for n in range(2, version + 1))
    db.executescript(
        f"BEGIN; {_LAYOUT} {steps} PRAGMA application_id={APPLICATION_ID}; "
        f"PRAGMA user_version={version}; COMMIT;"
    )


def _migrate(db: sqlite3.Connection, version: int, path: str) -> None:
    """Bring an older layout up to VERSION, in place, in one transaction: all of it or, if
    anything fails, nothing (the file stays as it was)."""
    if version < 1:  # a file of ours with tables and no layout number: damaged
        raise StoreError(f"{path}: unknown task database layout {version}; left as it is")
    steps = "".join(_MIGRATIONS[n] for n in range(version + 1, VERSION + 1))
    db.executescript(f"BEGIN; {steps} PRAGMA user_version={VERSION}; COMMIT;")
