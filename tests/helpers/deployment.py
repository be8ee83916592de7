"""The node in its production layout, and the queue faults the reliability suite injects into it.

* :class:`Deployment` / :func:`run_deployment`: PostgreSQL + a Redis broker + separate ``infergate scp``
  (with the watcher), ``api`` and ``worker`` processes, with a real Orthanc as the PACS.
* :class:`RedisServer`: a private ``redis-server`` without persistence on a free loopback port, so a test
  may stop it, or SIGKILL and start it again (a restart that forgets every message), without touching
  the Redis other tests share.
* Model packages for faults: :func:`slow_segmentation` (the shipped CT tissue model run in densely
  overlapping sliding windows, so a job takes seconds of real ONNX work) and :func:`poison_classifier`
  (a manifest whose input shape the ONNX graph does not accept, so every run raises in ONNX Runtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from infergate.store.migrate import upgrade
from infergate.store.tables import Export, Job, ResultObject
from tests.data.make_series import SeriesInfo, write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.peers import LOOPBACK, Orthanc, free_port, port_is_listening, run_storescu, wait_for_port

REPO = Path(__file__).resolve().parents[2]


# --- a private Redis ----------------------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free loopback port with persistence off; ``restart`` forgets every message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def url(self, db: int = 0) -> str:
        return f"redis://{LOOPBACK}:{self.port}/{db}"

    def start(self, timeout: float = 15.0) -> RedisServer:
        assert self.process is None or self.process.poll() is not None, "Redis is already running"
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_is_listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: the broker is gone, and with it every message it held."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)

    def queue_length(self, queue: str) -> int:
        with self.client() as client:
            return int(client.llen(queue))  # type: ignore[arg-type]

    def log_text(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- model packages -----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_model(
    models_dir: Path,
    source: str,
    *,
    model_id: str | None = None,
    onnx_from: str | None = None,
    preprocess: dict[str, Any] | None = None,
) -> str:
    """Copy the shipped package ``source`` into ``models_dir``, optionally as a variant; returns its id.

    ``model_id`` renames it, ``onnx_from`` takes another shipped package's ONNX file (the manifest's
    SHA-256 is updated, so the package loads), and ``preprocess`` overrides manifest preprocessing keys.
    """
    model_id = model_id or source
    folder = models_dir / model_id
    folder.mkdir(parents=True)
    manifest = json.loads((REPO / "models" / source / "manifest.json").read_text())
    onnx = REPO / "models" / (onnx_from or source) / "model.onnx"
    shutil.copyfile(onnx, folder / manifest["file"])
    manifest["id"] = model_id
    manifest["sha256"] = _sha256(folder / manifest["file"])
    manifest["preprocess"].update(preprocess or {})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return model_id


def slow_segmentation(models_dir: Path, model_id: str = "ct-tissue-seg-slow", overlap: float = 0.98) -> str:
    """The CT tissue model run in 64x64 sliding windows at 0.8 mm, one voxel apart at ``overlap`` 0.98.

    Real ONNX work that takes about 2-3 s per 128x128 slice on one core: the number of slices sets the
    length of a job. Its SEG and SR are ordinary ones.
    """
    return install_model(
        models_dir,
        "ct-tissue-seg",
        model_id=model_id,
        preprocess={"target_spacing": [0.8, 0.8], "patch_size": [64, 64], "overlap": overlap},
    )


def poison_classifier(models_dir: Path, model_id: str = "ct-poison") -> str:
    """A CT classifier whose manifest hides that its ONNX graph takes 2-D images: every run raises.

    The manifest is the 3-D ``ct-bone-classifier``'s, the graph the 2-D radiograph classifier's, so
    ONNX Runtime refuses the ``(1, 1, 32, 64, 64)`` input (invalid rank) each time.
    """
    return install_model(models_dir, "ct-bone-classifier", model_id=model_id, onnx_from="cxr-demo-classifier")


def write_rules(path: Path, models: Sequence[str]) -> Path:
    """Routing rules that send every CT series to ``models``."""
    path.write_text(f"rules:\n  - name: CT\n    match: {{modality: [CT]}}\n    models: [{', '.join(models)}]\n")
    return path


# --- the deployment -----------------------------------------------------------------------------------------


@dataclass
class Deployment:
    tmp: Path
    env: dict[str, str]
    database_url: str
    pacs: Orthanc
    scp_port: int
    api: str
    scp: NodeProcess
    api_process: NodeProcess
    worker: NodeProcess

    def start_worker(self) -> NodeProcess:
        self.worker = NodeProcess(["worker"], self.env, self.tmp / "worker.log").start()
        return self.worker

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_text()[-8000:]}" for p in (self.scp, self.api_process, self.worker)
        )

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        engine = create_engine(self.database_url)
        try:
            with Session(engine) as session:
                yield session
        finally:
            engine.dispose()

    def jobs(self) -> list[Job]:
        with self.session() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def result_objects(self) -> list[tuple[int, str, str]]:
        """(job id, kind, SOP Instance UID) of every SEG and SR recorded."""
        with self.session() as session:
            rows = session.execute(
                select(ResultObject.job_id, ResultObject.kind, ResultObject.sop_instance_uid).order_by(
                    ResultObject.job_id, ResultObject.kind
                )
            ).all()
        return [(job_id, kind, uid) for job_id, kind, uid in rows]

    def export_states(self) -> list[str]:
        with self.session() as session:
            return [str(state.value) for state in session.scalars(select(Export.state))]


def deployment_env(
    tmp: Path, database_url: str, broker_url: str, pacs: Orthanc, scp_port: int, api_port: int, **settings: Any
) -> dict[str, str]:
    values: dict[str, Any] = {
        "data_dir": tmp / "var",
        "database_url": database_url,
        "broker_url": broker_url,
        "scp_port": scp_port,
        "api_port": api_port,
        "series_quiet_seconds": 3,
        "pacs": f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
        "job_lease_seconds": 20,
        "reconcile_interval_seconds": 2,
        "requeue_after_seconds": 600,
    }
    values.update(settings)
    return node_env(**values)


@contextlib.contextmanager
def run_deployment(tmp: Path, database_url: str, broker_url: str, **settings: Any) -> Iterator[Deployment]:
    """The node as separate ``scp``/``api``/``worker`` processes with Orthanc as its PACS.

    ``settings`` are Settings fields (``job_lease_seconds=10``) over the defaults of
    :func:`deployment_env`. The processes' logs are printed when the block raises.
    """
    engine: Engine = create_engine(database_url)
    upgrade(engine)
    engine.dispose()
    scp_port, api_port = free_port(), free_port()
    with Orthanc(tmp / "orthanc", aet="ORTHANC") as pacs:
        env = deployment_env(tmp, database_url, broker_url, pacs, scp_port, api_port, **settings)
        scp = NodeProcess(["scp"], env, tmp / "scp.log").start()
        api = NodeProcess(["api"], env, tmp / "api.log").start()
        worker = NodeProcess(["worker"], env, tmp / "worker.log").start()
        deployment = Deployment(
            tmp, env, database_url, pacs, scp_port, f"http://127.0.0.1:{api_port}", scp, api, worker
        )
        try:
            wait_for_port("127.0.0.1", scp_port, timeout=60)
            wait_for_http(f"{deployment.api}/health", timeout=60)
            yield deployment
        except BaseException:
            print(deployment.logs())  # noqa: T201
            raise
        finally:
            for process in (deployment.worker, api, scp):
                process.stop()


def send_ct(deployment: Deployment, slices: int = 100, size: int = 512, name: str = "ct", **kwargs: Any) -> SeriesInfo:
    """Write a CT series (see :func:`write_ct_series`) and C-STORE it to the node; asserts storescu's success."""
    info = write_ct_series(deployment.tmp / name, slices=slices, size=size, **kwargs)
    sent = run_storescu(info.folder, port=deployment.scp_port, aec="INFERGATE")
    assert sent.returncode == 0, sent.stderr
    return info


def results_in_pacs(
    pacs: Orthanc, timeout: float, srs_expected: int, segs_expected: int = 1
) -> tuple[list[str], list[str]]:
    """Orthanc's SEG and SR instance ids, once at least the expected numbers arrived (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segs = pacs.find("Instance", {"Modality": "SEG"})
        srs = pacs.find("Instance", {"Modality": "SR"})
        if len(segs) >= segs_expected and len(srs) >= srs_expected:
            return segs, srs
        time.sleep(0.5)
    return pacs.find("Instance", {"Modality": "SEG"}), pacs.find("Instance", {"Modality": "SR"})


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (a Celery worker's pool processes), from ``/proc``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)


def kill_pid(pid: int) -> bool:
    """SIGKILL one process; False if it was already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


__all__ = [
    "Deployment",
    "RedisServer",
    "child_pids",
    "install_model",
    "kill_pid",
    "poison_classifier",
    "results_in_pacs",
    "run_deployment",
    "send_ct",
    "slow_segmentation",
    "wait_for",
    "write_rules",
]
