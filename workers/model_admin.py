"""``infergate models validate|add``: check a model package end to end, then install it.

Validation lives with the workers because it loads the ONNX file with ONNX Runtime and runs one
inference through the same pre/post-processing the worker uses, on a synthetic input built from
the manifest; the service never imports ONNX Runtime. Validating every shipped model takes a while
(the inference step), so a bar over the steps of all packages is drawn on stderr when stderr is a
terminal or with ``--progress``; the report on stdout is unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError
from pydicom.sr._concepts_dict import concepts

from infergate.config import get_settings
from infergate.errors import InfergateError
from infergate.manifest import Code, ModelManifest, ModelPackage, file_sha256
from infergate.progress import Progress, bars, no_progress, wanted
from workers.header_features import classify_from_headers
from workers.inference import infer
from workers.runtime import OnnxRunner
from workers.synthetic import synthetic_series


@dataclass
class Report:
    """What validation found: ``errors`` refuse the package, ``notes`` only inform."""

    folder: Path
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(root)"


def read_manifest(folder: Path, report: Report) -> ModelManifest | None:
    path = folder / "manifest.json"
    if not path.is_file():
        report.errors.append(f"{path}: missing")
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        report.errors.append(f"{path}: not valid JSON ({exc})")
        return None
    try:
        manifest = ModelManifest.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            report.errors.append(f'manifest field "{_field(error["loc"])}": {error["msg"]}')
        return None
    if manifest.id != folder.name:
        report.errors.append(f'manifest field "id": {manifest.id!r} should equal the folder name {folder.name!r}')
    return manifest


def _codes(manifest: ModelManifest) -> Iterator[tuple[str, Code]]:
    for label in manifest.labels:
        yield f"labels[{label.value}].category", label.category
        yield f"labels[{label.value}].type", label.type
        if label.anatomic_region is not None:
            yield f"labels[{label.value}].anatomic_region", label.anatomic_region
    for cls in manifest.classes:
        yield f"classes[{cls.index}].code", cls.code
    if manifest.finding is not None:
        yield "finding", manifest.finding
    for total in manifest.volume_totals:
        yield f"volume_totals[{total.name}].type", total.type


def check_codes(manifest: ModelManifest, report: Report) -> None:
    """Codes of SCT/DCM must exist with the meaning the Standard gives; private schemes start with 99."""
    for name, code in _codes(manifest):
        if code.scheme.startswith("99"):
            report.notes.append(f'manifest field "{name}": private code {code.scheme} {code.value}')
            continue
        table: dict[str, dict[str, tuple[str, list[int]]]] | None = concepts.get(code.scheme)  # type: ignore[assignment]
        if table is None:
            report.errors.append(f'manifest field "{name}": unknown coding scheme {code.scheme!r}')
            continue
        meanings = [entry[code.value][0] for entry in table.values() if code.value in entry]
        if not meanings:
            report.notes.append(f'manifest field "{name}": {code.scheme} {code.value} is not in pydicom\'s tables')
        elif code.meaning.casefold() not in {m.casefold() for m in meanings}:
            report.errors.append(
                f'manifest field "{name}": {code.scheme} {code.value} means {meanings[0]!r}, not {code.meaning!r}'
            )


def _onnx_files(manifest: ModelManifest) -> list[tuple[str, str, str, str, str]]:
    """(field, file, sha256, input name, output name) of every ONNX file of the package."""
    files: list[tuple[str, str, str, str, str]] = [
        ("file", manifest.file, manifest.sha256, manifest.input_name, manifest.output_name)
    ]
    roi = manifest.preprocess.roi
    if roi is not None:
        files.append(("preprocess.roi.file", roi.file, roi.sha256, roi.input_name, roi.output_name))
    return files


def check_onnx(folder: Path, manifest: ModelManifest, report: Report) -> None:
    """Hashes, then input/output names and ranks (and static class counts) against the manifest."""
    image_rank = 2 + manifest.accepts.dimensionality
    for name, file, sha256, input_name, output_name in _onnx_files(manifest):
        path = folder / file
        if not path.is_file():
            report.errors.append(f'manifest field "{name}": {file} is missing')
            continue
        if file_sha256(path) != sha256:
            report.errors.append(f'manifest field "{name}": the SHA-256 of {file} differs from the manifest')
            continue
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types for a bad file
            report.errors.append(f'manifest field "{name}": {file} does not load: {exc}')
            continue
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if input_name not in inputs:
            report.errors.append(
                f'manifest field "input_name": {input_name!r} is not an input of {file} ({list(inputs)})'
            )
        elif manifest.input == "image" and len(inputs[input_name].shape) != image_rank:
            report.errors.append(
                f'manifest field "accepts.dimensionality": {file} input has rank {len(inputs[input_name].shape)}, '
                f"a {manifest.accepts.dimensionality}D model needs rank {image_rank}"
            )
        if output_name not in outputs:
            report.errors.append(
                f'manifest field "output_name": {output_name!r} is not an output of {file} ({list(outputs)})'
            )
            continue
        if name != "file":
            continue
        shape = outputs[output_name].shape
        classes = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
        if manifest.task == "classification" and classes is not None and classes != len(manifest.classes):
            report.errors.append(
                f'manifest field "classes": {file} outputs {classes} classes, '
                f"the manifest names {len(manifest.classes)}"
            )
        if manifest.task == "segmentation" and classes is not None and manifest.postprocess.threshold is None:
            needed = max(label.value for label in manifest.labels) + 1
            if classes < needed:
                report.errors.append(
                    f'manifest field "labels": {file} outputs {classes} channels, label values need {needed}'
                )


def check_inference(folder: Path, manifest: ModelManifest, report: Report) -> None:
    """One run on a synthetic series through the worker's own path; outputs must match the manifest."""
    package = ModelPackage(manifest=manifest, folder=folder)
    runner = OnnxRunner(["CPUExecutionProvider"])
    datasets, volume = synthetic_series(manifest)
    probabilities: np.ndarray | None
    label_map: np.ndarray | None
    try:
        if manifest.input == "header_features":
            probabilities = classify_from_headers(datasets, package, runner)
            label_map = None
        else:
            assert volume is not None
            output = infer(volume, package, runner)
            probabilities, label_map = output.probabilities, output.label_map
    except (InfergateError, ValueError, RuntimeError) as exc:
        report.errors.append(f"synthetic inference failed: {type(exc).__name__}: {exc}")
        return
    if manifest.task == "classification":
        if probabilities is None or len(probabilities) != len(manifest.classes):
            report.errors.append("synthetic inference: probabilities do not match the manifest's classes")
        elif not np.isclose(float(np.sum(probabilities)), 1.0, atol=1e-3):
            report.errors.append("synthetic inference: probabilities do not sum to 1")
        else:
            report.notes.append(f"synthetic inference: probabilities {np.round(probabilities, 3).tolist()}")
    else:
        assert volume is not None
        allowed = {0} | {label.value for label in manifest.labels}
        if label_map is None or label_map.shape != volume.array.shape:
            report.errors.append("synthetic inference: the label map does not cover the input grid")
        elif not set(np.unique(label_map).tolist()) <= allowed:
            report.errors.append("synthetic inference: the label map holds values that are not manifest labels")
        else:
            report.notes.append(
                f"synthetic inference: label map {label_map.shape}, labels {np.unique(label_map).tolist()}"
            )


