"""``benchmarks/inference.py --quick`` and ``benchmarks/gpu.py --quick`` run end to end: tables and JSON records.

Only the shape of the output and the agreement of the outputs are checked, never a timing: the figures of
a one-repetition run on a busy test machine mean nothing, and the real runs are ``benchmarks/inference.py``
and, on a GPU machine, ``benchmarks/gpu.py`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFERENCE = ROOT / "benchmarks" / "inference.py"
GPU = ROOT / "benchmarks" / "gpu.py"
MODELS = ("brain-extraction", "ct-bone-classifier", "ct-tissue-seg", "cxr-demo-classifier", "mr-series-type")
NETWORKS = {(m, "model.onnx") for m in MODELS} | {("brain-extraction", "bbox_model.onnx")}
VERDICTS = {"PASS", "FAIL", "n/a"}


def _run(script: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result.stdout


def _records(folder: Path, name: str) -> list[dict[str, Any]]:
    lines = (folder / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("inference-bench")
    stdout = _run(INFERENCE, "--quick", "--results", str(folder))
    (record,) = _records(folder, "inference.jsonl")
    return stdout, record


def test_inference_prints_a_table_per_network_and_a_verdict_per_model(inference_run: tuple[str, Any]) -> None:
    stdout, _ = inference_run
    assert stdout.count("median ms") == len(NETWORKS)
    assert "brain-extraction/bbox_model.onnx: input (1, 1, 128, 128, 128)" in stdout
    assert "brain-extraction: input (1, 1, 256, 256, 256)" in stdout
    assert "ct-tissue-seg: input (1, 1, 273, 273)" in stdout  # one 512^2 slice of 0.8 mm on the 1.5 mm grid
    summary = stdout.split("Summary:", 1)[1].splitlines()[1:]
    verdicts = {line.split()[0]: line.split()[-1] for line in summary if line.startswith("  ")}
    assert set(verdicts) == set(MODELS)
    assert set(verdicts.values()) <= VERDICTS
    assert verdicts["mr-series-type"] == "n/a"  # no torch source: compared with dcm-classifier's own runtime


def test_inference_record(inference_run: tuple[str, dict[str, Any]]) -> None:
    _, record = inference_run
    assert record["benchmark"] == "inference"
    assert record["settings"]["quick"] is True
    assert record["machine"]["cpus"] >= 1 and record["machine"]["cpu"]
    for package in ("onnxruntime", "torch", "numpy"):
        assert record["versions"][package]
    assert {(n["model"], n["network"]) for n in record["networks"]} == NETWORKS
    for network in record["networks"]:
        runtimes = {row["runtime"] for row in network["rows"]}
        assert runtimes == ({"torch", "onnxruntime"} if network["torch_source"] else {"reference", "onnxruntime"})
        for row in network["rows"]:
            assert row["n"] >= 1 and row["min_s"] <= row["median_s"] <= row["max_s"]
            if row["runtime"] == "onnxruntime":
                assert row["ratio"] > 0
        # the same input gives the same output (within the model's tolerance) under both runtimes
        assert network["within_tolerance"], network
        assert network["verdict"] in VERDICTS
    assert {s["model"] for s in record["summary"]} == set(MODELS)


def test_gpu_benchmark_skips_cleanly_without_gpu_providers(tmp_path: Path) -> None:
    stdout = _run(GPU, "--quick", "--results", str(tmp_path))
    (record,) = _records(tmp_path, "gpu.jsonl")
    assert record["benchmark"] == "gpu"
    if record["usable_gpu_providers"]:  # a GPU machine: the real run
        assert record["networks"] and "skipped" not in record
        return
    assert "no GPU providers available; skipped" in stdout
    assert record["skipped"] == "no GPU providers available; skipped"


def test_gpu_benchmark_rows_on_the_cpu_provider(tmp_path: Path) -> None:
    stdout = _run(
        GPU,
        "--quick",
        "--providers",
        "CPUExecutionProvider",
        "--models",
        "cxr-demo-classifier",
        "ct-bone-classifier",
        "--batch-sizes",
        "1",
        "2",
        "--results",
        str(tmp_path),
    )
    assert stdout.count("items/s") == 2
    (record,) = _records(tmp_path, "gpu.jsonl")
    rows = [row for network in record["networks"] for row in network["rows"]]
    assert {row["batch"] for row in rows} == {1, 2}  # both have a dynamic batch axis
    for row in rows:
        assert row["provider"] == "CPUExecutionProvider" and row["precision"] == "fp32"
        assert row["within_tolerance"] and row["items_per_s"] > 0
