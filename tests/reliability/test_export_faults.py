"""Export to the PACS under faults (issue 5, rows 11, 12 and 13), each bounded in time.

The node runs as real processes (``infergate worker``, ``watcher`` and, where REST is checked, ``api``)
on PostgreSQL and Redis; the test ingests a small CT series in process and queues one ``ct-tissue-seg``
job, whose SEG and SR the worker exports. The PACS are on loopback: the pynetdicom storage SCP of
:mod:`tests.helpers.storage_scp` (answering a chosen status, counting what it sees), the rejecting and
forwarding peers of :mod:`tests.helpers.pacs_faults`, and a real Orthanc.

"Minutes" of PACS downtime are scaled down with the backoff settings (0.5 s doubling, capped at 2 s);
the schedule checked is the same function of the settings as with the defaults (2 s, capped at 300 s).
Two checks run in process, without the node's processes: two export runners at once (the lock on the
rows being sent), and a rejection that pynetdicom reads only after the socket closed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import evt
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Destination, Settings
from infergate.dicom import scu
from infergate.ingest import InstanceHeader, ingest_instance
from infergate.jobs import JobQueue, make_celery
from infergate.store import queries
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, Series, SeriesState
from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, http_json, node_env, wait_for_http
from tests.helpers.pacs_faults import ForwardingPACS, RejectingPACS, stop_process_group
from tests.helpers.peers import Orthanc, free_port
from tests.helpers.storage_scp import StorageSCP
from workers.export import export_job
from workers.pipeline import JobOutcome, WorkerContext, run_job
from workers.runtime import OnnxRunner

pytestmark = pytest.mark.integration

MODEL = "ct-tissue-seg"  # one SEG and one SR per job
BACKOFF, BACKOFF_MAX = 0.5, 2.0
#: Largest lateness of one retry (Celery countdown, worker and database on a busy 2-core machine).
LATENESS = 1.5
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Node:
    """The node's processes for one test, with a session factory and a job queue of its own."""

    tmp: Path
    env: dict[str, str]
    settings: Settings
    factory: sessionmaker[Session]
    queue: JobQueue
    api: str | None
    processes: dict[str, NodeProcess] = field(default_factory=dict)

    def start(self, name: str) -> NodeProcess:
        self.processes[name] = NodeProcess([name], self.env, self.tmp / f"{name}.log").start()
        return self.processes[name]

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()[-6000:]}" for p in self.processes.values())

    def submit(self) -> int:
        """Ingest a 16-slice CT series, create a job for it and queue the job; returns the job id."""
        job_id = _job_for_new_series(self.settings, self.factory, self.tmp / "ct")
        self.queue.send_run(job_id)
        return job_id

    def job(self, job_id: int) -> dict[str, Any]:
        assert self.api is not None
        status, body = http_json(f"{self.api}/api/v1/jobs/{job_id}", timeout=5)
        assert status == 200, body
        return dict(body)

    def redrive(self, job_id: int, destination: str | None = None) -> tuple[int, dict[str, Any]]:
        assert self.api is not None
        query = "" if destination is None else "?" + urllib.parse.urlencode({"destination": destination})
        request = urllib.request.Request(f"{self.api}/api/v1/jobs/{job_id}/export{query}", method="POST")
        try:
            with _HTTP.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.job(job_id)
            if body["state"] in states:
                return body
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} not in {states} within {timeout} s: {body}\n{self.logs()}")

    def exports(self, job_id: int) -> list[Export]:
        with self.factory() as session:
            stmt = select(Export).join(ResultObject).where(ResultObject.job_id == job_id).order_by(Export.id)
            return list(session.scalars(stmt))

    def result_uids(self, job_id: int) -> list[str]:
        with self.factory() as session:
            return sorted(session.scalars(select(ResultObject.sop_instance_uid).where(ResultObject.job_id == job_id)))


