"""Whether a series fits a model's ``accepts`` block, checked by the worker before it runs a model.

Routing should never send a series a model was not made for, but rules are edited by people; the
worker checks again so that a mis-routed series fails with a message naming the mismatch instead
of producing a result nobody should trust.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from infergate.errors import InvalidInput
from infergate.manifest import ModelManifest


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip().upper() for part in value.split("\\")]
    if isinstance(value, Sequence):
        return [str(part).strip().upper() for part in value]
    return [str(value).strip().upper()]


def check_series(datasets: Sequence[Dataset], manifest: ModelManifest, images: int | None = None) -> None:
    """Refuse a series whose modality, body part, image type or size the manifest does not accept.

    Parameters
    ----------
    datasets:
        The series' datasets; the first one's header values speak for the series.
    images:
        Number of images (slices) as the model sees them; ``len(datasets)`` by default.

    Raises
    ------
    InvalidInput
        With a message naming the field of ``accepts`` that does not hold.
    """
    if not datasets:
        raise InvalidInput("The series has no images.")
    accepts = manifest.accepts
    first = datasets[0]
    count = len(datasets) if images is None else images
    modality = str(first.get("Modality", "") or "").strip().upper()
    allowed = [m.strip().upper() for m in accepts.modalities]
    if modality not in allowed:
        raise InvalidInput(f"Model {manifest.id!r} accepts modalities {allowed}, not {modality or 'none'!r}.")
    if accepts.body_parts is not None:
        body_part = str(first.get("BodyPartExamined", "") or "").strip().upper()
        parts = [p.strip().upper() for p in accepts.body_parts]
        if body_part not in parts:
            raise InvalidInput(f"Model {manifest.id!r} accepts body parts {parts}, not {body_part or 'none'!r}.")
    if accepts.image_types is not None:
        missing = sorted({t.strip().upper() for t in accepts.image_types} - set(_values(first.get("ImageType"))))
        if missing:
            raise InvalidInput(f"Model {manifest.id!r} needs ImageType values {missing}.")
    if count < accepts.min_slices:
        raise InvalidInput(f"Model {manifest.id!r} needs at least {accepts.min_slices} slices; the series has {count}.")
    if accepts.max_slices is not None and count > accepts.max_slices:
        raise InvalidInput(f"Model {manifest.id!r} takes at most {accepts.max_slices} slices; the series has {count}.")
