"""Index for rebuilding a bundle version's labelled window at start (latest labels of one version).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_predictions_bundle_labelled", "predictions",
                    ["bundle", "version", "calibration_hash", "labelled_at"])


def downgrade() -> None:
    op.drop_index("ix_predictions_bundle_labelled", table_name="predictions")
