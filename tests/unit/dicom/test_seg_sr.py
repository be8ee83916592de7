"""SEG and SR builders (infergate.dicom.seg, infergate.dicom.sr).

Every written object is saved, read back and checked with dicom3tools' ``dciodvfy``; the SR is
also rendered with DCMTK's ``dsrdump``. Source images are synthetic CT slices made here.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

import infergate
from infergate.dicom.seg import build_seg, segment_tracking_uid
from infergate.dicom.sr import ClassificationFinding, SegmentMeasurement, build_sr, device_observer_uid
from infergate.dicom.uids import derived_uid
from infergate.manifest import Accepts, ClassLabel, Code, ModelManifest, Preprocess, SegmentLabel
from tests.helpers.dicom_validation import dciodvfy_errors, dsrdump

N_SLICES, ROWS, COLUMNS = 8, 32, 32


def ct_series(n_slices: int = N_SLICES, rows: int = ROWS, columns: int = COLUMNS) -> list[Dataset]:
    """Axial CT slices 2.5 mm apart with every attribute a SEG or SR copies from its sources."""
    study_uid, series_uid, frame_uid = (derived_uid("test-ct", part) for part in ("study", "series", "for"))
    pixels = np.full((rows, columns), 1024, dtype=np.int16).tobytes()
    slices = []
    for index in range(n_slices):
        ds = Dataset()
        sop_uid = UID(derived_uid("test-ct", "instance", str(index)))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.PatientName, ds.PatientID = "Synthetic^Test", "SYN0001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", "ACC0001"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber, ds.AcquisitionNumber = index + 1, 1
        ds.ContentDate, ds.ContentTime = "20240101", "120000"
        ds.ImagePositionPatient = [-16.0, -16.0, 2.5 * index]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness, ds.KVP = [1.0, 1.0], 2.5, 120
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = pixels
        slices.append(ds)
    return slices


def dx_image() -> Dataset:
    """A digital radiograph: no frame of reference, so no patient coordinate system."""
    ds = ct_series(1)[0]
    for keyword in (
        "FrameOfReferenceUID PositionReferenceIndicator ImagePositionPatient ImageOrientationPatient "
        "PixelSpacing SliceThickness KVP RescaleType"
    ).split():
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality, ds.ImageType, ds.PresentationIntentType = "DX", ["ORIGINAL", "PRIMARY"], "FOR PRESENTATION"
    ds.PatientOrientation, ds.ImagerPixelSpacing = ["L", "F"], [0.1, 0.1]
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, 0
    return ds


def sct(value: str, meaning: str) -> Code:
    return Code(value=value, scheme="SCT", meaning=meaning)


def seg_manifest(values: tuple[int, int] = (1, 2)) -> ModelManifest:
    tissue = sct("85756007", "Tissue")
    return ModelManifest(
        id="ct-tissue",
        version="1.0.0",
        name="CT tissue",
        task="segmentation",
        sha256="0" * 64,
        accepts=Accepts(modalities=["CT"]),
        preprocess=Preprocess(intensity="none"),
        labels=[
            SegmentLabel(
                value=values[0],
                name="Soft tissue",
                category=tissue,
                type=sct("87784001", "Soft tissue"),
                color=(220, 140, 100),
            ),
            SegmentLabel(
                value=values[1],
                name="Bone",
                category=tissue,
                type=sct("272673000", "Bone"),
                anatomic_region=sct("818981001", "Abdomen"),
                color=(255, 255, 230),
            ),
        ],
    )


def class_manifest() -> ModelManifest:
    return ModelManifest(
        id="ct-pneumothorax",
        version="2.1",
        name="CT pneumothorax",
        task="classification",
        sha256="0" * 64,
        accepts=Accepts(modalities=["CT"]),
        preprocess=Preprocess(intensity="none"),
        classes=[
            ClassLabel(index=0, name="No pneumothorax", code=sct("272519000", "Absent")),
            ClassLabel(index=1, name="Pneumothorax", code=sct("52101004", "Present")),
        ],
        finding=sct("36118008", "Pneumothorax"),
        threshold=0.5,
        positive_class=1,
    )


def label_map(values: tuple[int, int] = (1, 2)) -> np.ndarray:
    labels = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=np.int64)  # argmax output type
    labels[2:5, 4:12, 6:14] = values[0]
    labels[3:7, 18:26, 16:30] = values[1]
    return labels


def make_seg(
    sources: list[Dataset], labels: np.ndarray, manifest: ModelManifest, job: str = "job-1"
) -> hd.seg.Segmentation:
    return build_seg(
        sources,
        labels,
        manifest,
        series_instance_uid=derived_uid(job, "seg", "series"),
        sop_instance_uid=derived_uid(job, "seg", "instance"),
        series_number=9001,
    )


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def read_segments(path: Path, sources: list[Dataset], n_segments: int) -> np.ndarray:
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
        segment_numbers=list(range(1, n_segments + 1)),
        assert_missing_frames_are_empty=True,
    )


# --- SEG ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [(1, 2), (3, 7)], ids=["consecutive", "sparse-label-values"])
def test_seg_round_trip_is_exact_and_valid(tmp_path: Path, values: tuple[int, int]) -> None:
    sources, manifest, labels = ct_series(), seg_manifest(values), label_map(values)
    path = write(make_seg(sources, labels, manifest), tmp_path / "seg.dcm")

    assert dciodvfy_errors(path) == []
    pixels = read_segments(path, sources, 2)
    for number, value in enumerate(values, start=1):
        np.testing.assert_array_equal(pixels[..., number - 1], labels == value)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.NumberOfFrames == 3 + 4  # empty frames omitted: 3 slices of label 1, 4 of label 2
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("infergate", "ct-tissue")
    assert (ds.SoftwareVersions, ds.DeviceSerialNumber) == (infergate.__version__, "0")
    assert ds.SeriesDescription == "CT tissue SEG"
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID


def test_seg_segment_descriptions_come_from_the_manifest(tmp_path: Path) -> None:
    manifest = seg_manifest()
    path = write(make_seg(ct_series(), label_map(), manifest), tmp_path / "seg.dcm")
    segments = pydicom.dcmread(path).SegmentSequence
    assert [item.SegmentNumber for item in segments] == [1, 2]
    for item, label in zip(segments, manifest.labels, strict=True):
        assert item.SegmentLabel == label.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == manifest.name
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == label.category.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.type.value
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == manifest.name
        assert algorithm.AlgorithmVersion == manifest.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.allclose(rgb, label.color, atol=2)
    assert "AnatomicRegionSequence" not in segments[0]
    assert segments[1].AnatomicRegionSequence[0].CodeValue == "818981001"


def test_seg_with_one_empty_label_is_valid(tmp_path: Path) -> None:
    sources, labels = ct_series(), label_map()
    labels[labels == 2] = 0
    path = write(make_seg(sources, labels, seg_manifest()), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    pixels = read_segments(path, sources, 2)
    np.testing.assert_array_equal(pixels[..., 0], labels == 1)
    assert not pixels[..., 1].any()


def test_seg_with_no_foreground_keeps_one_frame_per_segment(tmp_path: Path) -> None:
    sources = ct_series()
    path = write(
        make_seg(sources, np.zeros((N_SLICES, ROWS, COLUMNS), np.uint8), seg_manifest()), tmp_path / "seg.dcm"
    )
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 2
    referenced = {
        item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {s.SOPInstanceUID for s in sources}
    assert not read_segments(path, sources, 2).any()


def test_seg_from_a_single_image_and_a_2d_label_map(tmp_path: Path) -> None:
    sources = ct_series(1)
    labels = label_map()[3].astype(np.uint8)
    path = write(make_seg(sources, labels, seg_manifest()), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    pixels = read_segments(path, sources, 2)
    np.testing.assert_array_equal(pixels[0, ..., 0], labels == 1)
    np.testing.assert_array_equal(pixels[0, ..., 1], labels == 2)


@pytest.mark.parametrize("empty", [False, True], ids=["finding", "empty"])
def test_seg_of_a_radiograph_is_valid(tmp_path: Path, empty: bool) -> None:
    """No frame of reference: highdicom omits Patient Orientation (Type 2C), build_seg adds it."""
    source = dx_image()
    labels = np.zeros((ROWS, COLUMNS), np.uint8)
    if not empty:
        labels[10:20, 5:9] = 2
    path = write(make_seg([source], labels, seg_manifest()), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).PatientOrientation == ["L", "F"]
    pixels = read_segments(path, [source], 2)
    np.testing.assert_array_equal(pixels[0, ..., 1], labels == 2)
    assert not pixels[..., 0].any()


def test_seg_accepts_a_boolean_label_map(tmp_path: Path) -> None:
    sources = ct_series()
    labels = label_map() == 1
    pixels = read_segments(write(make_seg(sources, labels, seg_manifest()), tmp_path / "seg.dcm"), sources, 2)
    np.testing.assert_array_equal(pixels[..., 0], labels)


def test_seg_uids_are_the_callers_and_reruns_agree() -> None:
    sources, manifest = ct_series(), seg_manifest()
    first, again = make_seg(sources, label_map(), manifest), make_seg(sources, label_map(), manifest)
    other = make_seg(sources, label_map(), manifest, job="job-2")
    assert first.SOPInstanceUID == again.SOPInstanceUID == derived_uid("job-1", "seg", "instance")
    assert first.SeriesInstanceUID == derived_uid("job-1", "seg", "series")
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.PixelData == again.PixelData
    tracking = [item.TrackingUID for item in first.SegmentSequence]
    assert tracking == [item.TrackingUID for item in again.SegmentSequence]
    assert tracking == [segment_tracking_uid(first.SOPInstanceUID, n) for n in (1, 2)]


@pytest.mark.parametrize(
    "shape",
    [
        (N_SLICES - 1, ROWS, COLUMNS),
        (N_SLICES, ROWS, COLUMNS + 1),
        (ROWS, COLUMNS),
        (1, N_SLICES, ROWS, COLUMNS),
    ],
)
def test_seg_rejects_a_label_map_that_does_not_fit_the_sources(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match='"label_map"'):
        make_seg(ct_series(), np.zeros(shape, np.uint8), seg_manifest())


@pytest.mark.parametrize("bad_value", [3, -1, 5])
def test_seg_rejects_values_that_are_not_manifest_labels(bad_value: int) -> None:
    labels = label_map((1, 4))
    labels[0, 0, 0] = bad_value
    with pytest.raises(ValueError, match='"label_map"'):
        make_seg(ct_series(), labels, seg_manifest((1, 4)))


def test_seg_rejects_wrong_types_and_identifiers() -> None:
    sources, manifest = ct_series(), seg_manifest()
    with pytest.raises(TypeError, match='"label_map"'):
        make_seg(sources, label_map().astype(np.float32), manifest)
    with pytest.raises(TypeError, match='"label_map"'):
        make_seg(sources, label_map().tolist(), manifest)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"source_datasets"'):
        make_seg([], label_map(), manifest)
    multi_frame = ct_series(1)[0]
    multi_frame.NumberOfFrames = 2
    with pytest.raises(ValueError, match='"source_datasets"'):
        make_seg([multi_frame], label_map()[:2], manifest)
    with pytest.raises(ValueError, match='"manifest"'):
        make_seg(sources, label_map(), class_manifest())
    series_uid, sop_uid = derived_uid("x"), derived_uid("y")
    with pytest.raises(ValueError, match='"sop_instance_uid"'):
        build_seg(
            sources,
            label_map(),
            manifest,
            series_instance_uid=series_uid,
            sop_instance_uid="1.2.03",
            series_number=1,
        )
    with pytest.raises(ValueError, match='"series_number"'):
        build_seg(
            sources,
            label_map(),
            manifest,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=0,
        )


# --- SR ----------------------------------------------------------------------------------------


def make_sr(
    sources: list[Dataset],
    manifest: ModelManifest,
    *,
    seg: hd.seg.Segmentation | None = None,
    measurements: list[SegmentMeasurement] | None = None,
    findings: list[ClassificationFinding] | None = None,
) -> hd.sr.Comprehensive3DSR:
    return build_sr(
        sources,
        manifest,
        seg=seg,
        measurements=measurements or [],
        findings=findings or [],
        series_instance_uid=derived_uid("job-1", "sr", "series"),
        sop_instance_uid=derived_uid("job-1", "sr", "instance"),
        series_number=9002,
    )


def volumes(manifest: ModelManifest, labels: np.ndarray) -> list[SegmentMeasurement]:
    voxel_ml = 1.0 * 1.0 * 2.5 / 1000.0
    return [
        SegmentMeasurement(number, label, float((labels == label.value).sum() * voxel_ml))
        for number, label in enumerate(manifest.labels, start=1)
    ]


def test_segmentation_sr_is_valid_and_references_the_segments(tmp_path: Path) -> None:
    sources, manifest, labels = ct_series(), seg_manifest(), label_map()
    seg = make_seg(sources, labels, manifest)
    measurements = volumes(manifest, labels)
    path = write(make_sr(sources, manifest, seg=seg, measurements=measurements), tmp_path / "sr.dcm")

    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert '"Volume")="0.48" (ml,UCUM,"milliliter")' in dump  # 3 x 8 x 8 voxels of 2.5 ul
    assert '"Device Observer Model Name")="ct-tissue"' in dump

    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.SeriesDescription == "CT tissue SR"
    assert sr.Manufacturer == "infergate"
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in sources} | {seg.SOPInstanceUID}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for number, (group, measurement) in enumerate(zip(groups, measurements, strict=True), start=1):
        assert group.tracking_uid == segment_tracking_uid(seg.SOPInstanceUID, number)
        reference = group.referenced_segment
        assert reference is not None and reference.source_series_for_segmentation is not None
        assert group.finding_type is not None
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [number]
        assert reference.source_series_for_segmentation.value == sources[0].SeriesInstanceUID
        assert group.finding_type.value == measurement.label.type.value
        (volume,) = group.get_measurements()
        assert volume.name.value == "118565006"
        assert volume.value == pytest.approx(measurement.volume_ml)
        assert volume.unit.value == "ml"
    assert [site.value.value for site in groups[1].finding_sites] == ["818981001"]


def test_sr_for_a_single_segment_seg(tmp_path: Path) -> None:
    """highdicom's ReferencedSegment.from_segmentation fails on this case; build_sr must not."""
    sources, labels = ct_series(), label_map()
    manifest = seg_manifest()
    one_label = manifest.model_copy(update={"labels": manifest.labels[:1]})
    labels[labels == 2] = 0
    seg = make_seg(sources, labels, one_label)
    path = write(
        make_sr(sources, one_label, seg=seg, measurements=volumes(one_label, labels)), tmp_path / "sr.dcm"
    )
    assert dciodvfy_errors(path) == []
    assert "Referenced Segment" in dsrdump(path)


