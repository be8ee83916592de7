"""Alembic environment: runs migrations on the engine built from Settings (see infergate.store.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from infergate.store.tables import Base

config = context.config
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Run migrations through infergate.store.migrate (infergate db upgrade).")
run(connection)
