"""DICOM UIDs: checking the ones we receive and deriving the ones we write.

Received UIDs end up in file paths and database keys, so they are checked against the UID
grammar of PS3.5 9.1 and rejected (never rewritten) when they do not match. The UIDs we write
are derived from the job rather than drawn at random, so that rerunning a job produces the same
SEG and SR SOP Instance UIDs and a receiving archive replaces the earlier result instead of
storing a duplicate.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["UID_MAX_LENGTH", "UID_PATTERN", "derived_uid", "is_valid_uid", "require_uid", "result_uids"]

UID_MAX_LENGTH = 64
"""Maximum length of a UID in characters (PS3.5 9.1, VR UI)."""

UID_PATTERN: re.Pattern[str] = re.compile(r"\A(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z")
"""The UID grammar of PS3.5 9.1: numeric components without leading zeros, joined by dots.

Anchored with ``\\A``/``\\Z`` (not ``^``/``$``) so that ``match`` and ``fullmatch`` agree and a
trailing newline is never accepted; the character class is ASCII-only, unlike ``\\d``.
"""

_UUID_ROOT = "2.25."
_NAMESPACE = b"infergate.derived_uid.v1"


def is_valid_uid(text: object) -> bool:
    """Whether ``text`` is a syntactically valid DICOM UID.

    Parameters
    ----------
    text: object
        Anything, typically a value taken from a received dataset. Non-strings (``None``,
        ``bytes``, multi-valued elements) are not UIDs and give ``False`` rather than raising,
        so that callers at the network edge can reject them uniformly.

    Returns
    -------
    bool
        ``True`` when ``text`` is a ``str`` of at most 64 characters that matches
        :data:`UID_PATTERN` (PS3.5 9.1). Padding (a trailing NUL or space) is not accepted:
        pydicom strips it when reading, so its presence means the value was not read by pydicom.
    """
    return isinstance(text, str) and len(text) <= UID_MAX_LENGTH and UID_PATTERN.match(text) is not None


def require_uid(value: object, argument: str) -> str:
    """Return ``value`` if it is a valid UID, otherwise raise naming ``argument``.

    Used by the SEG and SR builders, because highdicom copies the UIDs it is given into the
    object without checking them, and a bad UID would only surface at the receiving archive.

    Parameters
    ----------
    value: object
        The candidate UID.
    argument: str
        The caller's parameter name, quoted in the error message.

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    TypeError
        When ``value`` is not a ``str``.
    ValueError
        When ``value`` does not follow PS3.5 9.1.
    """
    if not isinstance(value, str):
        raise TypeError(f'Argument "{argument}" should be a str, not {type(value).__name__}.')
    if not is_valid_uid(value):
        raise ValueError(f'Argument "{argument}" should be a valid DICOM UID (PS3.5 9.1): {value!r}.')
    return value


def derived_uid(*parts: str) -> str:
    """A deterministic UID of the form ``2.25.<decimal>`` derived from ``parts``.

    The parts are hashed with SHA-256 (each one length-prefixed, so that ``("ab", "c")`` and
    ``("a", "bc")`` differ, and under a fixed namespace so that the same strings hashed by other
    software give other UIDs). The first 128 bits are turned into a version 8 ("custom") UUID
    as RFC 9562 describes for name-based UUIDs built on SHA-256, and written under the
    ``2.25`` root as PS3.5 B.2 requires for UIDs made from UUIDs. The result has at most
    44 characters.

    Parameters
    ----------
    *parts: str
        What identifies the object, e.g. ``(job_id, "seg", "instance")``. Use the same parts
        for the same object on a rerun and different parts for different objects.

    Returns
    -------
    str
        The UID.

    Raises
    ------
    TypeError
        When no part is given or a part is not a ``str``.
    """
    if not parts:
        raise TypeError('Argument "parts" should hold at least one string.')
    digest = hashlib.sha256()
    digest.update(len(_NAMESPACE).to_bytes(8, "big") + _NAMESPACE)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f'Argument "parts" should hold strings, not {type(part).__name__}.')
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    value = int.from_bytes(digest.digest()[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8 in bits 48..51 of the UUID
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant (binary 10)
    return f"{_UUID_ROOT}{value}"


def result_uids(series_uid: str, model_id: str, model_version: str, kind: str) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of a job's SEG or SR: the same job always yields the same UIDs (PS3.5 B.2).

    Kept here rather than in the worker so that the node can check an uploaded result against the
    job it claims to belong to (:mod:`infergate.result_upload`) with the very same derivation.

    Parameters
    ----------
    series_uid: str
        Series Instance UID of the source series.
    model_id, model_version: str
        The model (manifest ``id`` and ``version``) that made the result.
    kind: str
        ``"SEG"`` or ``"SR"``.
    """
    base = ("infergate", series_uid, model_id, model_version, kind)
    return derived_uid(*base, "series"), derived_uid(*base, "instance")
