"""``benchmarks/ingest.py --quick`` runs end to end: it prints the table and appends one JSON record.

Only the shape of the output is checked, never a timing: the figures of a tiny run on a busy test machine
mean nothing, and the real run is ``benchmarks/ingest.py --repeat 5`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.peers import DICOMWEB_PLUGIN, ORTHANC_BINARY

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ingest.py"
DIMSE_RECEIVERS = {"node", "storescp", "storescp-sync", "orthanc", "pynetdicom-null"}
STOW_RECEIVERS = {"node", "orthanc"}
METRICS = ("inst_per_s", "mb_per_s", "lat_p50_ms", "lat_p99_ms", "cpu_ms_per_inst", "peak_rss_mb")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (shutil.which("storescu") and shutil.which("storescp") and ORTHANC_BINARY.exists())
        or not DICOMWEB_PLUGIN.exists(),
        reason="needs dcmtk and Orthanc with its DICOMweb plugin",
    ),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("ingest-bench")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(folder), "--workdir", str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result.stdout, folder


def test_quick_run_prints_every_section_and_receiver(quick_run: tuple[str, Path]) -> None:
    stdout, _ = quick_run
    for heading in ("== DIMSE C-STORE", "== STOW-RS", "== Memory", "== Targets", "Same-run ratios"):
        assert heading in stdout
    for name in DIMSE_RECEIVERS:
        assert f"  {name} " in stdout
    assert "node/orthanc" in stdout and "node/storescp" in stdout
    assert stdout.count("PASS") + stdout.count("FAIL") == 2
    assert "does NOT fsync" in stdout  # the reader is told storescp is no durable reference


def test_quick_run_appends_one_complete_record(quick_run: tuple[str, Path]) -> None:
    _, folder = quick_run
    lines = (folder / "ingest.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["benchmark"] == "ingest" and record["config"]["quick"] is True
    assert {"platform", "cpus", "cpu_model", "filesystem"} <= record["machine"].keys()
    assert {"python", "pynetdicom", "pydicom", "dcmtk", "orthanc"} <= record["versions"].keys()
    assert record["versions"]["dcmtk"] != "missing" and record["versions"]["orthanc"] != "missing"

    rows = {(row["phase"], row["series"], row["ways"], row["receiver"]): row for row in record["summary"]}
    series = set(record["config"]["series"])
    assert len(series) == 2
    expected = {("dimse", s, w, r) for s in series for w in (1, 4) for r in DIMSE_RECEIVERS}
    expected |= {("stow", s, w, r) for s in series for w in (1, 4) for r in STOW_RECEIVERS}
    assert set(rows) == expected
    for row in rows.values():
        for metric in METRICS:
            span = row[metric]
            assert span["min"] <= span["median"] <= span["max"]
            assert math.isfinite(span["max"]) and span["min"] >= 0
        assert row["inst_per_s"]["min"] > 0 and row["peak_rss_mb"]["min"] > 0

    ratios = {(item["phase"], item["series"], item["ways"], item["ratio"]) for item in record["ratios"]}
    expected_ratios = {
        ("dimse", s, w, f"node/{ref}") for s in series for w in (1, 4) for ref in DIMSE_RECEIVERS - {"node"}
    } | {("stow", s, w, "node/orthanc") for s in series for w in (1, 4)}
    assert ratios == expected_ratios
    assert [target["threshold"] for target in record["targets"]] == [1.5, 0.5]
    assert all(isinstance(target["pass"], bool) for target in record["targets"])
    assert [item["instances"] for item in record["memory"]] == sorted(item["instances"] for item in record["memory"])
    assert len(record["memory"]) == 3 and all(item["peak_rss_mb"] > 0 for item in record["memory"])
    assert len(record["runs"]) == len(expected)  # one repetition
    assert not list(folder.glob("infergate-bench-*")), "the work folder is removed"
