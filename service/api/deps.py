"""FastAPI dependencies: settings, database sessions and the model catalogue held on app.state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from infergate.catalog import Catalog, fingerprint, load_catalog
from infergate.config import Settings
from infergate.jobs import JobSender
from infergate.manifest import ModelPackage, load_all


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_packages(request: Request) -> dict[str, ModelPackage]:
    """Installed models; re-read when the models folder changed (``infergate models add``)."""
    state = request.app.state
    current = fingerprint(state.settings)
    if current != state.models_fingerprint:
        state.packages, state.models_fingerprint = load_all(state.settings.models_dir, verify_hash=False), current
    packages: dict[str, ModelPackage] = state.packages
    return packages


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
PackagesDep = Annotated[dict[str, ModelPackage], Depends(get_packages)]


def get_queue(request: Request) -> JobSender:
    queue: JobSender = request.app.state.queue
    return queue


def get_catalog(request: Request) -> Catalog:
    """Models and routing rules, re-read when they changed."""
    state = request.app.state
    current = fingerprint(state.settings)
    if state.catalog is None or current != state.catalog_fingerprint:
        state.catalog, state.catalog_fingerprint = load_catalog(state.settings, verify_hash=False), current
    catalog: Catalog = state.catalog
    return catalog


QueueDep = Annotated[JobSender, Depends(get_queue)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
