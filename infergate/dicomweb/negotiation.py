"""Choosing the media type and Transfer Syntax of a WADO-RS response (PS3.18 8.7).

The node keeps every instance as it was received, so most answers serve the stored bytes. The
Standard asks two things beyond that:

* when a request names no Transfer Syntax, instances come in the Default Transfer Syntax, Explicit VR
  Little Endian, except that lossy compressed pixel data may be returned as stored (PS3.18 8.7.3.4);
* Implicit VR Little Endian is never used with Web Services (PS3.18 8.7.3), so an instance stored
  that way is re-encoded even when the client accepts any syntax (``transfer-syntax=*``).

The node converts only towards Explicit VR Little Endian (decoding compressed pixel data with
pydicom's decoders); it never compresses. A request that accepts nothing the node can produce gets
:class:`NotAcceptable` (HTTP 406, PS3.18 8.7.8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from pydicom.pixels import get_decoder
from pydicom.uid import UID

from infergate.dicomweb.multipart import MediaType, parse_media_type, split_header_list
from infergate.errors import InfergateError, InvalidInput

__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "AcceptRange",
    "FrameEncoding",
    "NotAcceptable",
    "can_decode",
    "is_native",
    "parse_accept",
    "select_frame_encoding",
    "select_instance_syntax",
    "select_json",
]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
#: Syntaxes whose Pixel Data is native little-endian bytes once the file is read.
_NATIVE = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN})
#: Lossy syntaxes a default request may get as stored (PS3.18 8.7.3.4 note 2).
_LOSSY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy or lossless)
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 (lossy or lossless)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy or lossless)
    }
)
#: Media type of a compressed frame per Transfer Syntax (PS3.18 Table 8.7.3-4).
_FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
#: The Transfer Syntax a media type means when a request gives none (PS3.18 Tables 8.7.3-2 and -4).
_DEFAULT_SYNTAX = {
    "application/dicom": EXPLICIT_VR_LITTLE_ENDIAN,
    "application/octet-stream": EXPLICIT_VR_LITTLE_ENDIAN,
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
}
_OCTET_STREAM = "application/octet-stream"
_DICOM = "application/dicom"


class NotAcceptable(InfergateError):
    """No acceptable media type or Transfer Syntax can be produced (the API answers 406)."""


@dataclass(frozen=True)
class AcceptRange:
    """One media range of an ``Accept`` header with its quality."""

    media: MediaType
    q: float

    def part_type(self, default: str) -> str | None:
        """The media type of the parts this range asks for, ``*/*`` for any, None if it is not multipart.

        ``multipart/related`` without ``type`` means the resource's default part type.
        """
        if self.media.essence in ("*/*", "multipart/*"):
            return "*/*"
        if self.media.essence == "multipart/related":
            return (self.media.param("type") or default).lower()
        return None

    @property
    def transfer_syntax(self) -> str | None:
        return self.media.param("transfer-syntax")


def parse_accept(header: str | None) -> list[AcceptRange]:
    """The ranges of an ``Accept`` header, most preferred first (RFC 7231 5.3.2).

    A missing or empty header accepts anything (``*/*``). Ranges with ``q=0`` are dropped; equal
    qualities keep the client's order.

    Raises
    ------
    InvalidInput
        A range is not a media type, or its ``q`` is not a number between 0 and 1.
    """
    if not header or not header.strip():
        return [AcceptRange(MediaType("*", "*"), 1.0)]
    ranges: list[AcceptRange] = []
    for item in split_header_list(header):
        media = parse_media_type(item)
        try:
            q = float(media.params.get("q", "1"))
        except ValueError:
            raise InvalidInput(f'The Accept range "{item[:100]}" has a malformed q value.') from None
        if not 0.0 <= q <= 1.0:
            raise InvalidInput(f'The Accept range "{item[:100]}" has a q value outside 0-1.')
        if q > 0.0:
            ranges.append(AcceptRange(media, q))
    return sorted(ranges, key=lambda r: -r.q)


@cache
def can_decode(transfer_syntax_uid: str) -> bool:
    """Whether pydicom has an installed decoder for this compressed syntax."""
    try:
        return bool(get_decoder(UID(transfer_syntax_uid)).is_available)
    except (NotImplementedError, ValueError):
        return False


def is_native(transfer_syntax_uid: str) -> bool:
    """Whether Pixel Data of this syntax is native little-endian bytes (not encapsulated)."""
    return transfer_syntax_uid in _NATIVE


def _pattern(media_range: str) -> MediaType:
    kind, _, sub = media_range.partition("/")
    return MediaType(kind, sub)


