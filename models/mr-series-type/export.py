"""Copy dcm-classifier's ONNX model into this package, verify it and write ``manifest.json``.

Run from anywhere with the ``export`` extra installed (dcm-classifier 0.9.9)::

    python models/mr-series-type/export.py

dcm-classifier ships its trained classifier, ten one-vs-rest scikit-learn random forests converted by
skl2onnx 1.16, as ``dcm_classifier/models/ova_rf_classifier.onnx``. Nothing is retrained or converted
here: the file is copied byte for byte, checked to be the model the manifest describes (input
``float_input`` float32 ``(N, 28)``; output ``output_probability``, a ZipMap over the integer labels
0..9; dcm-classifier's label map), and ``manifest.json`` is written with its SHA-256. The script then
prints the copy's SHA-256 and the largest difference between its probabilities and dcm-classifier's
own ``ImageTypeClassifierBase.infer_modality`` on a few feature rows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infergate.manifest import ModelManifest

HERE = Path(__file__).resolve().parent
MODEL_ID = HERE.name
DCM_CLASSIFIER_VERSION = "0.9.9"
VERSION = DCM_CLASSIFIER_VERSION
SOURCE = ("models", "ova_rf_classifier.onnx")
N_FEATURES = 28

#: dcm-classifier's ``imagetype_to_integer_mapping`` (image_type_inference.py): label -> (name, code).
#: Codes are from CID 7180 "Abstract Multi-dimensional Image Model Component Semantics" where it has
#: one; the other classes get codes of the private scheme 99INFERGATE (see README.md).
CLASSES: list[tuple[str, str, dict[str, str]]] = [
    ("t1w", "T1w", {"value": "110804", "scheme": "DCM", "meaning": "T1 Weighted MR Signal Intensity"}),
    ("gret2star", "T2starw", {"value": "110806", "scheme": "DCM", "meaning": "T2* Weighted MR Signal Intensity"}),
    ("t2w", "T2w", {"value": "110805", "scheme": "DCM", "meaning": "T2 Weighted MR Signal Intensity"}),
    (
        "flair",
        "FLAIR",
        {"value": "MRST-FLAIR", "scheme": "99INFERGATE", "meaning": "T2 Weighted FLAIR MR Signal Intensity"},
    ),
    ("b0", "DWI_b0", {"value": "MRST-B0", "scheme": "99INFERGATE", "meaning": "Diffusion b=0 MR Signal Intensity"}),
    (
        "tracew",
        "DWI_trace",
        {"value": "MRST-TRACEW", "scheme": "99INFERGATE", "meaning": "Trace Weighted Diffusion MR Signal Intensity"},
    ),
    ("adc", "ADC", {"value": "113041", "scheme": "DCM", "meaning": "Apparent Diffusion Coefficient"}),
    ("fa", "FA", {"value": "110808", "scheme": "DCM", "meaning": "Fractional Anisotropy"}),
    (
        "eadc",
        "eADC",
        {"value": "MRST-EADC", "scheme": "99INFERGATE", "meaning": "Exponential Apparent Diffusion Coefficient"},
    ),
    ("dwig", "DWI_gradient", {"value": "113043", "scheme": "DCM", "meaning": "Diffusion weighted"}),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_file() -> Path:
    """The ONNX file inside the installed dcm-classifier, found without importing it (ITK is slow)."""
    version = importlib.metadata.version("dcm_classifier")
    if version != DCM_CLASSIFIER_VERSION:
        raise SystemExit(f"dcm-classifier {DCM_CLASSIFIER_VERSION} is required, found {version}.")
    spec = importlib.util.find_spec("dcm_classifier")
    if spec is None or spec.origin is None:
        raise SystemExit("dcm-classifier is not installed: pip install -e '.[export]'")
    return Path(spec.origin).parent.joinpath(*SOURCE)


def check_graph(path: Path) -> None:
    """Refuse a file whose interface is not the one the manifest and the feature extractor assume."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "float_input" and model_input.type == "tensor(float)", model_input
    assert model_input.shape[1] == N_FEATURES, model_input.shape
    outputs = {o.name: o.type for o in session.get_outputs()}
    assert outputs == {"output_label": "tensor(int64)", "output_probability": "seq(map(int64,tensor(float)))"}
    (rows,) = session.run(["output_probability"], {"float_input": np.zeros((1, N_FEATURES), np.float32)})
    assert sorted(rows[0]) == list(range(len(CLASSES))), rows[0]


def reference_difference(path: Path) -> float:
    """Largest |p_copy - p_dcm_classifier| on feature rows, through dcm-classifier's own inference code."""
    import pandas as pd
    from dcm_classifier.dicom_config import inference_features
    from dcm_classifier.image_type_inference import ImageTypeClassifierBase, imagetype_to_integer_mapping

    assert [label for label, _, _ in CLASSES] == sorted(
        imagetype_to_integer_mapping, key=imagetype_to_integer_mapping.get
    )
    reference = ImageTypeClassifierBase()
    reference.series_number = 1
    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    largest = 0.0
    for _ in range(20):
        row = {name: float(rng.choice([-12345.0, 0.0, 1.0, rng.uniform(1, 5000)])) for name in inference_features}
        _, outputs = reference.infer_modality(row)
        expected = np.array([outputs[f"GUESS_ONNX_{label}"].iloc[0] for label, _, _ in CLASSES])
        features = pd.DataFrame([row])[inference_features].to_numpy(np.float32)
        (rows,) = session.run(["output_probability"], {"float_input": features})
        got = np.array([rows[0][i] for i in range(len(CLASSES))])
        largest = max(largest, float(np.abs(got - expected).max()))
    return largest


def manifest(digest: str) -> dict[str, object]:
    return {
        "id": MODEL_ID,
        "version": VERSION,
        "name": "MR series type from DICOM headers (dcm-classifier)",
        "description": (
            "dcm-classifier 0.9.9 (Brzus et al., SPIE Medical Imaging 2024): random forests on 28 header "
            "values tell T1w, T2w, T2*w, FLAIR and diffusion series and maps apart, for routing series to "
            "the models that expect them. Reads no pixels. Not for clinical use."
        ),
        "task": "classification",
        "input": "header_features",
        "feature_extractor": "dcm-classifier-v1",
        "file": "model.onnx",
        "sha256": digest,
        "input_name": "float_input",
        "output_name": "output_probability",
        "accepts": {"modalities": ["MR"], "dimensionality": 3, "min_slices": 1},
        # the graph already ends in probabilities (L1-normalised one-vs-rest votes): no softmax on top
        "postprocess": {"activation": "softmax"},
        "classes": [{"index": index, "name": name, "code": code} for index, (_, name, code) in enumerate(CLASSES)],
        "finding": {"value": "121141", "scheme": "DCM", "meaning": "Image Type"},
        "measurements": [],
    }


def main() -> int:
    source = source_file()
    target = HERE / "model.onnx"
    shutil.copyfile(source, target)
    digest = sha256(target)
    if digest != sha256(source):
        raise SystemExit(f"The copy of {source} differs from the original.")
    check_graph(target)
    data = manifest(digest)
    ModelManifest.model_validate(data)
    (HERE / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"copied {source} -> {target}")
    print(f"sha256 {digest}")
    print(f"largest |p - p_dcm_classifier| on 20 feature rows: {reference_difference(target):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
