"""Durable, path-safe storage of Part 10 files.

Every path is built from UIDs that were checked against the UID grammar first, so nothing a peer
sends can name a path outside the data folder. A new file is written as an unnamed file of its
folder (``O_TMPFILE``), fsync'd, hard-linked to its final name (which fails instead of overwriting
an existing first copy) and the directory is fsync'd, so that once :func:`store_new_file` returns
the instance survives a crash. A process killed while writing leaves nothing behind: the kernel
frees an unnamed file when its last descriptor closes. Where ``O_TMPFILE`` is unsupported a
hidden temporary name is used instead, removed on every error but not on SIGKILL.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from infergate.dicom.uids import is_valid_uid
from infergate.errors import InvalidInput

#: A Part 10 file to write: one buffer, or its parts in order (no copy is made to join them).
FileData = bytes | Sequence[bytes | memoryview]


class OutOfSpace(OSError):
    """The storage volume is full (maps to DIMSE 0xA700)."""


def check_uid(value: object, name: str) -> str:
    """Return ``value`` if it is a valid UID; raise :class:`InvalidInput` naming it otherwise."""
    if not is_valid_uid(value):
        raise InvalidInput(f'Argument "{name}" is not a valid UID.')
    assert isinstance(value, str)
    return value


#: The folders of the data folder that hold received instances and produced results; retention
#: removes files below these and nowhere else (never the database, the broker or the salt).
INSTANCES_FOLDER = "instances"
RESULTS_FOLDER = "results"


def series_relfolder(study_uid: str, series_uid: str) -> Path:
    """Relative folder of a received series: ``instances/<study>/<series>``."""
    return Path(
        INSTANCES_FOLDER, check_uid(study_uid, "study_instance_uid"), check_uid(series_uid, "series_instance_uid")
    )


def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Relative path of a received instance: ``instances/<study>/<series>/<sop>.dcm``."""
    folder = series_relfolder(study_uid, series_uid)
    return folder / (check_uid(sop_instance_uid, "sop_instance_uid") + ".dcm")


def result_relfolder(job_id: int) -> Path:
    """Relative folder of a job's result objects: ``results/<job>``."""
    return Path(RESULTS_FOLDER, str(int(job_id)))


def result_relpath(job_id: int, kind: str, sop_instance_uid: str) -> Path:
    """Relative path of a result object: ``results/<job>/<kind>-<sop>.dcm``."""
    if kind not in {"SEG", "SR"}:
        raise ValueError(f'Argument "kind" should be SEG or SR, not {kind!r}.')
    return result_relfolder(job_id) / f"{kind}-{check_uid(sop_instance_uid, 'sop_instance_uid')}.dcm"


@functools.lru_cache(maxsize=32)
def _resolved_root(root: Path) -> Path:
    return root.resolve()


def resolve_inside(root: Path, relpath: Path | str) -> Path:
    """``root / relpath``, refusing anything that would leave ``root``.

    An absolute data folder is resolved once per process (its symlinks are the operator's, set
    before the node starts); what lies below it is resolved on every call.
    """
    root = _resolved_root(root) if root.is_absolute() else root.resolve()
    path = (root / relpath).resolve()
    if root != path and root not in path.parents:
        raise InvalidInput("Path leaves the data folder.")
    return path


def removable_path(root: Path, relpath: Path | str) -> Path:
    """``root / relpath`` if it lies strictly below the instances or results folder, for deletion.

    Stricter than :func:`resolve_inside`: a stored path that names the database, the broker folder,
    the log salt, or the instances folder itself is inside the data folder yet must never be removed.

    Raises
    ------
    InvalidInput
        The path leaves the data folder, or is not below ``instances/`` or ``results/``.
    """
    path = resolve_inside(root, relpath)
    base = resolve_inside(root, ".")
    if not any(base / name in path.parents for name in (INSTANCES_FOLDER, RESULTS_FOLDER)):
        raise InvalidInput("Path is not below the instances or results folder of the data folder.")
    return path


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a new name, an unlinked file) durable."""
    _fsync_dir(path)


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


def _write_all(fd: int, chunks: FileData) -> None:
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]


def _write_fsynced(path: Path, chunks: FileData) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, chunks)
        os.fsync(fd)
    finally:
        os.close(fd)


#: errno values by which open(O_TMPFILE) says the filesystem or kernel cannot make unnamed files.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}


def _link_unnamed(final: Path, data: FileData) -> bool | None:
    """Write ``data`` as an unnamed file of ``final``'s folder, fsync it and link it as ``final``.

    Returns True if linked, False if ``final`` already exists (nothing is left behind), or None
    where unnamed files are unsupported (the caller falls back to a temporary name).
    """
    tmpfile = getattr(os, "O_TMPFILE", None)
    if tmpfile is None:
        return None
    try:
        fd = os.open(final.parent, os.O_WRONLY | tmpfile, 0o640)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise
    try:
        _write_all(fd, data)
        os.fsync(fd)
        folder = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # linkat(AT_SYMLINK_FOLLOW) through /proc names the unnamed file; a dir fd makes
            # Python call linkat rather than link(2), which would not follow the magic link.
            os.link(f"/proc/self/fd/{fd}", final.name, dst_dir_fd=folder, follow_symlinks=True)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EXDEV):  # no /proc here: use a temporary name
                return None
            raise
        finally:
            os.close(folder)
    finally:
        os.close(fd)
    return True


def store_new_file(root: Path, relpath: Path, data: FileData) -> bool:
    """Durably write ``data`` at ``root/relpath`` unless a file is already there.

    The file's content is fsync'd before it gets its name and the folder is fsync'd after, so a
    file under its final name is always complete and, once this returns True, survives a crash.

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
    tmp: Path | None = None
    try:
        _makedirs_durable(final.parent)  # inside the try: a full disk can refuse a new folder too
        linked = _link_unnamed(final, data)
        if linked is None:
            tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(data):x}.tmp")
            _write_fsynced(tmp, data)
            try:
                os.link(tmp, final)
                linked = True
            except FileExistsError:
                linked = False
        if not linked:
            return False
        _fsync_dir(final.parent)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(exc.errno, "storage volume is full") from exc
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def discard_file(root: Path, relpath: Path) -> None:
    """Remove ``root/relpath`` durably (an instance that was never acknowledged); missing is fine."""
    path = resolve_inside(root, relpath)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


@contextmanager
def folder_lock(root: Path, relfolder: Path) -> Iterator[Path]:
    """Hold an exclusive lock on the folder ``root/relfolder`` (created durably if missing).

    ``flock`` on the folder itself: one lock per series folder that excludes other threads (each
    opens its own descriptor) and other processes alike, and that the kernel drops when a process
    dies, so a crash never leaves a stale lock. No lock file is created.

    Raises
    ------
    OutOfSpace
        The folder had to be created and the volume is full.
    """
    folder = resolve_inside(root, relfolder)
    try:
        _makedirs_durable(folder)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(exc.errno, "storage volume is full") from exc
        raise
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(fd)  # closing the only descriptor of this open file releases the lock


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
