"""The REST API application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker

from infergate import __version__
from infergate.catalog import fingerprint
from infergate.config import Settings
from infergate.jobs import JobQueue, JobSender, make_celery
from infergate.manifest import load_all
from infergate.store.session import make_engine, make_session_factory
from service.api.auth import PROTECTED, Authenticator
from service.api.errors import install_error_handlers
from service.api.routes import (
    dicomweb_qido,
    dicomweb_stow,
    dicomweb_wado,
    health,
    jobs,
    models,
    results,
    retrievals,
)


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
    )
    app.state.settings = settings
    app.state.authenticator = Authenticator(settings)  # a bad keys/JWKS file stops the start
    app.state.session_factory = session_factory or make_session_factory(make_engine(settings))
    app.state.packages = load_all(settings.models_dir, verify_hash=False)
    app.state.models_fingerprint = fingerprint(settings)
    app.state.catalog, app.state.catalog_fingerprint = None, None
    app.state.queue = queue or JobQueue(make_celery(settings))
    install_error_handlers(app)
    for module in (health, jobs, retrievals, results, models, dicomweb_qido, dicomweb_stow, dicomweb_wado):
        # /health stays open for probes; every other router needs read (GET) or submit (other methods)
        app.include_router(module.router, **({} if module is health else PROTECTED))
    return app
