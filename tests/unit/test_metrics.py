"""Prometheus metrics (infergate/metrics.py): names, labels, multiprocess mode and the SQL gauges.

The names are a contract with the Grafana dashboard and the Prometheus configuration, so they are
checked as exposed text, not through the Python objects. Multiprocess behaviour is checked with real
processes: enabling metrics changes process-wide state of prometheus_client, which this pytest
process must not take on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage
from sqlalchemy.orm import Session, sessionmaker

from infergate import metrics
from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import make_engine, make_session_factory, transaction
from infergate.store.tables import JobState

REPO_ROOT = Path(__file__).resolve().parents[2]


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_families_are_exposed_under_the_agreed_names_and_labels() -> None:
    registry = CollectorRegistry()
    families = metrics.Metrics(registry)
    families.instances_received.labels(calling_ae="PACS", sop_class="CTImageStorage").inc(3)
    families.associations.labels(calling_ae="PACS", result="accepted").inc()
    families.series_completed.inc()
    families.stage_seconds.labels(stage="onnx", model="ct-tissue-seg").observe(0.2)
    families.export_failures.labels(destination="ORTHANC@pacs:4242", status="0xA700").inc()
    families.inference_provider.labels(model="ct-tissue-seg", provider="CPUExecutionProvider").set(1)
    samples = _samples(generate_latest(registry).decode())
    expected = {
        ("infergate_instances_received_total", (("calling_ae", "PACS"), ("sop_class", "CTImageStorage"))): 3,
        ("infergate_associations_total", (("calling_ae", "PACS"), ("result", "accepted"))): 1,
        ("infergate_series_completed_total", ()): 1,
        ("infergate_stage_seconds_count", (("model", "ct-tissue-seg"), ("stage", "onnx"))): 1,
        ("infergate_export_failures_total", (("destination", "ORTHANC@pacs:4242"), ("status", "0xA700"))): 1,
        ("infergate_inference_provider", (("model", "ct-tissue-seg"), ("provider", "CPUExecutionProvider"))): 1,
    }
    for (name, labels), value in expected.items():
        assert _value(samples, name, **dict(labels)) == value, name
    # an observation of 0.2 s falls in the 0.25 s bucket, not in the 0.1 s one
    bucket = "infergate_stage_seconds_bucket"
    assert _value(samples, bucket, model="ct-tissue-seg", stage="onnx", le="0.25") == 1
    assert _value(samples, bucket, model="ct-tissue-seg", stage="onnx", le="0.1") == 0


def test_sop_class_label_is_the_keyword_or_the_uid() -> None:
    assert metrics.sop_class_label(CTImageStorage) == "CTImageStorage"
    assert metrics.sop_class_label("1.2.3.4.5") == "1.2.3.4.5"
    assert metrics.sop_class_label("") == "unknown"
    assert metrics.ae_label("  ") == "unknown" and metrics.ae_label(" PACS ") == "PACS"


def test_calling_ae_labels_are_bounded() -> None:
    labels = metrics.BoundedLabels(2)
    assert [labels(v) for v in ("A", "B", "C", "A", "D", "B")] == ["A", "B", "other", "A", "other", "B"]
    with pytest.raises(ValueError, match="limit"):
        metrics.BoundedLabels(0)


def test_export_status_label() -> None:
    assert metrics.export_status(0xA700, None) == "0xA700"
    assert metrics.export_status(0xC000, None) == "0xC000"
    assert metrics.export_status(None, "rejected") == "rejected"
    assert metrics.export_status(None, None) == "network"


def test_recording_before_enable_records_nothing() -> None:
    assert metrics.active() is None  # this pytest process never enables metrics (see the module docstring)
    metrics.instance_received("PACS", CTImageStorage)  # no error, nothing to record into
    metrics.stage_timings("m", {"onnx": 1.0})


def test_wipe_removes_only_metric_files(tmp_path: Path) -> None:
    (tmp_path / "counter_host-1.db").write_bytes(b"x")
    (tmp_path / "gauge_livemax_host-1.db").write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("not ours")
    assert metrics.wipe(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert metrics.wipe(tmp_path / "missing") == 0


_RECORDER = textwrap.dedent(
    """
    import sys
    import prometheus_client  # imported before enable(), without PROMETHEUS_MULTIPROC_DIR: must not matter
    from infergate import metrics
    from infergate.config import Settings

    settings = Settings(data_dir=sys.argv[1])
    metrics.enable(settings)
    assert metrics.enable(settings) is metrics.active()  # idempotent
    metrics.instance_received("PACS", "1.2.840.10008.5.1.4.1.1.2")
    metrics.association("PACS", accepted=False)
    metrics.series_completed()
    metrics.stage_timings("ct-tissue-seg", {"onnx": 0.5, "load": 0.01})
    metrics.export_failure("ORTHANC@pacs:4242", metrics.export_status(None, "network"))
    metrics.inference_provider("ct-tissue-seg", "CPUExecutionProvider")
    if sys.argv[2] == "exit":
        metrics.process_exiting()
    """
)


def _record_in_process(data_dir: Path, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV and not k.startswith("INFERGATE_")}
    subprocess.run(
        [sys.executable, "-c", _RECORDER, str(data_dir), mode], cwd=REPO_ROOT, env=env, check=True, timeout=120
    )


def test_values_of_several_processes_add_up(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    _record_in_process(data_dir, "stay")
    _record_in_process(data_dir, "exit")  # drops its live provider gauge as a pool process does when it ends
    folder = Settings(data_dir=data_dir).metrics_path
    names = sorted(p.name for p in folder.iterdir())
    # one file per kind and process, named <host>-<pid> so that containers sharing a volume never collide
    assert all(re.fullmatch(r"(counter|histogram|gauge_livemax)_[A-Za-z0-9.-]+-\d+\.db", n) for n in names), names
    assert len([n for n in names if n.startswith("counter_")]) == 2
    assert len([n for n in names if n.startswith("gauge_livemax_")]) == 1

    samples = _samples(generate_latest(metrics.multiprocess_registry(folder)).decode())
    assert _value(samples, "infergate_instances_received_total", calling_ae="PACS", sop_class="CTImageStorage") == 2
    assert _value(samples, "infergate_associations_total", calling_ae="PACS", result="rejected") == 2
    assert _value(samples, "infergate_series_completed_total") == 2
    assert _value(samples, "infergate_stage_seconds_count", stage="onnx", model="ct-tissue-seg") == 2
    assert _value(samples, "infergate_stage_seconds_sum", stage="onnx", model="ct-tissue-seg") == pytest.approx(1.0)
    status = {"destination": "ORTHANC@pacs:4242", "status": "network"}
    assert _value(samples, "infergate_export_failures_total", **status) == 2
    assert _value(samples, "infergate_inference_provider", model="ct-tissue-seg", provider="CPUExecutionProvider") == 1


def _job(factory: sessionmaker[Session], series_uid: str, model: str, state: JobState) -> None:
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, "1.2.826.0.1.3680043.8.498.900")
        series_id = queries.get_or_create_series(session, study_id, series_uid, modality="CT")
        job_id = queries.create_job(session, series_id, model, "1.0.0")
        assert job_id is not None
        if state is not JobState.queued:
            queries.claim_job(session, job_id, timedelta(minutes=15))
            if state is not JobState.running:
                queries.set_job_state(session, job_id, state)


def test_node_collector_reads_jobs_and_free_space_at_scrape_time(
    db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    _job(session_factory, "1.2.826.0.1.3680043.8.498.901", "ct-tissue-seg", JobState.done)
    _job(session_factory, "1.2.826.0.1.3680043.8.498.902", "ct-tissue-seg", JobState.done)
    _job(session_factory, "1.2.826.0.1.3680043.8.498.903", "ct-tissue-seg", JobState.queued)
    _job(session_factory, "1.2.826.0.1.3680043.8.498.904", "ct-bone-classifier", JobState.running)
    samples = _samples(metrics.render(db_settings, session_factory).decode())
    assert _value(samples, "infergate_jobs", state="done", model="ct-tissue-seg") == 2
    assert _value(samples, "infergate_jobs", state="queued", model="ct-tissue-seg") == 1
    assert _value(samples, "infergate_jobs", state="running", model="ct-bone-classifier") == 1
    assert _value(samples, "infergate_jobs", state="failed", model="ct-tissue-seg") == 0  # zero, not absent
    assert _value(samples, "infergate_queue_depth") == 1
    free = _value(samples, "infergate_storage_free_bytes")
    assert free is not None and free > 0

    # a job changed by another process is seen by the next scrape
    _job(session_factory, "1.2.826.0.1.3680043.8.498.905", "ct-tissue-seg", JobState.queued)
    samples = _samples(metrics.render(db_settings, session_factory).decode())
    assert _value(samples, "infergate_queue_depth") == 2


def test_an_unreachable_database_leaves_only_the_job_gauges_out(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    engine = make_engine(settings)
    try:
        samples = _samples(metrics.render(settings, make_session_factory(engine)).decode())
    finally:
        engine.dispose()
    names = {name for name, _ in samples}
    assert "infergate_storage_free_bytes" in names
    assert not {"infergate_jobs", "infergate_queue_depth"} & names


_FILLER = textwrap.dedent(
    """
    import os, sys
    from infergate import metrics
    from infergate.config import Settings

    settings = Settings(data_dir=sys.argv[1])
    if sys.argv[2] == "fill-first":  # the disk is full before the process starts: it runs without metrics
        assert metrics.enable(settings) is None
        metrics.instance_received("PACS", "1.2.840.10008.5.1.4.1.1.2")
        print("survived", flush=True)
        raise SystemExit(0)
    assert metrics.enable(settings) is not None
    try:
        with open(os.path.join(sys.argv[3], "filler"), "wb") as filler:
            while True:
                filler.write(b"x" * 4096)
                filler.flush()
    except OSError:
        pass
    for number in range(int(sys.argv[4])):  # new label sets need new pages of the memory-mapped file
        metrics.export_failure(f"AE{number}@pacs{number}.example.org:104", "network")
        metrics.stage_timings(f"model-{number}", {"onnx": 0.1})
    print("survived", flush=True)
    """
)


def _fill(data_dir: Path, mode: str, filler_dir: Path, labels: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV and not k.startswith("INFERGATE_")}
    return subprocess.run(
        [sys.executable, "-c", _FILLER, str(data_dir), mode, str(filler_dir), str(labels)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_metric_files_have_their_blocks_allocated(tmp_path: Path) -> None:
    """No sparse page: a write through the memory map can never need a block the disk no longer has."""
    done = _fill(tmp_path / "var", "record", tmp_path / "nowhere-missing", 600)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr
    files = list(Settings(data_dir=tmp_path / "var").metrics_path.glob("*.db"))
    assert files
    for file in files:
        stats = file.stat()
        assert stats.st_size > 65536  # 600 label sets made the files grow past their first size
        assert stats.st_blocks * 512 >= stats.st_size, file.name


def test_a_full_disk_costs_values_not_the_process(tmp_path: Path) -> None:
    """Row 4 of the reliability suite holds with metrics in the data folder: no SIGBUS on a full disk."""
    from tests.reliability.scp_harness import small_tmpfs

    try:
        with small_tmpfs(tmp_path / "volume", "512k") as volume:
            done = _fill(volume / "var", "record", volume, 600)
            assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr[-2000:])
            assert "not recorded" in done.stderr  # said once per kind, not once per value
            assert done.stderr.count("not recorded") <= 2
            (volume / "var" / "metrics").rename(volume / "old-metrics")  # full, and no metrics folder yet
            done = _fill(volume / "var", "fill-first", volume, 0)
            assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr[-2000:])
            assert "metrics are off in this process" in done.stderr
    except PermissionError as exc:
        pytest.skip(f"a full disk is emulated with a small tmpfs, which needs root: {exc}")


_EXPORTER = textwrap.dedent(
    """
    import sys, urllib.request
    from infergate import metrics
    from infergate.config import Settings

    assert metrics.start_worker_exporter(Settings(data_dir=sys.argv[1])) is False  # port 0: off
    settings = Settings(data_dir=sys.argv[1], worker_metrics_port=int(sys.argv[2]))
    metrics.enable(settings)
    metrics.stage_timings("ct-tissue-seg", {"onnx": 0.25})
    assert metrics.start_worker_exporter(settings) is True
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{sys.argv[2]}/metrics", timeout=10) as response:
        sys.stdout.write(response.read().decode())
    """
)


def test_a_worker_serves_its_own_folder_on_its_metrics_port(tmp_path: Path) -> None:
    from tests.helpers.peers import free_port

    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV and not k.startswith("INFERGATE_")}
    done = subprocess.run(
        [sys.executable, "-c", _EXPORTER, str(tmp_path / "var"), str(free_port())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    samples = _samples(done.stdout)
    assert _value(samples, "infergate_stage_seconds_count", stage="onnx", model="ct-tissue-seg") == 1
    assert _value(samples, "infergate_jobs") is None  # the SQL gauges are the API's alone
