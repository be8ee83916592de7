"""Receiving instances over DICOM: the C-STORE handler of the SCP, also used for C-GET retrieves.

The C-STORE handler only stores: it checks the UIDs, writes the Part 10 file, fsyncs it, commits
its row and answers. Inference, routing and network calls happen elsewhere (pynetdicom runs one
thread per association; a slow handler stalls the sender).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import OutOfSpace
from infergate.errors import InvalidInput
from infergate.ingest import IngestOutcome, InstanceHeader, ingest_instance
from infergate.logs import log_context

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

#: Decoding the header stops here: (7FE0,0008) Float Pixel Data, the first of the pixel data elements.
_FIRST_PIXEL_TAG = Tag(0x7FE0, 0x0008)

#: A deflated dataset may inflate to this many bytes, or to this many times its own size if that is
#: more; beyond, it is refused as a decompression bomb. Real deflated datasets compress a few times.
INFLATED_FLOOR_BYTES = 64 * 1024**2
INFLATE_RATIO = 64
#: Deepest nesting of sequences accepted; real objects stay well below.
MAX_SEQUENCE_DEPTH = 32


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, bound as the handler's extra argument."""

    factory: sessionmaker[Session]
    data_root: Path


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def handle_echo(event: Event) -> int:
    """``EVT_C_ECHO``: always Success (PS3.7 9.1.5)."""
    return SUCCESS


def handle_store(
    event: Event, ctx: StoreContext, on_stored: Callable[[InstanceHeader], None] | None = None
) -> int | Dataset:
    """``EVT_C_STORE``: store one instance durably; ``on_stored`` gets the header of what was stored.

    ``on_stored`` lets a caller (the audit count of the SCP) learn the study without decoding the
    dataset again, pixel data included.

    Statuses returned
    -----------------
    0x0000 Success
        The file is fsync'd and its row committed, or the SOP Instance UID was already stored
        (the first copy is kept).
    0xA700 Refused: out of resources
        Storage full or database unavailable; nothing of ours was kept, the sender may retry.
    0xA900 Error: data set does not match SOP class
        The dataset's SOP Class/Instance UID differs from the request's.
    0xC210 Error: cannot understand
        The dataset could not be decoded: not whole data elements to its last byte (cut short,
        a length running past its parent, an unknown VR; see :func:`check_encoding`), a deflate
        stream that is broken or inflates too far; or a UID is missing or malformed.

    Any other exception propagates so that pynetdicom answers 0xC211 and logs it.
    """
    request = event.request
    assert isinstance(request, C_STORE)
    try:
        ds = _read_header(event)
    except InvalidInput as exc:
        log.warning("C-STORE refused: %s", exc)
        return _status(CANNOT_UNDERSTAND, str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding error of hostile input is 0xC210
        log.warning("C-STORE dataset could not be decoded (%s)", type(exc).__name__)
        return _status(CANNOT_UNDERSTAND, "The dataset could not be decoded.")
    try:
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
    except InvalidInput as exc:
        log.warning("C-STORE refused: %s", exc)
        return _status(CANNOT_UNDERSTAND, str(exc))
    except ValueError as exc:
        log.warning("C-STORE refused: %s", exc)
        return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding error of hostile input is 0xC210
        log.warning("C-STORE dataset could not be decoded (%s)", type(exc).__name__)
        return _status(CANNOT_UNDERSTAND, "The dataset could not be decoded.")
    # The lines logged while this instance is stored name its study (hashed; infergate.logs). A
    # context of its own, not a binding of the thread: the handler may run on a thread that outlives
    # the association (C-GET in a worker, tests), whose later lines must not carry this study.
    with log_context(study_uid=header.study_instance_uid):
        return _store(event, ctx, header, on_stored)


def _store(
    event: Event, ctx: StoreContext, header: InstanceHeader, on_stored: Callable[[InstanceHeader], None] | None
) -> int | Dataset:
    """The durable store of a decoded, checked instance, and its status (see :func:`handle_store`)."""
    request = event.request
    assert isinstance(request, C_STORE)
    assoc = event.assoc
    stream = request.DataSet
    assert isinstance(stream, BytesIO)
    # The received bytes are written as they are, behind a file meta of our own: no copy of the
    # dataset is made (a large multi-frame is held in memory once, as pynetdicom received it).
    dataset_bytes = stream.getbuffer()
    try:
        outcome = ingest_instance(
            ctx.factory,
            ctx.data_root,
            header,
            [b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta), dataset_bytes],
            calling_ae=assoc.requestor.ae_title.strip() or None,
            called_ae=assoc.acceptor.ae_title.strip() or None,
        )
    except OutOfSpace:
        log.error("C-STORE refused: storage volume is full")
        return _status(OUT_OF_RESOURCES, "Storage full.")
    except (OperationalError, InterfaceError, SQLAlchemyTimeoutError) as exc:
        # Server down or restarting, connection lost, pool exhausted, SQLite disk full or locked
        # for too long: nothing was acknowledged and the sender may retry later.
        reason = type(getattr(exc, "orig", None) or exc).__name__
        log.error("C-STORE refused: database unavailable (%s)", reason)
        return _status(OUT_OF_RESOURCES, "Database unavailable.")
    finally:
        dataset_bytes.release()
    if outcome is IngestOutcome.duplicate:
        log.info("duplicate SOP Instance UID: first copy kept")
    if on_stored is not None:
        on_stored(header)
    return SUCCESS


