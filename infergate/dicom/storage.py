"""Durable, path-safe storage of Part 10 files.

Every path is built from UIDs that were checked against the UID grammar first, so nothing a peer
sends can name a path outside the data folder. A file is written to a temporary name, fsync'd,
hard-linked to its final name (which fails instead of overwriting an existing first copy) and the
directory is fsync'd, so that once :func:`store_new_file` returns the instance survives a crash.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from infergate.dicom.uids import is_valid_uid
from infergate.errors import InvalidInput


class OutOfSpace(OSError):
    """The storage volume is full (maps to DIMSE 0xA700)."""


def check_uid(value: object, name: str) -> str:
    """Return ``value`` if it is a valid UID; raise :class:`InvalidInput` naming it otherwise."""
    if not is_valid_uid(value):
        raise InvalidInput(f'Argument "{name}" is not a valid UID.')
    assert isinstance(value, str)
    return value


def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Relative path of a received instance: ``instances/<study>/<series>/<sop>.dcm``."""
    parts = [
        check_uid(study_uid, "study_instance_uid"),
        check_uid(series_uid, "series_instance_uid"),
        check_uid(sop_instance_uid, "sop_instance_uid"),
    ]
    return Path("instances", parts[0], parts[1], parts[2] + ".dcm")


def result_relpath(job_id: int, kind: str, sop_instance_uid: str) -> Path:
    """Relative path of a result object: ``results/<job>/<kind>-<sop>.dcm``."""
    if kind not in {"SEG", "SR"}:
        raise ValueError(f'Argument "kind" should be SEG or SR, not {kind!r}.')
    return Path("results", str(int(job_id)), f"{kind}-{check_uid(sop_instance_uid, 'sop_instance_uid')}.dcm")


def resolve_inside(root: Path, relpath: Path | str) -> Path:
    """``root / relpath``, refusing anything that would leave ``root``."""
    root = root.resolve()
    path = (root / relpath).resolve()
    if root != path and root not in path.parents:
        raise InvalidInput("Path leaves the data folder.")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and fsync each parent whose entry was new."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(folder.parent)


def _write_fsynced(path: Path, chunks: list[bytes] | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def store_new_file(root: Path, relpath: Path, data: bytes | list[bytes]) -> bool:
    """Durably write ``data`` at ``root/relpath`` unless a file is already there.

    Returns
    -------
    bool
        True if the file was written, False if a first copy already existed (it is kept as is).

    Raises
    ------
    OutOfSpace
        The volume is full; nothing partial is left behind.
    """
    final = resolve_inside(root, relpath)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(data):x}.tmp")
    try:
        _makedirs_durable(final.parent)  # inside the try: a full disk can refuse a new folder too
        _write_fsynced(tmp, data)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        _fsync_dir(final.parent)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(exc.errno, "storage volume is full") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def replace_file(root: Path, relpath: Path, data: bytes) -> Path:
    """Durably write ``data`` at ``root/relpath``, replacing an older version atomically.

    Used for result objects, whose deterministic UIDs make a rerun replace the earlier output.
    """
    final = resolve_inside(root, relpath)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        _makedirs_durable(final.parent)
        tmp.unlink(missing_ok=True)
        _write_fsynced(tmp, data)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(exc.errno, "storage volume is full") from exc
        raise
    return final
