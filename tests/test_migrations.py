"""The migrations build exactly the models, on both databases, and go down and up again."""

from __future__ import annotations

import re
from datetime import datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from drip import db
from drip.models import Base

NOW = datetime(2026, 11, 30, 12, 0)  # naive UTC, as the database holds it


def diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_migrations_build_exactly_the_models(engine: Engine) -> None:
    assert diff(engine) == []


def test_the_schema_is_at_the_newest_revision(engine: Engine) -> None:
    current, head = db.schema_revision(engine)
    assert current == head is not None
    db.require_current_schema(engine)


def test_downgrade_removes_everything_and_upgrade_restores_it(engine: Engine) -> None:
    with engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.upgrade(engine)
    assert diff(engine) == []
    assert {"patients", "enrolments", "deliveries", "events"} <= set(
        inspect(engine).get_table_names()
    )


def test_upgrade_twice_is_harmless(engine: Engine) -> None:
    db.upgrade(engine)
    assert diff(engine) == []


def test_0003_gives_every_existing_patient_a_public_id_and_goes_down_again(
    engine: Engine,
) -> None:
    with engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0002")
    assert "public_id" not in {c["name"] for c in inspect(engine).get_columns("patients")}
    with engine.begin() as conn:  # patients as revision 0002 holds them, one suppressed
        for i in range(3):
            conn.execute(
                text(
                    "INSERT INTO patients (email, email_key, first_name, timezone, created_at, "
                    "suppressed_at, suppressed_reason) VALUES (:e, :e, 'P', 'UTC', :now, :s, :r)"
                ),
                {"e": f"p{i}@example.com", "now": NOW, "s": NOW if i == 0 else None,
                 "r": "bounce 5.1.1" if i == 0 else None},
            )  # fmt: skip
    db.upgrade(engine)
    assert diff(engine) == []
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT public_id, suppressed_reason FROM patients ORDER BY id")
        ).all()
    public_ids = [public_id for public_id, _ in rows]
    assert len(set(public_ids)) == 3 and all(re.fullmatch(r"[\w-]{22}", p) for p in public_ids)
    assert rows[0][1] == "bounce 5.1.1"  # the mirror stays; the hash comes with the key
    with engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0002")
    assert "suppressions" not in inspect(engine).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(
            text("SELECT count(*), max(suppressed_reason) FROM patients")
        ).one() == (
            3,
            "bounce 5.1.1",
        )
    db.upgrade(engine)
    assert diff(engine) == []


def _patients_with_emails_planned(engine: Engine) -> None:
    """A database at 0002 as a clinic has it: patients, their enrolments and planned emails."""
    with engine.begin() as conn:
        for i in range(2):
            patient_id = conn.execute(
                text(
                    "INSERT INTO patients (email, email_key, first_name, timezone, created_at) "
                    "VALUES (:e, :e, 'P', 'UTC', :now) RETURNING id"
                ),
                {"e": f"p{i}@example.com", "now": NOW},
            ).scalar_one()
            enrolment_id = conn.execute(
                text(
                    "INSERT INTO enrolments (patient_id, campaign, status, enrolled_at) "
                    "VALUES (:p, 'ketamine-onboarding', 'active', :now) RETURNING id"
                ),
                {"p": patient_id, "now": NOW},
            ).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO deliveries (enrolment_id, step_key, state, due_at, attempts, "
                    "created_at, updated_at) VALUES (:e, 'welcome', 'scheduled', :now, 0, :now, "
                    ":now)"
                ),
                {"e": enrolment_id, "now": NOW},
            )


def _rows_and_orphans(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        counts = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM enrolments), "
                "(SELECT count(*) FROM enrolments e WHERE NOT EXISTS "
                "(SELECT 1 FROM patients p WHERE p.id = e.patient_id))"
            )
        ).one()
    return counts[0], counts[1], counts[2]


def test_0003_goes_up_and_down_on_a_database_whose_patients_have_enrolments(
    engine: Engine,
) -> None:
    # SQLite rebuilds the patients table (a new NOT NULL column, a unique constraint): with
    # foreign keys enforced, dropping the old table under the enrolments that reference it failed.
    db.downgrade(engine, "0002")
    _patients_with_emails_planned(engine)
    db.upgrade(engine)
    assert diff(engine) == []
    assert _rows_and_orphans(engine) == (2, 2, 0)
    db.downgrade(engine, "0002")
    assert _rows_and_orphans(engine) == (2, 2, 0)
    db.upgrade(engine)
    assert diff(engine) == []
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1  # on again
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
