"""Removing the files of deleted rows: the outbox that makes retention crash-safe.

Retention (:mod:`infergate.retention`) deletes rows in one transaction and, in the same
transaction, records every file and folder those rows named as a
:class:`~infergate.store.tables.FileDeletion`. Only after the commit are the files removed, and only
after that the outbox rows. A process that dies anywhere in between leaves outbox rows behind, and
the next pass (:func:`remove` with no ids) finishes the job, so no file is orphaned for good and no
row ever points at a removed file.

Every path is checked before anything is removed: it must lie strictly below ``instances/`` or
``results/`` of the data folder (:func:`~infergate.dicom.storage.removable_path`); anything else (a
``../`` in a tampered row, the database file) is refused and left alone. A file is removed under its
folder's lock (the lock the SCP holds while it stores into a series folder), and only if no row
refers to it again: a series re-sent after its removal, or a rerun that wrote a job's results anew,
keeps its new file. Folders are removed only when empty (``rmdir``), never recursively.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import (
    INSTANCES_FOLDER,
    RESULTS_FOLDER,
    folder_lock,
    fsync_dir,
    removable_path,
    resolve_inside,
)
from infergate.dicom.uids import is_valid_uid
from infergate.errors import InvalidInput
from infergate.store.tables import FileDeletion, Instance, ResultObject, utcnow

log = logging.getLogger(__name__)

_CHUNK = 500
"""Ids or UIDs per ``IN (...)``: well below SQLite's and PostgreSQL's parameter limits."""


@dataclass
class Removal:
    """What :func:`remove` did: counts only, never a path (paths hold UIDs)."""

    files: int = 0
    bytes: int = 0
    folders: int = 0
    refused: int = 0
    """Paths outside ``instances/`` and ``results/``: left alone."""
    kept: int = 0
    """Files a row refers to again (re-received, or written anew by a rerun): left alone."""

    def add(self, other: Removal) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.folders += other.folders
        self.refused += other.refused
        self.kept += other.kept


_T = TypeVar("_T")


def _chunks(items: Sequence[_T]) -> Iterator[list[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield list(items[start : start + _CHUNK])


def record(session: Session, paths: Iterable[str]) -> list[int]:
    """Add outbox rows for ``paths`` in the caller's transaction (duplicates once); returns their ids."""
    now = utcnow()
    rows = [FileDeletion(path=path, created_at=now) for path in dict.fromkeys(paths)]
    session.add_all(rows)
    session.flush()
    return [row.id for row in rows]


def pending(session: Session) -> int:
    """How many outbox rows wait (left by a pass that died, or by one running now)."""
    return session.scalar(select(func.count(FileDeletion.id))) or 0


def _delete_rows(factory: sessionmaker[Session], ids: Sequence[int]) -> None:
    if not ids:
        return
    with factory() as session, session.begin():
        for chunk in _chunks(ids):
            session.execute(delete(FileDeletion).where(FileDeletion.id.in_(chunk)))


def _uid_of(relpath: str) -> str | None:
    """The SOP Instance UID a stored file is named after (``<sop>.dcm``, ``<kind>-<sop>.dcm``)."""
    stem = PurePosixPath(relpath).stem
    uid = stem.rsplit("-", 1)[-1]
    return uid if is_valid_uid(uid) else None


