"""Observability of a running node (``infergate up``): /ready, /metrics across processes, JSON logs.

A small CT study goes in over DICOM (dcmtk storescu) and a second one over STOW-RS; once the jobs
are done, ``GET /metrics`` must show what the SCP, the API, the watcher and the worker's pool process
each recorded, added up, and the gauges read from SQL; the log lines (``INFERGATE_LOG_FORMAT=json``)
must be JSON naming the job and the study's salted hash, never the Study Instance UID.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infergate.dicomweb.multipart import build_multipart, multipart_content_type
from infergate.logs import SALT_FILE, study_hash
from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, http_json, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import free_port, run_echoscu, run_storescu, wait_for_port

pytestmark = pytest.mark.integration

QUIET_SECONDS = 2.0
SLICES = 10
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _metrics(api: str) -> Samples:
    with _HTTP.open(f"{api}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _stow(api: str, paths: list[Path]) -> int:
    body, boundary = build_multipart([("application/dicom", path.read_bytes()) for path in paths])
    request = urllib.request.Request(
        f"{api}/dicomweb/studies",
        data=body,
        method="POST",
        headers={"Content-Type": multipart_content_type("application/dicom", boundary)},
    )
    with _HTTP.open(request, timeout=60) as response:
        return int(response.status)


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The log records of the node's processes (Celery's start-up banner is printed, not logged)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_ready_metrics_and_json_logs_of_a_running_node(tmp_path: Path) -> None:
    scp_port, api_port = free_port(), free_port()
    data_dir = tmp_path / "var"
    node = NodeProcess(
        ["up"],
        node_env(
            data_dir=data_dir,
            scp_port=scp_port,
            api_port=api_port,
            series_quiet_seconds=QUIET_SECONDS,
            log_format="json",
            min_free_bytes=1,
        ),
        tmp_path / "up.log",
    ).start()
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_for_port("127.0.0.1", scp_port, timeout=60)
        wait_for_http(f"{api}/ready", timeout=90)  # 200 only once the worker answers a ping
        status, body = http_json(f"{api}/ready")
        assert status == 200 and body["status"] == "ready" and body["failing"] == []
        assert {check["name"] for check in body["checks"] if check["ok"]} == {
            "database",
            "broker",
            "storage",
            "workers",
            "models",
        }

        ct = write_ct_series(tmp_path / "ct", slices=SLICES, size=64)
        sent = run_storescu(ct.folder, port=scp_port, aet="OBSCT")
        assert sent.returncode == 0, sent.stderr
        refused = run_echoscu(scp_port, "NOTTHENODE", aet="OBSECHO")  # wrong called AE: rejected-permanent
        assert refused.returncode != 0
        results = wait_for_results(api, ct.study_uid, timeout=QUIET_SECONDS + 90, jobs=2)
        jobs = {job["model_id"]: job for series in results["series"] for job in series["jobs"]}
        assert {job["state"] for job in jobs.values()} == {"done"}, jobs
        again = run_storescu([ct.paths[0]], port=scp_port, aet="OBSCT")  # a duplicate: kept once, logged
        assert again.returncode == 0, again.stderr
        # A study of two slices by STOW-RS: stored and counted, routed nowhere (CT rules need 8 slices).
        stowed = write_ct_series(tmp_path / "stow", slices=2, size=32, seed=7)
        assert _stow(api, stowed.paths) == 200

        samples = _metrics(api)
        received = "infergate_instances_received_total"
        assert _value(samples, received, calling_ae="OBSCT", sop_class="CTImageStorage") == SLICES + 1
        assert _value(samples, received, calling_ae="STOW-RS", sop_class="CTImageStorage") == 2
        associations = "infergate_associations_total"
        assert _value(samples, associations, calling_ae="OBSCT", result="accepted") == 2
        assert _value(samples, associations, calling_ae="OBSECHO", result="rejected") == 1
        completed = _value(samples, "infergate_series_completed_total")
        assert completed is not None and completed >= 1
        for model in ("ct-tissue-seg", "ct-bone-classifier"):
            assert _value(samples, "infergate_jobs", state="done", model=model) == 1
            assert _value(samples, "infergate_jobs", state="failed", model=model) == 0
            provider = _value(samples, "infergate_inference_provider", model=model, provider="CPUExecutionProvider")
            assert provider == 1
            for stage in ("queue_wait", "load", "preprocess", "onnx", "postprocess", "sr_build", "write", "record"):
                count = _value(samples, "infergate_stage_seconds_count", stage=stage, model=model)
                assert count == 1, (stage, model, count)
        assert _value(samples, "infergate_stage_seconds_count", stage="seg_build", model="ct-tissue-seg") == 1
        assert _value(samples, "infergate_queue_depth") == 0
        free = _value(samples, "infergate_storage_free_bytes")
        assert free is not None and free > 0
    except BaseException:
        print(node.log_text()[-20000:])  # noqa: T201
        raise
    finally:
        node.signal_group(signal.SIGINT)
        assert node.process is not None
        code = node.process.wait(timeout=40)
    assert code == 0, node.log_text()[-5000:]

    text = node.log_text()
    records = _json_lines(text)
    assert records and {"scp", "api", "worker", "up"} <= {r["process"] for r in records}
    expected = study_hash(ct.study_uid, (data_dir / SALT_FILE).read_bytes().strip())
    seg_job = jobs["ct-tissue-seg"]["id"]
    worker = [r for r in records if r["logger"] == "workers.pipeline" and r["job_id"] == seg_job]
    assert worker and all(r["study"] == expected for r in worker), worker
    duplicate = [r for r in records if r["process"] == "scp" and "duplicate SOP Instance UID" in r["message"]]
    assert duplicate and duplicate[0]["study"] == expected and duplicate[0]["job_id"] is None
    assert ct.study_uid not in text and stowed.study_uid not in text
