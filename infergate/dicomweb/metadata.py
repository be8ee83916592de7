"""DICOM JSON metadata of a stored instance (PS3.18 F.2), with bulk data left on disk.

Pixel Data of any size, and any other OB/OD/OF/OL/OV/OW/UN value above the threshold, are
replaced by a ``BulkDataURI`` (PS3.18 F.2.7) that points at this node's bulkdata resource, so a
viewer gets the header of a 500-slice series without the pixels. Top-level bulk values are never
read from disk: the file is read with ``defer_size`` and those elements are described from their
tag and length. Nested values (rare: icon images, private blobs) are handled by pydicom's
bulk data handler.

A bulk data URI ends in a path of tags and item indices: ``…/bulkdata/7FE00010`` for Pixel Data,
``…/bulkdata/00880200/0/7FE00010`` for the Pixel Data of the first Icon Image Sequence item.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from infergate.errors import InvalidInput, NotFound

__all__ = ["BULK_VRS", "PIXEL_DATA_TAG", "bulkdata_value", "instance_metadata", "parse_bulkdata_path"]

#: Binary VRs whose values may go out as bulk data (PS3.18 F.2.7).
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA_TAG = 0x7FE00010
#: Pixel Data, Float and Double Float Pixel Data: bulk data at any size, so a client always finds
#: the pixels in the same place (the frames and bulkdata resources), never inline.
ALWAYS_BULK = frozenset({PIXEL_DATA_TAG, 0x7FE00008, 0x7FE00009})
AVAILABLE_TRANSFER_SYNTAX_UID = "00083002"
#: Base64 size above which a value becomes bulk data, as pydicom's ``bulk_data_threshold``.
DEFAULT_THRESHOLD = 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEGMENT = re.compile(r"\A(?:[0-9A-Fa-f]{8})(?:/(?:0|[1-9][0-9]{0,5})/[0-9A-Fa-f]{8}){0,8}\Z")


def _raw_vr(ds: Dataset, raw: RawDataElement) -> str:
    """The VR of an unread element: explicit in the file, or from the data dictionary."""
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            vr = "UN"
    if " or " in vr:  # e.g. "OB or OW" in Implicit VR: PS3.5 A.1 and 8.2
        if raw.tag == PIXEL_DATA_TAG:
            vr = "OB" if raw.length == _UNDEFINED_LENGTH or int(ds.get("BitsAllocated", 16)) <= 8 else "OW"
        else:
            vr = "OW" if "OW" in vr else vr.split(" or ")[0]
    return str(vr)


def _top_level_bulk(ds: Dataset, limit: int) -> dict[int, str]:
    """Top-level bulk elements (tag -> VR), found without reading their values."""
    bulk: dict[int, str] = {}
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement):
            vr, length = _raw_vr(ds, elem), elem.length
        elif isinstance(elem, DataElement) and isinstance(elem.value, bytes | bytearray):
            vr, length = str(elem.VR), len(elem.value)
        else:
            continue
        if vr in BULK_VRS and (length > limit or int(tag) in ALWAYS_BULK):
            bulk[int(tag)] = vr
    return bulk


def _nested_paths(ds: Dataset, prefix: str, paths: dict[int, str]) -> None:
    """Map ``id(element)`` of every element inside sequences to its bulkdata path."""
    for elem in ds:
        key = f"{prefix}{int(elem.tag):08X}"
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                _nested_paths(item, f"{key}/{index}/", paths)
        else:
            paths[id(elem)] = key


def instance_metadata(
    path: Path, *, bulkdata_url: str, transfer_syntax_uid: str, threshold: int = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """The DICOM JSON object of the stored instance at ``path``.

    Parameters
    ----------
    path
        The stored Part 10 file.
    bulkdata_url
        The instance's bulkdata resource, e.g. ``…/instances/{uid}/bulkdata``; each bulk
        element's path is appended to it.
    transfer_syntax_uid
        The stored syntax, given as Available Transfer Syntax UID (0008,3002) so that a client
        knows what it may ask for without fetching the instance (PS3.18 10.4.1.1.2).
    threshold
        Size of the base64 text above which a binary value becomes a ``BulkDataURI``.

    Returns
    -------
    dict
        Tags (``"7FE00010"``) in ascending order to ``{"vr": …, "Value"|"InlineBinary"|"BulkDataURI": …}``.
        Values that break their VR are left out rather than failing the whole study (tolerant when reading).
    """
    limit = (threshold // 4) * 3  # pydicom compares raw lengths with this
    ds = dcmread(path, defer_size=limit + 1)
    bulk = _top_level_bulk(ds, limit)
    for tag in bulk:
        del ds[tag]
    nested: dict[int, str] = {}
    _nested_paths(ds, "", nested)

    def handler(elem: DataElement) -> str:
        return f"{bulkdata_url}/{nested.get(id(elem), f'{int(elem.tag):08X}')}"

    body = ds.to_json_dict(bulk_data_threshold=threshold, bulk_data_element_handler=handler, suppress_invalid_tags=True)
    for tag, vr in bulk.items():
        body[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{bulkdata_url}/{tag:08X}"}
    body.setdefault(AVAILABLE_TRANSFER_SYNTAX_UID, {"vr": "UI", "Value": [transfer_syntax_uid]})
    return dict(sorted(body.items()))


def parse_bulkdata_path(text: str) -> list[int]:
    """Tags and item indices of a bulkdata path (``00880200/0/7FE00010`` -> [tag, 0, tag]).

    Raises
    ------
    InvalidInput
        Not a path of 8-digit hex tags and item indices, at most 8 sequences deep.
    """
    if not _SEGMENT.match(text):
        raise InvalidInput('Argument "tag_path" should be tags (8 hex digits) and item indices, e.g. "7FE00010".')
    return [int(part, 16) if i % 2 == 0 else int(part) for i, part in enumerate(text.split("/"))]


def bulkdata_value(ds: Dataset, steps: list[int]) -> bytes:
    """The value of the binary element at ``steps`` (from :func:`parse_bulkdata_path`).

    Raises
    ------
    NotFound
        A tag or item along the path does not exist, or the element is not binary.
    """
    current = ds
    for position in range(0, len(steps), 2):
        tag = steps[position]
        if tag not in current:
            raise NotFound(f"The instance has no element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at this path.")
        elem = current[tag]
        if position + 1 == len(steps):
            if elem.VR not in BULK_VRS or not isinstance(elem.value, bytes | bytearray):
                raise NotFound("The element at this path is not binary bulk data.")
            return bytes(elem.value)
        index = steps[position + 1]
        if elem.VR != "SQ" or index >= len(elem.value):
            raise NotFound("No sequence item exists at this path.")
        current = elem.value[index]
    raise NotFound("Empty bulkdata path.")  # unreachable: parse_bulkdata_path gives an odd length