def _stop_at_bulk_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= _FIRST_PIXEL_TAG


def _read_header(event: Event) -> Dataset:
    """The received dataset up to its pixel data, decoded without copying the pixel data.

    ``event.dataset`` would decode, and so copy, every value including a multi-frame's pixels;
    the handler needs only the header. The whole dataset's encoding is checked first
    (:func:`check_encoding`); a deflated one is inflated first, within a bound (:func:`inflate_dataset`).
    """
    request = event.request
    stream = request.DataSet  # type: ignore[union-attr]
    assert isinstance(stream, BytesIO)
    syntax = event.context.transfer_syntax
    stream.seek(0)
    if syntax.is_deflated:
        with stream.getbuffer() as deflated:
            inflated = inflate_dataset(deflated)
        check_encoding(inflated, implicit_vr=False, little_endian=True)
        return read_dataset(BytesIO(inflated), False, True, stop_when=_stop_at_bulk_pixels)
    with stream.getbuffer() as received:
        check_encoding(received, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    try:
        return read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_stop_at_bulk_pixels)
    finally:
        stream.seek(0)


def inflate_dataset(deflated: memoryview) -> bytes:
    """A Deflated Explicit VR Little Endian dataset (PS3.5 A.5) inflated, within a bound.

    Raises
    ------
    InvalidInput
        The stream is broken, cut short or followed by more than a NUL pad byte, or it inflates
        beyond ``max(INFLATED_FLOOR_BYTES, INFLATE_RATIO * len(deflated))`` (a decompression bomb:
        nothing beyond the bound is ever inflated).
    """
    limit = max(INFLATED_FLOOR_BYTES, INFLATE_RATIO * len(deflated))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(deflated, limit + 1)
    except zlib.error as exc:
        raise InvalidInput("The deflated dataset is not a valid deflate stream.") from exc
    if len(inflated) > limit:
        raise InvalidInput(f"The deflated dataset inflates beyond {limit} bytes (a decompression bomb).")
    if not inflater.eof or inflater.unused_data not in (b"", b"\x00"):
        raise InvalidInput("The deflated dataset is cut short or followed by other bytes.")
    return inflated


#: VRs whose explicit VR encoding has a 4-byte length (PS3.5 Table 7.1-1); the others have 2 bytes.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VRS = _LONG_VRS | frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
#: Binary VRs whose values pydicom unpacks number by number: a length not a multiple of the size is
#: an error when the element is read (PS3.5 Table 6.2-1).
_NUMBER_SIZES = {b"FL": 4, b"FD": 8, b"SL": 4, b"SS": 2, b"SV": 8, b"UL": 4, b"US": 2, b"UV": 8}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF


def check_encoding(data: bytes | memoryview, *, implicit_vr: bool, little_endian: bool) -> None:
    """Refuse a dataset that is not whole data elements, from its first byte to its last.

    pydicom reads a value cut short without complaint, so a dataset truncated in its pixel data
    (or anywhere after the header) would otherwise be stored, acknowledged and fail only in a
    worker. Checked here (PS3.5 7.1 and 7.5): every value fits inside its parent (the dataset, a
    sequence, an item); sequences and items of undefined length are closed by their delimiters;
    encapsulated pixel data is items of defined length and a sequence delimiter (PS3.5 A.4); a VR
    is one of PS3.5's; tags increase within each dataset, so no element can be given twice; no
    File Meta Information element (group 0002) hides in the dataset; sequences nest at most
    ``MAX_SEQUENCE_DEPTH`` deep. Values are skipped, never copied.

    Raises
    ------
    InvalidInput
        Naming the first defect found.
    """
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    _Walker(view, "<" if little_endian else ">").dataset(0, len(view), implicit_vr, delimited=False, depth=0)


