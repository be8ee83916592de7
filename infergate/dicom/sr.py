"""DICOM Structured Report output: a TID 1500 Measurement Report, built only through highdicom.

One Comprehensive 3D SR (PS3.3 A.35.13) per model run holds what the model found:

* for a segmentation model, one TID 1411 volumetric group per segment, pointing at the segment
  in the SEG written alongside and holding its volume in millilitres;
* for a classification model, one TID 1501 group per class reported, holding the class as a
  qualitative evaluation of the manifest's ``finding`` concept, its probability and, when a
  decision threshold was applied, whether the finding is present.

The observer is the model, as a device (TID 1004), so that a reader can tell AI results from a
radiologist's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.sr.codedict import codes

import infergate
from infergate.dicom.seg import (
    MANUFACTURER,
    coded_concept,
    require_positive_int,
    segment_tracking_uid,
    source_list,
)
from infergate.dicom.uids import derived_uid, require_uid
from infergate.manifest import ClassLabel, ModelManifest, SegmentLabel, VolumeTotal

__all__ = ["ClassificationFinding", "SegmentMeasurement", "TotalVolume", "build_sr", "device_observer_uid"]

_MILLILITER = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
_LO_MAX = 64  # maximum length of a LO value such as Series Description (PS3.5 6.2)

# Procedure Reported (TID 1500 row 2, CID 100 is extensible) by the sources' Modality.
_PROCEDURES: dict[str, hd.sr.CodedConcept] = {
    "CT": hd.sr.CodedConcept("77477000", "SCT", "Computed tomography"),
    "MR": hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging"),
    "CR": hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure"),
    "DX": hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure"),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class SegmentMeasurement:
    """The volume of one segment of the SEG.

    Attributes
    ----------
    segment_number: int
        Segment Number in the SEG (1-based, manifest order when the SEG came from
        :func:`infergate.dicom.seg.build_seg`).
    label: infergate.manifest.SegmentLabel
        The manifest label the segment describes; gives the finding type and site.
    volume_ml: float
        Volume in millilitres (voxel count times voxel volume).
    """

    segment_number: int
    label: SegmentLabel
    volume_ml: float


@dataclass(frozen=True)
class ClassificationFinding:
    """The probability of one class of a classification model.

    Attributes
    ----------
    class_label: infergate.manifest.ClassLabel
        One of the manifest's ``classes``.
    probability: float
        Softmax probability in [0, 1].
    positive: bool | None
        Whether the probability reached the manifest's ``threshold``; ``None`` when no
        decision was made, and then no presence is recorded.
    """

    class_label: ClassLabel
    probability: float
    positive: bool | None = None


@dataclass(frozen=True)
class TotalVolume:
    """The volume of a union of segments (a manifest ``volume_totals`` entry), e.g. the whole body.

    Attributes
    ----------
    total: infergate.manifest.VolumeTotal
        Names the union and its finding type.
    volume_ml: float
        Volume in millilitres.
    """

    total: VolumeTotal
    volume_ml: float


def device_observer_uid(manifest: ModelManifest) -> str:
    """Device Observer UID of a model version (TID 1004), the same in every report it makes."""
    return derived_uid("device-observer", manifest.id, manifest.version)


def _observation_context(manifest: ModelManifest) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(manifest),
        name=manifest.name,
        manufacturer_name=MANUFACTURER,
        model_name=manifest.id,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _algorithm_id(manifest: ModelManifest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence
    )


#: Attributes highdicom 0.28 reads unconditionally, by Modality, for the modality-specific Image
#: Library Entry Descriptors (TID 1603 projection radiography, TID 1604 cross-sectional), with the
#: number of values each must hold.
_PROJECTION_DESCRIPTORS = {"PatientOrientation": 2, "ImagerPixelSpacing": 2}
_CROSS_SECTIONAL_DESCRIPTORS = {
    "PixelSpacing": 2,
    "ImageOrientationPatient": 6,
    "ImagePositionPatient": 3,
    "SliceThickness": 1,
}
_LIBRARY_DESCRIPTORS: dict[str, dict[str, int]] = {
    **dict.fromkeys(("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"), _PROJECTION_DESCRIPTORS),
    **dict.fromkeys(("CT", "MR", "PT"), _CROSS_SECTIONAL_DESCRIPTORS),
}


def _value_count(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return 0
    return len(value) if isinstance(value, MultiValue | list | tuple) else 1


def _library_entry(ds: Dataset) -> Dataset:
    """The dataset to describe ``ds`` from in the Image Library (TID 1600).

    highdicom reads the modality-specific descriptors unconditionally, so a valid image without
    them raises: a CR without Imager Pixel Spacing (optional in the CR Image module, PS3.3 C.8.1.2;
    pydicom-data's RG1 chest CR has none) or with an empty Type 2C Patient Orientation. Each of
    those descriptors is optional ("U") in TID 1603 and TID 1604, so such an image is described by
    a copy that highdicom does not classify by Modality: its entry still holds the modality (coded
    from the SOP Class), rows, columns and frame of reference, and no invented spacing.
    """
    needed = _LIBRARY_DESCRIPTORS.get(str(ds.get("Modality", "")), {})
    if all(_value_count(ds, keyword) == count for keyword, count in needed.items()):
        return ds
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in ds:
            setattr(entry, keyword, ds[keyword].value)
    entry.Modality = ""
    return entry


#: Attributes highdicom 0.28 makes Image Library Entry Descriptors (TID 1602-1604) from, besides
#: Image Position (Patient): images that agree on all of them get the same descriptor items.
_DESCRIBED_BY = "SOPClassUID Modality FrameOfReferenceUID Rows Columns PixelSpacing SliceThickness \
ImageOrientationPatient SpacingBetweenSlices PatientOrientation ImagerPixelSpacing".split()
_POSITIONS = [
    hd.sr.CodedConcept.from_code(code)
    for code in (codes.DCM.ImagePositionPatientX, codes.DCM.ImagePositionPatientY, codes.DCM.ImagePositionPatientZ)
]
_CONTAINS, _ACQUISITION = hd.sr.RelationshipTypeValues.CONTAINS, hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT


def _image_library(entries: list[Dataset]) -> hd.sr.ContainerContentItem:
    """The Image Library (TID 1600), with the descriptors images share said once per group.

    TID 1600 puts Image Library Entry Descriptors (TID 1602) at two levels: on each Image Library
    Group, for what its images have in common, and on each image, for what is its own. Images
    whose described attributes agree (SOP Class, modality, frame of reference, matrix, spacing,
    thickness, orientation: one series, usually) form one group that carries highdicom's
    descriptors for them once; each image then carries only the Image Position (Patient)
    coordinates that differ within its group (Z for an axial series). highdicom's own
    ``ImageLibrary`` repeats all 16 descriptors under every image: 44,000 data elements for a
    200-slice series, which took longer to encode and for a PACS to parse than the rest of the
    report. The descriptor values are highdicom's (``ImageLibraryEntryDescriptors``); only where
    they sit differs, so an image's descriptors are those of its group plus its own.
    """
    # per set of described attributes: highdicom's descriptors for its first image, the indexes of
    # its position items, and its images with their positions
    groups: dict[tuple[str | None, ...], tuple[list[Dataset], list[tuple[int, int]], list[Dataset]]] = {}
    for ds in entries:
        key = tuple(str(ds[keyword].value) if keyword in ds else None for keyword in _DESCRIBED_BY)
        if key not in groups:
            items = list(hd.sr.ImageLibraryEntryDescriptors(ds))
            slots = [
                (index, _POSITIONS.index(item.name)) for index, item in enumerate(items) if item.name in _POSITIONS
            ]
            groups[key] = (items, slots, [])
        groups[key][2].append(ds)
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = PydicomSequence()
    for template, slots, images in groups.values():
        varying = {axis for _, axis in slots if len({str(ds.ImagePositionPatient[axis]) for ds in images}) > 1}
        own = [(index, axis) for index, axis in slots if axis in varying]
        own_indexes = {index for index, _ in own}
        shared = [item for index, item in enumerate(template) if index not in own_indexes]
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS)
        group.ContentSequence = PydicomSequence(shared)
        for ds in images:
            image_item = hd.sr.ImageContentItem(
                name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type=_CONTAINS,
            )
            if own:
                image_item.ContentSequence = PydicomSequence(
                    hd.sr.NumContentItem(
                        template[index].name,
                        ds.ImagePositionPatient[axis],
                        template[index].unit,
                        relationship_type=_ACQUISITION,
                    )
                    for index, axis in own
                )
            group.ContentSequence.append(image_item)
        library.ContentSequence.append(group)
    return library


def _volume_group(
    measurement: SegmentMeasurement,
    manifest: ModelManifest,
    seg: hd.seg.Segmentation,
    source_series_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group for one segment.

    The segment is referenced through ``ReferencedSegment``'s constructor rather than
    ``ReferencedSegment.from_segmentation``, which in highdicom 0.28.2 fails on a single-segment
    SEG written by highdicom itself. The source series form of the reference is used because
    the SEG already lists the individual source images.
    """
    if not isinstance(measurement, SegmentMeasurement):
        raise TypeError(
            f'Items of argument "measurements" should be SegmentMeasurement, not {type(measurement).__name__}.'
        )
    number = measurement.segment_number
    segments = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    if number not in segments:
        raise ValueError(f'Argument "measurements" refers to segment {number}, which "seg" does not have.')
    if measurement.label not in manifest.labels:
        raise ValueError(f'Argument "measurements" has label {measurement.label.name!r}, which is not in the manifest.')
    if not (math.isfinite(measurement.volume_ml) and measurement.volume_ml >= 0):
        raise ValueError(f'Argument "measurements" has volume {measurement.volume_ml} for segment {number}.')
    label = measurement.label
    tracking_uid = segments[number].get("TrackingUID") or segment_tracking_uid(seg.SOPInstanceUID, number)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label.name),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        ),
        finding_type=coded_concept(label.type),
        finding_category=coded_concept(label.category),
        finding_sites=(
            None
            if label.anatomic_region is None
            else [hd.sr.FindingSite(anatomic_location=coded_concept(label.anatomic_region))]
        ),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(measurement.volume_ml),
                unit=_MILLILITER,
                algorithm_id=algorithm,
            )
        ],
    )


