"""``uqserve log {export,upgrade,purge}``: the prediction log from the command line, for audits and for
recalibrating a bundle on live labelled traffic.

    uqserve log export --since 2026-12-01 --format parquet --out audit.parquet
    uqserve log export --bundle default --labelled-only --format csv --out labelled.csv

The database is the server's (``UQSERVE_DATABASE_URL``, else SQLite under ``UQSERVE_STATE_DIR``) unless
``--database-url`` names another. Rows stream in time order, a chunk at a time, so memory stays flat.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service.predlog.schema import predictions

JSON_COLUMNS = ("choices", "probabilities", "thresholds", "abstain_reasons")
COLUMNS = tuple(c.name for c in predictions.columns)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: the server's UQSERVE_DATABASE_URL, else "
                                               "sqlite under UQSERVE_STATE_DIR)")
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write logged answers to CSV or Parquet")
    export.add_argument("--since", type=_timestamp, help="first answer time, ISO 8601 (UTC unless it says)")
    export.add_argument("--until", type=_timestamp, help="answers before this time")
    export.add_argument("--bundle", help="only this bundle")
    export.add_argument("--labelled-only", action="store_true", help="only answers that have a label")
    export.add_argument("--format", choices=["csv", "parquet"], required=True)
    export.add_argument("--out", type=Path, required=True, help="output file ('-' for CSV on stdout)")
    sub.add_parser("upgrade", help="migrate the database to this version's schema (the server does it at start)")
    sub.add_parser("purge", help="delete answers older than UQSERVE_LOG_RETENTION_DAYS now")


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-01 or "
                                         "2026-12-01T08:00:00+01:00)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    from service.predlog.migrate import upgrade
    from service.predlog.sql import SqlPredictionStore
    from service.settings import Settings

    settings = Settings()
    url = args.database_url or settings.log_database_url()
    store = SqlPredictionStore(url, replica=settings.replica(), retention_days=settings.log_retention_days)
    try:
        revision = upgrade(store.engine)
        if args.action == "upgrade":
            print(f"prediction log at schema revision {revision}")
        elif args.action == "purge":
            print(f"deleted {store.purge()} answers older than {settings.log_retention_days} days")
        else:
            rows = store.rows(args.since, args.until, args.bundle, args.labelled_only)
            count = write_rows(tqdm(rows, desc="export", unit=" answers", disable=None, file=sys.stderr),
                               args.format, args.out)
            print(f"wrote {count} answers to {args.out}", file=sys.stderr)
    finally:
        store.engine.dispose()
    return 0


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """One row for CSV: JSON columns as JSON text, times as ISO 8601 in UTC."""
    out = dict(row)
    for name in JSON_COLUMNS:
        out[name] = None if row[name] is None else json.dumps(row[name], ensure_ascii=False)
    for name in ("created_at", "labelled_at"):
        out[name] = None if row[name] is None else _utc(row[name]).isoformat()
    return out


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)  # SQLite drops the zone


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, out: Path, chunk: int = 2000) -> int:
    """Write rows (as :meth:`SqlPredictionStore.rows` yields them) to ``out``; returns how many."""
    if fmt == "csv":
        return _write_csv(rows, out)
    return _write_parquet(rows, out, chunk)


def _write_csv(rows: Iterable[dict[str, Any]], out: Path) -> int:
    handle = sys.stdout if str(out) == "-" else out.open("w", newline="", encoding="utf-8")
    count = 0
    try:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(_flat(row))
            count += 1
    finally:
        if handle is not sys.stdout:
            handle.close()
    return count


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def _write_parquet(rows: Iterable[dict[str, Any]], out: Path, chunk: int) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise SystemExit("Parquet export needs pyarrow: pip install 'uqserve[parquet]' (or use --format csv)") from None
    timestamp = pa.timestamp("us", tz="UTC")
    types = {"created_at": timestamp, "labelled_at": timestamp, "choices": pa.list_(pa.string()),
             "probabilities": pa.list_(pa.float64()), "abstain_reasons": pa.list_(pa.string()),
             "thresholds": pa.string(), "abstained": pa.bool_(), "num_choices": pa.int32(),
             "answer_index": pa.int32(), "label": pa.int32()}
    floats = ("max_probability", "predictive_entropy", "expected_entropy", "mutual_information", "feu", "latency_ms")
    schema = pa.schema([(name, types.get(name, pa.float64() if name in floats else pa.string())) for name in COLUMNS])
    count = 0
    with pq.ParquetWriter(out, schema) as writer:
        for batch in _chunks(rows, chunk):
            for row in batch:
                row["thresholds"] = json.dumps(row["thresholds"])
                for name in ("created_at", "labelled_at"):
                    row[name] = None if row[name] is None else _utc(row[name])
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
