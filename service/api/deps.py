"""FastAPI dependencies: settings, database sessions and the model catalogue held on app.state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from infergate.catalog import fingerprint
from infergate.config import Settings
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
