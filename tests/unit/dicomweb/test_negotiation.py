"""Accept negotiation of WADO-RS responses (infergate.dicomweb.negotiation, PS3.18 8.7)."""

from __future__ import annotations

import pytest

from infergate.dicomweb.negotiation import (
    EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT,
)
from infergate.dicomweb.negotiation import (
    IMPLICIT_VR_LITTLE_ENDIAN as IMPLICIT,
)
from infergate.dicomweb.negotiation import (
    FrameEncoding,
    NotAcceptable,
    parse_accept,
    select_frame_encoding,
    select_instance_syntax,
    select_json,
)
from infergate.errors import InvalidInput

RLE = "1.2.840.10008.1.2.5"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DICOM = 'multipart/related; type="application/dicom"'
OCTETS = 'multipart/related; type="application/octet-stream"'


def test_accept_order_and_quality() -> None:
    ranges = parse_accept("a/b;q=0.5, c/d, e/f;q=0, g/h;q=0.5")
    assert [r.media.essence for r in ranges] == ["c/d", "a/b", "g/h"]
    assert [r.media.essence for r in parse_accept(None)] == ["*/*"]
    assert [r.media.essence for r in parse_accept("  ")] == ["*/*"]


@pytest.mark.parametrize("header", ["a/b;q=x", "a/b;q=2", "nonsense"])
def test_malformed_accept(header: str) -> None:
    with pytest.raises(InvalidInput):
        parse_accept(header)


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        (DICOM, EXPLICIT, EXPLICIT),
        (DICOM, RLE, EXPLICIT),  # default syntax: decode (PS3.18 8.7.3.4)
        (DICOM, JPEG_BASELINE, JPEG_BASELINE),  # lossy may stay as stored
        (DICOM, IMPLICIT, EXPLICIT),  # Implicit VR is never used with Web Services
        (DICOM + "; transfer-syntax=*", RLE, RLE),
        (DICOM + "; transfer-syntax=*", IMPLICIT, EXPLICIT),
        (DICOM + f"; transfer-syntax={RLE}", RLE, RLE),
        (DICOM + f"; transfer-syntax={EXPLICIT}", JPEG_LS, EXPLICIT),
        (f"{DICOM}; transfer-syntax={JPEG_LS}, {DICOM}; transfer-syntax=*; q=0.5", RLE, RLE),
        ("*/*", RLE, EXPLICIT),
        ("multipart/related", EXPLICIT, EXPLICIT),
        ('multipart/related; type="application/*"', EXPLICIT, EXPLICIT),
    ],
)
def test_instance_syntax(accept: str, stored: str, expected: str) -> None:
    assert select_instance_syntax(parse_accept(accept), stored) == expected


@pytest.mark.parametrize(
    "accept",
    [
        DICOM + f"; transfer-syntax={JPEG_LS}",  # the node never compresses
        DICOM + f"; transfer-syntax={IMPLICIT}",
        "application/dicom",  # single-part: not offered
        'multipart/related; type="application/dicom+json"',
    ],
)
def test_instance_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable, match="application/dicom"):
        select_instance_syntax(parse_accept(accept), RLE)


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        (OCTETS, EXPLICIT, FrameEncoding("application/octet-stream", EXPLICIT, decode=False)),
        (OCTETS, IMPLICIT, FrameEncoding("application/octet-stream", EXPLICIT, decode=False)),
        (OCTETS, RLE, FrameEncoding("application/octet-stream", EXPLICIT, decode=True)),
        (OCTETS + f"; transfer-syntax={EXPLICIT}", RLE, FrameEncoding("application/octet-stream", EXPLICIT, True)),
        (OCTETS + "; transfer-syntax=*", RLE, FrameEncoding("application/octet-stream", RLE, decode=False)),
        ('multipart/related; type="image/dicom-rle"', RLE, FrameEncoding("image/dicom-rle", RLE, decode=False)),
        ('multipart/related; type="image/jls"', JPEG_LS, FrameEncoding("image/jls", JPEG_LS, decode=False)),
        ('multipart/related; type="*/*"', RLE, FrameEncoding("image/dicom-rle", RLE, decode=False)),
        ("*/*", EXPLICIT, FrameEncoding("application/octet-stream", EXPLICIT, decode=False)),
        (
            f'multipart/related; type="image/jls", {OCTETS}',
            RLE,
            FrameEncoding("application/octet-stream", EXPLICIT, True),
        ),
    ],
)
def test_frame_encoding(accept: str, stored: str, expected: FrameEncoding) -> None:
    assert select_frame_encoding(parse_accept(accept), stored) == expected


def test_frame_content_type_names_the_syntax() -> None:
    assert FrameEncoding("image/jls", JPEG_LS, False).content_type == f"image/jls; transfer-syntax={JPEG_LS}"


@pytest.mark.parametrize(
    ("accept", "stored"),
    [
        ('multipart/related; type="image/jls"', RLE),
        (OCTETS + f"; transfer-syntax={JPEG_LS}", RLE),
        ('multipart/related; type="image/jpeg"', EXPLICIT),
        ("application/octet-stream", EXPLICIT),  # single-part
    ],
)
def test_frames_not_acceptable(accept: str, stored: str) -> None:
    with pytest.raises(NotAcceptable):
        select_frame_encoding(parse_accept(accept), stored)


def test_json() -> None:
    assert select_json(parse_accept(None)) == "application/dicom+json"
    assert select_json(parse_accept("application/json")) == "application/json"
    assert select_json(parse_accept("application/dicom+json, application/json")) == "application/dicom+json"
    with pytest.raises(NotAcceptable, match="dicom\\+json"):
        select_json(parse_accept('multipart/related; type="application/dicom+xml"'))
