"""Build one pixel volume, in modality units, from the instances of a series.

Two kinds of input are accepted:

* a stack of single-frame cross-sectional images (CT, MR, ...) that share one orientation, one
  matrix size and one pixel spacing, with evenly spaced positions along the slice normal; the
  slices are sorted by their position along that normal (PS3.3 C.7.6.2.1.1), never by
  Instance Number, which says nothing reliable about geometry;
* a single image, e.g. a CR/DX radiograph without patient geometry (PS3.3 C.8.11.4), which
  becomes a volume of one slice.

Anything else (mixed orientations, duplicate positions, gaps, sheared stacks, multi-frame or colour
images) is refused with :class:`~infergate.errors.InvalidInput`: a model run on a mis-built volume
would give a wrong answer silently, whereas a refusal is visible in the job state.

Compressed pixel data is decoded by pydicom with whichever plugins are installed (pylibjpeg for
JPEG, JPEG-LS and JPEG 2000; pydicom's own RLE decoder).

Nothing is decoded or allocated before the size is known to be honest and affordable ("pixel
bombs"): the volume's voxels (slices x rows x columns) must not exceed ``max_voxels``; native
Pixel Data must hold at least the bytes its header declares; a compressed frame must not be larger
than twice its decoded size, and its codestream's own dimensions (JPEG and JPEG-LS SOF, JPEG 2000
SIZ) and components must be the header's, because decoders allocate what the codestream declares.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)

from infergate.dicom.codestream import j2k_image_size, jpeg_frame_size
from infergate.errors import InvalidInput

#: Largest difference between direction cosines still taken as the same orientation (~0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3
#: Relative tolerance on Pixel Spacing between slices.
PIXEL_SPACING_RTOL = 1e-3
#: Slice gaps may differ from the mean by the larger of these (mm, and fraction of the mean).
SLICE_SPACING_ATOL_MM = 0.01
SLICE_SPACING_RTOL = 0.01
#: Two positions closer than this along the normal (mm) are duplicates.
DUPLICATE_POSITION_MM = 1e-3
#: mm assumed for a projection image without Pixel Spacing or Imager Pixel Spacing, and between
#: "slices" of a one-image volume.
_PROJECTION_DEFAULT_SPACING = 1.0
#: Default ``max_voxels`` (``Settings.max_volume_voxels``): 2000 slices of 1024 x 1024, more than
#: the largest CT or MR series hospitals send; 8 GiB once decoded to float32.
DEFAULT_MAX_VOXELS = 2000 * 1024 * 1024
#: A compressed frame may be at most this many times its decoded size, plus this many bytes (no
#: codec inflates real data that far); RLE, whose runs can decode 64 times larger than they are,
#: is then bounded too.
_COMPRESSED_FRAME_RATIO, _COMPRESSED_FRAME_SLACK = 2, 64 * 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class Volume:
    """A pixel volume with its patient geometry.

    Attributes
    ----------
    array : numpy.ndarray
        float32 ``(slices, rows, columns)`` in modality units (HU for CT): Rescale Slope and
        Intercept (or a Modality LUT) applied per slice.
    spacing : tuple[float, float, float]
        mm between slice centres, between rows (Pixel Spacing[0]) and between columns
        (Pixel Spacing[1]).
    origin : tuple[float, float, float]
        Image Position (Patient) of the first slice; ``(0, 0, 0)`` when the image has none.
    direction : numpy.ndarray
        3x3, one unit vector per row: the row direction cosines (the way the column index grows),
        the column direction cosines (the way the row index grows) and the slice normal
        ``cross(row, column)`` (the way the slice index grows). Identity when the image has no
        patient geometry.
    datasets : list[pydicom.Dataset]
        The source datasets in array order, so that outputs can reference them slice by slice.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    datasets: list[Dataset]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        slices, rows, columns = self.array.shape
        return int(slices), int(rows), int(columns)


