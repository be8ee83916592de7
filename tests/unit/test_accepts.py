"""The worker's own check of a manifest's ``accepts`` block."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from infergate.accepts import check_series
from infergate.errors import InvalidInput
from infergate.manifest import Accepts, Code, ModelManifest, Preprocess

CODE = Code(value="260413007", scheme="SCT", meaning="None")


def _manifest(**accepts: object) -> ModelManifest:
    return ModelManifest(
        id="m",
        version="1",
        name="m",
        task="classification",
        sha256="0" * 64,
        accepts=Accepts(**accepts),  # type: ignore[arg-type]
        preprocess=Preprocess(intensity="none"),
        finding=CODE,
        classes=[{"index": 0, "name": "a", "code": CODE}],  # type: ignore[list-item]
    )


def _ds(modality: str = "CR", body_part: str = "CHEST", image_type: str = "ORIGINAL\\PRIMARY") -> Dataset:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ImageType = modality, body_part, image_type.split("\\")
    return ds


def test_a_fitting_series_passes() -> None:
    check_series([_ds()], _manifest(modalities=["cr", "DX"], body_parts=["chest"], image_types=["ORIGINAL"]))


@pytest.mark.parametrize(
    ("accepts", "datasets", "message"),
    [
        ({"modalities": ["CT"]}, [_ds()], "modalities"),
        ({"modalities": ["CR"], "body_parts": ["HAND"]}, [_ds()], "body parts"),
        ({"modalities": ["CR"], "image_types": ["DERIVED"]}, [_ds()], "ImageType"),
        ({"modalities": ["CR"], "min_slices": 2}, [_ds()], "at least 2"),
        ({"modalities": ["CR"], "max_slices": 1}, [_ds(), _ds()], "at most 1"),
        ({"modalities": ["CR"]}, [], "no images"),
    ],
)
def test_mismatches_name_the_field(accepts: dict[str, object], datasets: list[Dataset], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_series(datasets, _manifest(**accepts))
