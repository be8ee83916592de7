"""The node, its PACS and its senders for ``benchmarks/e2e.py``.

* :class:`Node`: ``infergate scp`` (with the watcher), ``api`` and ``worker`` as separate processes, as
  ``infergate up`` starts them, with a real Orthanc as the PACS the results go to. ``embedded`` is what
  ``up`` runs (SQLite and a filesystem broker in the data folder); ``production`` uses a fresh PostgreSQL
  database and a private ``redis-server``. The worker can be restarted with another concurrency.
* :func:`send`: dcmtk ``storescu`` with a log4cplus pattern that timestamps every line, so the time of the
  last C-STORE response is the sender's own (epoch seconds, comparable with the node's UTC timestamps).
* :func:`wait_for_case`: polls the REST API until the case's jobs are settled and Orthanc holds every
  SEG/SR they list.

The test helpers are reused: :class:`tests.helpers.peers.Orthanc`, :func:`run_storescu` and
:class:`tests.helpers.node.NodeProcess`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._peers import parse_storescu, storescu_log_config
from tests.helpers.node import NodeProcess, http_json, node_env, wait_for_http
from tests.helpers.peers import LOOPBACK, Orthanc, free_port, run_storescu, wait_for_port


def epoch(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 timestamp from the API (they carry their zone)."""
    return datetime.fromisoformat(text).timestamp()


@dataclass
class Node:
    """The node's processes on loopback ports, in ``work``, exporting to ``pacs``."""

    work: Path
    pacs: Orthanc
    layout: str = "embedded"
    quiet_seconds: float = 1.0
    watcher_interval: float = 1.0
    pg_dsn: str | None = None
    scp_port: int = 0
    api_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, NodeProcess] = field(default_factory=dict)
    _redis: Any = None
    _database: str | None = None

    @property
    def api(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    def start(self, concurrency: int = 1, onnx_threads: int = 0) -> Node:
        self.work.mkdir(parents=True, exist_ok=True)
        self.scp_port, self.api_port = free_port(), free_port()
        values: dict[str, Any] = {
            "data_dir": self.work / "var",
            "scp_port": self.scp_port,
            "api_port": self.api_port,
            "series_quiet_seconds": self.quiet_seconds,
            "watcher_interval_seconds": self.watcher_interval,
            "pacs": f"{self.pacs.aet}@{LOOPBACK}:{self.pacs.dicom_port}",
        }
        if self.layout == "production":
            values.update(self._production_stores())
        elif self.layout != "embedded":
            raise ValueError(f'Argument "layout" should be "embedded" or "production", got "{self.layout}".')
        self.env = node_env(**values)
        upgrade = NodeProcess(["db", "upgrade"], self.env, self.work / "db-upgrade.log").start()
        assert upgrade.process is not None
        if upgrade.process.wait(timeout=120) != 0:
            raise RuntimeError(f"infergate db upgrade failed:\n{upgrade.log_text()[-3000:]}")
        for name in ("scp", "api"):
            self.processes[name] = NodeProcess([name], self.env, self.work / f"{name}.log").start()
        wait_for_port(LOOPBACK, self.scp_port, timeout=60)
        wait_for_http(f"{self.api}/health", timeout=60)
        self.start_worker(concurrency, onnx_threads)
        return self

    def _production_stores(self) -> dict[str, str]:
        import psycopg

        from tests.helpers.deployment import RedisServer

        if not self.pg_dsn:
            raise ValueError('The "production" layout needs a PostgreSQL admin DSN (--pg-dsn).')
        self._database = f"infergate_e2e_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self._database}"')
        self._redis = RedisServer(self.work / "redis").start()
        base = self.pg_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        return {"database_url": f"{base}/{self._database}", "broker_url": self._redis.url()}

    def start_worker(self, concurrency: int, onnx_threads: int = 0) -> None:
        """(Re)start ``infergate worker`` with ``concurrency`` processes; returns once Celery says ready."""
        old = self.processes.pop("worker", None)
        if old is not None:
            old.stop(timeout=60)
        env = dict(self.env, INFERGATE_WORKER_CONCURRENCY=str(concurrency), INFERGATE_ONNX_THREADS=str(onnx_threads))
        log_path = self.work / f"worker-{concurrency}-{uuid.uuid4().hex[:6]}.log"
        worker = NodeProcess(["worker"], env, log_path).start()
        self.processes["worker"] = worker
        deadline = time.monotonic() + 120
        while " ready." not in worker.log_text():
            assert worker.process is not None
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not become ready:\n{worker.log_text()[-3000:]}")
            time.sleep(0.1)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each of the node's processes (with their children)."""
        return {
            name: cpu_seconds(process.pid) for name, process in self.processes.items() if process.process is not None
        }

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()[-6000:]}" for p in self.processes.values())

    def stop(self) -> None:
        for name in ("worker", "api", "scp"):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop(timeout=60)
        if self._redis is not None:
            self._redis.kill()
            self._redis = None
        if self._database is not None and self.pg_dsn:
            import psycopg

            with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)')
            self._database = None


