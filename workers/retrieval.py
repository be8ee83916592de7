"""Running a retrieval: pull the study from its source, then create and send its jobs."""

from __future__ import annotations

import logging
from datetime import timedelta

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from infergate import retrieval, submission
from infergate.config import Destination
from infergate.dicom.receive import StoreContext, handle_store
from infergate.dicom.retrieve import RetrieveResult, get_study, move_study
from infergate.errors import InfergateError
from infergate.store.tables import RetrievalState
from workers.pipeline import WorkerContext

log = logging.getLogger(__name__)


def run_retrieval(ctx: WorkerContext, retrieval_id: int) -> tuple[list[int], float | None]:
    """Retrieve the study; returns the new job ids to send, and a retry delay when it should be tried again."""
    settings = ctx.settings
    with ctx.factory() as session, session.begin():
        claimed = retrieval.claim(session, retrieval_id, timedelta(seconds=settings.job_lease_seconds))
        if claimed is None:
            return [], None
        study_uid, source_name, model_id, attempt = (
            claimed.study_instance_uid,
            claimed.source,
            claimed.model_id,
            claimed.attempts,
        )
    try:
        source = retrieval.find_source(settings, source_name)
        if source.method == "get" and ctx.node is not None:
            # C-GET stores what it pulls in this worker's data folder, which the node cannot read
            raise InfergateError(
                f"source {source.name} is pulled with C-GET, which needs a worker sharing the node's data folder; "
                "this worker has INFERGATE_NODE_URL set (use C-MOVE to the node, or a co-located worker)"
            )
    except InfergateError as exc:
        with ctx.factory() as session, session.begin():
            retrieval.finish(session, retrieval_id, RetrievalState.failed, error=str(exc))
        return [], None
    log.info("retrieval %d: %s from %s (attempt %d)", retrieval_id, source.method, source.name, attempt)
    result = _retrieve(ctx, source.method, source.peer, study_uid)
    if not result.ok:
        final = attempt >= settings.job_max_attempts
        with ctx.factory() as session, session.begin():
            retrieval.finish(
                session,
                retrieval_id,
                RetrievalState.failed if final else RetrievalState.queued,
                error=result.error,
                instances=result.completed,
            )
        return [], None if final else min(60.0, 2.0**attempt)
    try:
        with ctx.factory() as session, session.begin():
            job_ids = submission.submit(session, ctx.catalog(), study_instance_uid=study_uid, model_id=model_id)
            retrieval.finish(session, retrieval_id, RetrievalState.done, instances=result.completed, job_ids=job_ids)
    except InfergateError as exc:
        with ctx.factory() as session, session.begin():
            retrieval.finish(
                session, retrieval_id, RetrievalState.failed, error=f"retrieved, but: {exc}", instances=result.completed
            )
        return [], None
    log.info("retrieval %d: %d instances, jobs %s", retrieval_id, result.completed, job_ids)
    return job_ids, None


def _retrieve(ctx: WorkerContext, method: str, peer: Destination, study_uid: str) -> RetrieveResult:
    """C-GET stores here with the SCP's own handler; C-MOVE makes the PACS send to the node's SCP."""
    settings = ctx.settings
    if method == "get":
        store_ctx = StoreContext(factory=ctx.factory, data_root=settings.data_path)

        def store(event: Event) -> int | Dataset:
            return handle_store(event, store_ctx)

        return get_study(peer, study_uid, calling_ae=settings.ae_title, store=store)
    return move_study(peer, study_uid, calling_ae=settings.ae_title, move_destination=settings.ae_title)
