"""The durable prediction log on SQLAlchemy: SQLite (WAL, synchronous=FULL) by default, PostgreSQL for fleets.

**Group commit.** One writer thread owns the writes. ``write`` and ``label`` calls queue an operation and
await its future; the thread takes every operation queued so far (up to ``max_batch`` rows), runs them in one
transaction, commits, and only then settles their futures. While one commit is being made the next batch
gathers, so at 32 concurrent clients one fsync covers many answers, and a response is never sent before its
record is on disk. If the commit fails, every operation in it fails (the answers are not acknowledged).

**Labels** are a read of the answer then ``UPDATE … WHERE label IS NULL``: atomic, so when two replicas take
feedback for one request at once exactly one joins and the other reports a duplicate.

**Retention.** Rows older than ``retention_days`` are deleted at start and then hourly by the writer thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, delete, event, insert, select, update

from service.predlog.migrate import upgrade
from service.predlog.records import (
    AlreadyLabelledError,
    LabelledAnswer,
    PredictionLogError,
    PredictionRecord,
    UnknownRequestError,
    WindowHistory,
)
from service.predlog.schema import predictions
from service.predlog.store import PredictionStore, check_label

log = logging.getLogger("uqserve.predlog")
PURGE_EVERY_S = 3600.0


def open_database(url: str) -> Engine:
    """An SQLAlchemy engine for the log; SQLite files get WAL, full fsync and a 30 s busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)


