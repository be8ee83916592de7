"""Input and output of a worker that does not share the node's data folder (``INFERGATE_NODE_URL``).

* Input: :func:`series_files` fetches a job's series over WADO-RS into a private cache of the
  worker's own data folder (``cache/jobs/<job id>/<SOP Instance UID>.dcm``), written with the same
  durable, path-safe helpers as received instances, checks that every SOP Instance UID the database
  lists arrived, and removes the cache once the job has read it (the datasets are then in memory).
  One folder per job, rebuilt by each attempt, means no two jobs share files and nothing grows.
* Output: the pipeline hands each SEG/SR back to the node (:meth:`NodeClient.store_result`); the
  node's data folder is the source of truth, so :func:`result_files` fetches a job's results from
  the node (WADO-RS) before an export sends them, whichever worker made them.

A co-located worker (no ``NODE_URL``) gets the paths of the shared data folder from both, as before.
"""

from __future__ import annotations

import logging
import mmap
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from infergate.config import Settings
from infergate.dicom.storage import check_uid, replace_file, resolve_inside, store_new_file
from infergate.dicomweb.multipart import parse_media_type, split_parts
from infergate.errors import InvalidInput
from infergate.store.tables import Job, ResultObject, Series, Study
from workers.node_client import NodeClient, NodeUnavailable

log = logging.getLogger(__name__)

__all__ = ["cache_folder", "fetch_series", "result_files", "series_files"]


def cache_folder(job_id: int) -> Path:
    """The job's private input cache, relative to the worker's data folder."""
    return Path("cache", "jobs", str(int(job_id)))


def _discard_tree(root: Path, relfolder: Path) -> None:
    """Remove a cache folder; nothing in it needs to survive a crash, so no fsync."""
    try:
        shutil.rmtree(resolve_inside(root, relfolder))
    except FileNotFoundError:
        return


def _spool(settings: Settings) -> IO[bytes]:
    """An anonymous file in the worker's data folder for a response body (never the whole body in memory)."""
    folder = settings.data_path / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile(dir=folder)


def _dicom_parts(spool: IO[bytes], content_type: str) -> Iterator[bytes]:
    """The Part 10 files of a spooled WADO-RS answer, one at a time (PS3.18 8.6.1.2).

    Raises
    ------
    NodeUnavailable
        The answer is not ``multipart/related`` of ``application/dicom`` parts, or is truncated:
        a transfer cut short looks like that, so the job is tried again.
    """
    try:
        media = parse_media_type(content_type)
        boundary = media.param("boundary")
        if media.essence != "multipart/related" or not boundary:
            raise InvalidInput(f'the node answered "{media.essence}", not multipart/related with a boundary')
        if spool.seek(0, 2) == 0:
            raise InvalidInput("the node's answer is empty")
        spool.flush()
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
            default = media.param("type") or "application/octet-stream"
            for part in split_parts(body, boundary):
                if part.content_type(default).essence != "application/dicom":
                    raise InvalidInput("the node's answer holds a part that is not application/dicom")
                yield body[part.start : part.end]
    except InvalidInput as exc:
        raise NodeUnavailable(f"unusable WADO-RS answer: {exc}") from None


def _sop_instance_uid(data: bytes) -> str:
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError):
        raise NodeUnavailable("a part of the node's WADO-RS answer is not a readable DICOM file") from None
    uid = ds.get("SOPInstanceUID")
    if not isinstance(uid, str):
        raise NodeUnavailable("a part of the node's WADO-RS answer has no SOP Instance UID")
    return uid


