"""A worker without the node's data folder (``INFERGATE_NODE_URL``): input over WADO-RS, results handed back.

The node is the real API on a real uvicorn server; the worker runs the real pipeline in this process
with its own data folder, sharing only the database. Failures of the node are served by a small
HTTP server that answers what each test sets, the process boundary the worker meets in production.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from infergate import submission
from infergate.config import Settings
from infergate.dicomweb.multipart import build_multipart, multipart_content_type
from infergate.store import queries
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory
from infergate.store.tables import Instance, Job, JobState, ResultObject, Series
from service.api.app import create_app
from tests.data.make_series import write_ct_series
from tests.helpers.dicom_compare import RUN_TIME_KEYWORDS, differences, keywords
from tests.helpers.ingest import ingest_file
from tests.helpers.queues import RecordingQueue
from tests.helpers.storage_scp import StorageSCP
from workers.export import export_job
from workers.node_client import NodeClient, NodeUnavailable
from workers.pipeline import JobOutcome, WorkerContext, run_job
from workers.remote import cache_folder, series_files
from workers.runtime import OnnxRunner

pytestmark = pytest.mark.timeout(120)

WORKER_KEY = secrets.token_urlsafe(24)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Node:
    settings: Settings
    factory: sessionmaker[Session]
    url: str


@pytest.fixture
def pacs() -> Iterator[StorageSCP]:
    scp = StorageSCP().start()
    yield scp
    scp.stop()


@pytest.fixture
def node(tmp_path: Path, pg_url: str, pacs: StorageSCP) -> Iterator[Node]:
    """The node's API with its data folder, on PostgreSQL, accepting the worker's key."""
    settings = Settings(
        data_dir=tmp_path / "node",
        database_url=pg_url,
        pacs=pacs.destination,
        api_keys=f"worker:{hashlib.sha256(WORKER_KEY.encode()).hexdigest()}:worker",
    )
    engine = make_engine(settings)
    upgrade(engine)
    factory = make_session_factory(engine)
    port = _free_port()
    app = create_app(settings, factory, queue=RecordingQueue())
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Node(settings, factory, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(10)
    engine.dispose()


def _ingest(node: Node, folder: Path, slices: int = 8) -> int:
    info = write_ct_series(folder, slices=slices, size=64)
    for path in info.paths:
        ingest_file(node.factory, node.settings.data_path, path)
    with node.factory() as session, session.begin():
        series_id = session.scalar(select(Series.id))
        assert series_id is not None
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "1")
    assert job_id is not None
    return job_id


def _worker(node: Node, data_dir: Path, **overrides: Any) -> WorkerContext:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": node.settings.database_url,
        "pacs": [str(d) for d in node.settings.pacs],
        "node_url": node.url,
        "node_api_key": WORKER_KEY,
    }
    values.update(overrides)
    settings = Settings(**values)
    return WorkerContext(settings=settings, factory=node.factory, runner=OnnxRunner(["CPUExecutionProvider"]))


def _results(factory: sessionmaker[Session], job_id: int) -> dict[str, str]:
    with factory() as session:
        return {r.kind: r.path for r in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id))}


def test_a_remote_worker_makes_the_same_seg_and_sr_as_a_co_located_one(
    node: Node, tmp_path: Path, pacs: StorageSCP
) -> None:
    job_id = _ingest(node, tmp_path / "ct")
    remote = _worker(node, tmp_path / "worker")
    assert str(node.settings.data_path) not in json.dumps(remote.settings.model_dump(mode="json"))

    assert run_job(remote, job_id) == (JobOutcome.exporting, None)
    paths = _results(node.factory, job_id)
    assert set(paths) == {"SEG", "SR"}
    for relpath in paths.values():  # made in the worker's folder, handed back to the node's
        assert (node.settings.data_path / relpath).read_bytes() == (remote.settings.data_path / relpath).read_bytes()
    assert not (remote.settings.data_path / cache_folder(job_id)).exists(), "the input cache outlives the job"
    assert not (remote.settings.data_path / "instances").exists()
    assert not any((remote.settings.data_path / "tmp").iterdir())

    (remote.settings.data_path / paths["SEG"]).write_bytes(b"stale")  # the export must take the node's copy
    assert export_job(remote, job_id) is None
    with node.factory() as session:
        assert session.scalar(select(Job.state).where(Job.id == job_id)) == JobState.done
        uids = set(session.scalars(select(ResultObject.sop_instance_uid).where(ResultObject.job_id == job_id)))
    assert sorted(pacs.received) == sorted(uids)
    made_remotely = {kind: dcmread(node.settings.data_path / relpath) for kind, relpath in paths.items()}

    with node.factory() as session, session.begin():
        submission.retry(session, job_id)
    co_located = WorkerContext(
        settings=node.settings, factory=node.factory, runner=OnnxRunner(["CPUExecutionProvider"])
    )
    assert run_job(co_located, job_id) == (JobOutcome.exporting, None)
    assert _results(node.factory, job_id) == paths  # same UIDs, same paths
    for kind, relpath in paths.items():
        here = dcmread(node.settings.data_path / relpath)
        diff = differences(made_remotely[kind], here)
        assert keywords(diff) <= RUN_TIME_KEYWORDS, (kind, sorted(diff))
        if kind == "SEG":
            assert here.PixelData == made_remotely[kind].PixelData and here.NumberOfFrames > 0


@dataclass
class Canned:
    """What the fake node answers, and the requests it saw."""

    status: int = 200
    content_type: str = "application/json"
    body: bytes = b"{}"
    requests: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def fake_node() -> Iterator[tuple[str, Canned]]:
    canned = Canned()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            canned.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            self.send_response(canned.status)
            self.send_header("Content-Type", canned.content_type)
            self.send_header("Content-Length", str(len(canned.body)))
            self.end_headers()
            self.wfile.write(canned.body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", canned
    server.shutdown()
    server.server_close()


@pytest.fixture
def series(tmp_path: Path) -> list[tuple[str, bytes]]:
    """(SOP Instance UID, Part 10 bytes) of a three-slice CT series."""
    info = write_ct_series(tmp_path / "ct", slices=3, size=16)
    return [(str(dcmread(path).SOPInstanceUID), path.read_bytes()) for path in info.paths]


def _fetch(url: str, settings: Settings, listed: list[tuple[str, bytes]]) -> list[str]:
    node = NodeClient(url, api_key="k3y", timeout=5)
    instances = [(sop, f"instances/x/{sop}.dcm") for sop, _ in listed]
    with series_files(settings, node, 7, "1.2.3", "1.2.3.4", instances) as paths:
        return [(settings.data_path / path).read_bytes().hex() for path in paths]


def test_the_series_is_fetched_as_stored_with_the_workers_key(
    fake_node: tuple[str, Canned], series: list[tuple[str, bytes]], make_settings: Callable[..., Settings]
) -> None:
    url, canned = fake_node
    body, boundary = build_multipart(("application/dicom", data) for _, data in reversed(series))
    canned.content_type, canned.body = multipart_content_type("application/dicom", boundary), body
    settings = make_settings()
    assert _fetch(url, settings, series) == [data.hex() for _, data in series]  # in the database's order
    (request,) = canned.requests
    assert request["path"] == "/dicomweb/studies/1.2.3/series/1.2.3.4"
    assert request["x-api-key"] == "k3y" and "transfer-syntax=*" in request["accept"]
    assert not (settings.data_path / cache_folder(7)).exists()


@pytest.mark.parametrize(
    ("status", "content_type", "body", "message"),
    [
        (503, "application/json", b'{"detail": "Database unavailable"}', "answered 503 to WADO-RS retrieve series: "),
        (404, "application/json", b'{"detail": "No such series"}', "answered 404 to WADO-RS retrieve series: No such"),
        (401, "application/json", b'{"detail": "The API key is not valid."}', "answered 401"),
        (200, "text/html", b"<html></html>", 'answered "text/html", not multipart/related'),
        (200, 'multipart/related; type="application/dicom"; boundary=b', b"--b\r\n\r\nxx", "unusable WADO-RS answer"),
    ],
)
def test_a_node_that_refuses_or_answers_garbage_raises_a_retryable_error(
    fake_node: tuple[str, Canned],
    series: list[tuple[str, bytes]],
    make_settings: Callable[..., Settings],
    status: int,
    content_type: str,
    body: bytes,
    message: str,
) -> None:
    url, canned = fake_node
    canned.status, canned.content_type, canned.body = status, content_type, body
    settings = make_settings()
    with pytest.raises(NodeUnavailable, match=message):
        _fetch(url, settings, series)
    assert not (settings.data_path / cache_folder(7)).exists()


def test_an_instance_missing_from_the_answer_is_an_error(
    fake_node: tuple[str, Canned], series: list[tuple[str, bytes]], make_settings: Callable[..., Settings]
) -> None:
    url, canned = fake_node
    body, boundary = build_multipart(("application/dicom", data) for _, data in series[:2])
    canned.content_type, canned.body = multipart_content_type("application/dicom", boundary), body
    with pytest.raises(NodeUnavailable, match="lacks 1 of the series' 3 instances"):
        _fetch(url, make_settings(), series)


def test_an_unreachable_node_sends_the_job_back_to_the_queue(node: Node, tmp_path: Path) -> None:
    job_id = _ingest(node, tmp_path / "ct", slices=3)
    worker = _worker(node, tmp_path / "worker", node_url=f"http://127.0.0.1:{_free_port()}")
    outcome, delay = run_job(worker, job_id)
    assert outcome is JobOutcome.retry and delay is not None
    with node.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.queued
        assert job.error is not None and "is unreachable for WADO-RS retrieve series" in job.error
        assert "will retry" in job.error
        assert session.scalar(select(Instance.sop_instance_uid).limit(1)) not in job.error  # no UID in the error


@pytest.mark.parametrize("url", ["ftp://node/", "node:8000", "http://user:secret@node:8000", "http://node/?x=1"])
def test_a_node_url_that_is_no_plain_http_base_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError, match='Setting "node_url" should look like https://host'):
        Settings(node_url=url)


def test_without_a_node_url_the_worker_shares_the_data_folder(make_settings: Callable[..., Settings]) -> None:
    assert NodeClient.from_settings(make_settings()) is None
    assert make_settings(node_url="https://node.example.org:8443/infergate/").node_url == (
        "https://node.example.org:8443/infergate"
    )
