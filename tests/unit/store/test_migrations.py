"""The Alembic migrations produce exactly the schema of infergate/store/tables.py.

This fails when someone changes tables.py without adding a migration (``infergate db revision``).
"""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from infergate.store.tables import Base


def test_migrations_match_tables(db_settings: Settings) -> None:
    engine = make_engine(db_settings)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"tables.py and the migrations differ; add a migration: {diff}"


def test_every_table_exists_with_its_revision(db_settings: Settings) -> None:
    engine = make_engine(db_settings)
    try:
        names = set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            heads = MigrationContext.configure(connection).get_current_heads()
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= names
    assert "alembic_version" in names
    assert len(heads) == 1


def test_upgrade_twice_is_a_no_op(db_settings: Settings) -> None:
    engine = make_engine(db_settings)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
