"""deliveries: an index on sent_at, for the emails sent in the last hour (`drip status`) without
reading every sent row

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Partial: only sent rows have a sent_at, and the rows still to send stay out of it.
    op.create_index(
        "ix_deliveries_sent_at",
        "deliveries",
        ["sent_at"],
        unique=False,
        sqlite_where=sa.text("sent_at IS NOT NULL"),
        postgresql_where=sa.text("sent_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_sent_at", table_name="deliveries")
