"""Durable record of scored requests and their reported outcomes, in SQLite (WAL).

One row per scored request: its id, time, model id, cluster, failure probabilities,
novelty, the classifier score if one was given, and the spectral profile (numbers
only: no pixels, no file names, no patient data), plus the outcome once reported.
A second table keeps per-(model, cluster) outcome tallies, updated in the same
transaction as each outcome, so that the tallies restored at start-up stay exact
when old rows are pruned.

Writes go through one writer thread and its own connection, fed by a queue:

- predictions are queued and committed in batches (the scoring thread only pays
  for building the row and a queue put);
- an outcome is committed (``synchronous=FULL``: the WAL is fsynced) before
  :meth:`OutcomeStore.record_outcome` returns, so an acknowledged outcome survives a
  crash of the process (``kill -9``) and, on a disk that honours fsync, power loss.
  Outcomes queued together share one commit.

Retention: rows older than ``max_age_seconds`` go, then the oldest rows beyond
``max_rows``; checked at start and every ``prune_interval`` seconds by the writer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError

__all__ = [
    "LabelledProfiles",
    "OutcomeStore",
    "SCHEMA_VERSION",
    "StoredPrediction",
    "read_labelled",
]

log = logging.getLogger("cxr_monitor.store")

SCHEMA_VERSION = 1
_BATCH = 512  # most queued operations committed in one transaction
_PUT_TIMEOUT = 1.0  # seconds a scoring thread waits for room in a full queue before dropping a row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    feature_names TEXT NOT NULL,      -- JSON list: profiles of models with equal names are comparable
    n_clusters INTEGER NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY,
    time REAL NOT NULL,               -- unix seconds
    model_id TEXT NOT NULL,
    cluster INTEGER NOT NULL,
    failure_probability REAL NOT NULL,
    cluster_failure_probability REAL NOT NULL,
    novelty REAL NOT NULL,
    classifier_score REAL,
    profile BLOB NOT NULL,            -- float64 little-endian, one value per feature
    failure INTEGER,                  -- NULL until the outcome is reported
    outcome_time REAL
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
CREATE INDEX IF NOT EXISTS predictions_model ON predictions (model_id, time);
CREATE TABLE IF NOT EXISTS tallies (
    model_id TEXT NOT NULL,
    cluster INTEGER NOT NULL,
    outcomes INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    predicted REAL NOT NULL,          -- sum of cluster failure probabilities of those outcomes
    PRIMARY KEY (model_id, cluster)
);
"""


@dataclass(frozen=True)
class StoredPrediction:
    """One scored request as stored.

    profile : ndarray of shape (n_features,), the raw spectral profile (not standardised).
    failure : the reported outcome, None while unknown.
    """

    request_id: str
    time: float
    model_id: str
    cluster: int
    failure_probability: float
    cluster_failure_probability: float
    novelty: float
    classifier_score: float | None
    profile: np.ndarray
    failure: bool | None = None


@dataclass(frozen=True)
class LabelledProfiles:
    """Stored rows with a reported outcome, for refitting.

    profiles : ndarray of shape (n_rows, n_features), dtype=float64
    failures : ndarray of shape (n_rows,), 0/1
    request_ids, model_ids : one per row
    first_time, last_time : unix seconds of the oldest and newest row (NaN if none)
    """

    profiles: np.ndarray
    failures: np.ndarray
    request_ids: list[str]
    model_ids: list[str]
    first_time: float
    last_time: float


class _Stop:
    pass


@dataclass
class _Outcome:
    request_id: str
    failure: bool
    time: float
    done: Future


@dataclass
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    done: Future


def _connect(path: Path, *, readonly: bool = False, busy_timeout: float = 30.0) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}?mode=rwc"
    # Another process writing (a refit only reads) makes this connection wait up to busy_timeout.
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=busy_timeout)


