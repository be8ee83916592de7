"""The committed OpenAPI document matches the API the code serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.api.openapi import DEFAULT_PATH, render

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED = REPO_ROOT / "openapi" / "openapi.json"
FIX = "run `infergate openapi` (python -m service.api.openapi) and commit openapi/openapi.json"


def _differences(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Paths and schemas that differ, to say where the drift is."""
    out = []
    for label, old, new in (
        ("path", committed.get("paths", {}), fresh.get("paths", {})),
        (
            "schema",
            committed.get("components", {}).get("schemas", {}),
            fresh.get("components", {}).get("schemas", {}),
        ),
    ):
        out += [f"{label} {key}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return out


def test_committed_document_has_no_drift() -> None:
    assert COMMITTED.is_file(), f"openapi/openapi.json is missing; {FIX}."
    current = render()
    if COMMITTED.read_text() != current:
        where = _differences(json.loads(COMMITTED.read_text()), json.loads(current)) or ["formatting or info"]
        pytest.fail(f"openapi/openapi.json is out of date ({', '.join(where)}); {FIX}.")


def test_export_writes_the_default_path() -> None:
    assert DEFAULT_PATH == COMMITTED


def test_render_is_deterministic_and_independent_of_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = render()
    monkeypatch.setenv("INFERGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("INFERGATE_AE_TITLE", "OTHER")
    monkeypatch.chdir(tmp_path)
    assert render() == first


def test_operation_ids_are_stable_names() -> None:
    document = json.loads(render())
    ids = sorted(op["operationId"] for path in document["paths"].values() for op in path.values())
    assert len(ids) == len(set(ids))
    assert {"health", "list_jobs", "get_job", "get_study_results", "list_models"} <= set(ids)