def _job_for_new_series(settings: Settings, factory: sessionmaker[Session], folder: Path) -> int:
    """Ingest a 16-slice CT series in process and create a ``MODEL`` job for it; returns the job id."""
    info = write_ct_series(folder, slices=16, size=64)
    for path in info.paths:
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        )
        ingest_instance(factory, settings.data_path, header, path.read_bytes(), calling_ae="CT", called_ae="NODE")
    with factory() as session, session.begin():
        series_id = session.scalar(select(Series.id).where(Series.series_instance_uid == info.series_uid))
        assert series_id is not None
        # routed by the test: the watcher must not add the routing rules' other jobs
        session.execute(update(Series).where(Series.id == series_id).values(state=SeriesState.routed))
        job_id = queries.create_job(session, series_id, MODEL, "1")
    assert job_id is not None
    return job_id


@pytest.fixture
def make_node(tmp_path: Path, pg_url: str, redis_db: str) -> Iterator[Callable[..., Node]]:
    """Start the node's processes (``worker`` and ``watcher``; ``api`` if asked) with settings overrides."""
    made: list[Node] = []
    engine = make_engine(Settings(database_url=pg_url, data_dir=tmp_path / "var"))
    upgrade(engine)

    def make(*, pacs: list[str], api: bool = True, **overrides: Any) -> Node:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "database_url": pg_url,
            "broker_url": redis_db,
            "pacs": ",".join(pacs),
            "api_port": free_port(),
            "onnx_providers": "CPUExecutionProvider",
            "onnx_threads": 1,
            "series_quiet_seconds": 3600,
            "reconcile_interval_seconds": 1,
            "requeue_after_seconds": 5,
            "job_lease_seconds": 30,
            **overrides,
        }
        settings = Settings(**values)
        node = Node(
            tmp_path,
            node_env(**values),
            settings,
            make_session_factory(engine),
            JobQueue(make_celery(settings)),
            f"http://127.0.0.1:{values['api_port']}" if api else None,
        )
        made.append(node)
        for name in ("worker", "watcher", *(("api",) if api else ())):
            node.start(name)
        if node.api is not None:
            wait_for_http(f"{node.api}/health", timeout=60)
        return node

    yield make
    for node in made:
        for process in node.processes.values():
            process.kill()
        print(node.logs())  # noqa: T201 - shown when the test failed
    engine.dispose()


def _exports_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for r in body["result_objects"] for e in r["exports"]]


def _expected_gap(first: int, last: int) -> float:
    """Seconds from the next-attempt time set by attempt ``first`` to the one set by attempt ``last``.

    The delay after attempt n is min(cap, base * 2^(n-1)): 0.5, 1, 2, 2, ... s here. Written out rather
    than taken from ``workers.export.backoff``, so that a broken schedule cannot pass by agreeing with itself.
    """
    return sum(min(BACKOFF_MAX, BACKOFF * 2 ** (n - 1)) for n in range(first + 1, last + 1))


