"""Liveness (``/health``) and readiness (``/ready``), both open to probes without credentials.

``/ready`` names its checks and why one fails (an exception type, a count), never a URL or anything
about a patient, so it stays open like ``/health``: an orchestrator's probe carries no credentials.
"""

from __future__ import annotations

import logging

from celery import Celery
from fastapi import APIRouter, Request, Response

from infergate import __version__, readiness
from infergate.jobs import make_celery
from service.api.deps import get_catalog
from service.api.schemas import Health, Readiness, ReadyCheck

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process answers (liveness); whether the node can take work is ``/ready``."""
    return Health(status="ok", version=__version__)


def _celery(request: Request) -> Celery:
    """A Celery app of the API's own for the probes, made on the first probe (not for the OpenAPI export)."""
    state = request.app.state
    app: Celery | None = getattr(state, "probe_celery", None)
    if app is None:
        app = state.probe_celery = make_celery(state.settings)
    return app


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A check failed; `failing` names it."}},
)
def ready(request: Request, response: Response) -> Readiness:
    """Whether the node can take work: database, broker, storage, a live worker and a model (readiness).

    200 when every check passes, 503 otherwise; each check is listed with what it found. The checks
    run side by side and answer within a few seconds even when a peer hangs.
    """
    state = request.app.state
    settings = state.settings
    results = readiness.run_checks(
        {
            "database": lambda: readiness.check_database(state.session_factory),
            "broker": lambda: readiness.check_broker(settings, lambda: _celery(request)),
            "storage": lambda: readiness.check_storage(settings),
            "workers": lambda: readiness.check_workers(lambda: _celery(request)),
            "models": lambda: readiness.check_models(lambda: get_catalog(request)),
        }
    )
    failing = [check.name for check in results if not check.ok]
    if failing != getattr(state, "ready_failing", []):  # log changes, not every probe
        if failing:
            log.warning("not ready: %s", "; ".join(f"{c.name}: {c.detail}" for c in results if not c.ok))
        else:
            log.info("ready")
        state.ready_failing = failing
    if failing:
        response.status_code = 503
    return Readiness(
        status="not ready" if failing else "ready",
        failing=failing,
        checks=[ReadyCheck(name=c.name, ok=c.ok, detail=c.detail) for c in results],
    )