def load_volume(datasets: Sequence[Dataset], *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Sort, check and decode the instances of one series into a :class:`Volume`.

    Parameters
    ----------
    datasets : Sequence[pydicom.Dataset]
        Every instance of the series, in any order. One dataset without Image Orientation
        (Patient) and Image Position (Patient) is read as a projection radiograph.
    max_voxels : int
        Most voxels (slices x rows x columns) the volume may have (``Settings.max_volume_voxels``).

    Returns
    -------
    Volume
        The volume; ``datasets`` sorted along the slice normal.

    Raises
    ------
    TypeError
        ``datasets`` is not a sequence of pydicom Datasets.
    InvalidInput
        The instances do not form one regular volume (see the module docstring), their pixel data
        disagrees with their headers or exceeds ``max_voxels`` (checked before anything is decoded
        or allocated), or it cannot be decoded.

    Notes
    -----
    MONOCHROME1 (minimum value displayed white, PS3.3 C.7.6.3.1.2) is inverted to MONOCHROME2
    semantics only for single images without patient geometry, i.e. projection radiographs: their
    stored values have no physical unit and models expect "brighter is denser". Cross-sectional
    images are left alone, because their modality values (HU for CT) mean the same whatever the
    display polarity, and inverting them would break windows given in those units.
    """
    if isinstance(datasets, Dataset) or not isinstance(datasets, Sequence):
        raise TypeError('Argument "datasets" should be a sequence of pydicom Datasets.')
    if not datasets:
        raise InvalidInput('Argument "datasets" is empty; a volume needs at least one image.')
    for index, ds in enumerate(datasets):
        if not isinstance(ds, Dataset):
            raise TypeError(f'Argument "datasets" item {index} should be a pydicom Dataset, not {type(ds).__name__}.')
        _check_single_frame_monochrome(ds, index)
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
        raise ValueError(f'Argument "max_voxels" should be a positive integer, not {max_voxels!r}.')
    _check_pixel_budget(datasets, max_voxels)
    if len(datasets) == 1 and not _has_geometry(datasets[0]):
        return _load_projection(datasets[0])
    return _load_stack(list(datasets))


def _count(ds: Dataset, keyword: str, index: int, default: int | None = None) -> int:
    """A positive whole-number header value (US, IS), or :class:`InvalidInput` naming it."""
    try:
        value = ds.get(keyword)
        number = default if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError) as exc:  # multi-valued, "abc", ...
        raise InvalidInput(f"Image {index} has an unusable {keyword}.") from exc
    if number is None:
        raise InvalidInput(f"Image {index} has no {keyword}.")
    if number < 1:
        raise InvalidInput(f"Image {index} has {keyword} {number}; a positive number is needed.")
    return number


def _check_single_frame_monochrome(ds: Dataset, index: int) -> None:
    frames = _count(ds, "NumberOfFrames", index, 1)
    if frames != 1:
        raise InvalidInput(
            f"Image {index} has {frames} frames; only single-frame images are supported "
            "(enhanced multi-frame objects need per-frame geometry)."
        )
    samples = _count(ds, "SamplesPerPixel", index, 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidInput(
            f"Image {index} has Photometric Interpretation {photometric!r} with {samples} samples per "
            "pixel; only MONOCHROME1/2 greyscale images are supported."
        )
    for keyword in ("Rows", "Columns"):
        _count(ds, keyword, index)


def _check_pixel_budget(datasets: Sequence[Dataset], max_voxels: int) -> None:
    """Refuse, before any pixel is decoded or allocated, a volume larger than ``max_voxels`` and
    pixel data that disagrees with its header (see the module docstring)."""
    first = datasets[0]
    rows, columns = _count(first, "Rows", 0), _count(first, "Columns", 0)
    voxels = len(datasets) * rows * columns
    if voxels > max_voxels:
        raise InvalidInput(
            f"The series declares {len(datasets)} x {rows} x {columns} = {voxels} voxels, more than the "
            f"{max_voxels} allowed (INFERGATE_MAX_VOLUME_VOXELS); refused before decoding."
        )
    for index, ds in enumerate(datasets):
        _check_pixel_data(ds, index, max_voxels)


def _check_pixel_data(ds: Dataset, index: int, max_voxels: int) -> None:
    """One image's pixel data against its header: sizes only, nothing decoded."""
    rows, columns = _count(ds, "Rows", index), _count(ds, "Columns", index)
    frames = _count(ds, "NumberOfFrames", index, 1)
    samples = _count(ds, "SamplesPerPixel", index, 1)
    bits = _count(ds, "BitsAllocated", index)
    if rows * columns * frames > max_voxels:
        raise InvalidInput(
            f"Image {index} declares {rows} x {columns} pixels, more than the {max_voxels} voxels allowed "
            "(INFERGATE_MAX_VOLUME_VOXELS); refused before decoding."
        )
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise InvalidInput(f"Image {index} has no pixel data.")
    value = ds[keyword].value
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidInput(f"Image {index} has unreadable pixel data.")
    value = value if isinstance(value, bytes) else bytes(value)
    expected = (rows * columns * frames * samples * bits + 7) // 8
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))
    if not (keyword == "PixelData" and syntax.is_transfer_syntax and syntax.is_encapsulated):
        # Bytes beyond the declared frames (trailing padding, which some writers add) are left
        # unread, as pydicom leaves them; fewer than declared would be read past their end.
        if len(value) < expected:
            raise InvalidInput(
                f"Image {index} declares {rows} x {columns} x {frames} frame(s) of {samples} sample(s) at {bits} "
                f"bits ({expected} bytes) but its {keyword} holds {len(value)} bytes; refused before decoding."
            )
        return
    try:
        frame = next(generate_frames(value, number_of_frames=frames))
    except (StopIteration, ValueError, TypeError, struct.error) as exc:
        raise InvalidInput(f"Image {index}: its encapsulated Pixel Data holds no readable frame.") from exc
    frame_bytes = expected // frames
    if len(frame) > _COMPRESSED_FRAME_RATIO * frame_bytes + _COMPRESSED_FRAME_SLACK:
        raise InvalidInput(
            f"Image {index}: a compressed frame of {len(frame)} bytes for {frame_bytes} decoded bytes; "
            "refused before decoding."
        )
    if syntax in RLETransferSyntaxes:
        segments = int.from_bytes(frame[:4], "little") if len(frame) >= 64 else 0
        if segments != samples * ((bits + 7) // 8):
            raise InvalidInput(f"Image {index}: the RLE frame has {segments} segments for {samples} x {bits} bits.")
        return
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        declared = jpeg_frame_size(frame)
    elif syntax in JPEG2000TransferSyntaxes:
        declared = j2k_image_size(frame)
    else:
        raise InvalidInput(f"Image {index} uses {syntax.name}, whose codestream the node cannot check; refused.")
    if declared is None:
        raise InvalidInput(f"Image {index}: the {syntax.name} codestream declares no image size.")
    if declared != (rows, columns, samples):
        raise InvalidInput(
            f"Image {index}: the {syntax.name} codestream declares {declared[0]} x {declared[1]} pixels of "
            f"{declared[2]} component(s) but the header {rows} x {columns} of {samples}; refused before decoding."
        )


def _has_geometry(ds: Dataset) -> bool:
    try:
        return ds.get("ImageOrientationPatient") is not None and ds.get("ImagePositionPatient") is not None
    except ValueError:  # present but malformed (read from a file): the stack checks refuse it clearly
        return True


def _floats(ds: Dataset, keyword: str, count: int, index: int) -> np.ndarray:
    try:
        value = ds.get(keyword)  # a malformed DS read from a file raises here
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"Image {index} has no usable {keyword} ({count} numbers needed).") from exc
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise InvalidInput(f"Image {index} has no usable {keyword} ({count} numbers needed).")
    return numbers


