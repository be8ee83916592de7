"""Prometheus metrics: every metric family of the node, defined in this one module.

The SCP, the API, the watcher and the Celery workers (a parent and its prefork children) are separate
processes, so prometheus_client runs in its *multiprocess mode*: each process writes its values to
memory-mapped files in ``Settings.metrics_path`` and the API's ``GET /metrics`` adds them up
(:func:`render`), together with the gauges computed from SQL and the file system at scrape time
(:class:`NodeCollector`), which are right whichever process changed a job.

Process start-up
    Every entry point calls :func:`enable` before it records anything. prometheus_client chooses its
    value class when ``prometheus_client.values`` is first imported, from ``PROMETHEUS_MULTIPROC_DIR``,
    and reads that variable again whenever a value is created. Rather than depending on which module
    happens to import prometheus_client first, :func:`enable` sets the variable *and* installs the
    multiprocess value class itself, before it creates the families; nothing else creates metrics.
    The value class names its files ``<kind>_<host>-<pid>.db`` rather than prometheus_client's
    ``<kind>_<pid>.db``: containers sharing one data volume all run their main process as PID 1, and
    would otherwise write into each other's files. The files' disk blocks are allocated before they
    are written through their memory map (:class:`AllocatedMmapedDict`), so that a full data folder
    costs values, never the process (SIGBUS), and recording never raises into its caller.
Celery
    Prefork children inherit the set-up from the worker parent; prometheus_client notices the new PID
    and opens files of their own. A child that exits cleanly removes its ``live`` gauge files
    (:func:`process_exiting`), so the provider gauge describes live processes only.
The folder
    ``infergate up`` empties it when it starts (:func:`wipe`), since values of processes that no longer
    exist would otherwise be added to the new ones; separate services sharing a folder (compose) keep
    it, and each restarted process reopens its own ``<host>-<pid>`` files, so counters continue rather
    than reset. A worker on another machine writes to its own folder and serves it on
    ``worker_metrics_port`` (:func:`start_worker_exporter`).

Label values never carry patient data: AE titles, SOP class keywords, model ids, stage names,
destinations as configured (``AE@host:port``) and DIMSE statuses. Calling AE titles come from the
network, so at most :data:`MAX_AE_LABELS` distinct ones get a series of their own per process; the
rest are counted as ``other``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import ParamSpec

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    mmap_dict,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from pydicom.uid import UID
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.readiness import free_bytes
from infergate.store.tables import Job, JobState

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: ``calling_ae`` of instances received over DICOMweb.
STOW_RS = "STOW-RS"
#: Distinct calling AE titles a process labels before it counts the rest as ``other``.
MAX_AE_LABELS = 100
OTHER = "other"
#: Stage timings span milliseconds (``record``) to an hour (``export`` of a PACS that is down).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# Names of the families computed at scrape time (NodeCollector).
JOBS = "infergate_jobs"
QUEUE_DEPTH = "infergate_queue_depth"
STORAGE_FREE_BYTES = "infergate_storage_free_bytes"


class BoundedLabels:
    """Label values seen so far, up to ``limit``; later new values map to :data:`OTHER`.

    A peer that tries thousands of calling AE titles must not create thousands of time series.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError('Argument "limit" should be at least 1.')
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
            return value


def sop_class_label(sop_class_uid: str) -> str:
    """The SOP class keyword (``CTImageStorage``), or the UID itself when pydicom does not know it."""
    uid = (sop_class_uid or "").strip()
    if not uid:
        return "unknown"
    return UID(uid).keyword or uid


def ae_label(ae_title: str | None) -> str:
    """An AE title as a label value; a blank one is ``unknown``."""
    return (ae_title or "").strip() or "unknown"


