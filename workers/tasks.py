"""Celery tasks: thin wrappers that parse the payload and call :mod:`workers.pipeline`.

A task never receives ORM objects, only a job id; whether a job runs is decided by the SQL lease,
so duplicate deliveries are harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from infergate.jobs import EXPORT_RESULTS, RETRIEVE_STUDY, RUN_MODEL, ExportResults, JobQueue, RetrieveStudy, RunModel
from infergate.store.session import make_engine, make_session_factory
from workers.celery_app import app, settings
from workers.export import export_job
from workers.node_client import NodeUnavailable
from workers.pipeline import JobOutcome, WorkerContext, followup_jobs, run_job
from workers.retrieval import run_retrieval
from workers.runtime import OnnxRunner

log = logging.getLogger(__name__)


class PipelineTask(Task):  # type: ignore[misc]
    """Base task holding the per-process context; ONNX sessions load on first use, not at fork."""

    _ctx: WorkerContext | None = None

    @property
    def ctx(self) -> WorkerContext:
        if PipelineTask._ctx is None:
            PipelineTask._ctx = WorkerContext(
                settings=settings,
                factory=make_session_factory(make_engine(settings)),
                runner=OnnxRunner(settings.onnx_providers, settings.onnx_threads),
            )
        return PipelineTask._ctx

    @property
    def job_queue(self) -> JobQueue:
        # not "queue": Celery reads Task.queue as the name of the queue to route the task to
        return JobQueue(self.app)


@app.task(name=RUN_MODEL, bind=True, base=PipelineTask)
def run_model(self: PipelineTask, **kwargs: Any) -> str:
    payload = RunModel.model_validate(kwargs)
    outcome, delay = run_job(self.ctx, payload.job_id)
    if outcome in (JobOutcome.exporting, JobOutcome.done):
        for job_id in followup_jobs(self.ctx, payload.job_id):
            self.job_queue.send_run(job_id)
    if outcome is JobOutcome.exporting:
        self.job_queue.send_export(payload.job_id)
    elif outcome is JobOutcome.retry:
        self.job_queue.send_run(payload.job_id, countdown=delay)
    return outcome.value


@app.task(name=EXPORT_RESULTS, bind=True, base=PipelineTask)
def export_results(self: PipelineTask, **kwargs: Any) -> str:
    payload = ExportResults.model_validate(kwargs)
    try:
        delay: float | None = export_job(self.ctx, payload.job_id)
    except NodeUnavailable as exc:  # a remote worker could not fetch the results from the node: later
        delay = min(60.0, self.ctx.settings.export_backoff_max_seconds)
        log.warning("job %d: export postponed %.0f s: %s", payload.job_id, delay, exc)
    if delay is not None:
        self.job_queue.send_export(payload.job_id, countdown=max(delay, 0.1))
        return f"retry in {delay:.1f} s"
    return "settled"


@app.task(name=RETRIEVE_STUDY, bind=True, base=PipelineTask)
def retrieve_study(self: PipelineTask, **kwargs: Any) -> str:
    payload = RetrieveStudy.model_validate(kwargs)
    job_ids, delay = run_retrieval(self.ctx, payload.retrieval_id)
    for job_id in job_ids:
        self.job_queue.send_run(job_id)
    if delay is not None:
        self.job_queue.send_retrieve(payload.retrieval_id, countdown=delay)
        return f"retry in {delay:.1f} s"
    return f"jobs {job_ids}"