def _pixels(ds: Dataset, index: int) -> np.ndarray:
    """Decoded pixels of one image with the Modality LUT (Rescale Slope/Intercept) applied."""
    try:
        stored = ds.pixel_array
    except (AttributeError, KeyError) as exc:
        raise InvalidInput(f"Image {index} has no pixel data.") from exc
    except MemoryError as exc:  # past the checks above, only a decoder that overallocates gets here
        raise InvalidInput(f"Image {index}: decoding its pixel data ran out of memory.") from exc
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise InvalidInput(f"Image {index}: cannot decode pixel data ({name}): {exc}") from exc
    if stored.ndim != 2:
        raise InvalidInput(f"Image {index} decoded to shape {stored.shape}; one greyscale frame was expected.")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def _load_projection(ds: Dataset) -> Volume:
    """One image without patient geometry: a volume of one slice in an identity frame."""
    # Pixel Spacing is calibrated to the patient; Imager Pixel Spacing is at the detector face.
    # Some CR readers write "0.000\0.000" for an uncalibrated plate (pydicom-data's RG1 chest
    # CR does): all zeros means "unknown", read like an absent attribute (tolerant reading).
    row_spacing = column_spacing = _PROJECTION_DEFAULT_SPACING
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if not ds.get(keyword):
            continue
        numbers = _floats(ds, keyword, 2, 0)
        if np.all(numbers == 0.0):
            continue
        row_spacing, column_spacing = float(numbers[0]), float(numbers[1])
        break
    if row_spacing <= 0 or column_spacing <= 0:
        raise InvalidInput(f"Image 0 has a non-positive pixel spacing ({row_spacing}, {column_spacing}).")
    pixels = _pixels(ds, 0)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        pixels = invert_monochrome1(pixels, ds)
    return Volume(
        array=pixels[np.newaxis],
        spacing=(_PROJECTION_DEFAULT_SPACING, row_spacing, column_spacing),
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        datasets=[ds],
    )