def fetch_series(
    settings: Settings,
    node: NodeClient,
    job_id: int,
    study_uid: str,
    series_uid: str,
    instances: Sequence[tuple[str, str]],
) -> list[str]:
    """Fetch a series over WADO-RS into the job's cache; returns the cached files' relative paths.

    Parameters
    ----------
    settings : Settings
        The worker's; files go under its ``data_path``.
    node : NodeClient
        The node's API.
    job_id : int
        Names the cache folder (:func:`cache_folder`).
    study_uid, series_uid : str
        The series to retrieve.
    instances : sequence of (SOP Instance UID, stored path)
        What the database lists for the series; the result keeps this order.

    Returns
    -------
    list of str
        Paths relative to the data folder, one per listed instance.

    Raises
    ------
    NodeUnavailable
        The node is unreachable, refused, sent something unusable, or left out a listed instance.
    InvalidInput
        A listed SOP Instance UID breaks the UID grammar (it would name a path).
    """
    folder = cache_folder(job_id)
    wanted = {sop: folder / f"{check_uid(sop, 'sop_instance_uid')}.dcm" for sop, _ in instances}
    if not wanted:
        return []
    received: set[str] = set()
    with _spool(settings) as spool:
        content_type = node.retrieve_series(study_uid, series_uid, spool)
        for data in _dicom_parts(spool, content_type):
            sop = _sop_instance_uid(data)
            if sop in wanted and sop not in received:  # others arrived after the job listed the series
                store_new_file(settings.data_path, wanted[sop], data)
                received.add(sop)
    if len(received) != len(wanted):
        raise NodeUnavailable(
            f"the node's WADO-RS answer lacks {len(wanted) - len(received)} of the series' {len(wanted)} instances"
        )
    log.info("job %d: %d instances fetched from the node", job_id, len(received))
    return [str(wanted[sop]) for sop, _ in instances]


@contextmanager
def series_files(
    settings: Settings,
    node: NodeClient | None,
    job_id: int,
    study_uid: str,
    series_uid: str,
    instances: Sequence[tuple[str, str]],
) -> Iterator[list[str]]:
    """Relative paths to read a job's series from, for as long as the block runs.

    A co-located worker (``node`` None) reads the stored paths of the shared data folder. A remote
    one gets its private cache (:func:`fetch_series`), emptied first (what a dead attempt left) and
    removed when the block ends, whatever happens: the pipeline holds the datasets in memory then.
    """
    if node is None:
        yield [path for _, path in instances]
        return
    folder = cache_folder(job_id)
    _discard_tree(settings.data_path, folder)
    try:
        yield fetch_series(settings, node, job_id, study_uid, series_uid, instances)
    finally:
        _discard_tree(settings.data_path, folder)


def result_files(
    settings: Settings, node: NodeClient | None, session: Session, job_id: int, relpaths: Sequence[str]
) -> list[Path]:
    """Absolute paths of a job's result files to export, in the order of ``relpaths``.

    On a co-located worker they are the shared data folder's. A remote worker fetches each one from
    the node (WADO-RS, as stored) and writes it over its own copy at the same relative path: the
    node's file is the one WADO-RS serves, and another worker may have rerun the job since.

    Raises
    ------
    NodeUnavailable
        The node is unreachable or does not serve the object.
    """
    if node is None:
        return [resolve_inside(settings.data_path, path) for path in relpaths]
    rows = session.execute(
        select(
            ResultObject.path,
            ResultObject.series_instance_uid,
            ResultObject.sop_instance_uid,
            Study.study_instance_uid,
        )
        .join(Job, Job.id == ResultObject.job_id)
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(ResultObject.job_id == job_id, ResultObject.path.in_(list(relpaths)))
    ).all()
    by_path = {row.path: row for row in rows}
    paths = []
    for relpath in relpaths:
        row = by_path[relpath]
        with _spool(settings) as spool:
            content_type = node.retrieve_instance(
                row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, spool
            )
            parts = _dicom_parts(spool, content_type)
            found = [data for data in parts if _sop_instance_uid(data) == row.sop_instance_uid]
        if not found:
            raise NodeUnavailable("the node's WADO-RS answer lacks the result object")
        paths.append(replace_file(settings.data_path, Path(relpath), found[0]))
    return paths
