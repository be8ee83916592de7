"""Re-encoding a stored instance for WADO-RS: as stored, or in Explicit VR Little Endian.

Stored files are never changed; conversion happens per response, in memory, one instance at a time.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from infergate.dicomweb.negotiation import EXPLICIT_VR_LITTLE_ENDIAN, is_native

__all__ = ["encode_instance"]


def encode_instance(path: Path, stored: str, target: str) -> bytes:
    """The Part 10 bytes of the instance at ``path`` in the Transfer Syntax ``target``.

    Parameters
    ----------
    path
        The stored Part 10 file.
    stored
        Its Transfer Syntax UID, as indexed.
    target
        ``stored`` (the file is returned byte for byte) or Explicit VR Little Endian, chosen by
        :func:`~infergate.dicomweb.negotiation.select_instance_syntax`.

    Returns
    -------
    bytes
        A Part 10 file. A decoded instance keeps its SOP Instance UID: it is the same instance in
        another encoding (PS3.18 8.7.3.4), not a derived one.

    Raises
    ------
    ValueError
        ``target`` is neither ``stored`` nor Explicit VR Little Endian.
    """
    if target == stored:
        return path.read_bytes()
    if target != EXPLICIT_VR_LITTLE_ENDIAN:
        raise ValueError(f'Argument "target" should be {stored} or {EXPLICIT_VR_LITTLE_ENDIAN}, not {target}.')
    ds = dcmread(path)
    if not is_native(stored) and "PixelData" in ds:
        # YCbCr JPEG becomes RGB, with Photometric Interpretation updated to match
        ds.decompress(as_rgb=True, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
