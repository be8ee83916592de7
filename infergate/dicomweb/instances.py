"""Finding the stored instances a WADO-RS request names, through the SQL index.

Received instances and the node's own SEG/SR objects are both indexed as Instance rows, so both
are retrieved the same way. Paths in the index are relative to the data folder and are resolved
with :func:`~infergate.dicom.storage.resolve_inside`, which refuses any path that would leave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from infergate.dicom.storage import resolve_inside
from infergate.dicom.uids import is_valid_uid
from infergate.errors import Gone, InvalidInput, NotFound
from infergate.store.tables import Instance, Job, ResultObject, Series, Study

__all__ = ["StoredInstance", "check_uids", "find_instances", "removed_by_retention"]


@dataclass(frozen=True)
class StoredInstance:
    """What retrieval needs of one instance: its UIDs, stored syntax and absolute path."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


def check_uids(**uids: str | None) -> None:
    """Refuse malformed UIDs from a request path, naming the argument (400, not 404)."""
    for name, value in uids.items():
        if value is not None and not is_valid_uid(value):
            raise InvalidInput(f'Argument "{name}" is not a valid UID.')


def find_instances(
    session: Session,
    data_root: Path,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[StoredInstance]:
    """The instances of a study, a series of it, or one instance, in series then instance order.

    Raises
    ------
    InvalidInput
        A UID is malformed.
    NotFound
        The node holds nothing under these UIDs; the message names the level that is missing.
    """
    check_uids(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )
    stmt = (
        select(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.path,
        )
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(Series.id, Instance.instance_number.is_(None), Instance.instance_number, Instance.id)
    )
    if series_instance_uid is not None:
        stmt = stmt.where(Series.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_instance_uid)
    rows = session.execute(stmt).all()
    if not rows:
        removed = removed_by_retention(session, study_instance_uid, series_instance_uid, sop_instance_uid)
        if removed is not None:
            raise Gone(
                f"The node removed {removed[0]} on {removed[1]:%Y-%m-%d} under its retention policy "
                "(INFERGATE_RETAIN_INPUTS_DAYS / INFERGATE_RETAIN_RESULTS_DAYS); it is no longer held."
            )
        if sop_instance_uid is not None:
            raise NotFound("The node holds no instance with this SOP Instance UID in this series and study.")
        if series_instance_uid is not None:
            raise NotFound("The node holds no series with this Series Instance UID in this study.")
        raise NotFound("The node holds no study with this Study Instance UID.")
    return [
        StoredInstance(
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid=row.sop_class_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
            path=resolve_inside(data_root, row.path),
        )
        for row in rows
    ]


def removed_by_retention(
    session: Session,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> tuple[str, datetime] | None:
    """What retention removed under these UIDs (a phrase naming the level, and when), or None.

    The node's own SEG/SR are recognised by their result object rows, kept after the files go; a
    received series by its Series row, kept (marked ``purged_at``) while jobs refer to it; a study
    when every series it still has a row for was removed. A received instance's own row is gone, so
    an instance of a removed series answers for its series.
    """
    result = select(func.max(ResultObject.purged_at)).join(Job, Job.id == ResultObject.job_id)
    result = result.join(Series, Series.id == Job.series_id).join(Study, Study.id == Series.study_id)
    result = result.where(Study.study_instance_uid == study_instance_uid, ResultObject.purged_at.is_not(None))
    if sop_instance_uid is not None:
        result = result.where(ResultObject.sop_instance_uid == sop_instance_uid)
    if series_instance_uid is not None:
        result = result.where(ResultObject.series_instance_uid == series_instance_uid)
    when = session.scalar(result)
    if when is not None and (sop_instance_uid is not None or series_instance_uid is not None):
        return ("this result object" if sop_instance_uid is not None else "this result series", when)
    received = (
        select(func.max(Series.purged_at), func.count(Series.id), func.count(Series.purged_at))
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    if series_instance_uid is not None:
        received = received.where(Series.series_instance_uid == series_instance_uid)
    last, rows, purged = session.execute(received).one()
    if rows and rows == purged and last is not None:
        if series_instance_uid is not None:
            return ("this series", last)
        return ("this study", max(last, when) if when is not None else last)
    return None