class OutcomeStore:
    """Predictions and outcomes in the SQLite file ``path`` (created with its folder).

    Parameters
    ----------
    path : path
    max_age_seconds : float, optional
        Rows older than this are deleted (None: no age limit).
    max_rows : int, optional
        At most this many rows are kept; the oldest go first (None: no limit).
    prune_interval : float
        Seconds between retention checks.
    queue_size : int
        Predictions waiting for the writer; beyond it a scoring thread waits up to
        1 s, then the row is dropped and counted (``stats()["dropped"]``).
    busy_timeout : float
        Seconds a write waits for a lock held by another connection before it fails.
    clock : callable
        Unix seconds (tests inject a fake clock).

    Raises
    ------
    StoreError
        The file cannot be created or opened, is not an outcome store, or has
        another schema version.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_age_seconds: float | None = None,
        max_rows: int | None = None,
        prune_interval: float = 60.0,
        queue_size: int = 10_000,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_age_seconds = max_age_seconds
        self.max_rows = max_rows
        self.prune_interval = prune_interval
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._counts = {"predictions": 0, "outcomes": 0, "dropped": 0, "errors": 0, "pruned": 0}
        self._counts_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = _connect(self.path, busy_timeout=busy_timeout)
            mode = self._con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"outcome store {self.path}: the file system does not support WAL ({mode})")
            # FULL: each commit fsyncs the WAL, so an acknowledged outcome is on disk (NORMAL would
            # survive kill -9 too, but not power loss); predictions are batched, so it costs little.
            self._con.execute("PRAGMA synchronous = FULL")
            self._con.executescript(_SCHEMA)
            row = self._con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(
                    f"outcome store {self.path}: schema version {row[0]}, this server reads "
                    f"{SCHEMA_VERSION}; point --store at a new file"
                )
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"outcome store {self.path}: cannot open ({exc}); is it an SQLite file, on a writable "
                "local disk?"
            ) from exc
        except OSError as exc:
            raise StoreError(f"outcome store {self.path}: cannot create ({exc.strerror or exc})") from exc
        self._last_prune = -float("inf")
        self._pruned_uncommitted = 0  # counted once the transaction that deleted them commits
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="outcome-store", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ writes
    def register_model(self, model_id: str, feature_names: Sequence[str], n_clusters: int) -> None:
        """Record a served model (its feature names decide which profiles a refit may pool)."""
        names = json.dumps(list(feature_names))

        def write(con: sqlite3.Connection) -> None:
            con.execute(
                "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)",
                (model_id, names, n_clusters, self._clock()),
            )

        self._call(write)

    def add_prediction(self, p: StoredPrediction) -> bool:
        """Queue a scored request; committed by the writer with the next batch.

        Returns False (and counts a drop) if the queue stayed full for 1 s. A request id
        scored again replaces its row unless that row already has an outcome.
        """
        row = (
            p.request_id,
            p.time,
            p.model_id,
            int(p.cluster),
            float(p.failure_probability),
            float(p.cluster_failure_probability),
            float(p.novelty),
            None if p.classifier_score is None else float(p.classifier_score),
            np.ascontiguousarray(p.profile, dtype="<f8").tobytes(),
        )
        try:
            self._queue.put(row, timeout=_PUT_TIMEOUT)
        except queue.Full:
            self._count("dropped")
            log.warning(
                "outcome store queue full: a prediction was not stored", extra={"store": str(self.path)}
            )
            return False
        return True

    def record_outcome(self, request_id: str, failure: bool, timeout: float | None = 30.0) -> None:
        """Store the outcome of a stored request; returns once it is committed to disk.

        Raises
        ------
        KeyError
            The request already has an outcome in the store.
        StoreError
            The request is not in the store (never stored, dropped or pruned), the
            write failed, or it did not finish within ``timeout`` seconds.
        """
        done: Future = Future()
        self._put(_Outcome(request_id, bool(failure), self._clock(), done))
        self._wait(done, timeout, f"outcome of request {request_id!r}")

    def flush(self, timeout: float | None = 30.0) -> None:
        """Return once everything queued before the call is committed."""
        self._call(lambda con: None, timeout)

    def prune(self) -> int:
        """Apply the retention limits now; returns the number of rows deleted."""
        return int(self._call(self._prune))

    def close(self) -> None:
        """Commit what is queued, stop the writer and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Stop())
        self._writer.join()
        self._con.close()

    # ------------------------------------------------------------------ reads (own connection)
    def tallies(self, model_id: str, n_clusters: int) -> list[tuple[int, int, float]]:
        """Per cluster of ``model_id``: outcomes reported, failures, sum of predicted probabilities."""
        out = [(0, 0, 0.0)] * n_clusters
        for cluster, n, f, predicted in self._read(
            "SELECT cluster, outcomes, failures, predicted FROM tallies WHERE model_id = ?", (model_id,)
        ):
            if 0 <= cluster < n_clusters:
                out[cluster] = (int(n), int(f), float(predicted))
        return out

    def recent(self, model_id: str, limit: int) -> list[StoredPrediction]:
        """The newest ``limit`` rows of ``model_id``, oldest first (profiles not read: empty)."""
        rows = self._read(
            "SELECT request_id, time, cluster, failure_probability, cluster_failure_probability, novelty, "
            "classifier_score, failure FROM predictions WHERE model_id = ? ORDER BY time DESC LIMIT ?",
            (model_id, limit),
        )
        empty = np.empty(0)
        return [
            StoredPrediction(rid, t, model_id, c, fp, cfp, nov, cs, empty, None if f is None else bool(f))
            for rid, t, c, fp, cfp, nov, cs, f in reversed(rows)
        ]

    def stats(self) -> dict[str, int]:
        """Counts since start: predictions and outcomes written, dropped, write errors, pruned."""
        with self._counts_lock:
            return {**self._counts, "queued": self._queue.qsize()}

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        con = _connect(self.path)
        try:
            return con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"outcome store {self.path}: read failed ({exc})") from exc
        finally:
            con.close()

    # ------------------------------------------------------------------ the writer thread
    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def _put(self, item: Any) -> None:
        if self._closed:
            raise StoreError(f"outcome store {self.path} is closed")
        self._queue.put(item)

    def _call(self, fn: Callable[[sqlite3.Connection], Any], timeout: float | None = 30.0) -> Any:
        done: Future = Future()
        self._put(_Call(fn, done))
        return self._wait(done, timeout, "store operation")

    def _wait(self, done: Future, timeout: float | None, what: str) -> Any:
        try:
            return done.result(timeout)
        except TimeoutError:
            raise StoreError(
                f"outcome store {self.path}: {what} not committed within {timeout} s (disk stalled?)"
            ) from None

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=max(self.prune_interval, 0.01))
            except queue.Empty:
                item = None
            batch = [] if item is None else [item]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(isinstance(op, _Stop) for op in batch)
            if batch:
                self._commit(batch)
            if self._clock() - self._last_prune >= self.prune_interval and not stop:
                self._commit([_Call(self._prune, Future())])

    def _commit(self, batch: list[Any]) -> None:
        """Apply ``batch`` in one transaction, then resolve its futures (never raises)."""
        results: list[tuple[Future, Any, BaseException | None]] = []
        n_pred = n_out = 0
        con = self._con
        try:
            con.execute("BEGIN IMMEDIATE")
            for op in batch:
                if isinstance(op, tuple):
                    con.execute(
                        "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL) "
                        "ON CONFLICT (request_id) DO UPDATE SET time = excluded.time, "
                        "model_id = excluded.model_id, cluster = excluded.cluster, "
                        "failure_probability = excluded.failure_probability, "
                        "cluster_failure_probability = excluded.cluster_failure_probability, "
                        "novelty = excluded.novelty, classifier_score = excluded.classifier_score, "
                        "profile = excluded.profile WHERE predictions.failure IS NULL",
                        op,
                    )
                    n_pred += 1
                elif isinstance(op, _Outcome):
                    error = self._apply_outcome(con, op)
                    n_out += error is None
                    results.append((op.done, None, error))
                elif isinstance(op, _Call):
                    results.append((op.done, op.fn(con), None))
            con.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            if con.in_transaction:
                con.rollback()
            self._pruned_uncommitted = 0
            self._count("errors")
            log.error("outcome store write failed", extra={"store": str(self.path), "error": str(exc)})
            failure = StoreError(f"outcome store {self.path}: write failed ({exc})")
            for op in batch:
                if isinstance(op, _Outcome | _Call) and not op.done.done():
                    op.done.set_exception(failure)
            return
        self._count("predictions", n_pred)
        self._count("outcomes", n_out)
        if self._pruned_uncommitted:
            self._count("pruned", self._pruned_uncommitted)
            log.info(
                "outcome store pruned", extra={"store": str(self.path), "rows": self._pruned_uncommitted}
            )
            self._pruned_uncommitted = 0
        for done, value, error in results:
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(value)

    def _apply_outcome(self, con: sqlite3.Connection, op: _Outcome) -> BaseException | None:
        row = con.execute(
            "SELECT model_id, cluster, cluster_failure_probability, failure FROM predictions "
            "WHERE request_id = ?",
            (op.request_id,),
        ).fetchone()
        if row is None:
            return StoreError(
                f"outcome store {self.path}: request id {op.request_id!r} is not stored (its prediction "
                "was dropped under overload, failed to write, or was pruned)"
            )
        model_id, cluster, predicted, failure = row
        if failure is not None:
            return KeyError(op.request_id)
        con.execute(
            "UPDATE predictions SET failure = ?, outcome_time = ? WHERE request_id = ?",
            (int(op.failure), op.time, op.request_id),
        )
        con.execute(
            "INSERT INTO tallies VALUES (?, ?, 1, ?, ?) ON CONFLICT (model_id, cluster) DO UPDATE SET "
            "outcomes = outcomes + 1, failures = failures + excluded.failures, "
            "predicted = predicted + excluded.predicted",
            (model_id, cluster, int(op.failure), predicted),
        )
        return None

    def _prune(self, con: sqlite3.Connection) -> int:
        self._last_prune = self._clock()
        deleted = 0
        if self.max_age_seconds is not None:
            cur = con.execute(
                "DELETE FROM predictions WHERE time < ?", (self._clock() - self.max_age_seconds,)
            )
            deleted += cur.rowcount
        if self.max_rows is not None:
            (n,) = con.execute("SELECT COUNT(*) FROM predictions").fetchone()
            if n > self.max_rows:
                cur = con.execute(
                    "DELETE FROM predictions WHERE rowid IN "
                    "(SELECT rowid FROM predictions ORDER BY time LIMIT ?)",
                    (n - self.max_rows,),
                )
                deleted += cur.rowcount
        self._pruned_uncommitted += deleted
        return deleted


