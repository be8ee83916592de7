"""FastAPI dependencies: settings, database sessions and the model catalogue held on app.state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from infergate.config import Settings
from infergate.manifest import ModelPackage


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_packages(request: Request) -> dict[str, ModelPackage]:
    packages: dict[str, ModelPackage] = request.app.state.packages
    return packages


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
PackagesDep = Annotated[dict[str, ModelPackage], Depends(get_packages)]
