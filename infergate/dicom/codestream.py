"""Image sizes that compressed pixel data declares, read from the codestream without decoding it.

A decoder allocates what its codestream declares, whatever the DICOM header says; reading the
declaration first lets :mod:`infergate.dicom.volume` refuse a "pixel bomb" (a small codestream
declaring 65535 x 65535) before anything is allocated.
"""

from __future__ import annotations

import struct

__all__ = ["j2k_image_size", "jpeg_frame_size"]


#: SOFn markers of ISO/IEC 10918-1 (not DHT C4, JPG C8, DAC CC) and SOF55 of JPEG-LS (14495-1).
_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def jpeg_frame_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the frame header (SOFn/SOF55) of a JPEG or JPEG-LS
    codestream; None when there is none before the first scan or the data ends first."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 10 > len(frame):
                return None
            height, width = struct.unpack_from(">HH", frame, pos + 5)
            return height, width, frame[pos + 9]
        if marker == 0xDA or length < 2:  # a scan before any frame header
            return None
        pos += 2 + length
    return None


def j2k_image_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ marker segment of a JPEG 2000 codestream (ISO/IEC
    15444-1 A.5.1), in a JP2 file or bare; None when there is none."""
    pos = 0
    if frame[4:8] == b"jP  ":  # a JP2 file: find the contiguous codestream box
        while pos + 8 <= len(frame):
            length, kind = struct.unpack_from(">I4s", frame, pos)
            if kind == b"jp2c":
                pos += 8
                break
            if length < 8:
                return None
            pos += length
        else:
            return None
    if frame[pos : pos + 4] != b"\xff\x4f\xff\x51" or pos + 42 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, pos + 8)
    (components,) = struct.unpack_from(">H", frame, pos + 40)
    return ysiz - yosiz, xsiz - xosiz, components
