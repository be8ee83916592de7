"""Storing one received instance: shared by the DICOM SCP and (later) STOW-RS.

The order is what makes an acknowledgement safe: the file is fsync'd, then its row is committed,
and only then does the caller answer Success. A repeated SOP Instance UID keeps the first copy; a
repeated copy that differs (other bytes, or another series) is recorded as a conflict.

The rows also carry the attributes QIDO-RS searches (PS3.18 10.6), taken from the first instance
of each study and series; :func:`index_result_object` indexes the node's own SEG/SR the same way,
so that what the node holds, inputs and results, is searchable.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import (
    FileData,
    discard_file,
    folder_lock,
    instance_relpath,
    resolve_inside,
    store_new_file,
)
from infergate.instance_header import InstanceHeader
from infergate.store.queries import get_or_create_series, get_or_create_study, insert_ignore
from infergate.store.tables import (
    ConflictKind,
    Instance,
    InstanceConflict,
    Series,
    SeriesState,
    Study,
    utcnow,
)

log = logging.getLogger(__name__)


_PIXEL_KEYS = ("instance_number", "rows", "columns", "bits_allocated", "number_of_frames")
"""Instance columns taken from the header (besides the UIDs), also refreshed when a result is rewritten."""


class IngestOutcome(enum.Enum):
    stored = "stored"
    duplicate = "duplicate"


def ingest_instance(
    factory: sessionmaker[Session],
    data_root: Path,
    header: InstanceHeader,
    encoded: FileData,
    *,
    calling_ae: str | None,
    called_ae: str | None,
) -> IngestOutcome:
    """Durably store one Part 10 file and index it.

    When this returns, the file is fsync'd under its final name, its folder is fsync'd and its row
    is committed, in that order; only then may the caller answer Success. Stores into one series
    folder hold that folder's lock (across threads and processes) from the check for an existing
    row to the commit, so two copies of one SOP Instance UID never race: the first is kept.

    Parameters
    ----------
    encoded:
        The complete Part 10 file (preamble, meta, dataset), possibly in parts.

    Returns
    -------
    IngestOutcome
        ``duplicate`` when the SOP Instance UID is already stored (the first copy is kept; a copy
        that differs from it is recorded as an :class:`~infergate.store.tables.InstanceConflict`).

    Raises
    ------
    infergate.dicom.storage.OutOfSpace, sqlalchemy.exc.OperationalError
        Storage or database unavailable; nothing was indexed and no file of ours is left behind.
    """
    relpath = instance_relpath(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    first = None
    if not resolve_inside(data_root, relpath.parent).is_dir():
        # Taking the lock creates the series folder: a repeated copy that claims another series
        # must not leave an empty folder of that series behind, so look before creating it. Into
        # an existing folder (every instance but a series' first), one look-up under the lock does.
        with factory() as session:
            first = _first_copy(session, header.sop_instance_uid)
    if first is None:
        with folder_lock(data_root, relpath.parent):
            with factory() as session:
                first = _first_copy(session, header.sop_instance_uid)  # a concurrent store may have won
            if first is None:
                return _store_first_copy(
                    factory, data_root, header, relpath, encoded, calling_ae=calling_ae, called_ae=called_ae
                )
    return _repeated_copy(factory, data_root, first, header, relpath, encoded, calling_ae=calling_ae)


@dataclass(frozen=True)
class _FirstCopy:
    instance_id: int
    path: str
    study_instance_uid: str
    series_instance_uid: str


_FIRST_COPY = (
    select(Instance.id, Instance.path, Study.study_instance_uid, Series.series_instance_uid)
    .join(Series, Instance.series_id == Series.id)
    .join(Study, Series.study_id == Study.id)
    .where(Instance.sop_instance_uid == bindparam("sop_instance_uid"))
)
"""Built once: constructing a statement per instance costs more than running it (SQLAlchemy caches
the compiled form either way)."""


def _first_copy(session: Session, sop_instance_uid: str) -> _FirstCopy | None:
    row = session.execute(_FIRST_COPY, {"sop_instance_uid": sop_instance_uid}).first()
    return None if row is None else _FirstCopy(row[0], row[1], row[2], row[3])


def _store_first_copy(
    factory: sessionmaker[Session],
    data_root: Path,
    header: InstanceHeader,
    relpath: Path,
    encoded: FileData,
    *,
    calling_ae: str | None,
    called_ae: str | None,
) -> IngestOutcome:
    """File, then row; the caller holds the series folder's lock and found no row."""
    if not store_new_file(data_root, relpath, encoded):
        # A complete file without a row: written before a crash and never acknowledged (nothing
        # else writes here without this lock). The sender's copy replaces it.
        log.info("an instance file without a row was left by an earlier crash; replacing it")
        discard_file(data_root, relpath)
        if not store_new_file(data_root, relpath, encoded):
            raise RuntimeError("An instance file reappeared while its series folder was locked.")
    try:
        inserted = _index_committed(factory, header, relpath, encoded, calling_ae=calling_ae, called_ae=called_ae)
    except BaseException:
        # Nothing was acknowledged: no file without a row. Should the commit have reached the
        # database after all, the sender's retry finds the row and restores the file.
        discard_file(data_root, relpath)
        raise
    return IngestOutcome.stored if inserted else IngestOutcome.duplicate


