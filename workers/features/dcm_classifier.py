"""dcm-classifier 0.9.9's header features, reproduced with pydicom and numpy only.

dcm-classifier (Brzus et al., "DICOM sequence selection for medical imaging applications", SPIE Medical
Imaging 2024; Apache-2.0, Copyright NumFOCUS) tells T1-, T2-, T2*-weighted, FLAIR and diffusion series
apart with a random forest on 28 values read from one header per volume. This module reproduces
``dicom_volume.py`` (``_make_one_study_info_mapping_from_filelist``), ``utility_functions.py``
(``sanitize_dicom_dataset``, ``get_coded_dictionary_elements``, ``get_bvalue``,
``get_diffusion_gradient_direction``, ``parse_acquisition_datetime``) and ``study_processing.py``
(``_identify_and_split_sub_volumes_pydicom``) without importing it, so the worker needs neither ITK nor
pandas.

The encoding has to be reproduced *exactly*, quirks included: the forest splits on the encoded values,
so a "corrected" encoding would be a different model. Quirks that change a feature are marked
"(as dcm-classifier)".
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from infergate.errors import InvalidInput
from workers.features.registry import feature_extractor

__all__ = [
    "DCM_CLASSIFIER_FEATURES",
    "MISSING",
    "b_value",
    "dcm_classifier_features",
    "diffusion_weights",
    "has_gradient_direction",
    "split_volumes",
]

log = logging.getLogger(__name__)

#: The inputs of dcm-classifier 0.9.9's ONNX model in its column order (``dicom_config.inference_features``).
DCM_CLASSIFIER_FEATURES: tuple[str, ...] = (
    "Diffusionb-valueBool",
    "EchoTime",
    "EchoTrainLength",
    "FlipAngle",
    "HasDiffusionGradientOrientation",
    "ImageType_ADC",
    "ImageType_DERIVED",
    "ImageType_DIFFUSION",
    "ImageType_EADC",
    "ImageType_FA",
    "ImageType_ORIGINAL",
    "ImageType_TRACEW",
    "ImagingFrequency",
    "InversionTime",
    "Manufacturer_siemens",
    "NumberOfAverages",
    "PixelBandwidth",
    "RepetitionTime",
    "SAR",
    "ScanningSequence_GR",
    "ScanningSequence_IR",
    "ScanningSequence_SE",
    "SequenceVariant_MP",
    "SequenceVariant_SP",
    "dBdt",
    "has_b0",
    "has_pos_b0",
    "likely_diffusion",
)

#: dcm-classifier's value for "absent or not a number"; the forest was trained with it.
MISSING = -12345.0

#: Where vendors keep the b-value, in dcm-classifier's order of preference (NAMIC conventions).
_B_VALUE_TAGS: tuple[tuple[str, int], ...] = (
    ("standard", 0x00189087),
    ("ge", 0x00431039),
    ("philips", 0x20011003),
    ("siemens", 0x0019100C),
    ("siemens_historical", 0x00291010),  # skipped, as dcm-classifier does
    ("siemens_old", 0x0019000C),
    ("uih", 0x00651009),
)
#: Where vendors keep the diffusion gradient direction, in dcm-classifier's order.
_GRADIENT_TAGS: tuple[tuple[str, int], ...] = (
    ("standard", 0x00189076),
    ("ge", 0x001910E0),
    ("philips", 0x20011004),
    ("siemens", 0x0019100E),
    ("siemens_old", 0x0019000E),
    ("uih", 0x00651037),
)
_GE_B_VALUE_MODULO = 100_000
_MAX_B_VALUE = 5000.0
_DEFAULT_ACQUISITION = datetime(1900, 1, 1)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except Exception:  # dcm-classifier's is_number: anything float() refuses, whatever it raises
        return False
    return True


def _is_empty(value: Any) -> bool:
    return value is None or str(value) == ""


def _element_value(ds: Dataset, key: str | int) -> tuple[bool, Any]:
    """(present, value) of an element; a value pydicom cannot decode counts as absent."""
    if key not in ds:
        return False, None
    try:
        return True, ds[key].value
    except Exception:  # tolerant reading: a malformed element is treated like a missing one
        log.debug("element %s could not be decoded; treated as absent", key)
        return False, None


def b_value(ds: Dataset) -> float:
    """The b-value (s/mm², rounded to the nearest 10) from the standard or a vendor's private tag.

    Follows dcm-classifier's ``get_bvalue``: the first tag present wins, GE's value is the first
    number modulo 100000, values above 5000 or unreadable ones give :data:`MISSING`.
    """
    for vendor, tag in _B_VALUE_TAGS:
        if tag not in ds or vendor == "siemens_historical":
            continue
        try:
            element = ds[tag]
        except Exception:  # an undecodable private element ends the search, like dcm-classifier's failure
            return MISSING
        if vendor == "ge":
            try:
                value = element.value[0] % _GE_B_VALUE_MODULO
            except (TypeError, IndexError):
                return MISSING
        else:
            value = element.value
        if element.VR == "OB":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            elif not isinstance(value, numbers.Number):
                return MISSING
        if value is None:
            return MISSING
        try:
            result = float(value)
        except Exception:  # as dcm-classifier: any value float() refuses means "no b-value"
            return MISSING
        if result > _MAX_B_VALUE:
            return MISSING
        return float(round(result / 10.0) * 10)
    return MISSING


def has_gradient_direction(ds: Dataset) -> bool:
    """Whether the header holds a unit diffusion gradient direction (dcm-classifier's rule)."""
    direction: np.ndarray | None = None
    for vendor, tag in _GRADIENT_TAGS:
        present, raw = _element_value(ds, tag)
        if not present:
            continue
        if vendor == "siemens":
            if ds[tag].VR == "OB" and isinstance(raw, bytes) and len(raw) == 24:
                direction = np.frombuffer(raw, dtype="<f8")
            else:
                direction = np.array(raw)
            break
        try:
            direction = np.array(raw)
            break
        except (TypeError, ValueError):  # dcm-classifier moves on after a TypeError (and fails on ValueError)
            direction = None
    if direction is None or direction.size != 3:
        return False
    try:
        magnitude = float(np.linalg.norm(direction))
    except (TypeError, ValueError):
        return False
    return not abs(1.0 - magnitude) > 1e-2  # (as dcm-classifier) a NaN magnitude passes


def _text(ds: Dataset, keyword: str) -> str:
    """Lower-case text of a categorical element, for dcm-classifier's substring tests.

    A missing element reads ``"Unknown<keyword>"`` (as dcm-classifier), which matters: the
    ``"se"`` in "UnknownScanningSequence" sets ScanningSequence_SE. Values are joined with a
    space: only letters are tested, so this matches dcm-classifier's ``str(list)``.
    """
    if keyword not in ds:
        return f"unknown{keyword}".lower()
    present, value = _element_value(ds, keyword)
    if not present:
        return ""  # dcm-classifier's default -12345 contains no letters
    if value is None:
        return f"unknown{keyword}".lower()
    if isinstance(value, MultiValue | list | tuple):
        return " ".join(str(item) for item in value).lower()
    return str(value).lower()


def _optional_number(ds: Dataset, keyword: str) -> float:
    present, value = _element_value(ds, keyword)
    if not present:
        return MISSING
    try:
        return float(value)
    except (TypeError, ValueError):
        return MISSING


def _numbers(value: Any) -> list[float] | None:
    if not isinstance(value, MultiValue | list | tuple):
        return None
    try:
        return [float(item) for item in value]
    except (TypeError, ValueError):
        return None


def dcm_classifier_features(ds: Dataset) -> np.ndarray:
    """The 28 features of one volume from its reference header, in :data:`DCM_CLASSIFIER_FEATURES` order.

    Parameters
    ----------
    ds : pydicom.Dataset
        The first image of the volume (dcm-classifier reads only that one).

    Returns
    -------
    numpy.ndarray
        float32 ``(28,)``. Absent or non-numeric optional values are :data:`MISSING`; categorical
        elements become 0/1 flags by case-insensitive substring tests, as dcm-classifier encodes them.

    Raises
    ------
    InvalidInput
        A value dcm-classifier requires is absent or malformed (it reports such a volume as
        ``INVALID`` rather than guessing): Study/Series Instance UID, Series Number, Image
        Orientation (Patient), Pixel Bandwidth, Flip Angle, Pixel Spacing, Slice Thickness, or a
        present but non-numeric Echo/Repetition Time.
    """
    values: dict[str, float] = {}
    invalid: list[str] = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        present, value = _element_value(ds, keyword)
        if not present or _is_empty(value):
            invalid.append(keyword)
    present, value = _element_value(ds, "SeriesNumber")
    try:
        int(value)
    except (TypeError, ValueError):
        invalid.append("SeriesNumber")
    for keyword, count in (("ImageOrientationPatient", 6), ("PixelSpacing", 1)):
        parsed = _numbers(_element_value(ds, keyword)[1])
        if parsed is None or len(parsed) < count:
            invalid.append(keyword)
    for keyword in ("SliceThickness", "PixelBandwidth", "FlipAngle"):
        present, value = _element_value(ds, keyword)
        if not present or _is_empty(value) or not _is_number(value):
            invalid.append(keyword)
        else:
            values[keyword] = float(value)
    for keyword in ("EchoTime", "RepetitionTime"):  # may be absent (ADC maps), not malformed
        present, value = _element_value(ds, keyword)
        if not present or _is_empty(value):
            values[keyword] = MISSING
        elif _is_number(value):
            values[keyword] = float(value)
        else:
            invalid.append(keyword)
    if invalid:
        raise InvalidInput(f"The series lacks usable header values that dcm-classifier needs: {', '.join(invalid)}.")
    for keyword in ("EchoTrainLength", "ImagingFrequency", "InversionTime", "NumberOfAverages", "SAR", "dBdt"):
        values[keyword] = _optional_number(ds, keyword)

    image_type = _text(ds, "ImageType")
    if "adc" in image_type:
        eadc = "eadc" in image_type
        values["ImageType_EADC"], values["ImageType_ADC"] = float(eadc), float(not eadc)
    else:
        values["ImageType_EADC"] = values["ImageType_ADC"] = 0.0
    for term in ("DERIVED", "DIFFUSION", "FA", "ORIGINAL", "TRACEW"):  # (as dcm-classifier) "fa" in "fat"
        values[f"ImageType_{term}"] = float(term.lower() in image_type)
    values["Manufacturer_siemens"] = float("siemens" in _text(ds, "Manufacturer"))
    sequence = _text(ds, "ScanningSequence")
    for term in ("GR", "IR", "SE"):
        values[f"ScanningSequence_{term}"] = float(term.lower() in sequence)
    variant = _text(ds, "SequenceVariant")
    for term in ("MP", "SP"):
        values[f"SequenceVariant_{term}"] = float(term.lower() in variant)

    b = int(b_value(ds))
    gradient = has_gradient_direction(ds)
    values["Diffusionb-valueBool"] = float(b != int(MISSING))
    values["has_b0"] = float(b == 0)
    values["has_pos_b0"] = float(b > 0)
    values["HasDiffusionGradientOrientation"] = float(gradient)
    diffusion_terms = ("ImageType_DIFFUSION", "ImageType_ADC", "ImageType_EADC", "ImageType_TRACEW", "ImageType_FA")
    values["likely_diffusion"] = float(any(values[t] == 1.0 for t in diffusion_terms) or b > 0 or gradient)
    # float64 -> float32 as pandas' astype(np.float32) does on dcm-classifier's string values
    return np.array([values[name] for name in DCM_CLASSIFIER_FEATURES], dtype=np.float64).astype(np.float32)


def _acquisition_datetime(ds: Dataset) -> datetime:
    """dcm-classifier's ``parse_acquisition_datetime``: whole seconds, 1900-01-01 when unreadable."""
    try:
        if "AcquisitionDateTime" in ds and ds.AcquisitionDateTime:
            return datetime.strptime(str(ds.AcquisitionDateTime), "%Y%m%d%H%M%S")
        date = str(ds.AcquisitionDate) if "AcquisitionDate" in ds else "19000101"
        time = str(ds.AcquisitionTime) if "AcquisitionTime" in ds else "000000"
        return datetime.strptime(date.ljust(8, "0")[:8] + time.ljust(6, "0")[:6], "%Y%m%d%H%M%S")
    except (TypeError, ValueError):
        return _DEFAULT_ACQUISITION


def _int_or_missing(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword, MISSING))
    except (TypeError, ValueError):
        return int(MISSING)


