"""A worker on "another machine": its own data folder, sharing only PostgreSQL, Redis and the node's HTTP API.

The node runs as ``infergate scp`` (with the watcher) and ``infergate api`` on data folder A; the
remote worker runs as ``infergate worker`` on data folder B with ``INFERGATE_NODE_URL`` and a key
of the ``worker`` scope. Nothing in its environment names A, and where the kernel allows an
unprivileged mount namespace (``unshare``) the worker process sees an empty, read-only folder where
A is. A CT series sent with DCMTK ``storescu`` must end as the same SEG and SR a co-located worker
makes for it (the job re-run by one, on A), retrievable from the node over WADO-RS, and exported
to Orthanc by the remote worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine

from infergate.dicomweb.multipart import parse_multipart
from infergate.store.migrate import upgrade
from tests.data.make_series import SeriesInfo, write_ct_series
from tests.helpers.deployment import results_in_pacs, write_rules
from tests.helpers.dicom_compare import RUN_TIME_KEYWORDS, differences, keywords
from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.peers import Orthanc, free_port, run_storescu, wait_for_port
from tests.helpers.phi_watch import WATCH

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

WORKER_KEY = secrets.token_urlsafe(24)
OPERATOR_KEY = secrets.token_urlsafe(24)
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _can_hide_folders() -> bool:
    """Whether this kernel lets us give a process its own mount namespace (``unshare -Urm``)."""
    try:
        probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class IsolatedWorker(NodeProcess):
    """``infergate worker`` that cannot see ``hidden``: an empty read-only tmpfs is mounted over it."""

    def __init__(self, env: dict[str, str], log_path: Path, hidden: Path | None) -> None:
        super().__init__(["worker"], env, log_path)
        self.hidden = hidden

    def start(self) -> IsolatedWorker:
        WATCH.watch_file(self.log_path)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
        full_env.update(self.env)
        command = [sys.executable, "-m", "infergate.cli", "worker"]
        if self.hidden is not None:
            script = 'mount -t tmpfs -o ro,size=64k none "$0" && exec "$@"'
            command = ["unshare", "-Urm", "sh", "-c", script, str(self.hidden), *command]
        with self.log_path.open("ab") as handle:
            self.process = subprocess.Popen(
                command, env=full_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self


@dataclass
class Node:
    api: str
    data: Path
    env: dict[str, str]
    scp_port: int
    pacs: Orthanc
    processes: list[NodeProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()[-6000:]}" for p in self.processes)


def _request(url: str, key: str, method: str = "GET", accept: str | None = None) -> tuple[int, bytes, str]:
    headers = {"X-API-Key": key, **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with _HTTP.open(request, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _job(node: Node, job_id: int) -> dict[str, Any]:
    status, body, _ = _request(f"{node.api}/api/v1/jobs/{job_id}", OPERATOR_KEY)
    assert status == 200, body
    return dict(json.loads(body))


def _wait_done(node: Node, study_uid: str, timeout: float, *, after: str | None = None) -> dict[str, Any]:
    """The study's one job once it is done (finished after ``after``, an ISO time, when given)."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        status, raw, _ = _request(f"{node.api}/api/v1/studies/{study_uid}/results", OPERATOR_KEY)
        if status == 200:
            body = json.loads(raw)
            jobs = [job for series in body["series"] for job in series["jobs"]]
            if len(jobs) == 1 and jobs[0]["state"] in ("done", "failed"):
                job = _job(node, jobs[0]["id"])
                if job["state"] == "failed" or after is None or (job["finished_at"] or "") > after:
                    assert job["state"] == "done", (job, node.logs())
                    return job
        time.sleep(0.5)
    raise TimeoutError(f"the job did not finish within {timeout} s; last answer: {body}\n{node.logs()}")


@pytest.fixture
def node(tmp_path: Path, pg_url: str, redis_db: str) -> Iterator[Node]:
    """SCP (with the watcher) and API on data folder A, Orthanc as the PACS; no worker yet."""
    engine = create_engine(pg_url)
    upgrade(engine)
    engine.dispose()
    keys = ",".join(
        f"{name}:{hashlib.sha256(key.encode()).hexdigest()}:{scope}"
        for name, key, scope in (("worker-b", WORKER_KEY, "worker"), ("operator", OPERATOR_KEY, "admin"))
    )
    scp_port, api_port = free_port(), free_port()
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC") as pacs:
        env = node_env(
            data_dir=tmp_path / "node-a",
            database_url=pg_url,
            broker_url=redis_db,
            scp_port=scp_port,
            api_port=api_port,
            series_quiet_seconds=2,
            pacs=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
            routing_rules=write_rules(tmp_path / "routing.yaml", ["ct-tissue-seg"]),
            api_keys=keys,
            job_lease_seconds=30,
            reconcile_interval_seconds=2,
            requeue_after_seconds=600,
        )
        scp = NodeProcess(["scp"], env, tmp_path / "scp.log").start()
        api = NodeProcess(["api"], env, tmp_path / "api.log").start()
        node = Node(f"http://127.0.0.1:{api_port}", tmp_path / "node-a", env, scp_port, pacs, [scp, api])
        try:
            wait_for_port("127.0.0.1", scp_port, timeout=60)
            wait_for_http(f"{node.api}/health", timeout=60)
            yield node
        except BaseException:
            print(node.logs())  # noqa: T201
            raise
        finally:
            for process in reversed(node.processes):
                process.stop()