# Row 11 ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_pacs_down_retries_on_a_capped_backoff_and_delivers_once_when_back(make_node: Callable[..., Node]) -> None:
    pacs = StorageSCP(ae_title="DOWNPACS")  # not started: the PACS is down, connections are refused
    node = make_node(
        pacs=[pacs.destination],
        export_backoff_seconds=BACKOFF,
        export_backoff_max_seconds=BACKOFF_MAX,
        export_max_attempts=20,
    )
    try:
        job_id = node.submit()
        # Watch the retries over REST while the PACS is down: attempts -> next_attempt_at it set.
        scheduled: dict[int, datetime] = {}
        deadline = time.monotonic() + 90
        while not scheduled or max(scheduled) < 5:  # through attempt 5: two delays at the cap
            assert time.monotonic() < deadline, f"retries not seen: {scheduled}\n{node.logs()}"
            body = node.job(job_id)
            exports = _exports_of(body)
            if body["state"] == "exporting" and exports and exports[0]["attempts"] >= 1:
                assert len(exports) == 2 and len({e["attempts"] for e in exports}) == 1, exports
                for export in exports:
                    assert export["state"] == "pending" and export["last_status"] is None
                    assert "unreachable" in export["last_error"] and export["delivered_at"] is None
                scheduled.setdefault(exports[0]["attempts"], datetime.fromisoformat(exports[0]["next_attempt_at"]))
            assert body["state"] in ("queued", "running", "exporting"), body
            time.sleep(0.05)
        seen = sorted(scheduled)
        for first, last in zip(seen, seen[1:], strict=False):
            gap = (scheduled[last] - scheduled[first]).total_seconds()
            expected = _expected_gap(first, last)
            # never earlier than the schedule, and not later than a little lateness per retry
            assert expected <= gap <= expected + LATENESS * (last - first), (first, last, gap, expected, scheduled)

        pacs.start()  # the PACS comes back on the same port
        body = node.wait_job(job_id, ("done", "failed"), timeout=BACKOFF_MAX + 30)
        assert body["state"] == "done", body
        uids = node.result_uids(job_id)
        for export in _exports_of(body):
            assert export["state"] == "done" and export["delivered_at"] is not None and export["last_status"] == 0
            assert export["attempts"] > max(seen), export
        time.sleep(BACKOFF_MAX + 1)  # a late duplicate would arrive in this time
        assert Counter(pacs.stores) == Counter(uids) == dict.fromkeys(uids, 1), pacs.stores
        assert pacs.associations == 1
    finally:
        pacs.stop()


@pytest.mark.timeout(120)
def test_two_export_messages_at_once_send_each_object_once(tmp_path: Path, pg_url: str) -> None:
    """The countdown message and the reconciler's (or a redelivery) may run together when the PACS is back.

    Two runners export the same job at the same time, in process, against a slow PACS: the rows are
    locked while they are sent, so the second runner skips them and each object is sent once.
    """
    pacs = StorageSCP(ae_title="SLOWPACS", delay=0.5).start()
    settings = Settings(
        data_dir=tmp_path / "var", database_url=pg_url, pacs=pacs.destination, onnx_providers="CPUExecutionProvider"
    )
    engine = make_engine(settings)
    try:
        upgrade(engine)
        factory = make_session_factory(engine)
        ctx = WorkerContext(settings=settings, factory=factory, runner=OnnxRunner(["CPUExecutionProvider"], 1))
        job_id = _job_for_new_series(settings, factory, tmp_path / "ct")
        assert run_job(ctx, job_id)[0] is JobOutcome.exporting
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda _: export_job(ctx, job_id), range(2)))
        assert outcomes == [None, None]
        with factory() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state == JobState.done
            uids = sorted(session.scalars(select(ResultObject.sop_instance_uid).where(ResultObject.job_id == job_id)))
        assert Counter(pacs.stores) == dict.fromkeys(uids, 1), pacs.stores
        assert pacs.associations == 1
    finally:
        pacs.stop()
        engine.dispose()