def test_classification_sr_is_valid(tmp_path: Path) -> None:
    sources, manifest = ct_series(), class_manifest()
    findings = [
        ClassificationFinding(manifest.classes[1], 0.83, positive=True),
        ClassificationFinding(manifest.classes[0], 0.17),
    ]
    path = write(make_sr(sources, manifest, findings=findings), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert '"Probability")="0.83" (1,UCUM,"no units")' in dump
    assert '"Pneumothorax")=(52101004,SCT,"Present")' in dump
    assert '"Presence of property")=(121053,DCM,"Present")' in dump

    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Pneumothorax", "No pneumothorax"]
    assert [g.get_measurements()[0].value for g in groups] == [pytest.approx(0.83), pytest.approx(0.17)]
    assert len(groups[0].source_images) == N_SLICES


def test_sr_observer_and_uids_are_deterministic() -> None:
    sources, manifest = ct_series(), class_manifest()
    findings = [ClassificationFinding(manifest.classes[1], 0.4, positive=False)]
    first, again = (make_sr(sources, manifest, findings=findings) for _ in range(2))
    assert first.SOPInstanceUID == again.SOPInstanceUID == derived_uid("job-1", "sr", "instance")
    assert device_observer_uid(manifest) == derived_uid("device-observer", manifest.id, manifest.version)
    observer_uids = [item.UID for item in first.ContentSequence if "UID" in item]
    assert observer_uids == [device_observer_uid(manifest)]


def test_sr_rejects_inconsistent_input() -> None:
    sources, manifest = ct_series(), seg_manifest()
    seg = make_seg(sources, label_map(), manifest)
    label = manifest.labels[0]
    with pytest.raises(ValueError, match='"measurements" and "findings"'):
        make_sr(sources, manifest, seg=seg)
    with pytest.raises(ValueError, match='"seg"'):
        make_sr(sources, manifest, measurements=[SegmentMeasurement(1, label, 1.0)])
    with pytest.raises(ValueError, match='"measurements"'):
        make_sr(sources, manifest, seg=seg, measurements=[SegmentMeasurement(3, label, 1.0)])
    with pytest.raises(ValueError, match='"measurements"'):
        make_sr(sources, manifest, seg=seg, measurements=[SegmentMeasurement(1, label, float("nan"))])
    with pytest.raises(TypeError, match='"seg"'):
        make_sr(sources, manifest, seg=sources[0], measurements=[])  # type: ignore[arg-type]
    classes = class_manifest()
    with pytest.raises(ValueError, match='"findings"'):
        make_sr(sources, classes, findings=[ClassificationFinding(classes.classes[0], 1.5)])
    with pytest.raises(ValueError, match='"findings"'):
        foreign = classes.classes[0].model_copy(update={"name": "Other"})
        make_sr(sources, classes, findings=[ClassificationFinding(foreign, 0.5)])
    with pytest.raises(ValueError, match='"manifest"'):
        make_sr(sources, manifest, findings=[ClassificationFinding(classes.classes[0], 0.5)])


def test_a_64_character_model_name_still_fits(tmp_path: Path) -> None:
    """Series Description is LO (64 characters); the " SEG"/" SR" suffix must not overflow it."""
    sources, labels = ct_series(), label_map()
    manifest = seg_manifest().model_copy(update={"name": "N" * 64})
    seg = make_seg(sources, labels, manifest)
    sr = make_sr(sources, manifest, seg=seg, measurements=volumes(manifest, labels))
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        path = write(ds, tmp_path / name)
        assert dciodvfy_errors(path) == []
        assert len(pydicom.dcmread(path).SeriesDescription) <= 64