def invert_monochrome1(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map MONOCHROME1 values onto MONOCHROME2 polarity over the full range of stored values.

    Using the range the stored bits can hold (rather than the image's own minimum and maximum)
    keeps the mapping independent of content, so the same detector value always maps to the same
    output.
    """
    if "ModalityLUTSequence" in ds:
        low, high = float(pixels.min()), float(pixels.max())
    else:
        bits = int(ds.get("BitsStored", 16))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        stored_low, stored_high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        ends = sorted((stored_low * slope + intercept, stored_high * slope + intercept))
        low, high = ends
    return np.asarray(low + high - pixels, dtype=np.float32)


def _load_stack(datasets: list[Dataset]) -> Volume:
    """Single-frame cross-sectional images: check they form one regular grid, then sort and stack."""
    first = datasets[0]
    rows, columns = int(first.Rows), int(first.Columns)
    orientation = None
    pixel_spacing = None
    positions = np.empty((len(datasets), 3), dtype=np.float64)
    for index, ds in enumerate(datasets):
        if not _has_geometry(ds) or ds.get("PixelSpacing") is None:
            raise InvalidInput(
                f"Image {index} lacks Image Orientation (Patient), Image Position (Patient) or Pixel "
                "Spacing; a multi-image series needs all three to be stacked into a volume."
            )
        this_orientation = _floats(ds, "ImageOrientationPatient", 6, index)
        this_spacing = _floats(ds, "PixelSpacing", 2, index)
        positions[index] = _floats(ds, "ImagePositionPatient", 3, index)
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise InvalidInput(
                f"Image {index} has {ds.Rows}x{ds.Columns} pixels but image 0 has {rows}x{columns}; "
                "all slices of a volume must have the same matrix size."
            )
        if orientation is None or pixel_spacing is None:
            orientation, pixel_spacing = this_orientation, this_spacing
        elif np.max(np.abs(this_orientation - orientation)) > ORIENTATION_TOLERANCE:
            raise InvalidInput(
                f"Image {index} has a different Image Orientation (Patient) from image 0; mixed "
                "orientations (e.g. a localizer or another plane) cannot form one volume."
            )
        elif not np.allclose(this_spacing, pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0.0):
            raise InvalidInput(
                f"Image {index} has Pixel Spacing {this_spacing.tolist()} but image 0 has "
                f"{pixel_spacing.tolist()}; all slices of a volume must have the same pixel spacing."
            )
    assert orientation is not None and pixel_spacing is not None
    if np.any(pixel_spacing <= 0):
        raise InvalidInput(f"Pixel Spacing {pixel_spacing.tolist()} should be positive.")
    direction = _direction(orientation)
    along = positions @ direction[2]
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    slice_spacing = _slice_spacing(along, datasets[0])
    _check_not_sheared(positions, direction, float(pixel_spacing.min()))
    array = np.empty((len(datasets), rows, columns), dtype=np.float32)
    sorted_datasets = [datasets[int(i)] for i in order]
    for slot, source_index in enumerate(order):
        array[slot] = _pixels(datasets[int(source_index)], int(source_index))
    return Volume(
        array=array,
        spacing=(slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=(float(positions[0, 0]), float(positions[0, 1]), float(positions[0, 2])),
        direction=direction,
        datasets=sorted_datasets,
    )


def _direction(orientation: np.ndarray) -> np.ndarray:
    row, column = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row), np.linalg.norm(column)
    if min(norms) < 1e-6:
        raise InvalidInput("Image Orientation (Patient) holds a zero vector.")
    row, column = row / norms[0], column / norms[1]
    if abs(float(row @ column)) > 1e-2:
        raise InvalidInput("Image Orientation (Patient) row and column cosines are not orthogonal.")
    normal = np.cross(row, column)
    return np.stack([row, column, normal / np.linalg.norm(normal)])


def _slice_spacing(along: np.ndarray, first: Dataset) -> float:
    """Mean distance between sorted slice positions, refusing duplicates and uneven gaps."""
    if along.size == 1:
        # One slice with geometry: the spacing along the normal is only a nominal thickness.
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(keyword)
            if value is not None and float(value) > 0:
                return float(value)
        return 1.0
    gaps = np.diff(along)
    if np.any(gaps < DUPLICATE_POSITION_MM):
        count = int(np.sum(gaps < DUPLICATE_POSITION_MM))
        raise InvalidInput(
            f"{count} slice position(s) repeat along the slice normal; duplicate positions (e.g. two "
            "acquisitions or echoes in one series) cannot form one volume."
        )
    mean = float((along[-1] - along[0]) / (along.size - 1))
    tolerance = max(SLICE_SPACING_ATOL_MM, SLICE_SPACING_RTOL * mean)
    worst = float(np.max(np.abs(gaps - mean)))
    if worst > tolerance:
        raise InvalidInput(
            f"Slice spacing is uneven: gaps range from {gaps.min():.3f} to {gaps.max():.3f} mm around a "
            f"mean of {mean:.3f} mm (tolerance {tolerance:.3f} mm); missing slices or gaps are refused."
        )
    return mean


def _check_not_sheared(positions: np.ndarray, direction: np.ndarray, pixel_spacing: float) -> None:
    """Refuse stacks whose slices drift in-plane (gantry tilt): the grid would not be orthogonal."""
    if positions.shape[0] < 2:
        return
    in_plane = (positions - positions[0]) @ direction[:2].T
    drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if drift > 0.5 * pixel_spacing:
        raise InvalidInput(
            f"Slice positions drift {drift:.2f} mm in-plane across the stack (gantry tilt or a sheared "
            "acquisition); only orthogonal grids are supported."
        )