def _can_produce_instance(stored: str, target: str) -> bool:
    if target == IMPLICIT_VR_LITTLE_ENDIAN:
        return False  # PS3.18 8.7.3: never used with Web Services
    if target == stored:
        return True
    return target == EXPLICIT_VR_LITTLE_ENDIAN and (stored in _NATIVE or can_decode(stored))


def select_instance_syntax(ranges: Sequence[AcceptRange], stored: str) -> str:
    """The Transfer Syntax in which to send an instance stored in ``stored`` (PS3.18 8.7.8.2).

    Only ``multipart/related; type="application/dicom"`` (or a wildcard) is served.

    Raises
    ------
    NotAcceptable
        No range asks for something the node can produce from ``stored``.
    """
    for accept_range in ranges:
        part_type = accept_range.part_type(_DICOM)
        if part_type is None or not _pattern(part_type).matches(_DICOM):
            continue
        requested = accept_range.transfer_syntax
        if requested is None:
            target = stored if stored in _LOSSY else EXPLICIT_VR_LITTLE_ENDIAN
        elif requested == "*":
            target = EXPLICIT_VR_LITTLE_ENDIAN if stored == IMPLICIT_VR_LITTLE_ENDIAN else stored
        else:
            target = requested
        if _can_produce_instance(stored, target):
            return target
    raise NotAcceptable(
        'The node can send this instance as multipart/related; type="application/dicom" with '
        f"transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN} or as stored ({stored}); the Accept header asks for neither."
    )


@dataclass(frozen=True)
class FrameEncoding:
    """How frames (or a Pixel Data value) go out: part media type, its syntax, and whether to decode."""

    media_type: str
    transfer_syntax_uid: str
    decode: bool

    @property
    def content_type(self) -> str:
        """The part's ``Content-Type`` with its ``transfer-syntax`` parameter (PS3.18 8.7.3.3)."""
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax_uid}"


def _frame_candidates(stored: str) -> list[tuple[FrameEncoding, bool]]:
    """(encoding, needs an explicit transfer-syntax parameter), the cheapest first."""
    if stored in _NATIVE:
        return [(FrameEncoding(_OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, decode=False), False)]
    candidates = [
        (FrameEncoding(_FRAME_MEDIA_TYPES.get(stored, _OCTET_STREAM), stored, decode=False), False),
        # the compressed bytes labelled octet-stream, only when asked for by syntax (e.g. "*")
        (FrameEncoding(_OCTET_STREAM, stored, decode=False), True),
    ]
    if can_decode(stored):
        candidates.append((FrameEncoding(_OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, decode=True), False))
    return candidates


def select_frame_encoding(ranges: Sequence[AcceptRange], stored: str) -> FrameEncoding:
    """How to send frames of an instance stored in ``stored`` (PS3.18 8.7.3.3 and 8.7.8).

    ``application/octet-stream`` without a syntax means uncompressed Explicit VR Little Endian
    bytes, decoding compressed frames; an image media type (``image/jls``…) or
    ``transfer-syntax=*`` gets the frames as stored; ``*/*`` gets them as stored in their natural
    media type.

    Raises
    ------
    NotAcceptable
        No range asks for something the node can produce from ``stored``.
    """
    candidates = _frame_candidates(stored)
    for accept_range in ranges:
        part_type = accept_range.part_type(_OCTET_STREAM)
        if part_type is None:
            continue
        pattern = _pattern(part_type)
        requested = accept_range.transfer_syntax
        for encoding, needs_syntax in candidates:
            if not pattern.matches(encoding.media_type):
                continue
            if requested is None:
                wildcard = "*" in part_type
                if needs_syntax or not (
                    encoding.transfer_syntax_uid == _DEFAULT_SYNTAX.get(encoding.media_type) or wildcard
                ):
                    continue
            elif requested != "*" and requested != encoding.transfer_syntax_uid:
                continue
            return encoding
    natural = candidates[0][0]
    raise NotAcceptable(
        f'The node can send these frames as multipart/related; type="{natural.media_type}" with '
        f"transfer-syntax={natural.transfer_syntax_uid}"
        + (" or decoded as application/octet-stream" if len(candidates) > 2 else "")
        + "; the Accept header asks for neither."
    )


def select_json(ranges: Sequence[AcceptRange]) -> str:
    """``application/dicom+json`` (or ``application/json`` if only that is accepted) for metadata.

    Raises
    ------
    NotAcceptable
        The request accepts neither (e.g. only ``application/dicom+xml``, which the node does not produce).
    """
    for accept_range in ranges:
        for media_type in ("application/dicom+json", "application/json"):
            if accept_range.media.matches(media_type):
                return media_type
    raise NotAcceptable("The node sends metadata as application/dicom+json only.")