def _slice_order(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The files in the order GDCM's series reader gives them to dcm-classifier.

    Along the slice normal when every image has a distinct position (GDCM's Image Position
    Patient ordering), by Instance Number otherwise (its fallback, e.g. for repeated positions).
    """
    by_number = sorted(datasets, key=lambda ds: _int_or_missing(ds, "InstanceNumber"))
    try:
        orientation = np.array([float(v) for v in by_number[0].ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        distances = [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in by_number]
    except (AttributeError, TypeError, ValueError):
        return by_number
    if len(set(distances)) != len(distances):
        return by_number
    order = sorted(range(len(by_number)), key=lambda index: distances[index])
    return [by_number[index] for index in order]


def split_volumes(datasets: Sequence[Dataset]) -> list[list[Dataset]]:
    """Split one series into volumes as dcm-classifier does (e.g. the b-values of a DWI series).

    Images are grouped by Image Position (Patient); when there are fewer positions than images,
    each position contributes its i-th image (by acquisition date-time, Acquisition Number,
    Instance Number) to volume i. Anything irregular gives a single volume.

    Returns
    -------
    list[list[pydicom.Dataset]]
        The volumes in acquisition order; the first image of each is the one whose header
        dcm-classifier reads.
    """
    ordered = _slice_order(datasets)
    groups: dict[tuple[Any, ...], list[Dataset]] = {}
    for ds in ordered:
        position = ds.get("ImagePositionPatient")
        key = tuple(position) if position is not None else (0, 0, len(groups))  # (as dcm-classifier)
        groups.setdefault(key, []).append(ds)
    for group in groups.values():
        group.sort(
            key=lambda ds: (
                _acquisition_datetime(ds),
                _int_or_missing(ds, "AcquisitionNumber"),
                _int_or_missing(ds, "InstanceNumber"),
            )
        )
    if 0 < len(groups) < len(ordered):
        count = len(ordered) // len(groups)
        try:
            return [[group[index] for group in groups.values()] for index in range(count)]
        except IndexError:
            log.debug("positions hold different numbers of images; the series is one volume")
    return [ordered]


def diffusion_weights(features: np.ndarray) -> np.ndarray:
    """A diffusion series is what its diffusion-weighted volumes are; its b=0 volumes are the reference.

    So a series of b=0 and b=1000 trace volumes averages only the latter, as dcm-classifier calls
    such a series "tracew" (and one of b=0 and gradient-direction volumes "dwig"). Other series
    average all their volumes.
    """
    b0 = features[:, DCM_CLASSIFIER_FEATURES.index("has_b0")] == 1.0
    weighted = features[:, DCM_CLASSIFIER_FEATURES.index("has_pos_b0")] == 1.0
    return (~b0 if weighted.any() else np.ones_like(b0)).astype(np.float64)


@feature_extractor("dcm-classifier-v1", DCM_CLASSIFIER_FEATURES, volume_weights=diffusion_weights)
def dcm_classifier_v1(datasets: Sequence[Dataset]) -> np.ndarray:
    """dcm-classifier 0.9.9's features, one row per volume of the series (:func:`split_volumes`)."""
    return np.stack([dcm_classifier_features(volume[0]) for volume in split_volumes(datasets)])
