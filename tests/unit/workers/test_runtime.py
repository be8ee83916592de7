"""ONNX Runtime providers and sessions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from infergate.errors import ModelFailed, NotFound
from infergate.manifest import load_package
from tests.unit.workers._fakes import MODELS_DIR
from workers.runtime import InferenceRunner, OnnxRunner, resolve_providers

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