# Row 12 ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_permanent_refusals_are_tried_once_and_a_redrive_sends_again(make_node: Callable[..., Node]) -> None:
    a900 = StorageSCP(ae_title="A900PACS", status=0xA900).start()
    c000 = StorageSCP(ae_title="C000PACS", status=0xC000).start()
    # 1/1/7: rejected-permanent by the service user, called AE title not recognised
    permanent = RejectingPACS("RJPERMANENT", result=1, source=1, reason=7).start()
    # 2/3/1: rejected-transient by the presentation service provider, temporary congestion
    transient = RejectingPACS("RJTRANSIENT", result=2, source=3, reason=1).start()
    peers: list[StorageSCP | RejectingPACS] = [a900, c000, permanent, transient]
    replacements: list[StorageSCP] = []
    node = make_node(
        pacs=[peer.destination for peer in peers],
        export_backoff_seconds=BACKOFF,
        export_backoff_max_seconds=BACKOFF_MAX,
        export_max_attempts=3,
    )
    try:
        job_id = node.submit()
        body = node.wait_job(job_id, ("done", "failed"), timeout=90)
        uids = node.result_uids(job_id)
        assert body["state"] == "failed", body
        for code in ("0xA900", "0xC000", "rejected-permanent", "rejected-transient"):
            assert code in body["error"], body["error"]
        by_destination: dict[str, list[dict[str, Any]]] = {}
        for export in _exports_of(body):
            by_destination.setdefault(export["destination"], []).append(export)
        assert {d: len(e) for d, e in by_destination.items()} == {peer.destination: 2 for peer in peers}
        for scp, status in ((a900, 0xA900), (c000, 0xC000)):
            for export in by_destination[scp.destination]:
                assert (export["state"], export["attempts"], export["last_status"]) == ("failed", 1, status)
                assert f"status 0x{status:04X}" in export["last_error"]
        for export in by_destination[permanent.destination]:
            assert (export["state"], export["attempts"], export["last_status"]) == ("failed", 1, None)
            assert "rejected-permanent" in export["last_error"] and "reason 7" in export["last_error"]
        for export in by_destination[transient.destination]:  # transient: retried up to export_max_attempts
            assert (export["state"], export["attempts"], export["last_status"]) == ("failed", 3, None)
            assert "rejected-transient" in export["last_error"]

        # What each PACS saw, then nothing more (no storm): wait past the longest retry delay.
        def seen() -> tuple[object, ...]:
            return (Counter(a900.stores), a900.associations, Counter(c000.stores), c000.associations,
                    len(permanent.associations), len(transient.associations))  # fmt: skip

        once = Counter(uids)
        assert seen() == (once, 1, once, 1, 1, 3)
        gaps = [b - a for a, b in zip(transient.associations, transient.associations[1:], strict=False)]
        assert gaps[0] >= BACKOFF and gaps[1] >= 2 * BACKOFF, gaps
        time.sleep(BACKOFF_MAX + 2)
        assert seen() == (once, 1, once, 1, 1, 3)
        assert node.job(job_id)["state"] == "failed"

        # The 0xA900 PACS is fixed: re-drive that destination only.
        a900.status = 0x0000
        status, redriven = node.redrive(job_id, a900.destination)
        assert status == 200, redriven
        assert redriven["state"] == "exporting" and redriven["error"] is None
        body = node.wait_job(job_id, ("done", "failed"), timeout=30)
        assert body["state"] == "failed", body  # the other destinations still failed
        assert "0xA900" not in body["error"] and "0xC000" in body["error"]
        for export in _exports_of(body):
            if export["destination"] == a900.destination:
                assert (export["state"], export["attempts"], export["last_status"]) == ("done", 1, 0)
            else:
                assert export["state"] == "failed"
        assert Counter(a900.received) == once and a900.associations == 2
        assert seen()[2:] == (once, 1, 1, 3)
        assert node.redrive(job_id, "OTHER@127.0.0.1:104")[0] == 404  # only configured destinations

        # Every PACS fixed (the rejecting ones replaced on their ports): re-drive the whole job.
        c000.status = 0x0000
        for rejecting in (permanent, transient):
            rejecting.stop()
            replacements.append(StorageSCP(ae_title=rejecting.ae_title, port=rejecting.port).start())
        status, redriven = node.redrive(job_id)
        assert status == 200, redriven
        body = node.wait_job(job_id, ("done", "failed"), timeout=30)
        assert body["state"] == "done", body
        assert all(e["state"] == "done" and e["delivered_at"] for e in _exports_of(body))
        for scp in (c000, *replacements):
            assert Counter(scp.received) == once, scp.destination
        assert node.redrive(job_id + 1000)[0] == 404
    finally:
        for peer in (*peers, *replacements):
            peer.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("result", "permanent"), [(1, True), (2, False)])
