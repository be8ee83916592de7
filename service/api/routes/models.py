"""The installed models, as their manifests describe them."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import PackagesDep
from service.api.schemas import ClassOut, ModelOut, SegmentOut

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut])
def list_models(packages: PackagesDep) -> list[ModelOut]:
    """Every model package found in the models folder."""
    out = []
    for package in packages.values():
        m = package.manifest
        out.append(
            ModelOut(
                id=m.id,
                version=m.version,
                name=m.name,
                description=m.description,
                task=m.task,
                modalities=m.accepts.modalities,
                dimensionality=m.accepts.dimensionality,
                sha256=m.sha256,
                labels=[
                    SegmentOut(value=s.value, name=s.name, category=s.category.meaning, type=s.type.meaning)
                    for s in m.labels
                ],
                classes=[
                    ClassOut(index=c.index, name=c.name, code=f"{c.code.scheme}:{c.code.value}") for c in m.classes
                ],
            )
        )
    return out