class Metrics:
    """The metric families a process records into (the SQL-backed ones are in :class:`NodeCollector`).

    Parameters
    ----------
    registry : prometheus_client.CollectorRegistry or None
        Where the families are registered. Processes pass None: in multiprocess mode the files are what
        is exposed (:func:`render`), not a registry. Tests pass their own registry to read values back.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.instances_received = Counter(
            "infergate_instances_received",
            "Instances stored and answered Success, by C-STORE (calling AE title) or STOW-RS (calling_ae "
            '"STOW-RS"), by SOP class keyword (or UID if unknown); a repeated SOP Instance UID counts again.',
            ["calling_ae", "sop_class"],
            registry=registry,
        )
        self.associations = Counter(
            "infergate_associations",
            "DICOM associations requested of the SCP, by calling AE title and result (accepted/rejected).",
            ["calling_ae", "result"],
            registry=registry,
        )
        self.series_completed = Counter(
            "infergate_series_completed",
            "Series the watcher found complete (quiet) and routed, whether or not a rule matched.",
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "infergate_stage_seconds",
            "Seconds a job spent per worker stage (load, preprocess, onnx, postprocess, seg_build, sr_build, "
            "preview, write, record, export, queue_wait), observed when the worker records the job's timings.",
            ["stage", "model"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.export_failures = Counter(
            "infergate_export_failures",
            "Result objects a C-STORE to a destination failed for, by destination (AE@host:port as configured) and "
            "status: the DIMSE status (0xA700), or network / rejected / file when no status came back.",
            ["destination", "status"],
            registry=registry,
        )
        self.inference_provider = Gauge(
            "infergate_inference_provider",
            "1 for the ONNX Runtime execution provider that a live worker process's session of a model uses.",
            ["model", "provider"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.ae_labels = BoundedLabels(MAX_AE_LABELS)


class AllocatedMmapedDict(mmap_dict.MmapedDict):  # type: ignore[misc]
    """prometheus_client's metric file with its disk blocks allocated before any byte is written to them.

    prometheus_client sizes its files with ``truncate``, which leaves them sparse, and writes through a
    memory map. On a full file system (the data folder filling up with studies is a case the node
    handles) the first write to a page without a block kills the process with SIGBUS, the SCP in the
    middle of an association. ``posix_fallocate`` instead fails with ``ENOSPC`` as an ``OSError``,
    which the recording functions catch: the node goes on without that value.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, mmap_dict._INITIAL_MMAP_SIZE))
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        # the entry prometheus_client appends: length, key padded to 8 bytes, value and timestamp doubles
        encoded = key.encode("utf-8")
        size = struct.calcsize(f"i{len(encoded) + 8 - (len(encoded) + 4) % 8}sdd")
        capacity = self._capacity
        while self._used + size > capacity:
            capacity *= 2  # as prometheus_client grows the file, so that it truncates to what is allocated here
        if capacity != self._capacity:
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)


_lock = threading.Lock()
_active: Metrics | None = None
_active_path: Path | None = None
_identifier: str | None = None