def _repeated_copy(
    factory: sessionmaker[Session],
    data_root: Path,
    first: _FirstCopy,
    header: InstanceHeader,
    relpath: Path,
    encoded: FileData,
    *,
    calling_ae: str | None,
) -> IngestOutcome:
    """A SOP Instance UID that is already indexed: keep the first copy, record a differing one."""
    size, digest = _size_and_digest(encoded)
    same_place = (first.study_instance_uid, first.series_instance_uid) == (
        header.study_instance_uid,
        header.series_instance_uid,
    )
    if same_place and first.path == relpath.as_posix() and not resolve_inside(data_root, relpath).exists():
        return _restore_missing_file(factory, data_root, first, relpath, encoded, size)
    if not same_place:
        kind = ConflictKind.series
    elif _file_digest(resolve_inside(data_root, first.path), size) == digest:
        return IngestOutcome.duplicate
    else:
        kind = ConflictKind.content
    with factory() as session, session.begin():
        conflict = InstanceConflict(
            instance_id=first.instance_id,
            kind=kind,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            size=size,
            sha256=digest,
            calling_ae=calling_ae,
            received_at=utcnow(),
        )
        session.add(conflict)
        session.flush()
        conflict_id = conflict.id
    log.warning(
        "repeated SOP Instance UID differs from the first copy (%s): first copy kept as instance %d, conflict %d",
        kind.value,
        first.instance_id,
        conflict_id,
    )
    return IngestOutcome.duplicate


def _restore_missing_file(
    factory: sessionmaker[Session], data_root: Path, first: _FirstCopy, relpath: Path, encoded: FileData, size: int
) -> IngestOutcome:
    """A row without its file: the file is restored from the sender's retry.

    The handler discards the file when a commit fails. Should that COMMIT have reached the
    database all the same (its reply lost with the connection), the row remains; the sender, which
    was answered 0xA700, retries, and only its copy can bring the file back.
    """
    with folder_lock(data_root, relpath.parent):
        if not store_new_file(data_root, relpath, encoded):
            return IngestOutcome.duplicate  # a concurrent retry restored it
        with factory() as session, session.begin():
            session.execute(update(Instance).where(Instance.id == first.instance_id).values(size=size))
    log.warning("instance %d had a row but no file; restored from the sender's retry", first.instance_id)
    return IngestOutcome.stored


def _size_and_digest(encoded: FileData) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    for chunk in [encoded] if isinstance(encoded, bytes) else encoded:
        view = memoryview(chunk)
        sha.update(view)
        size += view.nbytes
    return size, sha.hexdigest()


def _file_digest(path: Path, expected_size: int) -> str | None:
    """SHA-256 of a stored file; None if it is missing or its size already differs."""
    try:
        if path.stat().st_size != expected_size:
            return None
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    except FileNotFoundError:
        return None
    return sha.hexdigest()


