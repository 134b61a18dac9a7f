"""SQLite persistence for the local ClearML server: JSON documents and task events.

Every entity (project, task, model, queue) is one JSON document in ``documents``; events
(scalars, plots, logs) are rows of ``events``. One lock serialises writers inside the
process, and SQLite's WAL journal keeps the file consistent across restarts.

Every write runs inside :meth:`Store.transaction`: committed when the block ends, rolled back
when anything in it raises, so a failed write never leaves the shared connection inside an
open transaction (where later writes would be answered but never committed). The database
file is created readable by its owner only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Document = dict[str, Any]


class Store:
    """Documents by (kind, id), plus an append-only event log."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # owner only; SQLite gives its -wal and -shm files the database file's mode
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        path.chmod(0o600)
        self._depth = 0
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS documents (kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, "
            "seq INTEGER NOT NULL, PRIMARY KEY (kind, id))")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, "
            "type TEXT NOT NULL, body TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS events_task ON events (task, type)")
        self.lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock and run the block in one transaction: COMMIT at its end, ROLLBACK on any error.

        Nested blocks join the outermost one.
        """
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._db.rollback()
                raise
            self._depth = 0
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._db.rollback()
                raise

    def close(self) -> None:
        """Close the database."""
        with self.lock:
            self._db.close()

    def get(self, kind: str, doc_id: str) -> Document | None:
        """One document, or None."""
        with self.lock:
            row = self._db.execute("SELECT body FROM documents WHERE kind = ? AND id = ?", (kind, doc_id)).fetchone()
        return None if row is None else json.loads(row[0])

    def all(self, kind: str) -> list[Document]:
        """Every document of a kind, oldest first."""
        with self.lock:
            rows = self._db.execute("SELECT body FROM documents WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def put(self, kind: str, doc: Document) -> None:
        """Insert or replace a document (keeps its original insertion order)."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO documents (kind, id, body, seq) VALUES (?, ?, ?, "
                "(SELECT COALESCE(MAX(seq), 0) + 1 FROM documents)) "
                "ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                (kind, doc["id"], json.dumps(doc)))

    def update(self, kind: str, doc_id: str, change: Callable[[Document], None]) -> Document | None:
        """Read-modify-write one document atomically; returns the new document or None."""
        with self.transaction():
            doc = self.get(kind, doc_id)
            if doc is None:
                return None
            change(doc)
            self.put(kind, doc)
            return doc

    def delete(self, kind: str, doc_id: str) -> bool:
        """Remove a document; True when it existed."""
        with self.transaction():
            cur = self._db.execute("DELETE FROM documents WHERE kind = ? AND id = ?", (kind, doc_id))
        return cur.rowcount > 0

    def add_events(self, events: Iterable[tuple[str, str, Document]]) -> int:
        """Append ``(task, type, event)`` rows; returns how many."""
        rows = [(task, kind, json.dumps(event)) for task, kind, event in events]
        with self.transaction():
            self._db.executemany("INSERT INTO events (task, type, body) VALUES (?, ?, ?)", rows)
        return len(rows)

    def events(self, task: str, kinds: Iterable[str] | None = None) -> list[Document]:
        """Events of a task in arrival order, optionally of some types only."""
        with self.lock:
            if kinds is None:
                rows = self._db.execute("SELECT body FROM events WHERE task = ? ORDER BY seq", (task,)).fetchall()
            else:
                kinds = list(kinds)
                marks = ",".join("?" * len(kinds))
                rows = self._db.execute(
                    f"SELECT body FROM events WHERE task = ? AND type IN ({marks}) ORDER BY seq", (task, *kinds)
                ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete_events(self, task: str) -> int:
        """Remove every event of a task; returns how many."""
        with self.transaction():
            cur = self._db.execute("DELETE FROM events WHERE task = ?", (task,))
        return cur.rowcount