@dataclass
class _Op:
    kind: str  # "insert" | "label"
    payload: Any  # insert: list[dict] rows; label: (request_id, label)
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the awaiting request was cancelled; its record is written all the same
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class SqlPredictionStore(PredictionStore):
    """The prediction log in a database; see the module docstring."""

    durable = True

    def __init__(self, url: str, *, replica: str, retention_days: float | None = None, max_batch: int = 512) -> None:
        self.url = url
        self.replica = replica
        self.retention_days = retention_days
        self.max_batch = max_batch
        self.engine = open_database(url)
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0

    async def start(self) -> None:
        try:
            await asyncio.to_thread(upgrade, self.engine)
            await asyncio.to_thread(self.purge)
        except PredictionLogError:
            raise
        except Exception as err:  # unreachable server, bad URL, unwritable file
            raise PredictionLogError(f"cannot open the prediction log at "
                                     f"{self.engine.url.render_as_string(hide_password=True)}: {err}") from err
        self._thread = threading.Thread(target=self._writer, name="uqserve-predlog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None  # later calls fail fast instead of queueing behind the stop
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)
        self.engine.dispose()

    # --- writes (group commit) -----------------------------------------------------------------------

    def _submit(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        if self._thread is None:
            raise PredictionLogError("the prediction log is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Op(kind, payload, future, loop))
        return future

    async def write(self, records: list[PredictionRecord]) -> None:
        await self._submit("insert", [r.row(self.replica) for r in records])

    async def label(self, request_id: str, label: int) -> LabelledAnswer:
        result: LabelledAnswer = await self._submit("label", (request_id, label))
        return result

    def _writer(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=60.0)
            except queue.Empty:
                self._maybe_purge()
                continue
            if first is None:
                return
            ops, rows, stop = [first], len(first.payload) if first.kind == "insert" else 1, False
            while rows < self.max_batch:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                ops.append(op)
                rows += len(op.payload) if op.kind == "insert" else 1
            self._commit(ops)
            self._maybe_purge()
            if stop:
                return

    def _commit(self, ops: list[_Op]) -> None:
        results: list[Any]
        try:
            with self.engine.begin() as connection:
                inserts = [row for op in ops if op.kind == "insert" for row in op.payload]
                if inserts:
                    connection.execute(insert(predictions), inserts)
                results = [None if op.kind == "insert" else _join(connection, *op.payload) for op in ops]
        except Exception as err:  # nothing in this transaction was committed
            log.error("prediction log commit of %d operations failed: %s", len(ops), err)
            failure = PredictionLogError(f"the prediction log could not commit: {type(err).__name__}: {err}")
            results = [failure] * len(ops)
        for op, result in zip(ops, results, strict=True):
            op.loop.call_soon_threadsafe(_settle, op.future, result)

    def _maybe_purge(self) -> None:
        if time.monotonic() - self._last_purge >= PURGE_EVERY_S:
            try:
                self.purge()
            except Exception as err:
                log.error("prediction log retention purge failed: %s", err)

    def purge(self) -> int:
        """Delete rows older than the retention; returns how many."""
        self._last_purge = time.monotonic()
        if not self.retention_days:
            return 0
        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
        with self.engine.begin() as connection:
            deleted = connection.execute(delete(predictions).where(predictions.c.created_at < cutoff)).rowcount
        if deleted:
            log.info("prediction log: deleted %d answers older than %g days", deleted, self.retention_days)
        return int(deleted or 0)

    # --- reads --------------------------------------------------------------------------------------

    async def history(self, bundle: str, version: str, calibration_hash: str, labelled: int,
                      live: int) -> WindowHistory:
        if self._thread is None:  # not started (or stopped): nothing to rebuild from
            return WindowHistory()
        try:
            return await asyncio.to_thread(self._history, bundle, version, calibration_hash, labelled, live)
        except Exception as err:  # the database is unreachable or lost its table
            raise PredictionLogError(f"cannot read the prediction log: {type(err).__name__}: {err}") from err

    def _history(self, bundle: str, version: str, calibration_hash: str, labelled: int, live: int) -> WindowHistory:
        p = predictions.c
        same = (p.bundle == bundle) & (p.version == version) & (p.calibration_hash == calibration_hash)
        with self.engine.connect() as connection:
            pairs = connection.execute(select(p.probabilities, p.label).where(same & p.label.is_not(None))
                                       .order_by(p.labelled_at.desc()).limit(labelled)).all()
            scores = connection.execute(select(p.max_probability, p.predictive_entropy, p.mutual_information)
                                        .where(same).order_by(p.created_at.desc()).limit(live)).all()
        return WindowHistory(
            labelled=[(list(probs), int(y)) for probs, y in reversed(pairs)],
            live=[{"confidence": c, "predictive_entropy": h, "mutual_information": mi}
                  for c, h, mi in reversed(scores)])

    def rows(self, since: datetime | None = None, until: datetime | None = None, bundle: str | None = None,
             labelled_only: bool = False, chunk: int = 1000) -> Iterator[dict[str, Any]]:
        """Logged answers in time order, streamed ``chunk`` rows at a time (for export)."""
        query = select(predictions).order_by(predictions.c.created_at, predictions.c.request_id)
        if since is not None:
            query = query.where(predictions.c.created_at >= since)
        if until is not None:
            query = query.where(predictions.c.created_at < until)
        if bundle is not None:
            query = query.where(predictions.c.bundle == bundle)
        if labelled_only:
            query = query.where(predictions.c.label.is_not(None))
        with self.engine.connect() as connection:
            for row in connection.execution_options(yield_per=chunk).execute(query):
                yield dict(row._mapping)


def _join(connection: Connection, request_id: str, label: int) -> LabelledAnswer | Exception:
    p = predictions.c
    found = connection.execute(select(p.bundle, p.version, p.calibration_hash, p.probabilities, p.label)
                               .where(p.request_id == request_id)).first()
    if found is None:
        return UnknownRequestError(f"no answered request {request_id!r} is on record")
    bundle, version, calibration_hash, probabilities, existing = found
    if existing is not None:
        return AlreadyLabelledError(f"request {request_id!r} already has a label", bundle)
    try:
        check_label(request_id, probabilities, label)
    except ValueError as err:
        return err
    joined = connection.execute(update(predictions).where((p.request_id == request_id) & p.label.is_(None))
                                .values(label=label, labelled_at=datetime.now(UTC))).rowcount
    if joined != 1:  # another replica labelled it between the read and the update
        return AlreadyLabelledError(f"request {request_id!r} already has a label", bundle)
    return LabelledAnswer(request_id, bundle, version, calibration_hash, list(probabilities), label)
