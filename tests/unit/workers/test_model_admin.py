"""``infergate models validate|add``: good packages pass, bad ones are refused naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infergate.catalog import load_catalog
from infergate.config import Settings
from infergate.manifest import file_sha256
from workers.model_admin import install, validate

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted(p for p in (REPO / "models").iterdir() if (p / "manifest.json").is_file())


def _copy(name: str, tmp_path: Path, new_id: str | None = None) -> Path:
    target = tmp_path / (new_id or name)
    shutil.copytree(REPO / "models" / name, target)
    if new_id is not None:
        _edit(target, lambda m: m.update(id=new_id))
    return target


def _edit(folder: Path, change: object) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_packages_are_valid(folder: Path) -> None:
    report = validate(folder)
    assert report.ok, report.errors


def test_missing_field_is_named(tmp_path: Path) -> None:
    folder = _copy("ct-bone-classifier", tmp_path)
    _edit(folder, lambda m: m.pop("task"))
    report = validate(folder)
    assert any('"task"' in e for e in report.errors), report.errors


def test_bad_value_is_named(tmp_path: Path) -> None:
    folder = _copy("ct-tissue-seg", tmp_path)
    _edit(folder, lambda m: m["preprocess"].update(overlap=1.5))
    report = validate(folder)
    assert any('"preprocess.overlap"' in e for e in report.errors), report.errors


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    folder = _copy("ct-bone-classifier", tmp_path)
    _edit(folder, lambda m: m.update(sha256="0" * 64))
    report = validate(folder)
    assert any('"file"' in e and "SHA-256" in e for e in report.errors), report.errors


def test_onnx_whose_class_count_disagrees_is_refused(tmp_path: Path) -> None:
    folder = _copy("ct-bone-classifier", tmp_path)

    def add_class(m: dict) -> None:  # type: ignore[type-arg]
        m["classes"].append({"index": len(m["classes"]), "name": "Extra", "code": m["classes"][0]["code"]})

    _edit(folder, add_class)
    report = validate(folder)
    assert any('"classes"' in e for e in report.errors), report.errors


def test_onnx_whose_rank_disagrees_is_refused(tmp_path: Path) -> None:
    folder = _copy("ct-tissue-seg", tmp_path)
    _edit(folder, lambda m: m["accepts"].update(dimensionality=3))
    report = validate(folder)
    assert any('"accepts.dimensionality"' in e for e in report.errors), report.errors


def test_wrong_code_meaning_is_refused(tmp_path: Path) -> None:
    folder = _copy("ct-tissue-seg", tmp_path)
    _edit(folder, lambda m: m["labels"][0]["type"].update(meaning="Kidney"))
    report = validate(folder)
    assert any('"labels[' in e and "Kidney" in e for e in report.errors), report.errors


def test_add_installs_and_the_catalog_routes_it(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(REPO / "models", models_dir)
    settings = Settings(data_dir=tmp_path / "var", models_dir=models_dir)
    before = load_catalog(settings)
    new = _copy("ct-bone-classifier", tmp_path / "incoming", new_id="ct-bone-copy")
    (new / "routing.yaml").write_text(
        "rules:\n  - name: copy\n    match: {modality: [CT], series_description: COPY}\n    models: [ct-bone-copy]\n"
    )
    assert validate(new).ok
    install(new, models_dir)
    after = load_catalog(settings)
    assert "ct-bone-copy" not in before.packages and "ct-bone-copy" in after.packages
    assert file_sha256(models_dir / "ct-bone-copy" / "model.onnx") == after.packages["ct-bone-copy"].manifest.sha256
    with pytest.raises(FileExistsError):
        install(new, models_dir)


def test_cli_exit_codes(tmp_path: Path) -> None:
    bad = _copy("ct-bone-classifier", tmp_path)
    _edit(bad, lambda m: m.pop("task"))
    cli = [sys.executable, "-m", "infergate.cli", "models", "validate"]
    good = subprocess.run([*cli, str(SHIPPED[0])], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    refused = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and '"task"' in refused.stdout