def _host_label() -> str:
    """This host's name for file names: prometheus_client splits them at ``_``, so only ``[A-Za-z0-9.-]``."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def process_identifier() -> str:
    """``<host>-<pid>``: distinct for processes of different containers sharing one folder."""
    host = _identifier or _host_label()
    return f"{host}-{os.getpid()}"


def enable(settings: Settings) -> Metrics | None:
    """Turn on recording in this process, in multiprocess mode, into ``settings.metrics_path``.

    Called at each entry point (SCP, API, watcher, worker) before anything is recorded; calling it again
    with the same folder returns the same families. Until it is called, the recording functions below do
    nothing (unit tests that call a handler directly, one-off commands). If the folder cannot be written
    (a full data folder), the process runs without metrics (None) rather than not at all.

    Two pieces of prometheus_client are replaced for this process: its value class (multiprocess, files
    named ``<host>-<pid>``) and its file class (:class:`AllocatedMmapedDict`).

    Raises
    ------
    RuntimeError
        If this process already records into another folder.
    """
    global _active, _active_path, _identifier
    path = settings.metrics_path
    with _lock:
        if _active is not None:
            if _active_path != path:
                raise RuntimeError(f"Metrics are already recorded into {_active_path}, not {path}.")
            return _active
        os.environ[MULTIPROC_ENV] = str(path)
        _identifier = _host_label()
        values.MmapedDict = AllocatedMmapedDict  # type: ignore[misc]
        values.ValueClass = values.MultiProcessValue(process_identifier=process_identifier)
        try:
            path.mkdir(parents=True, exist_ok=True)
            _active, _active_path = Metrics(registry=None), path
        except OSError as exc:  # a full or read-only data folder must not keep the SCP from starting
            log.error("metrics are off in this process: %s cannot be written (%s)", path, type(exc).__name__)
            return None
        return _active


def active() -> Metrics | None:
    """The families this process records into, or None before :func:`enable`."""
    return _active


def wipe(path: Path) -> int:
    """Delete the metric files in ``path`` (only ``*.db``: the folder may be set to one that holds more).

    Returns the number of files removed.
    """
    removed = 0
    if path.is_dir():
        for file in path.glob("*.db"):
            file.unlink(missing_ok=True)
            removed += 1
    return removed


def process_exiting() -> None:
    """Remove this process's ``live`` gauge files, so that the provider gauge forgets it."""
    if _active_path is not None:
        try:
            multiprocess.mark_process_dead(process_identifier(), str(_active_path))
        except OSError as exc:  # the folder went away: nothing left to forget
            log.warning("live metric files not removed (%s)", type(exc).__name__)


# Recording (no-ops until enable(); never raising) -------------------------------------------------------------

_P = ParamSpec("_P")
_failures: set[str] = set()


def _never_raises(record: Callable[_P, None]) -> Callable[_P, None]:
    """A metric that cannot be written (the disk is full) must not fail the C-STORE or the job that counts it.

    Each kind of failure is logged once per process.
    """

    @functools.wraps(record)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - counting is never worth an error of the caller
            kind = f"{record.__name__}:{type(exc).__name__}"
            if kind not in _failures:
                _failures.add(kind)
                log.warning("metric %s not recorded (%s); further such failures are not logged", kind, exc)

    return wrapper


@_never_raises
def instance_received(calling_ae: str | None, sop_class_uid: str) -> None:
    """One instance stored and answered Success."""
    if _active is not None:
        ae = _active.ae_labels(ae_label(calling_ae))
        _active.instances_received.labels(calling_ae=ae, sop_class=sop_class_label(sop_class_uid)).inc()


@_never_raises
def association(calling_ae: str | None, *, accepted: bool) -> None:
    """One association accepted or rejected by the SCP."""
    if _active is not None:
        ae = _active.ae_labels(ae_label(calling_ae))
        _active.associations.labels(calling_ae=ae, result="accepted" if accepted else "rejected").inc()


@_never_raises
def series_completed(count: int = 1) -> None:
    """Series found complete and routed by the watcher."""
    if _active is not None and count > 0:
        _active.series_completed.inc(count)


@_never_raises
def stage_timings(model: str, timings: Mapping[str, float]) -> None:
    """Observe a job's seconds per stage, as recorded in ``jobs.timings`` (see ``workers/stages.py``)."""
    if _active is not None:
        for stage, seconds in timings.items():
            _active.stage_seconds.labels(stage=stage, model=model).observe(max(0.0, float(seconds)))


@_never_raises
def export_failure(destination: str, status: str, count: int = 1) -> None:
    """``count`` result objects not delivered to ``destination``; ``status`` as :func:`export_status`."""
    if _active is not None and count > 0:
        _active.export_failures.labels(destination=destination, status=status).inc(count)


def export_status(status: int | None, cause: str | None) -> str:
    """The ``status`` label of an export failure: ``0xA700``, or the cause when no status came back."""
    if status is not None:
        return f"0x{status:04X}"
    return cause or "network"


