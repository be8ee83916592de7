"""``GET /ready`` and ``GET /metrics`` of the API against real databases and brokers.

What a live worker changes (``/ready`` 200, worker-written metrics) is proven end to end in
tests/integration/test_observability.py; here every check is made to fail for real: no worker
process, a database or broker port nobody listens on, no models, a watermark above the free space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store.session import make_engine, make_session_factory
from service.api.app import create_app

CLOSED_PG = "postgresql+psycopg://postgres:secret@127.0.0.1:1/none"
CLOSED_REDIS = "redis://:secret@127.0.0.1:1/0"


@pytest.fixture
def client_for(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """A TestClient of create_app(settings) for the given overrides (min_free_bytes 0 unless given)."""
    clients: list[TestClient] = []

    def _make(factory: sessionmaker[Session] | None = None, **overrides: Any) -> TestClient:
        overrides.setdefault("min_free_bytes", 0)
        client = TestClient(create_app(make_settings(**overrides), factory))
        clients.append(client.__enter__())
        return client

    yield _make
    for client in clients:
        client.__exit__(None, None, None)


def _checks(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in body["checks"]}


def test_ready_without_a_worker_is_503_naming_workers(
    client_for: Callable[..., TestClient], session_factory: sessionmaker[Session], db_settings: Settings
) -> None:
    client = client_for(session_factory, database_url=db_settings.database_url)
    response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready" and body["failing"] == ["workers"]
    checks = _checks(body)
    assert list(checks) == ["database", "broker", "storage", "workers", "models"]
    assert all(checks[name]["ok"] for name in ("database", "broker", "storage", "models")), checks
    assert "no worker answered" in checks["workers"]["detail"]


def test_ready_with_an_unreachable_database_names_it_without_the_url(
    client_for: Callable[..., TestClient],
) -> None:
    client = client_for(database_url=CLOSED_PG)
    response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert "database" in body["failing"]
    assert _checks(body)["database"]["detail"].startswith("unreachable (")
    assert "secret" not in response.text and "127.0.0.1:1" not in response.text


def test_ready_with_an_unreachable_broker_names_it(client_for: Callable[..., TestClient]) -> None:
    client = client_for(broker_url=CLOSED_REDIS)
    response = client.get("/ready")
    assert response.status_code == 503
    assert {"broker", "workers"} <= set(response.json()["failing"])
    assert "secret" not in response.text


def test_ready_checks_storage_watermark_and_models(client_for: Callable[..., TestClient], tmp_path: Path) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    client = client_for(min_free_bytes=10**18, models_dir=empty, routing_rules=rules)
    response = client.get("/ready")
    assert response.status_code == 503
    checks = _checks(response.json())
    assert not checks["storage"]["ok"] and "below the watermark" in checks["storage"]["detail"]
    assert not checks["models"]["ok"] and checks["models"]["detail"] == "no model installed"


def test_metrics_serves_the_sql_gauges(
    client_for: Callable[..., TestClient], session_factory: sessionmaker[Session], db_settings: Settings
) -> None:
    client = client_for(session_factory, database_url=db_settings.database_url)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"infergate_storage_free_bytes", "infergate_queue_depth"} <= names


def test_metrics_needs_credentials_when_auth_is_on_and_ready_does_not(
    client_for: Callable[..., TestClient],
) -> None:
    key = "observability-test-key"
    entry = f"prometheus:{hashlib.sha256(key.encode()).hexdigest()}:read"
    engine = make_engine(Settings(database_url=CLOSED_PG))
    try:
        client = client_for(make_session_factory(engine), api_host="0.0.0.0", api_keys=entry)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": key}).status_code == 200
        assert client.get("/ready").status_code == 503  # answered (not 401): probes carry no credentials
    finally:
        engine.dispose()
