"""The job preview renderer: key slice, display window, aspect ratio, overlay, and a clean PNG."""

from __future__ import annotations

import logging
import struct
import zlib
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from infergate.dicom.sr import ClassificationFinding
from infergate.dicom.volume import Volume, load_volume
from infergate.manifest import ClassLabel, Code, SegmentLabel
from tests.unit.dicom._synthetic import make_image, make_series
from workers import preview
from workers.preview import (
    MAX_SIDE,
    MIN_SIDE,
    display_grey,
    display_size,
    header_window,
    key_slice,
    render_preview,
    try_render_preview,
)

_CODE = Code(value="85756007", scheme="SCT", meaning="Tissue")
RED = SegmentLabel(value=1, name="Red thing", category=_CODE, type=_CODE, color=(255, 0, 0))
BLUE = SegmentLabel(value=2, name="Blue thing", category=_CODE, type=_CODE, color=(0, 0, 255))


def _volume(array: np.ndarray, spacing: tuple[float, float, float] = (2.0, 1.0, 1.0), **attributes: Any) -> Volume:
    """A volume whose datasets hold only ``attributes`` (Modality CT unless given)."""
    datasets = []
    for _ in range(array.shape[0]):
        ds = Dataset()
        ds.Modality = "CT"
        ds.PhotometricInterpretation = "MONOCHROME2"
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        datasets.append(ds)
    return Volume(
        array=np.asarray(array, dtype=np.float32),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        datasets=datasets,
    )


def _decode(png: bytes) -> np.ndarray:
    with Image.open(BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _chunk_types(png: bytes) -> list[bytes]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    types, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        data = png[offset + 8 : offset + 8 + length]
        assert struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])[0] == zlib.crc32(kind + data)
        types.append(kind)
        offset += 12 + length
    return types


# key slice


def test_key_slice_has_the_most_labelled_voxels() -> None:
    labels = np.zeros((5, 8, 8), dtype=np.uint8)
    labels[1, :2, :2] = 1
    labels[3, :4, :4] = 2
    labels[4, :3, :3] = 1
    assert key_slice(labels, 5) == 3


def test_key_slice_is_the_middle_without_labels() -> None:
    assert key_slice(np.zeros((7, 4, 4), dtype=np.uint8), 7) == 3
    assert key_slice(None, 6) == 3
    assert key_slice(None, 1) == 0


def test_render_reports_the_key_slice() -> None:
    labels = np.zeros((6, 16, 16), dtype=np.uint8)
    labels[4, 4:12, 4:12] = 1
    assert render_preview(_volume(np.zeros((6, 16, 16))), labels, [RED], []).slice_index == 4
    assert render_preview(_volume(np.zeros((6, 16, 16))), None, [], []).slice_index == 3


# windowing


def test_header_window_is_read_tolerantly() -> None:
    ds = Dataset()
    assert header_window(ds) is None
    ds.WindowCenter, ds.WindowWidth = ["300", "40"], ["1500", "400"]  # multi-valued: the first pair
    window = header_window(ds)
    assert window is not None and (window.center, window.width) == (300.0, 1500.0)
    ds.WindowWidth = "0"  # not a usable width
    assert header_window(ds) is None


