"""Frames, DICOM JSON metadata and instance re-encoding (infergate.dicomweb.frames/metadata/transcode)."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage, generate_uid

from infergate.dicomweb.frames import number_of_frames, parse_frame_list, pixel_data_parts, read_frames
from infergate.dicomweb.metadata import bulkdata_value, instance_metadata, parse_bulkdata_path
from infergate.dicomweb.negotiation import FrameEncoding
from infergate.dicomweb.transcode import encode_instance
from infergate.errors import InvalidInput, NotFound
from tests.data.make_series import write_ct_series

EXPLICIT = str(ExplicitVRLittleEndian)
NATIVE = FrameEncoding("application/octet-stream", EXPLICIT, decode=False)
URL = "http://node/dicomweb/studies/1/series/2/instances/3/bulkdata"


def _binary_seg(path: Path, masks: np.ndarray, syntax: str = EXPLICIT) -> Dataset:
    """A minimal multi-frame 1-bit image: 3x3 frames are 9 bits, so frames do not end on a byte."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SegmentationStorage, generate_uid()
    ds.Rows, ds.Columns = masks.shape[1:]
    ds.NumberOfFrames = masks.shape[0]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 1, 0, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.packbits(masks.ravel(), bitorder="little").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path)


def test_frame_list() -> None:
    assert parse_frame_list("3,1,3") == [3, 1, 3]
    assert parse_frame_list("1%2C2") == [1, 2]
    for bad in ("", "0", "1,", "a", "1;2", "01", "1" * 10):
        with pytest.raises(InvalidInput, match="frame_list"):
            parse_frame_list(bad)


def test_bit_packed_frames_are_cut_by_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, size=(5, 3, 3), dtype=np.uint8)
    ds = _binary_seg(tmp_path / "seg.dcm", masks)
    assert number_of_frames(ds) == 5
    frames = read_frames(ds, [2, 5], NATIVE, EXPLICIT)
    for frame, index in zip(frames, (1, 4), strict=True):
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")[:9]
        assert np.array_equal(bits.reshape(3, 3), masks[index])
        assert len(frame) == 2, "9 bits re-packed from bit 0 into two bytes"
    with pytest.raises(NotFound, match="Frame 6 does not exist; the instance has 5"):
        read_frames(ds, [6], NATIVE, EXPLICIT)


def test_no_pixel_data_has_no_frames() -> None:
    with pytest.raises(NotFound, match="no Pixel Data"):
        read_frames(Dataset(), [1], NATIVE, EXPLICIT)
    with pytest.raises(NotFound, match="no Pixel Data"):
        pixel_data_parts(Dataset(), NATIVE, EXPLICIT)


def test_metadata_replaces_bulk_data_and_keeps_the_rest(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path / "ct", slices=1, size=16, seed=5).paths
    ds = dcmread(path)
    icon = Dataset()
    icon.Rows = icon.Columns = 32
    icon.BitsAllocated = 8
    icon.PixelData = bytes(range(256)) * 4  # 1 KiB: over the threshold, nested
    ds.IconImageSequence = [icon]
    ds.add_new(0x00091010, "LO", "INFERGATE")  # private creator
    ds.add_new(0x00091011, "OB", b"\x01\x02")  # small private blob stays inline
    ds.save_as(path)

    meta = instance_metadata(path, bulkdata_url=URL, transfer_syntax_uid=EXPLICIT)
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{URL}/7FE00010"}
    assert meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"] == f"{URL}/00880200/0/7FE00010"
    assert meta["00091011"] == {"vr": "OB", "InlineBinary": "AQI="}
    assert meta["00083002"] == {"vr": "UI", "Value": [EXPLICIT]}
    assert meta["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Phantom^CT"}]}
    assert "00020010" not in meta, "File Meta Information is not part of the metadata"
    json.dumps(meta)  # serialisable as is

    read = dcmread(path)
    steps = parse_bulkdata_path("00880200/0/7FE00010")
    assert bulkdata_value(read, steps) == icon.PixelData
    assert bulkdata_value(read, [0x7FE00010]) == read.PixelData
    with pytest.raises(NotFound, match="not binary"):
        bulkdata_value(read, [0x00100010])
    with pytest.raises(NotFound, match="no element"):
        bulkdata_value(read, [0x00091001])
    with pytest.raises(NotFound, match="sequence item"):
        bulkdata_value(read, [0x00880200, 1, 0x7FE00010])


@pytest.mark.parametrize("text", ["7FE0", "7FE00010/", "00880200/x/7FE00010", "../etc", "7FE00010/0"])
def test_malformed_bulkdata_paths(text: str) -> None:
    with pytest.raises(InvalidInput, match="tag_path"):
        parse_bulkdata_path(text)


def test_implicit_vr_metadata_resolves_ambiguous_pixel_vr(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path / "ct", slices=1, size=16, seed=6, transfer_syntax=ImplicitVRLittleEndian).paths
    meta = instance_metadata(path, bulkdata_url=URL, transfer_syntax_uid=str(ImplicitVRLittleEndian))
    assert meta["7FE00010"]["vr"] == "OW"
    assert meta["00280010"] == {"vr": "US", "Value": [16]}


def test_implicit_vr_instance_goes_out_explicit(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path / "ct", slices=1, size=16, seed=7, transfer_syntax=ImplicitVRLittleEndian).paths
    out = dcmread(BytesIO(encode_instance(path, str(ImplicitVRLittleEndian), EXPLICIT)))
    original = dcmread(path)
    assert out.file_meta.TransferSyntaxUID == EXPLICIT and not out.original_encoding[0]
    assert out.PixelData == original.PixelData and out.SOPInstanceUID == original.SOPInstanceUID
    assert encode_instance(path, "1.2.840.10008.1.2", "1.2.840.10008.1.2") == path.read_bytes()
    with pytest.raises(ValueError, match="target"):
        encode_instance(path, str(ImplicitVRLittleEndian), "1.2.840.10008.1.2.5")
