"""Readiness: whether the node can take work now, the checks behind ``GET /ready``.

``/health`` says the API process answers; a load balancer or an orchestrator needs more before it
sends studies: the database answers, the broker takes messages, the data folder takes files, a
worker is there to run the jobs and a model is installed to route them to. Each check here is a
plain function returning a :class:`Check`; :func:`run_checks` runs them side by side under one
deadline, so that a database that hangs cannot hold the probe longer than the probe's own timeout.

Details name the cause (an exception type, a folder, a count), never a URL (it may hold a password)
and never anything about a patient.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from infergate.catalog import Catalog
from infergate.config import Settings

if TYPE_CHECKING:
    from celery import Celery

#: Longest wait for the broker's connection and for a worker's answer to a ping.
BROKER_TIMEOUT_SECONDS = 2.0
WORKER_PING_SECONDS = 1.0
#: Longest time all the checks together may take; a check still running then counts as failed.
DEADLINE_SECONDS = 5.0


@dataclass(frozen=True)
class Check:
    """The outcome of one readiness check."""

    name: str
    ok: bool
    detail: str


def free_bytes(path: Path) -> int:
    """Bytes available to this process on the file system holding ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def check_database(factory: sessionmaker[Session]) -> Check:
    """``SELECT 1`` through the node's own engine (its pool, its connect arguments)."""
    try:
        with factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any driver error means "not ready"; the type says which
        return Check("database", False, f"unreachable ({type(exc).__name__})")
    return Check("database", True, "answers")


def check_broker(settings: Settings, app: Callable[[], Celery]) -> Check:
    """The Celery broker: its folders for the embedded filesystem broker, else one connection attempt.

    The filesystem broker is folders in the data folder (``make_celery``, behind ``app``, creates them);
    it works as long as they exist and are writable. Any other broker (Redis) gets a real connection,
    tried once.
    """
    try:
        celery = app()
    except Exception as exc:  # noqa: BLE001 - e.g. the broker folders cannot be created
        return Check("broker", False, f"cannot be set up ({type(exc).__name__})")
    if settings.celery_broker_url.startswith("filesystem"):
        folders = [settings.broker_dir / name for name in ("queue", "processed", "control")]
        bad = [folder.name for folder in folders if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK))]
        if bad:
            return Check("broker", False, f"filesystem broker folders missing or not writable: {', '.join(bad)}")
        return Check("broker", True, "filesystem broker folders writable")
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT_SECONDS)
    except Exception as exc:  # noqa: BLE001 - kombu and the transports raise many types
        return Check("broker", False, f"unreachable ({type(exc).__name__})")
    return Check("broker", True, "connected")


def check_storage(settings: Settings) -> Check:
    """The data folder exists, is writable, and has more free space than ``min_free_bytes``.

    Below the watermark the SCP rejects associations (transient), so the node is not ready for studies.
    """
    folder = settings.data_path
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return Check("storage", False, "data folder missing or not writable")
    try:
        free = free_bytes(folder)
    except OSError as exc:
        return Check("storage", False, f"free space unknown ({type(exc).__name__})")
    if settings.min_free_bytes and free < settings.min_free_bytes:
        return Check("storage", False, f"{free} bytes free, below the watermark of {settings.min_free_bytes}")
    return Check("storage", True, f"{free} bytes free")


def check_workers(app: Callable[[], Celery]) -> Check:
    """At least one Celery worker answers a ping over the broker.

    Celery's remote control works over both brokers the node supports (Redis publishes it; kombu's
    filesystem transport writes a message per worker mailbox), and the worker's main process answers
    while its pool runs a job. An answer proves the worker consumes from the broker, which a heartbeat
    kept by a side thread would not. With the filesystem broker, a ping to a worker that stopped stays
    in its mailbox folder until a worker of the same name starts and drops it as expired.
    """
    try:
        replies = app().control.ping(timeout=WORKER_PING_SECONDS, limit=1)
    except Exception as exc:  # noqa: BLE001 - a broker failure is reported by check_broker too
        return Check("workers", False, f"cannot ping workers ({type(exc).__name__})")
    if not replies:
        return Check("workers", False, f"no worker answered within {WORKER_PING_SECONDS:g} s")
    return Check("workers", True, "a worker answered")


def check_models(catalog: Callable[[], Catalog]) -> Check:
    """The catalog loads (manifests and routing rules valid) and holds a model whose ONNX file exists."""
    try:
        packages = catalog().packages
    except Exception as exc:  # noqa: BLE001 - InvalidInput, or an unreadable folder
        return Check("models", False, f"models or routing rules invalid ({type(exc).__name__})")
    usable = [model_id for model_id, package in packages.items() if package.onnx_path.is_file()]
    if not usable:
        return Check("models", False, "no model installed")
    return Check("models", True, f"{len(usable)} model(s): {', '.join(sorted(usable))}")


def run_checks(checks: Mapping[str, Callable[[], Check]], deadline: float = DEADLINE_SECONDS) -> list[Check]:
    """Run ``checks`` side by side; one not finished within ``deadline`` seconds fails as timed out.

    A timed-out check keeps its thread until it returns (a thread cannot be stopped), which the
    driver's own timeouts bound; the probe answers on time regardless.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(checks) or 1, thread_name_prefix="ready")
    try:
        futures = {name: pool.submit(check) for name, check in checks.items()}
        concurrent.futures.wait(futures.values(), timeout=deadline)
        results = []
        for name, future in futures.items():
            if not future.done():
                results.append(Check(name, False, f"no answer within {deadline:g} s"))
            elif (error := future.exception()) is not None:
                results.append(Check(name, False, f"check failed ({type(error).__name__})"))
            else:
                results.append(future.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return results
