"""Shared fixtures: settings in a temporary data folder, and real databases.

PostgreSQL and Redis are the real servers this machine runs (``.ci/run`` starts them if they are
down); each test that needs PostgreSQL gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory
from tests.helpers.phi_watch import WATCH

PG_ADMIN_DSN = os.environ.get("INFERGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("INFERGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Watch the node's logs for the test data's patient values during the whole run (row 26)."""
    logging.getLogger().addHandler(WATCH)
    if logging.getLogger().level > logging.INFO:
        # Records below the root's level never reach a handler: let the node's INFO lines through
        # to the watch (the node logs at INFO by default; DEBUG is checked in node processes by
        # tests/reliability/test_phi_in_logs.py, which would be costly here: pynetdicom logs every PDU).
        logging.getLogger().setLevel(logging.INFO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a canary reached a log of the node, saying where."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    roots = [Path(factory.getbasetemp())] if factory is not None else []
    WATCH.scan_files(roots)
    if WATCH.hits:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"patient data in the node's logs ({len(WATCH.hits)} lines):"]
        lines += [f"  {hit.where}: {hit.text}" for hit in WATCH.hits[:50]]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _clean_infergate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build Settings explicitly; stray INFERGATE_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("INFERGATE_") and not name.startswith("INFERGATE_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL), dropped after the test."""
    name = f"infergate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_db() -> str:
    """A Redis URL on a database number unlikely to be shared with a parallel test; flushed first."""
    import redis

    number = 1 + uuid.uuid4().int % 14
    url = f"{REDIS_URL}/{number}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build Settings with the data folder in ``tmp_path`` and any overrides."""

    def _make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "var"}
        values.update(overrides)
        return Settings(**values)

    return _make


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on a migrated database: SQLite in the data folder, then a fresh PostgreSQL one."""
    if request.param == "postgresql":
        settings = make_settings(database_url=request.getfixturevalue("pg_url"))
    else:
        settings = make_settings()
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    return settings


@pytest.fixture
def session_factory(db_settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_settings)
    yield make_session_factory(engine)
    engine.dispose()
