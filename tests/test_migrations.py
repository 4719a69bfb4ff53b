"""The migrations build exactly the models, on both databases, and go down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from drip import db
from drip.models import Base


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