class _Walker:
    """The element structure of one encoded dataset (see :func:`check_encoding`)."""

    def __init__(self, view: memoryview, order: str) -> None:
        self.view = view
        self.tag_and_long = struct.Struct(order + "HHL")  # implicit VR element, item, delimiter
        self.explicit = struct.Struct(order + "HH2sH")
        self.long = struct.Struct(order + "L")

    def dataset(self, pos: int, end: int, implicit: bool, *, delimited: bool, depth: int) -> int:
        """Walk elements from ``pos`` to exactly ``end``, or (``delimited``) to an item delimiter
        before ``end``; return the position after them."""
        previous = -1
        while not (pos == end and not delimited):
            if end - pos < 8:
                raise InvalidInput("The dataset is cut short inside an element header.")
            group, element, length = self.tag_and_long.unpack_from(self.view, pos)
            tag = group << 16 | element
            if tag == _ITEM_END and delimited and length == 0:
                return pos + 8
            if group == 0xFFFE:
                raise InvalidInput(f"An item tag ({tag:08X}) is out of place in the dataset.")
            if tag <= previous:
                raise InvalidInput(f"Element ({group:04X},{element:04X}) is out of ascending tag order.")
            if group == 0x0002:
                raise InvalidInput("The dataset holds a File Meta Information element (group 0002).")
            previous = tag
            vr: bytes | None = None
            if implicit:
                pos += 8
            else:
                _, _, vr, length = self.explicit.unpack_from(self.view, pos)
                if vr not in _VRS:
                    raise InvalidInput(f"Element ({group:04X},{element:04X}) has an unknown VR.")
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise InvalidInput("The dataset is cut short inside an element header.")
                    (length,) = self.long.unpack_from(self.view, pos + 8)
                    pos += 12
                else:
                    pos += 8
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and vr in (None, b"OB", b"OW"):
                    pos = self.items(pos, end, implicit, delimited=True, depth=depth, fragments=True)
                elif vr in (None, b"SQ", b"UN"):
                    # PS3.5 6.2.2: a UN of undefined length is a sequence in Implicit VR Little Endian.
                    inner = implicit or vr == b"UN"
                    pos = self.items(pos, end, inner, delimited=True, depth=depth + 1, fragments=False)
                else:
                    raise InvalidInput(f"Element ({group:04X},{element:04X}) has an undefined length.")
                continue
            if length > end - pos:
                raise InvalidInput(f"The value of ({group:04X},{element:04X}) runs past the end of its dataset.")
            vr = vr or _dictionary_vr(tag)
            if vr == b"SQ":
                self.items(pos, pos + length, implicit, delimited=False, depth=depth + 1, fragments=False)
            elif vr is not None and length % _NUMBER_SIZES.get(vr, 1):
                raise InvalidInput(f"The value of ({group:04X},{element:04X}) has a length its VR does not allow.")
            pos += length
        return pos

    def items(self, pos: int, end: int, implicit: bool, *, delimited: bool, depth: int, fragments: bool) -> int:
        """Walk the items of a sequence (or pixel data fragments) like :meth:`dataset`."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise InvalidInput(f"Sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels.")
        while not (pos == end and not delimited):
            if end - pos < 8:
                raise InvalidInput("The dataset is cut short inside a sequence.")
            group, element, length = self.tag_and_long.unpack_from(self.view, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END and delimited and length == 0:
                return pos + 8
            if tag != _ITEM:
                raise InvalidInput(f"A sequence holds ({group:04X},{element:04X}) where an item should be.")
            pos += 8
            if length == _UNDEFINED and not fragments:
                pos = self.dataset(pos, end, implicit, delimited=True, depth=depth)
                continue
            if length > end - pos:
                raise InvalidInput("An item runs past the end of its sequence.")
            if not fragments:
                self.dataset(pos, pos + length, implicit, delimited=False, depth=depth)
            pos += length
        return pos


def _dictionary_vr(tag: int) -> bytes | None:
    """Implicit VR: the data dictionary's VR of ``tag``, where it has one; one size of a choice such
    as "US or SS"; None for private and unknown tags (read as UN) and for "OB or OW"."""
    try:
        choices = {vr.strip().encode() for vr in dictionary_VR(tag).split(" or ")}
    except KeyError:
        return None
    if len(choices) == 1:
        return choices.pop()
    sizes = {_NUMBER_SIZES.get(vr) for vr in choices}
    return next(vr for vr in choices if vr in _NUMBER_SIZES) if len(sizes) == 1 and None not in sizes else None