def _class_group(
    finding: ClassificationFinding,
    manifest: ModelManifest,
    source_images: list[hd.sr.SourceImageForMeasurementGroup],
    sop_instance_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one class: the class, its probability and, if decided, its presence."""
    if not isinstance(finding, ClassificationFinding):
        raise TypeError(f'Items of argument "findings" should be ClassificationFinding, not {type(finding).__name__}.')
    if manifest.finding is None:
        raise ValueError('Argument "manifest" should have a "finding" concept to report "findings".')
    label = finding.class_label
    if label not in manifest.classes:
        raise ValueError(f'Argument "findings" has class {label.name!r}, which is not in the manifest.')
    if not (math.isfinite(finding.probability) and 0.0 <= finding.probability <= 1.0):
        raise ValueError(f'Argument "findings" has probability {finding.probability} for class {label.name!r}.')
    concept = coded_concept(manifest.finding)
    evaluations = [hd.sr.QualitativeEvaluation(name=concept, value=coded_concept(label.code))]
    if finding.positive is not None:
        presence = codes.DCM.Present if finding.positive else codes.DCM.Absent
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.DCM.PresenceOfProperty, value=presence))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_instance_uid, "class", str(label.index)), identifier=label.name
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(finding.probability),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        ],
        qualitative_evaluations=evaluations,
        source_images=source_images,
    )


def _total_group(
    total: TotalVolume,
    source_images: list[hd.sr.SourceImageForMeasurementGroup],
    sop_instance_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for a union of segments: no single segment to reference, so it points to the images."""
    if not isinstance(total, TotalVolume):
        raise TypeError(f'Items of argument "totals" should be TotalVolume, not {type(total).__name__}.')
    if not (math.isfinite(total.volume_ml) and total.volume_ml >= 0.0):
        raise ValueError(f'Argument "totals" has volume {total.volume_ml} for {total.total.name!r}.')
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_instance_uid, "total", total.total.name), identifier=total.total.name
        ),
        finding_type=coded_concept(total.total.type),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(total.volume_ml),
                unit=_MILLILITER,
                algorithm_id=algorithm,
            )
        ],
        source_images=source_images,
    )


