"""deliveries: an index on sent_at, for the emails sent in the last hour (`drip status`) without
reading every sent row

Revision ID: 0003_sent_at_index
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_sent_at_index"
down_revision = "0002"
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
