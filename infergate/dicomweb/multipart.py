"""Media types and ``multipart/related`` bodies (RFC 2387 over RFC 2046), as DICOMweb uses them.

STOW-RS requests carry one Part 10 file per part (PS3.18 10.5.1); WADO-RS answers with one instance,
frame or bulk data value per part (PS3.18 8.6.1.2). Parsing works on any buffer with ``find`` and
slicing, so a request body spooled to disk can be parsed through an ``mmap`` without reading it into
memory: :func:`split_parts` returns offsets, and the caller copies one part at a time.

Every malformed input raises :class:`~infergate.errors.InvalidInput` with a message that says what is
wrong, so the API can answer 400 without guessing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from infergate.errors import InvalidInput

__all__ = [
    "MediaType",
    "Part",
    "TooManyParts",
    "build_multipart",
    "iter_multipart",
    "multipart_content_type",
    "new_boundary",
    "parse_media_type",
    "parse_multipart",
    "split_header_list",
    "split_parts",
]

#: Most bytes of header fields one part may carry; real parts carry one or two short fields.
MAX_PART_HEADER_BYTES = 16 * 1024
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: RFC 2046 5.1.1 ``bchars``: a boundary is 1-70 of these and does not end with a space.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_CRLF = b"\r\n"


class TooManyParts(InvalidInput):
    """A multipart body has more parts than the caller allows (the API answers 413)."""


class Buffer(Protocol):
    """What the parser needs of a body: ``bytes``, ``bytearray`` and ``mmap.mmap`` all qualify."""

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...

    def __getitem__(self, index: slice) -> bytes: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class MediaType:
    """A parsed media type: lower-case ``type/subtype`` and its parameters.

    Parameter names are lower-cased (they are case-insensitive, RFC 7231 3.1.1.1); values keep
    their case with quotes and escapes removed.
    """

    type: str
    subtype: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def essence(self) -> str:
        """``type/subtype`` without parameters."""
        return f"{self.type}/{self.subtype}"

    def param(self, name: str) -> str | None:
        return self.params.get(name.lower())

    def matches(self, media_type: str) -> bool:
        """Whether this media range (``*/*``, ``image/*`` or exact) covers ``media_type``."""
        kind, _, sub = media_type.lower().partition("/")
        if self.type == "*":
            return True
        return self.type == kind and self.subtype in ("*", sub)


def split_header_list(text: str) -> list[str]:
    """Split a comma-separated header value (``Accept``) on commas outside quoted strings."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _parameter_value(text: str, start: int) -> tuple[str, int]:
    """Read a token or quoted-string at ``start``; return the value and the index after it."""
    if start < len(text) and text[start] == '"':
        out: list[str] = []
        index = start + 1
        while index < len(text):
            char = text[index]
            if char == "\\" and index + 1 < len(text):
                out.append(text[index + 1])
                index += 2
                continue
            if char == '"':
                return "".join(out), index + 1
            out.append(char)
            index += 1
        raise InvalidInput(f'Media type "{text}" has an unterminated quoted parameter value.')
    end = text.find(";", start)
    end = len(text) if end < 0 else end
    # Tolerant when reading: clients send type=application/dicom unquoted although "/" is no token char.
    return text[start:end].strip(), end


def parse_media_type(text: str) -> MediaType:
    """Parse ``type/subtype *(; name=value)`` (RFC 7231 3.1.1.1).

    Raises
    ------
    InvalidInput
        The text is not a media type, or a parameter is malformed.
    """
    if not isinstance(text, str):
        raise TypeError('Argument "text" should be a string.')
    essence, _, rest = text.partition(";")
    kind, slash, sub = essence.strip().partition("/")
    if not slash or not _TOKEN.match(kind) or not _TOKEN.match(sub):
        raise InvalidInput(f'"{text.strip()[:100]}" is not a media type (type/subtype).')
    params: dict[str, str] = {}
    index = len(essence) + 1
    while index < len(text):
        end_name = text.find("=", index)
        semicolon = text.find(";", index)
        if end_name < 0 or (0 <= semicolon < end_name):
            name = text[index : semicolon if semicolon >= 0 else len(text)].strip()
            if name:
                raise InvalidInput(f'Media type "{text.strip()[:100]}" has a parameter without a value: "{name}".')
            index = (semicolon if semicolon >= 0 else len(text)) + 1
            continue
        name = text[index:end_name].strip().lower()
        if not _TOKEN.match(name):
            raise InvalidInput(f'Media type "{text.strip()[:100]}" has a malformed parameter name "{name}".')
        start = end_name + 1
        while start < len(text) and text[start] in " \t":
            start += 1
        value, index = _parameter_value(text, start)
        params[name] = value
        trailing = text.find(";", index)
        if text[index : trailing if trailing >= 0 else len(text)].strip():
            raise InvalidInput(f'Media type "{text.strip()[:100]}" has text after the value of "{name}".')
        index = (trailing if trailing >= 0 else len(text)) + 1
    return MediaType(kind.lower(), sub.lower(), params)


def _check_boundary(boundary: str) -> bytes:
    if not _BOUNDARY.match(boundary):
        raise InvalidInput("The multipart boundary should be 1-70 characters of the RFC 2046 set.")
    return boundary.encode("ascii")


@dataclass(frozen=True)
class Part:
    """One part of a body: its header fields and where its content lies in the buffer."""

    headers: Mapping[str, str]
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def content_type(self, default: str) -> MediaType:
        """The part's ``Content-Type``, or ``default`` (the body's ``type`` parameter) when it has none."""
        return parse_media_type(self.headers.get("content-type") or default)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for raw_line in block.split(_CRLF):
        line = raw_line.decode("latin-1")
        if not line:
            continue
        if line[0] in " \t" and last is not None:  # obsolete folding (RFC 5322 2.2.3)
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name.strip()):
            raise InvalidInput(f'A multipart part has a malformed header line "{line[:100]}".')
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


def split_parts(buffer: Buffer, boundary: str, *, max_parts: int | None = None) -> list[Part]:
    """Find the parts of a multipart body (RFC 2046 5.1.1) without copying their content.

    A preamble before the first delimiter and an epilogue after the closing one are ignored.

    Parameters
    ----------
    buffer
        The whole body (``bytes`` or an ``mmap`` of a spooled body).
    boundary
        The ``boundary`` parameter of the body's ``Content-Type``.
    max_parts
        Refuse bodies with more parts than this, before looking at the rest.

    Raises
    ------
    TooManyParts
        More than ``max_parts`` parts.
    InvalidInput
        No opening delimiter, a part without the blank line that ends its header fields, a
        malformed header line, text after a delimiter, or a body that ends before the closing
        delimiter (a truncated upload).
    """
    dash = b"--" + _check_boundary(boundary)
    delimiter = _CRLF + dash
    if buffer[: len(dash)] == dash:
        position = len(dash)
    else:
        found = buffer.find(delimiter)
        if found < 0:
            raise InvalidInput("The multipart body has no delimiter with the declared boundary.")
        position = found + len(delimiter)
    parts: list[Part] = []
    size = len(buffer)
    while True:
        if buffer[position : position + 2] == b"--":
            return parts
        line_end = buffer.find(_CRLF, position, min(size, position + 1024))
        if line_end < 0:
            raise InvalidInput("The multipart body ends inside a delimiter line (truncated upload?).")
        if buffer[position:line_end].strip(b" \t"):
            raise InvalidInput("A multipart delimiter line is followed by text (is the boundary right?).")
        header_start = line_end + 2
        if buffer[header_start : header_start + 2] == _CRLF:
            headers: dict[str, str] = {}
            content_start = header_start + 2
        else:
            header_end = buffer.find(_CRLF + _CRLF, header_start, min(size, header_start + MAX_PART_HEADER_BYTES))
            if header_end < 0:
                raise InvalidInput(
                    "A multipart part has no blank line after its header fields "
                    f"within {MAX_PART_HEADER_BYTES} bytes (truncated upload or a missing CRLF CRLF)."
                )
            headers = _parse_headers(buffer[header_start:header_end])
            content_start = header_end + 4
        # Searching from two bytes earlier also accepts an empty part whose header-ending CRLF
        # doubles as the delimiter's CRLF, as some clients write it.
        next_delimiter = buffer.find(delimiter, content_start - 2)
        if next_delimiter < 0:
            raise InvalidInput("The multipart body ends without a closing delimiter (truncated upload?).")
        parts.append(Part(headers, content_start, max(next_delimiter, content_start)))
        if max_parts is not None and len(parts) > max_parts:
            raise TooManyParts(f"The request has more than {max_parts} parts; send the instances in smaller batches.")
        position = next_delimiter + len(delimiter)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[MediaType, bytes]]:
    """Parse an in-memory ``multipart/related`` body into (content type, content) pairs.

    The content type of a part without a ``Content-Type`` field is the body's ``type`` parameter
    (RFC 2387 3.1), or ``application/octet-stream`` when there is none (RFC 2046 5.1).

    Raises
    ------
    InvalidInput
        ``content_type`` is not ``multipart/related`` with a boundary, or the body is malformed.
    """
    media = parse_media_type(content_type)
    if media.essence != "multipart/related":
        raise InvalidInput(f'Expected a multipart/related body, not "{media.essence}".')
    boundary = media.param("boundary")
    if not boundary:
        raise InvalidInput("The multipart/related Content-Type has no boundary parameter.")
    default = media.param("type") or "application/octet-stream"
    return [(part.content_type(default), body[part.start : part.end]) for part in split_parts(body, boundary)]


def new_boundary() -> str:
    """A fresh boundary per response: random, so that no part's content can contain it by chance."""
    return f"infergate-{uuid.uuid4().hex}"


def multipart_content_type(part_type: str, boundary: str) -> str:
    """``multipart/related; type="…"; boundary=…`` for a body whose root part is ``part_type``."""
    _check_boundary(boundary)
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def iter_multipart(parts: Iterable[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """Encode (content type, content) pairs as a multipart body, lazily, part by part.

    ``parts`` may be a generator that reads or transcodes each instance only when its turn comes,
    so a study is streamed with one instance in memory at a time.
    """
    dash = b"--" + _check_boundary(boundary)
    for content_type, content in parts:
        if "\r" in content_type or "\n" in content_type:
            raise ValueError('Argument "parts" has a content type with a line break.')
        yield dash + b"\r\nContent-Type: " + content_type.encode("ascii") + b"\r\n\r\n"
        yield content
        yield _CRLF
    yield dash + b"--\r\n"


def build_multipart(parts: Iterable[tuple[str, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    """Encode a whole multipart body in memory; returns the body and the boundary used."""
    boundary = boundary or new_boundary()
    return b"".join(iter_multipart(parts, boundary)), boundary