def build_sr(
    source_datasets: Sequence[Dataset],
    manifest: ModelManifest,
    *,
    seg: hd.seg.Segmentation | None,
    measurements: Sequence[SegmentMeasurement],
    findings: Sequence[ClassificationFinding],
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    totals: Sequence[TotalVolume] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the Measurement Report (TID 1500) of one model run as a Comprehensive 3D SR.

    Parameters
    ----------
    source_datasets: Sequence[pydicom.Dataset]
        The images the model ran on; they become the Image Library and, with ``seg``, the
        Current Requested Procedure Evidence. Patient and study are copied from them.
    manifest: infergate.manifest.ModelManifest
        Names the observer device, the algorithm and the concepts reported.
    seg: highdicom.seg.Segmentation | None
        The SEG the ``measurements`` refer to; required when there are measurements.
    measurements: Sequence[SegmentMeasurement]
        Segment volumes, one TID 1411 group each, in the order given.
    findings: Sequence[ClassificationFinding]
        Class probabilities, one TID 1501 group each, referencing all source images.
    series_instance_uid, sop_instance_uid: str
        UIDs of the new series and instance, derived from the job by the caller.
    series_number, instance_number: int
        Positive Series Number and Instance Number.
    totals: Sequence[TotalVolume]
        Volumes of unions of segments, one TID 1501 group each, after the segment groups.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        A complete, unverified report (Completion Flag COMPLETE, Verification Flag UNVERIFIED),
        since nobody has reviewed the model's output yet.

    Raises
    ------
    TypeError
        An argument or an item has the wrong type.
    ValueError
        Neither ``measurements`` nor ``findings``, ``measurements`` without ``seg``, a segment
        number that ``seg`` lacks, a label or class not in the manifest, a negative or
        non-finite volume, a probability outside [0, 1], ``findings`` for a manifest without
        ``finding``, or a malformed UID or number.
    """
    if not isinstance(manifest, ModelManifest):
        raise TypeError(f'Argument "manifest" should be a ModelManifest, not {type(manifest).__name__}.')
    if seg is not None and not isinstance(seg, hd.seg.Segmentation):
        raise TypeError(f'Argument "seg" should be a highdicom Segmentation or None, not {type(seg).__name__}.')
    require_uid(series_instance_uid, "series_instance_uid")
    require_uid(sop_instance_uid, "sop_instance_uid")
    require_positive_int(series_number, "series_number")
    require_positive_int(instance_number, "instance_number")
    sources = source_list(source_datasets)
    for argument, value in (("measurements", measurements), ("findings", findings)):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise TypeError(f'Argument "{argument}" should be a sequence.')
    if not measurements and not findings:
        raise ValueError('Arguments "measurements" and "findings" should not both be empty.')
    if measurements and seg is None:
        raise ValueError('Argument "seg" is required when "measurements" is not empty.')

    algorithm = _algorithm_id(manifest)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    if seg is not None:
        referenced_series = seg.get("ReferencedSeriesSequence")
        source_series_uid = (
            referenced_series[0].SeriesInstanceUID if referenced_series else sources[0].SeriesInstanceUID
        )
        groups.extend(_volume_group(m, manifest, seg, source_series_uid, algorithm) for m in measurements)
    if totals or findings:
        # one reference per source image, shared by every group that lists the sources
        source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
        groups.extend(_total_group(t, source_images, sop_instance_uid, algorithm) for t in totals)
        groups.extend(_class_group(f, manifest, source_images, sop_instance_uid, algorithm) for f in findings)

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(manifest),
        procedure_reported=_PROCEDURES.get(str(sources[0].get("Modality", "")), _IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    evidence = [*sources, seg] if seg is not None else sources
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.id,
        software_versions=infergate.__version__,
        device_serial_number="0",
        is_complete=True,
        series_description=f"{manifest.name[: _LO_MAX - 3]} SR",
    )
    _add_image_library(sr, [_library_entry(ds) for ds in sources])
    return sr


def _add_image_library(sr: hd.sr.Comprehensive3DSR, entries: list[Dataset]) -> None:
    """Insert the Image Library where ``MeasurementReport(referenced_images=...)`` puts it.

    That is just before the Imaging Measurements container, the report's last item. Passing the
    images to ``MeasurementReport`` instead gives the same document, but the SR constructor then
    deep-copies, re-parses and searches every library item (17 per image): seconds for 200 images.
    The library references only sources, all of them evidence anyway, so the evidence sequences
    are the same. The item goes into the dataset and into highdicom's parsed view, ``sr.content``.
    """
    library = _image_library(entries)
    for root in (sr, sr.content[0]):
        items = root.ContentSequence
        if items[-1].name != codes.DCM.ImagingMeasurements:
            raise AssertionError("highdicom's Measurement Report should end with Imaging Measurements.")
        items.insert(len(items) - 1, library)
