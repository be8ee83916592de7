"""Celery tasks: thin wrappers that parse the payload and call :mod:`workers.pipeline`.

A task never receives ORM objects, only a job id; whether a job runs is decided by the SQL lease,
so duplicate deliveries are harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from infergate.jobs import EXPORT_RESULTS, RUN_MODEL, ExportResults, JobQueue, RunModel
from infergate.logs import setup_logging
from infergate.store.session import make_engine, make_session_factory
from workers.celery_app import app, settings
from workers.export import export_job
from workers.pipeline import JobOutcome, WorkerContext, followup_jobs, run_job
from workers.runtime import OnnxRunner

log = logging.getLogger(__name__)


class PipelineTask(Task):  # type: ignore[misc]
    """Base task holding the per-process context; ONNX sessions load on first use, not at fork."""

    _ctx: WorkerContext | None = None

    @property
    def ctx(self) -> WorkerContext:
        if PipelineTask._ctx is None:
            setup_logging(settings, "worker")
            PipelineTask._ctx = WorkerContext(
                settings=settings,
                factory=make_session_factory(make_engine(settings)),
                runner=OnnxRunner(settings.onnx_providers, settings.onnx_threads),
            )
        return PipelineTask._ctx

    @property
    def queue(self) -> JobQueue:
        return JobQueue(self.app)


@app.task(name=RUN_MODEL, bind=True, base=PipelineTask)
def run_model(self: PipelineTask, **kwargs: Any) -> str:
    payload = RunModel.model_validate(kwargs)
    outcome, delay = run_job(self.ctx, payload.job_id)
    if outcome in (JobOutcome.exporting, JobOutcome.done):
        for job_id in followup_jobs(self.ctx, payload.job_id):
            self.queue.send_run(job_id)
    if outcome is JobOutcome.exporting:
        self.queue.send_export(payload.job_id)
    elif outcome is JobOutcome.retry:
        self.queue.send_run(payload.job_id, countdown=delay)
    return outcome.value


@app.task(name=EXPORT_RESULTS, bind=True, base=PipelineTask)
def export_results(self: PipelineTask, **kwargs: Any) -> str:
    payload = ExportResults.model_validate(kwargs)
    delay = export_job(self.ctx, payload.job_id)
    if delay is not None:
        self.queue.send_export(payload.job_id, countdown=max(delay, 0.1))
        return f"retry in {delay:.1f} s"
    return "settled"
