"""DICOM Segmentation (SEG) output, built only through highdicom (PS3.3 A.51).

A segmentation model's label map becomes one BINARY Segmentation instance with one segment per
``manifest.labels`` entry. Everything that describes a segment (coded category and type,
anatomic region, display colour) comes from the model manifest, and every UID comes from the
caller, so a rerun of the same job yields the same object.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

import infergate
from infergate.dicom.uids import derived_uid, require_uid
from infergate.manifest import Code, ModelManifest, SegmentLabel

__all__ = [
    "MANUFACTURER",
    "algorithm_identification",
    "build_seg",
    "coded_concept",
    "require_positive_int",
    "segment_tracking_uid",
]

MANUFACTURER = "infergate"
"""Manufacturer (0008,0070) of every object infergate writes."""

_LO_MAX = 64  # maximum length of a LO value such as Series Description (PS3.5 6.2)


def coded_concept(code: Code) -> hd.sr.CodedConcept:
    """The highdicom form of a manifest :class:`~infergate.manifest.Code`.

    Parameters
    ----------
    code: infergate.manifest.Code
        Value, coding scheme designator and meaning, as written in ``manifest.json``.

    Returns
    -------
    highdicom.sr.CodedConcept
        The same concept; highdicom moves values longer than 16 characters to Long Code Value.
    """
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def require_positive_int(value: object, argument: str) -> int:
    """Return ``value`` if it is a positive ``int``, otherwise raise naming ``argument``.

    highdicom copies Series and Instance Number without checking them; a value of zero or a
    float would only be noticed by the receiving archive (IS, PS3.5 6.2).

    Raises
    ------
    TypeError
        When ``value`` is not an ``int`` (``bool`` included).
    ValueError
        When ``value`` is below 1 or above the IS range.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f'Argument "{argument}" should be a positive integer, not {type(value).__name__}.')
    if not 1 <= value < 2**31:
        raise ValueError(f'Argument "{argument}" should be a positive integer below 2**31, not {value}.')
    return value


def segment_tracking_uid(seg_sop_instance_uid: str, segment_number: int) -> str:
    """The Tracking UID of one segment, derived from the SEG instance.

    The SR's volumetric measurement group for the segment reuses it (TID 1411 Tracking
    Identifier), so a viewer can link the measurement to the segment, and a rerun keeps it.

    Parameters
    ----------
    seg_sop_instance_uid: str
        SOP Instance UID of the Segmentation.
    segment_number: int
        Segment Number (0062,0004) within it.

    Returns
    -------
    str
        A ``2.25`` UID.
    """
    return derived_uid(seg_sop_instance_uid, "segment", str(segment_number))


def algorithm_identification(manifest: ModelManifest) -> hd.content.AlgorithmIdentificationSequence:
    """The Segmentation Algorithm Identification of a model (PS3.3 C.8.20.2, CID 7162).

    Parameters
    ----------
    manifest: infergate.manifest.ModelManifest
        Supplies the algorithm name and version.

    Returns
    -------
    highdicom.content.AlgorithmIdentificationSequence
        Name and version from the manifest, family "Artificial Intelligence" (DCM 123110).
    """
    return hd.content.AlgorithmIdentificationSequence(
        name=manifest.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=manifest.version,
    )


