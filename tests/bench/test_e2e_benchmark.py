"""``benchmarks/e2e.py --quick`` runs end to end and reports what it promises: no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = ["completion", "queue_wait", "load", "preprocess", "onnx", "postprocess", "seg_build", "sr_build"]
ROWS += ["preview", "write", "record", "export", "other", "total", "node overhead", "seen by poll"]


def test_quick_run_prints_the_table_and_appends_a_record(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "e2e.py"), "--quick", "--results", str(results)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    table = done.stdout
    assert "CT 16 x 64^2 -> ct-tissue-seg, ct-bone-classifier (1 runs)" in table
    for row in ROWS:
        assert any(line.strip().startswith(row) for line in table.splitlines()), row
    assert "Throughput: 2 CT studies of 8 x 64^2" in table
    assert "PASS" in table or "FAIL" in table

    lines = (results / "e2e.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["benchmark"] == "e2e"
    assert {"machine", "versions", "date", "settings", "cases", "targets", "throughput"} <= set(record)
    assert record["settings"]["quiet_seconds"] == 1.0
    assert record["versions"]["orthanc"] != "unknown"
    ct = record["cases"]["ct"]
    assert ct["models"] == ["ct-tissue-seg", "ct-bone-classifier"] and ct["runs_counted"] == 1
    for row in ("completion", "onnx", "seg_build", "sr_build", "export", "total", "overhead"):
        assert set(ct["summary"][row]) == {"p50", "p95", "min", "max"}, row
    run = ct["runs"][0]
    assert {job["model_id"] for job in run["jobs"]} == {"ct-tissue-seg", "ct-bone-classifier"}
    for job in run["jobs"]:
        assert {"queue_wait", "load", "onnx", "record", "export"} <= set(job["timings"])
        assert all(value >= 0 for value in job["timings"].values())
    assert run["seconds"]["total"] > run["seconds"]["completion"] >= 0
    assert [item["workers"] for item in record["throughput"]] == [1, 2]
    assert all(item["studies_per_min"] > 0 and item["jobs"] == 4 for item in record["throughput"])
    assert [target["target"].split(":")[0] for target in record["targets"]] == ["CT 16 x 64^2"]
