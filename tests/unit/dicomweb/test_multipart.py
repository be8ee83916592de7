"""multipart/related parsing and building (infergate.dicomweb.multipart): RFC 2046 edge cases."""

from __future__ import annotations

import mmap
import tempfile

import pytest

from infergate.dicomweb.multipart import (
    MediaType,
    TooManyParts,
    build_multipart,
    iter_multipart,
    multipart_content_type,
    new_boundary,
    parse_media_type,
    parse_multipart,
    split_header_list,
    split_parts,
)
from infergate.errors import InvalidInput

CT = 'multipart/related; type="application/dicom"; boundary=XyZ'


def test_media_type_parameters() -> None:
    media = parse_media_type('Multipart/Related; Type="application/dicom"; boundary="a b;c"; transfer-syntax=*')
    assert media.essence == "multipart/related"
    assert media.param("type") == "application/dicom"
    assert media.param("BOUNDARY") == "a b;c", "a quoted value keeps its semicolon and space"
    assert media.param("transfer-syntax") == "*"


def test_media_type_tolerates_unquoted_slash_and_escapes() -> None:
    assert parse_media_type("multipart/related; type=application/dicom").param("type") == "application/dicom"
    assert parse_media_type(r'a/b; x="q\"uote"').param("x") == 'q"uote'
    assert parse_media_type("a/b;").params == {}


@pytest.mark.parametrize(
    "text",
    ["multipart", "/related", "multi part/related", "a/b; noequals", 'a/b; x="unterminated', 'a/b; x="v" junk'],
)
def test_malformed_media_types(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_media_type(text)


def test_media_range_matching() -> None:
    assert MediaType("*", "*").matches("image/jls")
    assert MediaType("image", "*").matches("image/jls")
    assert not MediaType("image", "*").matches("application/octet-stream")
    assert MediaType("application", "dicom").matches("Application/DICOM")


def test_split_header_list_respects_quotes() -> None:
    assert split_header_list('a/b; x="1,2", c/d ,, e/f') == ['a/b; x="1,2"', "c/d", "e/f"]


def test_round_trip() -> None:
    parts = [("application/dicom", b"first\r\n--not-the-boundary"), ("application/dicom", b""), ("image/jls", b"\x00")]
    body, boundary = build_multipart(parts)
    decoded = parse_multipart(body, multipart_content_type("application/dicom", boundary))
    assert [(m.essence, content) for m, content in decoded] == [(ct, c) for ct, c in parts]
    assert body.endswith(f"--{boundary}--\r\n".encode())


def test_streamed_body_equals_built_body() -> None:
    parts = [("application/octet-stream", b"a"), ("application/octet-stream", b"b")]
    assert b"".join(iter_multipart(iter(parts), "B")) == build_multipart(parts, "B")[0]


def test_fresh_boundaries() -> None:
    assert new_boundary() != new_boundary()


def test_preamble_epilogue_and_default_type() -> None:
    body = (
        b"this is a preamble\r\n--XyZ\r\n\r\nno headers\r\n"
        b"--XyZ  \t\r\nContent-Type: application/dicom+json\r\n\r\n{}\r\n--XyZ--\r\nepilogue"
    )
    first, second = parse_multipart(body, CT)
    assert first[1] == b"no headers"
    assert first[0].essence == "application/dicom", "a part without Content-Type has the body's type"
    assert second[0].essence == "application/dicom+json" and second[1] == b"{}"


def test_header_folding_and_case() -> None:
    body = b"--XyZ\r\ncontent-TYPE: application/dicom;\r\n transfer-syntax=1.2\r\n\r\nx\r\n--XyZ--"
    ((media, content),) = parse_multipart(body, CT)
    assert media.param("transfer-syntax") == "1.2" and content == b"x"


def test_empty_part_sharing_crlf_with_delimiter() -> None:
    body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n--XyZ--"
    assert [c for _, c in parse_multipart(body, CT)] == [b""]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "no delimiter"),
        (b"--Other\r\n\r\nx\r\n--Other--", "no delimiter"),
        (b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nx", "without a closing delimiter"),
        (b"--XyZ\r\nContent-Type: application/dicom\r\nx", "no blank line"),
        (b"--XyZextra\r\n\r\nx\r\n--XyZ--", "followed by text"),
        (b"--XyZ\r\nno colon here\r\n\r\nx\r\n--XyZ--", "malformed header line"),
        (b"--XyZ", "ends inside a delimiter line"),
    ],
)
def test_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_multipart(body, CT)


def test_content_type_must_be_multipart_with_boundary() -> None:
    with pytest.raises(InvalidInput, match="multipart/related"):
        parse_multipart(b"", "application/dicom")
    with pytest.raises(InvalidInput, match="boundary"):
        parse_multipart(b"", 'multipart/related; type="application/dicom"')


@pytest.mark.parametrize("boundary", ["", "x" * 71, "ends with space ", "bad\nchar"])
def test_bad_boundaries(boundary: str) -> None:
    with pytest.raises(InvalidInput, match="boundary"):
        split_parts(b"--x\r\n\r\n\r\n--x--", boundary)


def test_too_many_parts_is_refused_before_the_rest() -> None:
    body, boundary = build_multipart([("application/dicom", b"x")] * 3)
    assert len(split_parts(body, boundary, max_parts=3)) == 3
    with pytest.raises(TooManyParts, match="more than 2 parts"):
        split_parts(body, boundary, max_parts=2)


def test_oversized_part_headers() -> None:
    body = b"--XyZ\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\nx\r\n--XyZ--"
    with pytest.raises(InvalidInput, match="no blank line"):
        parse_multipart(body, CT)


def test_split_parts_over_an_mmap_copies_nothing_until_asked() -> None:
    content = bytes(range(256)) * 1000
    body, boundary = build_multipart([("application/dicom", content), ("application/dicom", b"tail")])
    with tempfile.TemporaryFile() as spool:
        spool.write(body)
        spool.flush()
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            first, second = split_parts(buffer, boundary)
            assert first.size == len(content) and first.headers == {"content-type": "application/dicom"}
            assert buffer[first.start : first.end] == content
            assert buffer[second.start : second.end] == b"tail"


def test_content_type_with_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        build_multipart([("application/dicom\r\nX-Evil: 1", b"")])
