"""Export the OpenAPI document (``infergate openapi``); tests/test_openapi.py fails on drift."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from infergate.config import Settings
from service.api.app import create_app

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The document for default settings; an unbound session factory, since nothing is queried."""
    return create_app(Settings(), session_factory=sessionmaker(), queue=_NoQueue()).openapi()


class _NoQueue:
    """Exporting the document sends nothing; this keeps it from creating a broker."""

    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        raise RuntimeError("no queue while exporting the OpenAPI document")

    def send_export(self, job_id: int, countdown: float | None = None) -> None:
        raise RuntimeError("no queue while exporting the OpenAPI document")

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None:
        raise RuntimeError("no queue while exporting the OpenAPI document")


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="infergate openapi")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
