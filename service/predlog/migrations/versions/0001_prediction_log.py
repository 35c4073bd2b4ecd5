"""The prediction log: one row per answered question, with its delayed label.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("request_id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("bundle", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("base_model_hash", sa.String(64), nullable=False),
        sa.Column("calibration_hash", sa.String(64), nullable=False),
        sa.Column("prompt_hash", sa.String(64), nullable=False),
        sa.Column("question", sa.Text),
        sa.Column("context", sa.Text),
        sa.Column("choices", sa.JSON),
        sa.Column("texts_hash", sa.String(64), nullable=False),
        sa.Column("num_choices", sa.Integer, nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("answer_index", sa.Integer, nullable=False),
        sa.Column("max_probability", sa.Float, nullable=False),
        sa.Column("predictive_entropy", sa.Float, nullable=False),
        sa.Column("expected_entropy", sa.Float),
        sa.Column("mutual_information", sa.Float),
        sa.Column("feu", sa.Float),
        sa.Column("thresholds", sa.JSON, nullable=False),
        sa.Column("abstained", sa.Boolean, nullable=False),
        sa.Column("abstain_reasons", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("label", sa.Integer),
        sa.Column("labelled_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])  # retention, export


def downgrade() -> None:
    op.drop_index("ix_predictions_created_at", table_name="predictions")
    op.drop_table("predictions")
