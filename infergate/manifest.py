"""Model package manifests: everything the worker knows about a model comes from here.

A model package is a folder ``models/<model_id>/`` holding ``model.onnx``, ``manifest.json`` (this
schema), the script that produced the ONNX file and a model card. Tensor layout conventions:

* 3D input ``(N, 1, D, H, W)`` (slices, rows, columns), 2D input ``(N, 1, H, W)``, float32;
* segmentation output ``(N, C, ...)`` scores per class, ``argmax`` over ``C`` gives the label map,
  label 0 is background and each other label is described in ``labels``;
* classification output ``(N, C)`` logits; ``softmax`` gives probabilities per ``classes`` entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infergate.errors import InvalidInput, NotFound

_MODEL_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def _plain_file_name(value: str) -> str:
    if not value or "/" in value or "\\" in value or value.startswith("."):
        raise ValueError("A model file should be a plain file name inside the package folder.")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept (PS3.3 8.8), e.g. ``{"value": "272673000", "scheme": "SCT", "meaning": "Bone"}``."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class Window(_Strict):
    """Intensity window in output units of the Modality LUT (HU for CT)."""

    center: float
    width: float = Field(gt=0)


class Accepts(_Strict):
    """Which series a model can run on; the routing rules pick among those.

    ``body_parts`` (BodyPartExamined values, case-insensitive) and ``image_types`` (values that must all
    appear in ImageType) are checked by the worker too, so a mis-routed series fails with a clear error.
    """

    modalities: list[str] = Field(min_length=1)
    dimensionality: Literal[2, 3] = 3
    min_slices: int = Field(1, ge=1)
    max_slices: int | None = Field(None, ge=1)
    body_parts: list[str] | None = None
    image_types: list[str] | None = None


class RegionOfInterest(_Strict):
    """A first, coarse model that finds where the main model should look (a cascade, as deepbet does).

    The volume (after ``orientation``) is resized to ``shape`` with ``interpolation``, normalised like the
    main input, and run through ``file``; channel ``channel`` of its output, thresholded at ``threshold``
    (keeping the largest connected component when ``largest_component``), gives a bounding box that is
    grown by ``margin`` (fraction of its size per side) and cropped from the full-resolution volume. The
    crop is what the main model's ``target_shape``/``target_spacing`` then applies to, and the main model's
    output is pasted back into the crop (zeros elsewhere).
    """

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str = "input"
    output_name: str = "output"
    shape: list[int] = Field(min_length=2, max_length=3)
    interpolation: Literal["linear", "nearest"] = "nearest"
    channel: int = Field(1, ge=0)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    largest_component: bool = True
    margin: float = Field(0.1, ge=0.0, le=1.0)

    @field_validator("file")
    @classmethod
    def _plain(cls, value: str) -> str:
        return _plain_file_name(value)


class Preprocess(_Strict):
    """Steps from the stored pixel data to the input tensor, in this order.

    1. rescale (always: Rescale Slope/Intercept; MONOCHROME1 radiographs are inverted);
    2. ``orientation``: reorder/flip the array axes so that they run along the named patient axes
       (``RAS``: array axes 0, 1, 2 go to the patient's Right, Anterior, Superior, as NIfTI tools load
       volumes); ``null`` keeps the DICOM order (slice, row, column);
    3. ``roi``: optional cascade crop (see :class:`RegionOfInterest`);
    4. resample to ``target_spacing`` (mm) or to ``target_shape`` (voxels) with ``interpolation``;
       ``resize: "fit"`` keeps the aspect ratio and pads with the image minimum (2D radiographs);
    5. intensity: ``window`` clips to the window and maps to [0, 1]; ``voi`` applies the image's own
       VOI LUT or window (PS3.3 C.11.2) then maps to [0, 1]; ``percentile`` clips to the
       ``percentiles`` of the (resampled) image and maps to [0, 1]; ``zscore`` normalises to mean 0,
       sd 1; then, if ``standardize``, the result is z-scored; finally ``scale * x + shift``;
    6. inference over the whole volume, or in ``patch_size`` windows with ``overlap`` (sliding window).
    """

    orientation: Literal["RAS", "LPS"] | None = None
    roi: RegionOfInterest | None = None
    target_spacing: list[float] | None = None
    target_shape: list[int] | None = None
    interpolation: Literal["linear", "nearest"] = "linear"
    resize: Literal["stretch", "fit"] = "stretch"
    intensity: Literal["window", "voi", "percentile", "zscore", "none"] = "window"
    window: Window | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    standardize: bool = False
    scale: float = 1.0
    shift: float = 0.0
    patch_size: list[int] | None = None
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Preprocess:
        if self.target_spacing is not None and self.target_shape is not None:
            raise ValueError('Give at most one of "target_spacing" and "target_shape".')
        if self.intensity == "window" and self.window is None:
            raise ValueError('"intensity": "window" needs a "window".')
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError('"percentiles" should be two increasing values within 0-100.')
        if self.resize == "fit" and self.target_shape is None:
            raise ValueError('"resize": "fit" needs a "target_shape".')
        for name in ("target_spacing", "target_shape", "patch_size"):
            value = getattr(self, name)
            if value is not None and (len(value) not in (2, 3) or any(v <= 0 for v in value)):
                raise ValueError(f'"{name}" should hold 2 or 3 positive numbers.')
        return self


class Postprocess(_Strict):
    """How model outputs become labels.

    ``activation`` is what the graph's output already is (``none``: raw scores or logits). A
    segmentation output is turned into labels by ``argmax`` over the class axis, or, when ``threshold``
    is set, by thresholding channel ``channel`` (probabilities) into label 1. Then, per label,
    ``largest_component`` keeps the largest 3D connected component and ``fill_holes`` fills enclosed
    cavities; ``min_component_voxels`` drops smaller islands.
    """

    activation: Literal["none", "softmax", "sigmoid"] = "none"
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    channel: int = Field(1, ge=0)
    largest_component: bool = False
    fill_holes: bool = False
    min_component_voxels: int = Field(0, ge=0)


class VolumeTotal(_Strict):
    """A volume reported in the SR for the union of several labels (e.g. "Body" = all tissue labels)."""

    name: str = Field(min_length=1, max_length=64)
    labels: list[int] = Field(min_length=1)
    type: Code


class SegmentLabel(_Strict):
    """One label of a segmentation output, written as one SEG segment."""

    value: int = Field(ge=1, description="Index along the class axis of the output.")
    name: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    anatomic_region: Code | None = None
    color: tuple[int, int, int] = (255, 0, 0)


class ClassLabel(_Strict):
    """One class of a classification output."""

    index: int = Field(ge=0)
    name: str = Field(min_length=1, max_length=64)
    code: Code


def _default_measurements() -> list[Literal["volume"]]:
    return ["volume"]


class ModelManifest(_Strict):
    """The manifest of one model package (``manifest.json``)."""

    id: str = Field(pattern=_MODEL_ID)
    version: str = Field(min_length=1, max_length=16)
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    task: Literal["segmentation", "classification"]
    input: Literal["image", "header_features"] = Field(
        "image", description="What the model reads: pixels, or features computed from the DICOM headers."
    )
    feature_extractor: str | None = Field(
        None, description='With "input": "header_features", the name of a registered feature extractor.'
    )
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str = "input"
    output_name: str = "output"
    accepts: Accepts
    preprocess: Preprocess = Field(default_factory=lambda: Preprocess(intensity="none"))
    postprocess: Postprocess = Field(default_factory=lambda: Postprocess())
    labels: list[SegmentLabel] = Field(default_factory=list)
    volume_totals: list[VolumeTotal] = Field(default_factory=list)
    classes: list[ClassLabel] = Field(default_factory=list)
    finding: Code | None = Field(None, description="Concept of a classification finding in the SR.")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="Decision threshold on the positive class.")
    positive_class: int | None = None
    measurements: list[Literal["volume"]] = Field(default_factory=_default_measurements)

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        return _plain_file_name(value)

    @model_validator(mode="after")
    def _outputs(self) -> ModelManifest:
        if self.task == "segmentation":
            if not self.labels:
                raise ValueError('A segmentation model needs "labels".')
            values = [label.value for label in self.labels]
            if len(set(values)) != len(values):
                raise ValueError('"labels" values should be unique.')
            for total in self.volume_totals:
                if not set(total.labels) <= set(values):
                    raise ValueError(f'"volume_totals" {total.name!r} names labels that are not in "labels".')
        else:
            if not self.classes or self.finding is None:
                raise ValueError('A classification model needs "classes" and "finding".')
            if sorted(c.index for c in self.classes) != list(range(len(self.classes))):
                raise ValueError('"classes" indices should be 0..n-1.')
        if (self.input == "header_features") != (self.feature_extractor is not None):
            raise ValueError('"feature_extractor" is required with, and only with, "input": "header_features".')
        if self.input == "header_features" and self.task != "classification":
            raise ValueError('"input": "header_features" is for classification models.')
        return self


class ModelPackage(BaseModel):
    """A manifest together with the folder it was read from."""

    model_config = ConfigDict(frozen=True)

    manifest: ModelManifest
    folder: Path

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.manifest.file


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_package(folder: Path, *, verify_hash: bool = True) -> ModelPackage:
    """Read and validate ``folder/manifest.json``.

    Raises
    ------
    NotFound
        The folder has no manifest or no ONNX file.
    InvalidInput
        The manifest does not follow the schema, or the ONNX file's SHA-256 differs.
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise NotFound(f"No manifest.json in {folder}.")
    try:
        manifest = ModelManifest.model_validate(json.loads(manifest_path.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{manifest_path}: {exc}") from exc
    if manifest.id != folder.name:
        raise InvalidInput(f'{manifest_path}: "id" {manifest.id!r} should equal the folder name {folder.name!r}.')
    package = ModelPackage(manifest=manifest, folder=folder)
    if not package.onnx_path.is_file():
        raise NotFound(f"{package.onnx_path} is missing.")
    if verify_hash and file_sha256(package.onnx_path) != manifest.sha256:
        raise InvalidInput(f"{package.onnx_path}: SHA-256 differs from the manifest.")
    return package


def load_all(models_dir: Path, *, verify_hash: bool = True) -> dict[str, ModelPackage]:
    """Every model package under ``models_dir``, keyed by id (folders without a manifest are skipped)."""
    packages: dict[str, ModelPackage] = {}
    if not models_dir.is_dir():
        return packages
    for folder in sorted(p for p in models_dir.iterdir() if (p / "manifest.json").is_file()):
        package = load_package(folder, verify_hash=verify_hash)
        packages[package.manifest.id] = package
    return packages
