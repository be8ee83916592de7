"""The REST API application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker

from infergate import __version__
from infergate.audit import Auditor
from infergate.catalog import fingerprint
from infergate.config import Settings
from infergate.jobs import JobQueue, JobSender, make_celery
from infergate.manifest import load_all
from infergate.store.session import make_engine, make_session_factory
from service.api.access_audit import AccessAudit
from service.api.auth import API_KEY_HEADER, PROTECTED, WORKERS_ONLY, Authenticator
from service.api.errors import install_error_handlers
from service.api.limits import RequestLimits
from service.api.routes import (
    dicomweb_qido,
    dicomweb_stow,
    dicomweb_wado,
    exports,
    health,
    jobs,
    models,
    previews,
    prometheus,
    results,
    retrievals,
    worker_results,
)
from service.dashboard.routes import router as dashboard_router


def _operation_id(route: APIRoute) -> str:
    """Stable operation ids (the function name), so generated clients keep their method names."""
    return route.name


def create_app(
    settings: Settings, session_factory: sessionmaker[Session] | None = None, queue: JobSender | None = None
) -> FastAPI:
    """Build the API for ``settings``; tests may pass their own session factory and job queue."""
    app = FastAPI(
        title="infergate",
        version=__version__,
        description="DICOM AI inference node: jobs, results and models.",
        generate_unique_id_function=_operation_id,
        # No 307 to the path without its slash: a client re-POSTing a STOW-RS body to /studies/%2F/
        # would land on the collection, outside the study it named.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.authenticator = Authenticator(settings)  # a bad keys/JWKS file stops the start
    app.state.session_factory = session_factory or make_session_factory(make_engine(settings))
    app.state.packages = load_all(settings.models_dir, verify_hash=False)
    app.state.models_fingerprint = fingerprint(settings)
    app.state.catalog, app.state.catalog_fingerprint = None, None
    app.state.queue = queue or JobQueue(make_celery(settings))
    install_error_handlers(app)
    app.add_middleware(
        RequestLimits,
        body_timeout_seconds=settings.api_body_timeout_seconds,
        max_upload_bytes=settings.dicomweb_max_upload_bytes,
    )
    app.state.auditor = Auditor.from_settings(settings, process="api")
    app.add_middleware(AccessAudit, auditor=app.state.auditor)  # outside the limits: their refusals count too
    if settings.cors_origins:
        # Named origins only; credentials travel in headers (Authorization, X-API-Key), never cookies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", API_KEY_HEADER, "Accept", "Content-Type"],
            expose_headers=["Warning", "Content-Location", "Location", "Content-Type"],
            max_age=600,
        )
    for module in (
        health,
        jobs,
        exports,
        previews,
        retrievals,
        results,
        models,
        dicomweb_qido,
        dicomweb_stow,
        dicomweb_wado,
        prometheus,
    ):
        # /health stays open for probes; every other router needs read (GET) or submit (other methods)
        app.include_router(module.router, **({} if module is health else PROTECTED))
    app.include_router(worker_results.router, **WORKERS_ONLY)  # remote workers hand back SEG/SR (worker scope)
    app.include_router(dashboard_router)  # open like /health: the page holds no data, its script authenticates
    return app
