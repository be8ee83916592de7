"""The contract between the service and the workers: task names, payloads and the Celery app.

The service enqueues by task name with :class:`JobQueue` and never imports the worker code; the
payload carries only a job id (the database holds everything else). Long GPU jobs use late acks,
prefetch 1 and ``task_reject_on_worker_lost`` so that a message is not lost with a dying worker;
the SQL reconciler (:mod:`infergate.reconcile`) re-sends jobs whose message was lost anyway.
"""

from __future__ import annotations

from typing import Protocol

from celery import Celery
from pydantic import BaseModel, Field

from infergate.config import Settings

RUN_MODEL = "infergate.run_model"
EXPORT_RESULTS = "infergate.export_results"
RETRIEVE_STUDY = "infergate.retrieve_study"

GPU_QUEUE = "gpu"
DISPATCH_QUEUE = "dispatch"


class RunModel(BaseModel):
    """Payload of :data:`RUN_MODEL`."""

    job_id: int = Field(ge=1)


class ExportResults(BaseModel):
    """Payload of :data:`EXPORT_RESULTS`."""

    job_id: int = Field(ge=1)


class RetrieveStudy(BaseModel):
    """Payload of :data:`RETRIEVE_STUDY`."""

    retrieval_id: int = Field(ge=1)


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; the worker adds its tasks to it."""
    app = Celery("infergate", broker=settings.celery_broker_url, set_as_current=False)
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": DISPATCH_QUEUE,
        "task_routes": {
            RUN_MODEL: {"queue": GPU_QUEUE},
            EXPORT_RESULTS: {"queue": DISPATCH_QUEUE},
            RETRIEVE_STUDY: {"queue": DISPATCH_QUEUE},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        # A worker keeps reconnecting however long the broker is down (Celery gives up after 100
        # tries by default, some 45 minutes, and the worker then exits).
        "broker_connection_max_retries": None,
        # A task running when the broker connection drops goes on to the end: its result is
        # recorded in SQL, and a duplicate delivery of its message only finds the job settled.
        # (Cancelling it, as Celery 6 will by default, would throw the work away and leave the
        # job to wait for its lease to expire, since a broker restarted without persistence
        # forgets the message.)
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The lease is renewed while a job runs, so a model that hangs would hold its job forever:
        # the pool process is killed past this limit, and the job is retried like after a crash.
        "task_time_limit": settings.job_time_limit_seconds,
        "broker_transport_options": {},
    }
    if settings.celery_broker_url.startswith("filesystem"):
        queue_dir = settings.broker_dir / "queue"
        processed_dir = settings.broker_dir / "processed"
        control_dir = settings.broker_dir / "control"
        for folder in (queue_dir, processed_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "store_processed": False,
            # exchange bindings; kombu's default is ./control, i.e. the working directory
            "control_folder": str(control_dir),
            "polling_interval": 0.05,
        }
    elif settings.celery_broker_url.startswith("redis"):
        conf["broker_transport_options"] = redis_transport_options(settings)
    app.conf.update(conf)
    return app


def redis_transport_options(settings: Settings) -> dict[str, object]:
    """Kombu's Redis transport options for ``settings``.

    A message a worker took but never acknowledged (the worker died) goes back to its queue after
    the visibility timeout; the reconciler usually re-sends the job sooner, once its SQL lease has
    expired. Kombu looks for such messages every ``unacked_restore_interval`` seconds times
    ``unacked_restore_throttle`` (100 s by default), so the sweep is tied to the timeout here.
    The socket timeouts keep a publish (the watcher's, the API's) from waiting forever on a broker
    that vanished without closing its connections; the send then fails, and the job waits in SQL.
    """
    visibility = settings.broker_visibility_timeout_seconds
    if visibility is None:
        visibility = settings.job_lease_seconds + 60
    return {
        "visibility_timeout": max(1, round(visibility)),
        "unacked_restore_interval": max(1, min(60, round(visibility / 4))),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }


class JobSender(Protocol):
    """What the watcher and reconciler need of a queue: :class:`JobQueue`, or a test's stand-in."""

    def send_run(self, job_id: int, countdown: float | None = None) -> None: ...

    def send_export(self, job_id: int, countdown: float | None = None) -> None: ...

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None: ...


class JobQueue:
    """Sends work to the workers by task name (so the service never imports worker code)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        self.app.send_task(RUN_MODEL, kwargs=RunModel(job_id=job_id).model_dump(), countdown=countdown)

    def send_export(self, job_id: int, countdown: float | None = None) -> None:
        self.app.send_task(EXPORT_RESULTS, kwargs=ExportResults(job_id=job_id).model_dump(), countdown=countdown)

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None:
        self.app.send_task(
            RETRIEVE_STUDY, kwargs=RetrieveStudy(retrieval_id=retrieval_id).model_dump(), countdown=countdown
        )