_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a Celery worker's pool processes), from ``/proc``."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    queue += [int(item) for item in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``'s process tree, reaped children included."""
    ticks = 0
    for item in _tree(pid):
        try:
            with open(f"/proc/{item}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / _TICK


@dataclass(frozen=True)
class Sent:
    """One sending: epoch seconds of the first A-ASSOCIATE-RQ and of the last C-STORE response."""

    first: float
    last_response: float
    instances: int


def send(folders: Sequence[Path], port: int, log_config: Path) -> list[Sent]:
    """C-STORE each folder with its own ``storescu`` (all at once when several); every instance must succeed."""
    outputs: list[str] = [""] * len(folders)
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            result = run_storescu(folders[index], port=port, aec="INFERGATE", extra_args=["-lc", str(log_config)])
            outputs[index] = result.stderr
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(folders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    sent = []
    for folder, text in zip(folders, outputs, strict=True):
        first, last, _, ok, failed = parse_storescu(text)
        files = sum(1 for path in folder.rglob("*") if path.is_file())
        if failed or ok != files or not last:
            raise RuntimeError(f"storescu {folder.name}: {ok} of {files} answered Success\n{text[-2000:]}")
        sent.append(Sent(first, last, ok))
    return sent


def _jobs(api: str, study_uid: str) -> list[dict[str, Any]]:
    """The jobs of a study with their results (``JobDetail``), as the results endpoint lists them."""
    status, body = http_json(f"{api}/api/v1/studies/{study_uid}/results")
    if status != 200:
        return []
    return [job for series in body["series"] for job in series["jobs"]]


def _states(api: str, study_uids: Sequence[str]) -> list[str]:
    """States of the jobs of ``study_uids``: one light query (summaries, no results) per poll."""
    wanted = set(study_uids)
    status, body = http_json(f"{api}/api/v1/jobs?limit=1000")
    if status != 200:
        return []
    return [job["state"] for job in body["items"] if job["study_instance_uid"] in wanted]


def _in_pacs(pacs: Orthanc, sop_instance_uids: Sequence[str]) -> bool:
    return all(pacs.find("Instance", {"SOPInstanceUID": uid}) for uid in sop_instance_uids)


def wait_for_case(
    api: str, pacs: Orthanc, study_uids: Sequence[str], jobs: int, timeout: float, interval: float = 0.1
) -> tuple[list[dict[str, Any]], float]:
    """The settled jobs of ``study_uids`` (``jobs`` in all), once Orthanc holds all their results, and when.

    Polls the job list (one light request) every ``interval`` s; the results and Orthanc are read
    only once every job is settled, so that polling takes little CPU from the node it measures.

    Returns
    -------
    (list of job JSON, float)
        The jobs as ``GET /api/v1/studies/{uid}/results`` lists them, and the epoch seconds of the poll
        that found every SEG/SR in Orthanc.

    Raises
    ------
    RuntimeError
        A job failed or an export did not succeed.
    TimeoutError
        Not settled within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        states = _states(api, study_uids)
        if len(states) >= jobs and all(state in ("done", "failed", "cancelled") for state in states):
            found = [job for uid in study_uids for job in _jobs(api, uid)]
            bad = [job for job in found if job["state"] != "done"]
            if bad:
                raise RuntimeError(f"jobs did not succeed: {[(j['model_id'], j['state'], j['error']) for j in bad]}")
            uids = [obj["sop_instance_uid"] for job in found for obj in job["result_objects"]]
            if len(found) >= jobs and _in_pacs(pacs, uids):
                return found, time.time()
        time.sleep(interval)
    raise TimeoutError(f"{len(states)} of {jobs} jobs seen within {timeout} s, states {sorted(states)}")


__all__ = ["Node", "Sent", "cpu_seconds", "epoch", "send", "storescu_log_config", "wait_for_case"]