def _referenced(session: Session, relpaths: Sequence[str]) -> set[str]:
    """Those of ``relpaths`` that an instance row or a result object not purged refers to now.

    Looked up by the SOP Instance UID in the file name (a unique index), then compared by path;
    a file not named after a UID is looked up by its path.
    """
    by_uid = sorted({uid for uid in map(_uid_of, relpaths) if uid is not None})
    odd = sorted({path for path in relpaths if _uid_of(path) is None})
    found: set[str] = set()
    for chunk in _chunks(by_uid):
        found |= set(session.scalars(select(Instance.path).where(Instance.sop_instance_uid.in_(chunk))))
        held = select(ResultObject.path).where(ResultObject.purged_at.is_(None))
        found |= set(session.scalars(held.where(ResultObject.sop_instance_uid.in_(chunk))))
    for chunk in _chunks(odd):
        found |= set(session.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
        held = select(ResultObject.path).where(ResultObject.purged_at.is_(None))
        found |= set(session.scalars(held.where(ResultObject.path.in_(chunk))))
    return found & set(relpaths)


def _remove_files(
    factory: sessionmaker[Session],
    root: Path,
    folder: Path,
    entries: list[tuple[int, str, Path]],
    held: Path | None,
) -> Removal:
    """Unlink the files of one folder under its lock, then fsync the folder once."""
    removal = Removal()
    if not folder.is_dir():
        return removal  # the folder and every file in it are gone already
    base = resolve_inside(root, ".")
    # the caller may hold this folder's lock already; a second flock of it would wait for ever
    lock = contextlib.nullcontext() if folder == held else folder_lock(root, folder.relative_to(base))
    with lock:
        with factory() as session:
            referenced = _referenced(session, [relpath for _, relpath, _ in entries])
        unlinked = 0
        for _, relpath, path in entries:
            if relpath in referenced:
                removal.kept += 1
                continue
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            unlinked += 1
            removal.bytes += size
        if unlinked:
            fsync_dir(folder)  # durable before the outbox rows go: a lost unlink would orphan the file
        removal.files += unlinked
    return removal


def _prune(folder: Path, root: Path) -> int:
    """Remove ``folder`` and then each parent while empty, up to the instances or results folder."""
    base = resolve_inside(root, ".")
    tops = {base / INSTANCES_FOLDER, base / RESULTS_FOLDER}
    removed = 0
    while folder not in tops and any(top in folder.parents for top in tops):
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            break  # not empty (a series stored again, files of another series): keep it
        else:
            removed += 1
            fsync_dir(folder.parent)
        folder = folder.parent
    return removed


def remove(
    factory: sessionmaker[Session], root: Path, ids: Sequence[int] | None = None, *, held: Path | None = None
) -> Removal:
    """Remove the files and folders that outbox rows name, then those rows.

    Parameters
    ----------
    factory
        Sessions on the results store.
    root
        The data folder.
    ids
        The outbox rows to process; None processes every row (the sweep after a crashed pass).
    held
        A folder (absolute, resolved) whose lock the caller holds, so that it is not taken twice.

    Returns
    -------
    Removal
        Counts of files, bytes and folders removed, paths refused and files kept.
    """
    with factory() as session:
        stmt = select(FileDeletion.id, FileDeletion.path).order_by(FileDeletion.id)
        if ids is None:
            rows = [(row[0], row[1]) for row in session.execute(stmt)]
        else:
            rows = [
                (row[0], row[1])
                for chunk in _chunks(ids)
                for row in session.execute(stmt.where(FileDeletion.id.in_(chunk)))
            ]
    removal = Removal()
    refused: list[int] = []
    folders: list[tuple[int, Path]] = []
    files: dict[Path, list[tuple[int, str, Path]]] = {}
    for row_id, relpath in rows:
        try:
            path = removable_path(root, relpath)
        except InvalidInput:
            refused.append(row_id)
            continue
        if path.is_dir():
            folders.append((row_id, path))
        else:
            files.setdefault(path.parent, []).append((row_id, relpath, path))
    if refused:
        log.warning("retention: %d stored paths lie outside the instances and results folders; kept", len(refused))
        removal.refused += len(refused)
        _delete_rows(factory, refused)
    for folder, entries in files.items():
        removal.add(_remove_files(factory, root, folder, entries, held))
        _delete_rows(factory, [row_id for row_id, _, _ in entries])
    for row_id, folder in sorted(folders, key=lambda item: len(item[1].parts), reverse=True):
        removal.folders += _prune(folder, root)
        _delete_rows(factory, [row_id])
    return removal


def sweep(factory: sessionmaker[Session], root: Path) -> Removal:
    """Finish what a pass that died left in the outbox (every row; idempotent)."""
    removal = remove(factory, root)
    if removal.files or removal.folders:
        log.info("retention: removed %d files left by an interrupted pass", removal.files)
    return removal
