"""A rendered PNG preview of a job: one key slice, windowed for display, with the result drawn on it.

REST users and radiologists get a quick look at what a model did without a DICOM viewer: for a
segmentation, the slice with the most labelled voxels with each label blended in its manifest colour
and outlined; for a classification, the middle slice (or the single radiograph) with the findings.

The image carries only pixels and model output text (label names, finding names and probabilities,
"slice k/N"): no names, IDs or dates are drawn, the PNG holds no text chunks, and a source that says
it has annotations burned into its pixels is refused rather than shown, since those often name the
patient. The preview is a convenience, never a diagnostic rendering, so the window is applied as a
plain linear window whatever VOI LUT Function the image asks for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from infergate.dicom.sr import ClassificationFinding
from infergate.dicom.volume import Volume
from infergate.errors import InvalidInput
from infergate.manifest import Preprocess, SegmentLabel, Window
from workers.intensity import normalise_intensity, voi_source

log = logging.getLogger(__name__)

#: The longest side of the image part of a preview is brought within these bounds (pixels): large
#: radiographs are shrunk, small matrices enlarged enough for the legend to fit.
MAX_SIDE = 512
MIN_SIDE = 256
#: CT soft-tissue window (W400/L40 HU), used for CT without a window of its own.
CT_SOFT_TISSUE = Window(center=40.0, width=400.0)
#: Percentiles of the key slice used as the window when neither the image nor its modality gives one.
FALLBACK_PERCENTILES = (1.0, 99.0)
#: Opacity of the label colours over the image.
OVERLAY_ALPHA = 0.4
_MARGIN = 4
_TEXT = (255, 255, 255, 255)
_TEXT_BACKGROUND = (0, 0, 0, 160)


@dataclass(frozen=True)
class Preview:
    """A rendered preview.

    Attributes
    ----------
    png : bytes
        The PNG file (8-bit RGB, no text chunks).
    slice_index : int
        0-based index of the rendered slice in the volume's slice order.
    """

    png: bytes
    slice_index: int


def key_slice(label_map: np.ndarray | None, slices: int) -> int:
    """The slice with the most labelled voxels; the middle slice when there are none (or no mask)."""
    if label_map is not None:
        counts = np.count_nonzero(label_map.reshape(label_map.shape[0], -1), axis=1)
        if counts.size and counts.max() > 0:
            return int(np.argmax(counts))  # the first of equally full slices
    return slices // 2


def header_window(ds: Dataset) -> Window | None:
    """The image's own Window Center/Width (the first pair when several are given), if usable."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        window = Window(center=_first_float(center), width=_first_float(width))
    except (TypeError, ValueError, IndexError):  # malformed or empty: read as absent (tolerant reading)
        return None
    return window if math.isfinite(window.center) and math.isfinite(window.width) else None


def _first_float(value: object) -> float:
    """The first of a multi-valued DS, or the value itself."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)  # type: ignore[arg-type]  # DSfloat, int or str; anything else raises


def display_grey(volume: Volume, index: int) -> np.ndarray:
    """Slice ``index`` of ``volume`` windowed for display: float32 in [0, 1], 1 shown white.

    The window is the slice's own Window Center/Width, else CT soft tissue for CT, else the 1st-99th
    percentiles of the slice. MONOCHROME1 images are displayed inverted (their minimum is white,
    PS3.3 C.7.6.3.1.2), except radiographs the volume loader already inverted: for those the window,
    given on the original values, is reflected the same way (:func:`workers.intensity.voi_source`).
    """
    values = volume.array[index]
    ds = volume.datasets[index]
    reflection = voi_source(volume).reflection
    window = header_window(ds)
    if window is None and str(ds.get("Modality", "")).strip().upper() == "CT":
        window = CT_SOFT_TISSUE
    if window is None:
        steps = Preprocess(intensity="percentile", percentiles=FALLBACK_PERCENTILES)
    else:
        center = window.center if reflection is None else reflection - window.center
        steps = Preprocess(intensity="window", window=Window(center=center, width=window.width))
    unit = normalise_intensity(values, steps)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "MONOCHROME1" and reflection is None:
        unit = 1.0 - unit
    return unit


def display_size(rows: int, columns: int, row_spacing: float, column_spacing: float) -> tuple[int, int]:
    """``(height, width)`` in square display pixels, the longest side within [MIN_SIDE, MAX_SIDE].

    Rows are ``row_spacing`` mm apart and columns ``column_spacing`` mm, so the picture's physical
    aspect ratio is ``rows * row_spacing : columns * column_spacing``; that ratio is kept.
    """
    if rows < 1 or columns < 1:
        raise ValueError(f"An image of {rows}x{columns} pixels cannot be displayed.")
    if not (row_spacing > 0 and column_spacing > 0):
        raise ValueError(f"Pixel spacing ({row_spacing}, {column_spacing}) should be positive.")
    height, width = rows * row_spacing, columns * column_spacing
    longest = max(height, width)
    scale = min(max(longest / min(row_spacing, column_spacing), MIN_SIDE), MAX_SIDE) / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def _nearest(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``plane`` resized to ``size`` by nearest neighbour (labels must not be blended)."""
    rows = np.minimum((np.arange(size[0]) + 0.5) * plane.shape[0] / size[0], plane.shape[0] - 1).astype(np.intp)
    columns = np.minimum((np.arange(size[1]) + 0.5) * plane.shape[1] / size[1], plane.shape[1] - 1).astype(np.intp)
    return plane[np.ix_(rows, columns)]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_labels(rgb: np.ndarray, labels_plane: np.ndarray, labels: Sequence[SegmentLabel]) -> list[SegmentLabel]:
    """Blend each label's colour into ``rgb`` (in place) and outline it; returns the labels drawn."""
    drawn = []
    for label in labels:
        mask = labels_plane == label.value
        if not mask.any():
            continue
        colour = np.asarray(label.color, dtype=np.float32)
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colour
        rgb[_boundary(mask)] = colour
        drawn.append(label)
    return drawn


