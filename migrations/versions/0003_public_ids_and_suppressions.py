"""patients.public_id (what unsubscribe links name) and the suppression list of keyed hashes

Every existing patient gets a fresh random public id. The suppression list stores HMACs of
addresses under a key derived from DRIP_SECRET_KEY, which a migration does not have: patients
already suppressed keep `patients.suppressed_at/suppressed_reason` (the per-patient mirror the
claim and send paths check), and drip.suppression.backfill writes their hashes the first time
drip runs with the key (`drip db upgrade`, `drip suppressions`). The downgrade drops the list;
the mirror keeps every suppression of a known patient.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import base64
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _public_id() -> str:
    # The same as drip.patients.new_public_id, copied: a migration must not change when the
    # package does.
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


def upgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("public_id", sa.String(22), nullable=True))
    patients = sa.table("patients", sa.column("id", sa.Integer), sa.column("public_id"))
    connection = op.get_bind()
    ids = connection.execute(sa.select(patients.c.id)).scalars().all()
    if ids:
        connection.execute(
            sa.update(patients)
            .where(patients.c.id == sa.bindparam("pid"))
            .values(public_id=sa.bindparam("new_id")),
            [{"pid": pid, "new_id": _public_id()} for pid in ids],
        )
    with op.batch_alter_table("patients") as batch:
        batch.alter_column("public_id", existing_type=sa.String(22), nullable=False)
        batch.create_unique_constraint("uq_patients_public_id", ["public_id"])
    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address_hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_suppressions"),
        sa.UniqueConstraint("address_hash", name="uq_suppressions_address_hash"),
    )


def downgrade() -> None:
    op.drop_table("suppressions")
    with op.batch_alter_table("patients") as batch:
        batch.drop_constraint("uq_patients_public_id", type_="unique")
        batch.drop_column("public_id")