def read_labelled(path: str | os.PathLike, feature_names: Sequence[str]) -> LabelledProfiles:
    """Every stored row with an outcome whose model profiled with ``feature_names``.

    Rows are ordered by time, then request id. Profiles of models with other
    feature names (another spectral spec) are left out: they are not comparable.

    Raises
    ------
    StoreError
        The file does not exist or is not an outcome store.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"outcome store {path}: no such file")
    names = json.dumps(list(feature_names))
    con = _connect(path, readonly=True)
    try:
        rows = con.execute(
            "SELECT p.request_id, p.model_id, p.time, p.profile, p.failure FROM predictions p "
            "JOIN models m ON m.model_id = p.model_id "
            "WHERE p.failure IS NOT NULL AND m.feature_names = ? ORDER BY p.time, p.request_id",
            (names,),
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"outcome store {path}: cannot read ({exc}); is it an outcome store?") from exc
    finally:
        con.close()
    d = len(feature_names)
    profiles = np.empty((len(rows), d), dtype=np.float64)
    for i, (_, _, _, blob, _) in enumerate(rows):
        profile = np.frombuffer(blob, dtype="<f8")
        if profile.shape != (d,):
            raise StoreError(
                f"outcome store {path}: row {rows[i][0]!r} has {profile.size} values, expected {d}"
            )
        profiles[i] = profile
    times = [r[2] for r in rows]
    return LabelledProfiles(
        profiles=profiles,
        failures=np.array([int(r[4]) for r in rows], dtype=np.int64),
        request_ids=[r[0] for r in rows],
        model_ids=[r[1] for r in rows],
        first_time=min(times) if times else float("nan"),
        last_time=max(times) if times else float("nan"),
    )