#: The steps of :func:`validation_steps`, in order: one tick each of the progress bar.
STEPS = ("manifest", "codes", "onnx", "inference")


def validation_steps(folder: Path, report: Report) -> Iterator[str]:
    """Run every check in order into ``report``, yielding each step's name once it is done.

    A step that cannot run (the manifest itself is invalid, or an earlier check failed before the
    inference) is skipped but still yielded, so a progress bar always counts :data:`STEPS` per package.
    """
    manifest = None
    if not folder.is_dir():
        report.errors.append(f"{folder}: not a folder")
    else:
        manifest = read_manifest(folder, report)
    yield "manifest"
    if manifest is not None:
        check_codes(manifest, report)
    yield "codes"
    if manifest is not None:
        check_onnx(folder, manifest, report)
    yield "onnx"
    if manifest is not None and report.ok:
        check_inference(folder, manifest, report)
    yield "inference"


def validate(folder: Path) -> Report:
    """Every check, in order; later checks are skipped once the manifest itself is invalid."""
    report = Report(folder=folder.resolve())
    for _ in validation_steps(report.folder, report):
        pass
    return report


def validate_all(folders: list[Path], progress: Progress = no_progress) -> list[Report]:
    """:func:`validate` each folder, advancing ``progress`` once per step of each package."""
    reports = [Report(folder=folder.resolve()) for folder in folders]
    steps = (step for report in reports for step in validation_steps(report.folder, report))
    for _ in progress(steps, total=len(reports) * len(STEPS), desc="validate"):
        pass
    return reports


def install(folder: Path, models_dir: Path, *, replace: bool = False) -> Path:
    """Copy a validated package into the models folder atomically (rename of a complete copy)."""
    target = models_dir / folder.name
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; use --replace to overwrite it")
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=models_dir))
    shutil.copytree(folder, staging, dirs_exist_ok=True)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return target


def _print(report: Report) -> None:
    out = sys.stdout
    out.write(f"{report.folder}: {'valid' if report.ok else 'INVALID'}\n")
    for line in report.errors:
        out.write(f"  error: {line}\n")
    for line in report.notes:
        out.write(f"  note: {line}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate models")
    sub = parser.add_subparsers(dest="command", required=True)
    validate_parser = sub.add_parser("validate", help="Check model packages.")
    validate_parser.add_argument("paths", nargs="+", type=Path)
    add_parser = sub.add_parser("add", help="Validate a package, then install it into the models folder.")
    add_parser.add_argument("path", type=Path)
    add_parser.add_argument("--replace", action="store_true", help="Overwrite an installed package of the same id.")
    for each in (validate_parser, add_parser):
        each.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Draw a progress bar on stderr (default: only when stderr is a terminal).",
        )
    args = parser.parse_args(argv)
    progress = bars(wanted(args.progress))
    if args.command == "validate":
        # `models validate models/*` also names models/routing.yaml, NOTICE, README.md: skip plain files
        skipped = [path for path in args.paths if path.is_file()]
        for path in skipped:
            sys.stdout.write(f"{path}: skipped (a file, not a model package folder)\n")
        reports = validate_all([path for path in args.paths if path not in skipped], progress)
        for report in reports:
            _print(report)
        return 0 if all(r.ok for r in reports) else 1
    (report,) = validate_all([args.path], progress)
    _print(report)
    if not report.ok:
        return 1
    settings = get_settings()
    try:
        target = install(report.folder, settings.models_dir, replace=args.replace)
    except FileExistsError as exc:
        sys.stderr.write(f"infergate: {exc}\n")
        return 1
    sys.stdout.write(f"installed {target}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