_Line = tuple[str, tuple[int, int, int] | None]


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> tuple[int, int]:
    """(height of one text line with its spacing, offset of the glyph tops) for ``font``."""
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - top) + 3, int(top)


def _fit_lines(lines: list[_Line], height: int, line_height: int) -> list[_Line]:
    """As many lines as fit above the "slice k/N" line of an image ``height`` pixels high, then "+N more"."""
    room = max(1, (height - 2 * line_height - 4 * _MARGIN) // line_height)
    if len(lines) <= room:
        return lines
    return [*lines[: room - 1], (f"+{len(lines) - room + 1} more", None)]


def _draw_text_box(image: Image.Image, lines: Sequence[_Line], *, bottom: bool = False) -> Image.Image:
    """Lines of text, each with an optional colour swatch, on a dark box at the top-left (or bottom-left)."""
    if not lines:
        return image
    font = ImageFont.load_default()
    line_height, top = _line_height(font)
    swatch = line_height - 3
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    widths = [int(draw.textlength(text, font=font)) + (swatch + 4 if colour else 0) for text, colour in lines]
    box_width, box_height = max(widths) + 2 * _MARGIN, len(lines) * line_height + 2 * _MARGIN - 3
    y0 = max(0, image.height - box_height) if bottom else 0
    draw.rectangle((0, y0, box_width, y0 + box_height), fill=_TEXT_BACKGROUND)
    for number, (text, colour) in enumerate(lines):
        x, y = _MARGIN, y0 + _MARGIN + number * line_height
        if colour is not None:
            draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=(*colour, 255))
            x += swatch + 4
        draw.text((x, y - top), text, font=font, fill=_TEXT)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _check_no_burned_in_text(ds: Dataset) -> None:
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise InvalidInput(
            "The source image has Burned In Annotation YES; its pixels may show identifying text, so no "
            "preview is rendered."
        )


def render_preview(
    volume: Volume,
    label_map: np.ndarray | None,
    labels: Sequence[SegmentLabel],
    findings: Sequence[ClassificationFinding],
) -> Preview:
    """Render the key slice of ``volume`` with a segmentation overlay or findings, as a PNG.

    Parameters
    ----------
    volume : Volume
        The source volume in modality units.
    label_map : numpy.ndarray | None
        ``(slices, rows, columns)`` label values on the volume's grid, or None for a classification.
    labels : Sequence[SegmentLabel]
        The manifest's labels: names for the legend and colours for the overlay.
    findings : Sequence[ClassificationFinding]
        Class probabilities to print, for a classification.

    Returns
    -------
    Preview
        The PNG and the index of the slice shown.

    Raises
    ------
    ValueError
        ``label_map`` does not have the volume's shape, or the volume's spacing is not positive.
    InvalidInput
        The shown slice says it has burned-in annotation.
    """
    slices, rows, columns = volume.shape
    if label_map is not None and tuple(label_map.shape) != volume.shape:
        raise ValueError(f'Argument "label_map" has shape {label_map.shape}; the volume has {volume.shape}.')
    index = key_slice(label_map, slices)
    _check_no_burned_in_text(volume.datasets[index])
    size = display_size(rows, columns, volume.spacing[1], volume.spacing[2])
    grey = Image.fromarray(np.rint(display_grey(volume, index) * 255.0).astype(np.uint8))
    grey = grey.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    rgb = np.asarray(grey.convert("RGB"), dtype=np.float32)
    lines: list[_Line] = []
    if label_map is not None:
        drawn = overlay_labels(rgb, _nearest(label_map[index], size), labels)
        lines += [(label.name, label.color) for label in drawn] or [("nothing segmented on this slice", None)]
    lines += [(f"{finding.class_label.name}: {finding.probability:.3f}", None) for finding in findings]
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    image = _draw_text_box(image, _fit_lines(lines, size[0], _line_height(ImageFont.load_default())[0]))
    image = _draw_text_box(image, [(f"slice {index + 1}/{slices}", None)], bottom=True)
    buffer = BytesIO()
    # No pnginfo: the file holds no text chunks. zlib's default level, not optimize=True: that took
    # 0.3 s for a 512-pixel preview, on the way of every job's results to the PACS, for 15 % less.
    image.save(buffer, format="PNG")
    return Preview(png=buffer.getvalue(), slice_index=index)


def try_render_preview(
    job_id: int,
    volume: Volume,
    label_map: np.ndarray | None,
    labels: Sequence[SegmentLabel],
    findings: Sequence[ClassificationFinding],
) -> Preview | None:
    """:func:`render_preview`, or None with a warning: a preview is a convenience and must never fail a job.

    The warning names the job and the error's type and message only: the errors come from this module,
    numpy and Pillow, whose messages hold shapes and numbers, never header text.
    """
    try:
        return render_preview(volume, label_map, labels, findings)
    except Exception as exc:  # any failure here only costs the preview, never the job
        log.warning("job %d: no preview rendered (%s: %s)", job_id, type(exc).__name__, exc)
        return None