def _send(node: Node, folder: Path) -> SeriesInfo:
    info = write_ct_series(folder, slices=24, size=128)
    sent = run_storescu(info.folder, port=node.scp_port, aec="INFERGATE")
    assert sent.returncode == 0, sent.stderr
    return info


def _result_files(node: Node, job: dict[str, Any]) -> dict[str, Path]:
    """Relative paths of the job's SEG and SR (as the database names them: results/<job>/<kind>-<uid>.dcm)."""
    return {
        obj["kind"]: Path("results", str(job["id"]), f"{obj['kind']}-{obj['sop_instance_uid']}.dcm")
        for obj in job["result_objects"]
    }


def test_a_worker_with_its_own_data_folder_makes_what_a_co_located_one_makes(node: Node, tmp_path: Path) -> None:
    folder_b = tmp_path / "worker-b"
    worker_env = node_env(
        data_dir=folder_b,
        database_url=node.env["INFERGATE_DATABASE_URL"],
        broker_url=node.env["INFERGATE_BROKER_URL"],
        pacs=node.env["INFERGATE_PACS"],
        routing_rules=node.env["INFERGATE_ROUTING_RULES"],
        job_lease_seconds=30,
        node_url=node.api,
        node_api_key=WORKER_KEY,
    )
    assert not any(str(node.data) in value for value in worker_env.values()), "B's environment names A"
    hide = _can_hide_folders()
    if not hide:
        warnings.warn("no mount namespace: the remote worker could see folder A, though nothing names it", stacklevel=1)
    remote = IsolatedWorker(worker_env, tmp_path / "worker-b.log", node.data if hide else None).start()
    node.processes.append(remote)

    info = _send(node, tmp_path / "ct")
    job = _wait_done(node, info.study_uid, timeout=180)
    files = _result_files(node, job)
    assert set(files) == {"SEG", "SR"}, job
    made_remotely: dict[str, bytes] = {}
    for kind, relpath in files.items():
        made_remotely[kind] = (node.data / relpath).read_bytes()  # handed back into A by the node's API
        assert (folder_b / relpath).read_bytes() == made_remotely[kind]  # written (and exported) from B
    assert not (folder_b / "instances").exists() and not any((folder_b / "cache" / "jobs").iterdir())

    # the node serves them over WADO-RS, byte for byte as stored
    for obj in job["result_objects"]:
        status, body, content_type = _request(
            obj["retrieve_url"], OPERATOR_KEY, accept='multipart/related; type="application/dicom"; transfer-syntax=*'
        )
        assert status == 200, body[:300]
        ((_, part),) = parse_multipart(body, content_type)
        assert part == made_remotely[obj["kind"]]
    # ... and the remote worker exported them to the PACS (it had to fetch them from the node)
    segs, srs = results_in_pacs(node.pacs, timeout=20, srs_expected=1)
    assert len(segs) == 1 and len(srs) == 1
    assert all(e["state"] == "done" for obj in job["result_objects"] for e in obj["exports"]), job
    # the worker went through the API: its WADO-RS reads and its results handed back are in A's audit trail
    audit = (node.data / "audit.log").read_text()
    assert f"GET /dicomweb/studies/{info.study_uid}/series/{info.series_uid} -> 200" in audit
    assert f"PUT /api/v1/jobs/{job['id']}/results/SEG/" in audit
    assert '"worker-b"' in audit
    assert f"job {job['id']}: 24 instances fetched from the node" in remote.log_text()

    remote.stop()
    co_located = NodeProcess(["worker"], node.env, tmp_path / "worker-a.log").start()
    node.processes.append(co_located)
    status, body, _ = _request(f"{node.api}/api/v1/jobs/{job['id']}/retry", OPERATOR_KEY, method="POST")
    assert status == 200, body
    again = _wait_done(node, info.study_uid, timeout=180, after=job["finished_at"])
    assert _result_files(node, again) == files  # the same UIDs, hence the same objects and paths
    for kind, relpath in files.items():
        remote_ds, local_ds = dcmread(BytesIO(made_remotely[kind])), dcmread(node.data / relpath)
        diff = differences(remote_ds, local_ds)
        assert keywords(diff) <= RUN_TIME_KEYWORDS, (kind, sorted(diff))
        if kind == "SEG":
            assert local_ds.PixelData == remote_ds.PixelData and int(local_ds.NumberOfFrames) > 0
            assert len(local_ds.SegmentSequence) == 4
    assert {m["segment_label"] for m in again["measurements"]} == {"Soft tissue", "Fat", "Lung", "Bone", "Body"}
    assert again["measurements"] == job["measurements"]