def test_header_window_of_the_key_slice_is_applied() -> None:
    ramp = np.tile(np.linspace(-100.0, 300.0, 5, dtype=np.float32), (3, 5, 1))  # -100, 0, 100, 200, 300
    volume = _volume(ramp)
    volume.datasets[1].WindowCenter, volume.datasets[1].WindowWidth = "100", "200"
    grey = display_grey(volume, 1)[0]
    np.testing.assert_allclose(grey, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_ct_without_a_window_uses_soft_tissue() -> None:
    values = np.array([[[-1000.0, -160.0, 40.0, 240.0, 1000.0]]], dtype=np.float32)  # W400/L40
    np.testing.assert_allclose(display_grey(_volume(values), 0)[0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_other_modalities_without_a_window_use_percentiles() -> None:
    values = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    grey = display_grey(_volume(values, Modality="MR"), 0)[0]
    assert grey[0] == grey[1] == 0.0 and grey[-1] == grey[-2] == 1.0  # clipped at the 1st/99th percentile
    assert grey[50] == pytest.approx(0.5)


def test_monochrome1_cross_sectional_image_is_shown_inverted() -> None:
    values = np.array([[[-160.0, 40.0, 240.0]]], dtype=np.float32)
    geometry = {"ImagePositionPatient": [0, 0, 0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}
    volume = _volume(values, PhotometricInterpretation="MONOCHROME1", **geometry)
    np.testing.assert_allclose(display_grey(volume, 0)[0], [1.0, 0.5, 0.0], atol=1e-6)


def test_monochrome1_radiograph_keeps_its_window_and_is_shown_dense_bright() -> None:
    # the loader inverts a MONOCHROME1 radiograph; its window is on the stored values
    stored = np.array([[800, 900, 1000, 1100, 1200]], dtype=np.uint16)
    ds = make_image(
        stored, modality="DX", position=None, orientation=None, photometric="MONOCHROME1", slope=None, intercept=None
    )
    ds.WindowCenter, ds.WindowWidth = "1000", "200"
    grey = display_grey(load_volume([ds]), 0)[0]
    # MONOCHROME1: the low stored values (within the window) are white
    np.testing.assert_allclose(grey, [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


# geometry


@pytest.mark.parametrize(
    ("rows", "columns", "row_spacing", "column_spacing", "expected"),
    [
        (512, 512, 0.7, 0.7, (512, 512)),
        (40, 40, 2.0, 0.5, (256, 64)),  # 80 x 20 mm: four times as high as wide, enlarged
        (3000, 2000, 0.15, 0.15, (512, 341)),  # a large radiograph, shrunk
        (100, 400, 1.0, 1.0, (100, 400)),  # within bounds: as it is
    ],
)
def test_display_size_keeps_the_physical_aspect_ratio(
    rows: int, columns: int, row_spacing: float, column_spacing: float, expected: tuple[int, int]
) -> None:
    height, width = display_size(rows, columns, row_spacing, column_spacing)
    assert (height, width) == expected
    assert MIN_SIDE <= max(height, width) <= MAX_SIDE


def test_rendered_png_has_square_pixels() -> None:
    volume = _volume(np.zeros((2, 30, 60)), spacing=(2.0, 2.0, 0.5))  # 60 mm high, 30 mm wide
    with Image.open(BytesIO(render_preview(volume, None, [], []).png)) as image:
        width, height = image.size
    assert height == 2 * width and height == MIN_SIDE


# overlay and text


def test_overlay_colours_the_mask_and_outlines_it() -> None:
    array = np.full((3, 64, 64), 40.0, dtype=np.float32)  # mid grey in the soft-tissue window
    labels = np.zeros((3, 64, 64), dtype=np.uint8)
    labels[1, 32:60, 32:60] = 1  # away from the legend in the top-left corner
    labels[1, 40:50, 4:20] = 2
    rgb = _decode(render_preview(_volume(array, spacing=(1.0, 1.0, 1.0)), labels, [RED, BLUE], []).png)
    assert rgb.shape == (256, 256, 3)  # 64 px enlarged 4x
    inside_red, inside_blue, outside = rgb[180, 180], rgb[180, 48], rgb[100, 100]
    assert inside_red[0] > inside_red[1] + 50 and abs(int(inside_red[1]) - int(inside_red[2])) <= 1
    assert inside_blue[2] > inside_blue[0] + 50
    assert outside[0] == outside[1] == outside[2]  # untouched grey
    # alpha ~40%: grey 128 blended with 255 -> ~179
    assert 170 <= inside_red[0] <= 190 and 70 <= inside_red[1] <= 85
    assert tuple(rgb[128, 180]) == (255, 0, 0)  # the first row of the label is its outline
    assert tuple(rgb[239, 180]) == (255, 0, 0)  # and its last row


def test_legend_and_findings_are_drawn() -> None:
    array = np.full((1, 128, 128), 40.0, dtype=np.float32)
    finding = ClassificationFinding(
        class_label=ClassLabel(index=1, name="Pneumothorax", code=_CODE), probability=0.9861, positive=True
    )
    plain = _decode(render_preview(_volume(array), None, [], []).png)
    shown = _decode(render_preview(_volume(array), None, [], [finding]).png)
    assert not np.array_equal(plain[:20, :120], shown[:20, :120])  # the findings box, top-left
    assert np.array_equal(plain[60:200, 60:], shown[60:200, 60:])  # the rest of the image is the same
    assert np.any(shown[-12:, :40] != plain[100, 100])  # "slice 1/1", bottom-left


def test_png_decodes_and_holds_no_text_chunks() -> None:
    volume = _volume(np.zeros((2, 16, 16)))
    volume.datasets[1].PatientName = "Doe^Jane"  # nothing from the header but the window gets in
    labels = np.zeros((2, 16, 16), dtype=np.uint8)
    labels[1, 4:8, 4:8] = 1
    png = render_preview(volume, labels, [RED], []).png
    assert _decode(png).shape[2] == 3
    chunks = _chunk_types(png)
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND"
    assert not {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"} & set(chunks)
    assert b"Doe" not in png


def test_burned_in_annotation_is_not_shown() -> None:
    volume = _volume(np.zeros((1, 16, 16)), BurnedInAnnotation="YES")
    with pytest.raises(ValueError, match="Burned In Annotation"):
        render_preview(volume, None, [], [])


def test_label_map_must_match_the_volume() -> None:
    with pytest.raises(ValueError, match="label_map"):
        render_preview(_volume(np.zeros((2, 16, 16))), np.zeros((2, 8, 8), dtype=np.uint8), [RED], [])


def test_try_render_preview_turns_any_failure_into_no_preview(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> preview.Preview:
        raise RuntimeError("boom")

    monkeypatch.setattr(preview, "render_preview", broken)
    volume = _volume(np.zeros((1, 16, 16)), PatientName="Doe^Jane")
    with caplog.at_level(logging.WARNING, logger="workers.preview"):
        assert try_render_preview(7, volume, None, [], []) is None
    assert "job 7" in caplog.text and "RuntimeError: boom" in caplog.text and "Doe" not in caplog.text


def test_real_ct_series_renders() -> None:
    hu = np.full((4, 32, 48), -1000.0, dtype=np.float32)
    hu[:, 8:24, 8:40] = 40.0
    volume = load_volume(make_series(hu, spacing=(2.5, 0.8, 0.8)))
    labels = (hu > 0).astype(np.uint8)
    result = render_preview(volume, labels, [RED], [])
    assert result.slice_index == 0
    assert _decode(result.png).shape == (171, 256, 3)
