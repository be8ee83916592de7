"""ONNX Runtime providers and sessions."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from infergate.errors import ModelFailed, NotFound
from infergate.manifest import load_package
from tests.unit.workers._fakes import MODELS_DIR
from workers import runtime
from workers.runtime import InferenceRunner, OnnxRunner, resolve_providers, session_options

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


def test_auto_takes_gpu_providers_when_present() -> None:
    assert resolve_providers(["auto"], GPU) == GPU
    assert resolve_providers(["auto"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers(["auto"], CPU) == CPU
    assert resolve_providers(["AUTO"], CPU) == CPU


def test_explicit_providers_are_filtered_and_cpu_is_last() -> None:
    assert resolve_providers(["CPUExecutionProvider", "CUDAExecutionProvider"], GPU) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers(["CUDAExecutionProvider"], CPU) == CPU
    assert resolve_providers(["CUDAExecutionProvider", "auto"], GPU) == [
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers([], GPU) == CPU
    with pytest.raises(TypeError, match='"requested"'):
        resolve_providers("auto")  # type: ignore[arg-type]


def test_installed_onnxruntime_always_offers_cpu() -> None:
    assert resolve_providers(["auto"])[-1] == "CPUExecutionProvider"


def test_sessions_are_created_lazily_and_cached() -> None:
    package = load_package(MODELS_DIR / "ct-tissue-seg")
    runner = OnnxRunner(["CPUExecutionProvider"], intra_op_threads=1)
    assert isinstance(runner, InferenceRunner)
    assert runner.providers_in_use("ct-tissue-seg") == []
    output = runner.run(package, np.zeros((1, 1, 6, 8), dtype=np.float32))
    assert output.shape == (1, 5, 6, 8)
    assert runner.providers_in_use("ct-tissue-seg") == ["CPUExecutionProvider"]
    assert runner.session(package) is runner.session(package)


def test_missing_or_broken_onnx_files(tmp_path: Path) -> None:
    folder = tmp_path / "ct-tissue-seg"
    shutil.copytree(MODELS_DIR / "ct-tissue-seg", folder)
    package = load_package(folder)
    runner = OnnxRunner(["auto"])
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelFailed, match="cannot load"):
        runner.run(package, np.zeros((1, 1, 2, 2, 2), dtype=np.float32))
    (folder / "model.onnx").unlink()
    with pytest.raises(NotFound, match="missing"):
        runner.run(package, np.zeros((1, 1, 2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxRunner(["auto"], intra_op_threads=-1)


def _cpu_only_onnxruntime() -> bool:
    return not any(name in resolve_providers(["auto"]) for name in GPU[:2])


def test_session_options_are_the_workers_settings() -> None:
    options = session_options(2)
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options().intra_op_num_threads == 0  # ONNX Runtime's default
    with pytest.raises(ValueError, match="intra_op_threads"):
        session_options(-1)


def test_auto_falls_back_to_cpu_without_gpu_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["AzureExecutionProvider", *CPU])
    package = load_package(MODELS_DIR / "ct-tissue-seg")
    runner = OnnxRunner(["auto"], intra_op_threads=1)
    assert runner.providers == CPU
    assert runner.run(package, np.zeros((1, 1, 6, 8), dtype=np.float32)).shape == (1, 5, 6, 8)
    assert runner.providers_in_use("ct-tissue-seg") == CPU


def test_requesting_an_unavailable_gpu_provider_warns_and_runs_on_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: CPU)
    package = load_package(MODELS_DIR / "ct-tissue-seg")
    with caplog.at_level(logging.WARNING, logger="workers.runtime"):
        runner = OnnxRunner(["CUDAExecutionProvider", "TensorrtExecutionProvider"], intra_op_threads=1)
    assert runner.providers == CPU
    assert "CUDAExecutionProvider is not available" in caplog.text
    assert "TensorrtExecutionProvider is not available" in caplog.text
    runner.run(package, np.zeros((1, 1, 6, 8), dtype=np.float32))
    assert runner.providers_in_use("ct-tissue-seg") == CPU


@pytest.mark.skipif(not _cpu_only_onnxruntime(), reason="needs an ONNX Runtime without GPU providers")
def test_gpu_providers_listed_but_unusable_fall_back_to_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # onnxruntime-gpu on a machine without a usable GPU: the providers are listed, the session cannot start them
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: GPU)
    package = load_package(MODELS_DIR / "ct-tissue-seg")
    runner = OnnxRunner(["auto"], intra_op_threads=1)
    assert runner.providers == GPU
    with (
        caplog.at_level(logging.WARNING, logger="workers.runtime"),
        pytest.warns(UserWarning, match="not in available provider names"),  # ONNX Runtime's own warning
    ):
        output = runner.run(package, np.zeros((1, 1, 6, 8), dtype=np.float32))
    assert output.shape == (1, 5, 6, 8)
    assert runner.providers_in_use("ct-tissue-seg") == CPU
    assert "runs without TensorrtExecutionProvider,CUDAExecutionProvider" in caplog.text
