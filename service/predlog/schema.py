"""The prediction log's table (SQLAlchemy Core). Alembic migrations under ``migrations/`` create and
upgrade it; this module is what the code reads and writes, and must match the newest migration
(``tests/service/test_prediction_log.py`` compares them).

One row per answered question: who answered it (bundle lineage, thresholds, decision), what it said
(probabilities [K], uncertainty), and, once a delayed label arrives, the label and when it came.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("request_id", String(32), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("replica", String(128), nullable=False),  # which server answered (UQSERVE_REPLICA_ID)
    # lineage
    Column("bundle", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("method", String(32), nullable=False),
    Column("base_model_hash", String(64), nullable=False),
    Column("calibration_hash", String(64), nullable=False),
    Column("prompt_hash", String(64), nullable=False),
    # input: texts only when UQSERVE_LOG_TEXTS is on; their hash always
    Column("question", Text),
    Column("context", Text),
    Column("choices", JSON),  # [K] strings
    Column("texts_hash", String(64), nullable=False),
    Column("num_choices", Integer, nullable=False),
    # output
    Column("probabilities", JSON, nullable=False),  # [K] floats
    Column("answer_index", Integer, nullable=False),
    Column("max_probability", Float, nullable=False),
    Column("predictive_entropy", Float, nullable=False),
    Column("expected_entropy", Float),
    Column("mutual_information", Float),
    Column("feu", Float),
    # decision
    Column("thresholds", JSON, nullable=False),  # {"values": {name: float|None}, "sources": {name: str}}
    Column("abstained", Boolean, nullable=False),
    Column("abstain_reasons", JSON, nullable=False),  # [str]
    Column("latency_ms", Float, nullable=False),  # engine time: request entry → answer ready (before the log)
    # delayed label
    Column("label", Integer),
    Column("labelled_at", DateTime(timezone=True)),
    Index("ix_predictions_created_at", "created_at"),
    Index("ix_predictions_bundle_labelled", "bundle", "version", "calibration_hash", "labelled_at"),
)