@_never_raises
def inference_provider(model: str, provider: str, previous: str | None = None) -> None:
    """A session of ``model`` in this process now runs on ``provider`` (it ran on ``previous`` before)."""
    if _active is not None:
        if previous is not None and previous != provider:
            _active.inference_provider.labels(model=model, provider=previous).set(0)
        _active.inference_provider.labels(model=model, provider=provider).set(1)


# Exposition ---------------------------------------------------------------------------------------------------


class NodeCollector:
    """Gauges computed when Prometheus scrapes: jobs per state and model, queue depth, free storage.

    ``infergate_jobs`` and ``infergate_queue_depth`` are read from SQL, the source of truth for jobs, so
    they are right whichever process (API, watcher, worker, another machine) changed a job last. The
    queue depth counts jobs in state ``queued`` (sent or waiting to be sent, not yet claimed by a
    worker) rather than the broker's queue length, which the filesystem broker cannot report and
    which includes duplicate and export messages. If the database does not answer, those two families
    are left out of the scrape (and the failure logged) rather than failing the whole scrape.
    """

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory

    def describe(self) -> Iterable[Metric]:
        """The family names, without touching the database (the registry calls this on register)."""
        return [
            GaugeMetricFamily(STORAGE_FREE_BYTES, "", value=0),
            GaugeMetricFamily(JOBS, "", labels=["state", "model"]),
            GaugeMetricFamily(QUEUE_DEPTH, "", value=0),
        ]

    def collect(self) -> Iterator[Metric]:
        try:
            free = free_bytes(self.settings.data_path)
        except OSError as exc:
            log.warning("free space of the data folder unknown (%s)", type(exc).__name__)
        else:
            yield GaugeMetricFamily(
                STORAGE_FREE_BYTES, "Bytes available to the node on the data folder's file system.", value=free
            )
        try:
            with self.factory() as session:
                rows = session.execute(
                    select(Job.state, Job.model_id, func.count()).group_by(Job.state, Job.model_id)
                ).all()
        except SQLAlchemyError as exc:
            log.warning("job gauges left out of the scrape: database unavailable (%s)", type(exc).__name__)
            return
        counts = {(JobState(state), model): int(number) for state, model, number in rows}
        jobs = GaugeMetricFamily(JOBS, "Jobs per state and model, from SQL at scrape time.", labels=["state", "model"])
        for model in sorted({model for _, model in counts}):
            for state in JobState:  # every state, so that a state emptied reads 0 rather than vanishing
                jobs.add_metric([state.value, model], counts.get((state, model), 0))
        yield jobs
        queued = sum(number for (state, _), number in counts.items() if state is JobState.queued)
        yield GaugeMetricFamily(
            QUEUE_DEPTH, "Jobs queued and not yet claimed by a worker, from SQL at scrape time.", value=queued
        )


def multiprocess_registry(path: Path) -> CollectorRegistry:
    """A registry exposing the sum over every process's files in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return registry


def render(settings: Settings, factory: sessionmaker[Session]) -> bytes:
    """The text exposition of ``GET /metrics``: every process's metrics plus :class:`NodeCollector`."""
    registry = multiprocess_registry(settings.metrics_path)
    registry.register(NodeCollector(settings, factory))
    return bytes(generate_latest(registry))


def start_worker_exporter(settings: Settings) -> bool:
    """Serve this machine's metrics folder on ``worker_metrics_port`` (all interfaces); False when off.

    For a worker on another machine, whose files the API does not see. It exposes only what the
    processes here wrote (stage timings, export failures, providers); the SQL gauges stay with the API.

    Raises
    ------
    OSError
        If the port cannot be bound, so that a worker set up to be scraped does not run unseen.
    """
    if not settings.worker_metrics_port:
        return False
    start_http_server(settings.worker_metrics_port, registry=multiprocess_registry(settings.metrics_path))
    log.info("worker metrics exporter on port %d", settings.worker_metrics_port)
    return True
