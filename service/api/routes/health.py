"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

from infergate import __version__
from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process answers; readiness checks come with the observability work."""
    return Health(status="ok", version=__version__)