def _segment_description(
    number: int,
    label: SegmentLabel,
    algorithm: hd.content.AlgorithmIdentificationSequence,
    sop_instance_uid: str,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name,
        segmented_property_category=coded_concept(label.category),
        segmented_property_type=coded_concept(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=segment_tracking_uid(sop_instance_uid, number),
        tracking_id=label.name,
        anatomic_regions=None if label.anatomic_region is None else [coded_concept(label.anatomic_region)],
        display_color=hd.color.CIELabColor.from_rgb(*label.color),
    )


def source_list(source_datasets: Sequence[Dataset], *, single_frame: bool = False) -> list[Dataset]:
    """The sources as a non-empty list of Datasets (shared with the SR builder).

    With ``single_frame``, multi-frame sources (enhanced CT/MR) are refused rather than half
    supported: highdicom handles one multi-frame source only with a frame of reference, and the
    worker builds its volumes from single-frame series.
    """
    if isinstance(source_datasets, Dataset) or not isinstance(source_datasets, Sequence):
        raise TypeError('Argument "source_datasets" should be a sequence of pydicom Datasets.')
    sources = list(source_datasets)
    if not sources:
        raise ValueError('Argument "source_datasets" should not be empty.')
    for ds in sources:
        if not isinstance(ds, Dataset):
            raise TypeError(f'Items of argument "source_datasets" should be pydicom Datasets, not {type(ds).__name__}.')
        if single_frame and int(ds.get("NumberOfFrames") or 1) > 1:
            raise ValueError('Argument "source_datasets" should hold single-frame images only.')
    return sources


def _as_frames(label_map: np.ndarray, sources: list[Dataset]) -> np.ndarray:
    """``label_map`` as (frames, rows, columns), checked against the sources' geometry."""
    if not isinstance(label_map, np.ndarray):
        raise TypeError(f'Argument "label_map" should be a numpy array, not {type(label_map).__name__}.')
    if label_map.dtype == np.bool_:
        label_map = label_map.view(np.uint8)
    if not np.issubdtype(label_map.dtype, np.integer):
        raise TypeError(f'Argument "label_map" should have an integer data type, not {label_map.dtype}.')
    if label_map.ndim == 2:
        label_map = label_map[np.newaxis]
    if label_map.ndim != 3:
        raise ValueError(f'Argument "label_map" should have 2 or 3 dimensions, not {label_map.ndim}.')
    for ds in sources:
        expected = (len(sources), int(ds.Rows), int(ds.Columns))
        if label_map.shape != expected:
            raise ValueError(
                f'Argument "label_map" has shape {label_map.shape} but "source_datasets" '
                f"need (frames, rows, columns) = {expected}."
            )
    return label_map


def _segment_numbers(label_map: np.ndarray, labels: Sequence[SegmentLabel]) -> np.ndarray:
    """Map label values to segment numbers 1..n (manifest order) as uint8 or uint16.

    highdicom requires BINARY segment numbers to be 1..n, and for a uint8/uint16 label map with
    exactly those numbers it validates with a single ``max()`` instead of ``np.unique`` and
    slices each segment out per frame, which is the fastest form it accepts. When the manifest
    already numbers its labels 1..n in order (the usual case) this is just a cast; otherwise a
    lookup table does the mapping in one pass.
    """
    values = [label.value for label in labels]
    n_segments = len(values)
    dtype: type[np.unsignedinteger] = np.uint8 if n_segments < 255 else np.uint16
    lowest, highest = int(label_map.min()), int(label_map.max())
    if lowest < 0 or highest > max(values):
        raise ValueError(
            f'Argument "label_map" holds values from {lowest} to {highest}; they should be 0 '
            f"(background) or a label value of the manifest: {sorted(values)}."
        )
    if values == list(range(1, n_segments + 1)):
        return label_map.astype(dtype, copy=False)
    unknown = n_segments + 1
    lut = np.full(highest + 1, unknown, dtype=dtype)
    lut[0] = 0
    for number, value in enumerate(values, start=1):
        if value <= highest:
            lut[value] = number
    segments = lut[label_map]
    if int(segments.max()) == unknown:
        bad = np.unique(label_map[segments == unknown])[:10].tolist()
        raise ValueError(
            f'Argument "label_map" holds values {bad} that are neither 0 (background) nor a label '
            f"value of the manifest: {sorted(values)}."
        )
    return segments


def build_seg(
    source_datasets: Sequence[Dataset],
    label_map: np.ndarray,
    manifest: ModelManifest,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """Build a BINARY Segmentation of ``label_map`` with one segment per manifest label.

    Segment *k* (1-based) describes ``manifest.labels[k - 1]``: label name, segmented property
    category and type, anatomic region when given, recommended display colour (the label's RGB
    converted to CIELab) and the model as the segmentation algorithm (family "Artificial
    Intelligence"). Frames without any pixel of a segment are omitted, which keeps a
    200-slice result with a small finding small.

    When ``label_map`` holds no foreground at all, an object with zero frames would not be
    valid and highdicom would fall back to writing every frame of every segment (n_slices x
    n_labels empty frames). Instead a single empty frame per segment is written, placed on the
    first source image; all sources are still listed in the Referenced Series Sequence, so the
    object still says which images were segmented and that nothing was found.
    A segment that is empty while others are not simply has no frames: it is still described
    in the Segment Sequence, and readers (highdicom, dciodvfy) treat it as empty.

    Sources without a frame of reference (CR, DX) must be a single image, as highdicom
    requires; the SEG then gets the source's Patient Orientation, which highdicom omits.

    Parameters
    ----------
    source_datasets: Sequence[pydicom.Dataset]
        The images the model ran on: single-frame images (CT, MR, CR, DX, ...) in the order of
        the first axis of ``label_map``. Patient, study, frame of reference and geometry are
        copied from them.
    label_map: numpy.ndarray
        Integer array (frames, rows, columns), or (rows, columns) for a single source image,
        whose values are ``SegmentLabel.value`` of the manifest and 0 for background.
    manifest: infergate.manifest.ModelManifest
        A segmentation model's manifest; its ``labels`` describe the segments.
    series_instance_uid, sop_instance_uid: str
        UIDs of the new series and instance, derived from the job by the caller so that a rerun
        replaces rather than duplicates the result.
    series_number, instance_number: int
        Positive Series Number and Instance Number.

    Returns
    -------
    highdicom.seg.Segmentation
        A valid Segmentation Storage instance (Explicit VR Little Endian), ready to save.

    Raises
    ------
    TypeError
        An argument has the wrong type, e.g. ``label_map`` is not an integer numpy array.
    ValueError
        ``label_map`` does not match the sources' shape, holds values that are not label values
        of the manifest, a source is multi-frame, the manifest is not a segmentation model's, or
        a UID or number is malformed.
    """
    if not isinstance(manifest, ModelManifest):
        raise TypeError(f'Argument "manifest" should be a ModelManifest, not {type(manifest).__name__}.')
    if manifest.task != "segmentation" or not manifest.labels:
        raise ValueError(f'Argument "manifest" should describe a segmentation model, not "{manifest.task}".')
    require_uid(series_instance_uid, "series_instance_uid")
    require_uid(sop_instance_uid, "sop_instance_uid")
    require_positive_int(series_number, "series_number")
    require_positive_int(instance_number, "instance_number")
    sources = source_list(source_datasets, single_frame=True)
    segments = _segment_numbers(_as_frames(label_map, sources), manifest.labels)

    algorithm = algorithm_identification(manifest)
    descriptions = [
        _segment_description(number, label, algorithm, sop_instance_uid)
        for number, label in enumerate(manifest.labels, start=1)
    ]
    plane_positions: list[hd.PlanePositionSequence] | None = None
    omit_empty_frames = True
    if not segments.any():
        omit_empty_frames = False
        if len(sources) > 1:
            segments, plane_positions = segments[:1], [_first_plane_position(sources)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.id,
        software_versions=infergate.__version__,
        device_serial_number="0",
        content_description=manifest.name,
        series_description=f"{manifest.name[: _LO_MAX - 4]} SEG",
        plane_positions=plane_positions,
        omit_empty_frames=omit_empty_frames,
    )
    if "FrameOfReferenceUID" not in seg:
        # Patient Orientation is Type 2C in the General Image Module (PS3.3 C.7.6.1) when there
        # is no frame of reference (CR, DX); highdicom 0.28.2 leaves it out, which dciodvfy
        # reports as an error. The SEG shares the source's pixel matrix, so its value applies.
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    return seg


def _first_plane_position(sources: list[Dataset]) -> hd.PlanePositionSequence:
    """Position of the first source plane, for the one frame of an empty segmentation.

    Raises
    ------
    ValueError
        The sources lack a patient coordinate system, so the first plane cannot be placed.
    """
    ds = sources[0]
    if "ImagePositionPatient" not in ds or "FrameOfReferenceUID" not in ds:
        raise ValueError(
            'Argument "source_datasets" should have Image Position (Patient) and a Frame of '
            "Reference when there is more than one source image."
        )
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in ds.ImagePositionPatient],
    )