class _StaleSeriesId(Exception):
    """A remembered series id no longer names that series (its row was deleted)."""


class _SeriesIds:
    """Series row ids this process has committed instances to, most recent first.

    Every instance of a series after its first then needs two statements (insert the instance,
    count it) instead of six: the study and series rows exist and their ids are known. An id is
    only remembered after a commit that used it, and the count's ``WHERE`` names the series UID as
    well as the id, so an id whose row was deleted (or reused) is noticed, forgotten and the
    instance indexed the long way in a new transaction.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._ids: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, study_uid: str, series_uid: str) -> int | None:
        with self._lock:
            series_id = self._ids.get((study_uid, series_uid))
            if series_id is not None:
                self._ids.move_to_end((study_uid, series_uid))
            return series_id

    def put(self, study_uid: str, series_uid: str, series_id: int) -> None:
        with self._lock:
            self._ids[(study_uid, series_uid)] = series_id
            self._ids.move_to_end((study_uid, series_uid))
            while len(self._ids) > self._capacity:
                self._ids.popitem(last=False)

    def forget(self, study_uid: str, series_uid: str) -> None:
        with self._lock:
            self._ids.pop((study_uid, series_uid), None)


_series_ids: weakref.WeakKeyDictionary[sessionmaker[Session], _SeriesIds] = weakref.WeakKeyDictionary()
_series_ids_lock = threading.Lock()


def _series_ids_of(factory: sessionmaker[Session]) -> _SeriesIds:
    """One cache per session factory (per database), for as long as the factory lives."""
    with _series_ids_lock:
        ids = _series_ids.get(factory)
        if ids is None:
            ids = _series_ids[factory] = _SeriesIds()
        return ids


_INSERT_INSTANCE = {
    name: module.insert(Instance)
    .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
    .returning(Instance.id)
    for name, module in (("sqlite", sqlite), ("postgresql", postgresql))
}
_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("series_id"), Series.series_instance_uid == bindparam("series_uid"))
    .values(num_instances=Series.num_instances + 1, last_received_at=bindparam("now"))
)


def _index_committed(
    factory: sessionmaker[Session],
    header: InstanceHeader,
    relpath: Path,
    encoded: FileData,
    *,
    calling_ae: str | None,
    called_ae: str | None,
) -> bool:
    """Index the stored file and commit; True if a new Instance row was inserted."""
    ids = _series_ids_of(factory)
    size = len(encoded) if isinstance(encoded, bytes) else sum(memoryview(c).nbytes for c in encoded)
    known = ids.get(header.study_instance_uid, header.series_instance_uid)
    if known is not None:
        try:
            with factory() as session, session.begin():
                return _index_known_series(session, header, relpath, size, known)
        except (_StaleSeriesId, IntegrityError):
            ids.forget(header.study_instance_uid, header.series_instance_uid)
            log.info("series row %d is gone; indexing the instance the long way", known)
    with factory() as session, session.begin():
        series_id, inserted = _index(session, header, relpath, size, calling_ae=calling_ae, called_ae=called_ae)
    ids.put(header.study_instance_uid, header.series_instance_uid, series_id)
    return inserted


def _index_known_series(session: Session, header: InstanceHeader, relpath: Path, size: int, series_id: int) -> bool:
    """The fast path: the study and series rows exist; insert and count the instance."""
    dialect = session.get_bind().dialect.name
    statement = _INSERT_INSTANCE["postgresql" if dialect == "postgresql" else "sqlite"]
    values = _instance_values(header, series_id, relpath, size)
    if session.execute(statement, values).first() is None:
        return False  # the SOP Instance UID is indexed already
    counted = session.execute(
        _COUNT_INSTANCE,
        {"series_id": series_id, "series_uid": header.series_instance_uid, "now": values["received_at"]},
    )
    if counted.rowcount != 1:  # type: ignore[attr-defined]
        raise _StaleSeriesId(series_id)
    return True


def _index(
    session: Session,
    header: InstanceHeader,
    relpath: Path,
    size: int,
    *,
    calling_ae: str | None,
    called_ae: str | None,
) -> tuple[int, bool]:
    """The first instance of a series in this process: create or find the study and series rows."""
    study_id = get_or_create_study(session, header.study_instance_uid, **_study_values(header))
    series_id = get_or_create_series(
        session,
        study_id,
        header.series_instance_uid,
        **_series_values(header),
        calling_ae=calling_ae,
        called_ae=called_ae,
    )
    inserted = insert_ignore(
        session, Instance, _instance_values(header, series_id, relpath, size), conflict_columns=["sop_instance_uid"]
    )
    if inserted:
        _count_instance(session, series_id)
    return series_id, inserted


def index_result_object(session: Session, header: InstanceHeader, relpath: Path, size: int) -> None:
    """Index a SEG or SR the node wrote, so that QIDO-RS finds it in its source study.

    The object gets an Instance row under its own Series row (the SEG/SR series), which hangs
    under the Study row of the source study (created from the header if it is missing). A new
    series is created in state ``produced``, which the watcher never claims, so a result is never
    routed to a model. Rerunning a job rewrites the same SOP Instance UID at ``relpath``: the row
    is then updated in place (path, size, transfer syntax, pixel attributes), never duplicated.
    The caller owns the transaction, as with every query helper.

    Parameters
    ----------
    session
        The caller's session; nothing is committed here.
    header
        The written object's header, e.g. ``InstanceHeader.from_dataset(ds, sop_class_uid=
        ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax_uid=
        ds.file_meta.TransferSyntaxUID)``.
    relpath
        Where the file lies, relative to the data folder (``results/<job>/<kind>-<uid>.dcm``).
    size
        The file's size in bytes.
    """
    study_id = get_or_create_study(session, header.study_instance_uid, **_study_values(header))
    series_id = get_or_create_series(
        session,
        study_id,
        header.series_instance_uid,
        **_series_values(header),
        state=SeriesState.produced.value,
        completed_at=utcnow(),
        routing_note="written by this node",
    )
    values = _instance_values(header, series_id, relpath, size)
    if insert_ignore(session, Instance, values, conflict_columns=["sop_instance_uid"]):
        _count_instance(session, series_id)
        return
    # A rerun replaced the file: the existing row follows it.
    replaced = {key: values[key] for key in ("sop_class_uid", "transfer_syntax_uid", "path", "size", "received_at")}
    replaced.update({key: values[key] for key in _PIXEL_KEYS})
    session.execute(update(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid).values(**replaced))


def _study_values(header: InstanceHeader) -> dict[str, Any]:
    """Columns of a new Study row: the first instance of a study describes it."""
    return {
        "patient_name": header.patient_name,
        "patient_id": header.patient_id,
        "patient_birth_date": header.patient_birth_date,
        "patient_sex": header.patient_sex,
        "study_date": header.study_date,
        "study_time": header.study_time,
        "accession_number": header.accession_number,
        "study_description": header.study_description,
        "referring_physician_name": header.referring_physician_name,
        "study_id_value": header.study_id,
    }


def _series_values(header: InstanceHeader) -> dict[str, Any]:
    """Columns of a new Series row, from the first instance of the series."""
    return {
        "modality": header.modality,
        "body_part_examined": header.body_part_examined,
        "series_description": header.series_description,
        "image_type": header.image_type,
        "series_number": header.series_number,
        "series_date": header.series_date,
        "series_time": header.series_time,
        "performed_procedure_step_start_date": header.performed_procedure_step_start_date,
    }


def _instance_values(header: InstanceHeader, series_id: int, relpath: Path, size: int) -> dict[str, Any]:
    return {
        "series_id": series_id,
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "path": relpath.as_posix(),
        "size": size,
        "received_at": utcnow(),
        **{key: getattr(header, key) for key in _PIXEL_KEYS},
    }


def _count_instance(session: Session, series_id: int) -> None:
    session.execute(
        update(Series)
        .where(Series.id == series_id)
        .values(num_instances=Series.num_instances + 1, last_received_at=utcnow())
    )
