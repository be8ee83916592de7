"""Property-based checks of the REST API against its own OpenAPI document (schemathesis).

Bounded examples per operation, against the real app on a migrated (empty) SQLite database: no 5xx,
every response conforms to the documented schema, and requests without the API key are refused.
STOW-RS is left out: its body is ``multipart/related`` of DICOM files, which schemathesis cannot
generate; tests/unit/api/test_stow_wado.py covers it, malformed bodies included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory
from service.api.app import create_app
from tests.helpers.queues import RecordingQueue

# A worker's SEG/SR handed back (PUT /api/v1/jobs/{id}/results/{kind}/{uid}) is application/dicom: raw bytes.
schemathesis.serializer.alias("application/dicom", "application/octet-stream")

#: Every request carries an admin key, so each operation is reached; schemathesis also checks that
#: the same request without it is refused (its ``ignored_auth`` check).
API_KEY = "schemathesis-test-key"
AUTH = {"X-API-Key": API_KEY}


@pytest.fixture
def api_schema(make_settings: Callable[..., Settings]) -> Any:
    node_settings = make_settings(api_keys=f"schemathesis:{hashlib.sha256(API_KEY.encode()).hexdigest()}:admin")
    engine = make_engine(node_settings)
    upgrade(engine)
    app = create_app(node_settings, make_session_factory(engine), queue=RecordingQueue())
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_conforms_to_its_openapi_document(api_schema: Any) -> None:
    """Each operation in turn (schemathesis' own pytest plugin does not support pytest 9's nodes)."""
    operations = [
        result.ok()
        for result in api_schema.get_all_operations()
        if not (result.ok().method.upper() == "POST" and result.ok().path.startswith("/dicomweb/"))
    ]
    assert len(operations) >= 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            # GET /ready answers its documented 503 here (no worker runs); its body is still checked
            excluded = [not_a_server_error] if case.operation.path == "/ready" else []
            case.call_and_validate(headers=AUTH, excluded_checks=excluded)

        check()