def test_a_rejection_read_after_the_socket_closed_keeps_its_kind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, result: int, permanent: bool
) -> None:
    """A peer that rejects and closes at once: pynetdicom may see the closed socket first and call it an abort.

    Holding the requesting thread for 0.2 s after the A-ASSOCIATE-RQ makes that order certain; the
    rejection must still be classified by its A-ASSOCIATE-RJ (found by the stress of row 12).
    """
    monkeypatch.setattr(scu, "NODELAY_HANDLER", (evt.EVT_REQUESTED, lambda event: time.sleep(0.2)))
    info = write_ct_series(tmp_path, slices=1, size=16)
    peer = RejectingPACS("FASTREJECT", result=result, source=1, reason=3).start()
    try:
        outcome = scu.send_files(Destination.parse(peer.destination), list(info.paths), calling_ae="NODE")
    finally:
        peer.stop()
    assert len(outcome) == 1 and outcome[0].status is None and outcome[0].transient is not permanent
    kind = "permanent" if permanent else "transient"
    assert f"rejected-{kind} (result {result}, source 1, reason 3" in (outcome[0].error or ""), outcome


# Row 13 ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_crash_between_the_pacs_success_and_the_done_mark_resends_the_same_instance(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The kill point: Orthanc has stored the object and the Success answer is on its way, unread.

    The PACS in front of Orthanc freezes the worker's process group (SIGSTOP) once Orthanc stored the
    first object, then writes its Success to the socket; only then is the worker SIGKILLed. A worker
    that died after reading the Success but before its commit leaves the same state behind: the
    object in the PACS, the export row pending (its transaction rolled back with the connection).
    """
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC", dicomweb=False) as orthanc:
        crash: dict[str, Any] = {}
        pacs = ForwardingPACS(orthanc, ae_title="PACS")

        def freeze_worker(uid: str) -> None:
            # Orthanc has stored the object; stop the worker before it can read the Success answer
            if not crash:
                crash["uid"] = uid
                stop_process_group(node.processes["worker"].pid)

        pacs.after_store = freeze_worker
        pacs.start()
        try:
            node = make_node(pacs=[pacs.destination], api=False, requeue_after_seconds=2)
            job_id = node.submit()
            assert pacs.answered.wait(timeout=90), f"no C-STORE reached the PACS\n{node.logs()}"
            node.processes["worker"].kill()  # SIGKILL the frozen worker: its Success is unread
            uids = node.result_uids(job_id)
            assert crash["uid"] in uids
            assert len(orthanc.find("Instance", {"SOPInstanceUID": crash["uid"]})) == 1  # the PACS holds it
            with node.factory() as session:
                job = session.get(Job, job_id)
                assert job is not None and job.state == JobState.exporting
            for export in node.exports(job_id):  # ... and the node never marked it delivered
                assert (export.state, export.attempts, export.delivered_at) == (ExportState.pending, 0, None)

            node.start("worker")  # the reconciler re-sends the overdue export
            deadline = time.monotonic() + 60
            while True:
                with node.factory() as session:
                    job = session.get(Job, job_id)
                    assert job is not None
                    if job.state in (JobState.done, JobState.failed):
                        break
                assert time.monotonic() < deadline, f"export not re-sent\n{node.logs()}"
                time.sleep(0.2)
            assert job.state == JobState.done, (job.error, node.logs())
            for export in node.exports(job_id):
                assert export.state == ExportState.done and export.attempts == 1 and export.delivered_at is not None
            # The re-send used the same SOP Instance UID, and the PACS holds one copy of each object.
            assert Counter(pacs.received)[crash["uid"]] == 2, pacs.received
            assert set(pacs.received) == set(uids)
            for uid in uids:
                assert len(orthanc.find("Instance", {"SOPInstanceUID": uid})) == 1, uid
            assert orthanc.statistics()["CountInstances"] == len(uids)
        finally:
            pacs.stop()
