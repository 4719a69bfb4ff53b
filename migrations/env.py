"""Alembic environment: drip passes its own connection (drip.db.upgrade)."""

from alembic import context

from drip.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` from a shell: use DRIP_DATABASE_URL
        from drip.db import make_engine, migrating
        from drip.settings import Settings

        engine = make_engine(Settings.from_env().database_url)
        with migrating(engine) as connection:  # SQLite: foreign keys off while tables are rebuilt
            _migrate(connection)
        return
    _migrate(connection)


def _migrate(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
