"""Frames of a stored instance for WADO-RS (PS3.18 10.4.1.1.4 "Frames").

Uncompressed Pixel Data is cut into frames by size; single-bit Pixel Data (binary SEG) whose frames
do not end on a byte boundary is cut by bit and each frame re-packed from bit 0 (PS3.5 8.1.1).
Encapsulated Pixel Data gives each frame's fragments as stored (PS3.5 A.4), or the decoded frame in
native little-endian bytes when the client asked for ``application/octet-stream``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

from infergate.dicomweb.negotiation import FrameEncoding, is_native
from infergate.errors import InvalidInput, NotFound

__all__ = ["MAX_FRAMES_PER_REQUEST", "number_of_frames", "parse_frame_list", "pixel_data_parts", "read_frames"]

#: Most frame numbers one request may list; a long list is refused, not served slowly.
MAX_FRAMES_PER_REQUEST = 10_000
_FRAME_LIST = re.compile(r"\A[1-9][0-9]{0,8}(?:,[1-9][0-9]{0,8})*\Z")


def parse_frame_list(text: str) -> list[int]:
    """Parse the ``{frames}`` path segment: 1-based frame numbers separated by commas.

    Raises
    ------
    InvalidInput
        Not a comma-separated list of positive integers, or more than :data:`MAX_FRAMES_PER_REQUEST`.
    """
    compact = text.replace(" ", "").replace("%2C", ",").replace("%2c", ",")
    if not _FRAME_LIST.match(compact):
        raise InvalidInput('Argument "frame_list" should be 1-based frame numbers separated by commas, e.g. "1,3".')
    numbers = [int(part) for part in compact.split(",")]
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise InvalidInput(f'Argument "frame_list" lists more than {MAX_FRAMES_PER_REQUEST} frames.')
    return numbers


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, or 1 when absent or empty (single-frame IODs do not have it)."""
    value = ds.get("NumberOfFrames")
    try:
        count = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        count = 1
    return max(count, 1)


def _check(ds: Dataset, numbers: Sequence[int]) -> int:
    if "PixelData" not in ds:
        raise NotFound("The instance has no Pixel Data, so it has no frames.")
    count = number_of_frames(ds)
    missing = [n for n in numbers if not 1 <= n <= count]
    if missing:
        raise NotFound(f"Frame {missing[0]} does not exist; the instance has {count} frame(s).")
    return count


def _native_frames(ds: Dataset, numbers: Sequence[int], count: int) -> list[bytes]:
    data: bytes = ds.PixelData
    frame_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated)
    if len(data) * 8 < frame_bits * count:
        raise ValueError(f"The stored Pixel Data holds fewer bytes than {count} frame(s) need.")
    if frame_bits % 8 == 0:
        size = frame_bits // 8
        return [data[(n - 1) * size : n * size] for n in numbers]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return [np.packbits(bits[(n - 1) * frame_bits : n * frame_bits], bitorder="little").tobytes() for n in numbers]


def _decoded_frame(ds: Dataset, number: int) -> bytes:
    """One frame decoded to native little-endian bytes, colour components interleaved (PS3.5 8.2)."""
    array = pixel_array(ds, index=number - 1, raw=True)
    if int(ds.BitsAllocated) == 1:
        return np.packbits(array.astype(bool).ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _encapsulated_frames(ds: Dataset, numbers: Sequence[int], count: int) -> list[bytes]:
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    wanted = set(numbers)
    found: dict[int, bytes] = {}
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=extended)):
        if index + 1 in wanted:
            found[index + 1] = frame
            if len(found) == len(wanted):
                break
    return [found[n] for n in numbers]


def read_frames(ds: Dataset, numbers: Sequence[int], encoding: FrameEncoding, stored: str) -> list[bytes]:
    """The frames ``numbers`` (1-based, in the order asked) of ``ds`` in ``encoding``.

    Parameters
    ----------
    ds
        The stored instance, read with pydicom.
    numbers
        Frame numbers from :func:`parse_frame_list`; repeats are served repeatedly.
    encoding
        From :func:`~infergate.dicomweb.negotiation.select_frame_encoding`.
    stored
        The instance's stored Transfer Syntax UID.

    Raises
    ------
    NotFound
        The instance has no Pixel Data, or a frame number exceeds NumberOfFrames.
    """
    count = _check(ds, numbers)
    if is_native(stored):
        return _native_frames(ds, numbers, count)
    if encoding.decode:
        return [_decoded_frame(ds, n) for n in numbers]
    return _encapsulated_frames(ds, numbers, count)


def pixel_data_parts(ds: Dataset, encoding: FrameEncoding, stored: str) -> list[bytes]:
    """The Pixel Data value as bulk data: one part of native bytes, or one part per compressed frame.

    Native (or decoded) Pixel Data is the value itself, all frames end to end (PS3.5 8.1.1);
    encapsulated Pixel Data has no single value that means anything outside DICOM, so each
    frame is its own part, as the frames resource sends them.
    """
    if "PixelData" not in ds:
        raise NotFound("The instance has no Pixel Data.")
    if is_native(stored):
        return [bytes(ds.PixelData)]
    frames = read_frames(ds, list(range(1, number_of_frames(ds) + 1)), encoding, stored)
    if encoding.decode:
        return [b"".join(frames)]
    return frames
