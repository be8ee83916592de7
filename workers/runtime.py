"""Running a model's network on a batch: the :class:`InferenceRunner` protocol and ONNX Runtime.

The pipeline only needs "tensor in, tensor out", so it depends on the :class:`InferenceRunner`
protocol; :class:`OnnxRunner` is the production implementation and tests supply runners that
compute a known function. Sessions are created on first use, never at import or at worker
start-up (Celery's ``worker_process_init`` allows 4 s, too little to load a large model), and are
cached in the runner, which a worker process keeps for its lifetime.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from infergate import metrics
from infergate.errors import ModelFailed, NotFound
from infergate.manifest import ModelManifest, ModelPackage, RegionOfInterest

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
#: Providers that "auto" takes, fastest first, when the installed ONNX Runtime has them.
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@runtime_checkable
class InferenceRunner(Protocol):
    """Runs the network of a model package on one batch."""

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        """Run ``package``'s network.

        Parameters
        ----------
        package : ModelPackage
            The model to run.
        batch : numpy.ndarray
            float32 input in the manifest's layout, ``(N, 1, D, H, W)`` or ``(N, 1, H, W)``, or
            ``(N, F)`` header features.

        Returns
        -------
        numpy.ndarray
            The raw output named by the manifest's ``output_name``: ``(N, C, ...)`` scores for
            segmentation, ``(N, C)`` logits (or probabilities, see ``postprocess.activation``) for
            classification.
        """
        ...


@runtime_checkable
class RegionRunner(Protocol):
    """A runner that can also run a package's region-of-interest file (a model cascade)."""

    def run_file(self, package: ModelPackage, file: RegionOfInterest, batch: np.ndarray) -> np.ndarray:
        """Run the ONNX file ``file.file`` of ``package`` on ``batch`` with ``file``'s tensor names."""
        ...


def resolve_providers(requested: list[str], available: list[str] | None = None) -> list[str]:
    """The ONNX Runtime execution providers to use, in priority order.

    Parameters
    ----------
    requested : list[str]
        Provider names from the settings. ``"auto"`` stands for TensorRT and CUDA when the
        installed ONNX Runtime has them; other names are kept only if available, so one setting
        works on CPU-only and GPU workers alike.
    available : list[str] | None
        What the installed ONNX Runtime offers; ``onnxruntime.get_available_providers()`` when
        None (given explicitly in tests).

    Returns
    -------
    list[str]
        Available providers without repeats, always ending with ``CPUExecutionProvider`` so that
        operators a GPU provider does not implement still run.
    """
    if not isinstance(requested, list) or not all(isinstance(name, str) for name in requested):
        raise TypeError('Argument "requested" should be a list of provider names.')
    offered = set(ort.get_available_providers() if available is None else available)
    resolved: list[str] = []
    for name in requested:
        candidates = [p for p in AUTO_PROVIDERS if p in offered] if name.strip().lower() == "auto" else [name.strip()]
        for candidate in candidates:
            if candidate == CPU_PROVIDER or candidate in resolved:
                continue
            if candidate in offered:
                resolved.append(candidate)
            else:
                log.warning("ONNX Runtime provider %s is not available here; skipped", candidate)
    return [*resolved, CPU_PROVIDER]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """The options of every session the worker creates (``benchmarks/inference.py`` measures these).

    Parameters
    ----------
    intra_op_threads : int
        Threads for one operator; 0 leaves ONNX Runtime's default (one per physical core).

    All graph optimisations are on (``ORT_ENABLE_ALL``, ONNX Runtime's default, set here so that it
    is explicit): constant folding, operator fusions (e.g. Conv + Relu) and, on CPU, the NCHWc layout
    for 2-D convolutions. Sessions are built from the original file each time rather than from a
    saved optimised copy: such a copy is specific to the CPU it was made on, and loading saves
    little (see ``benchmarks/README.md``).
    """
    if not isinstance(intra_op_threads, int) or intra_op_threads < 0:
        raise ValueError('Argument "intra_op_threads" should be 0 or a positive integer.')
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return options


def zipmap_to_array(rows: list[dict[Any, float]], manifest: ModelManifest) -> np.ndarray:
    """``(N, C)`` float32 probabilities from a ZipMap output (one ``{label: probability}`` per input).

    skl2onnx ends scikit-learn classifiers with a ZipMap unless told not to. Its keys are the training
    labels: integers are taken as the manifest's class indices, strings are matched to class names.

    Raises
    ------
    ModelFailed
        A row does not have exactly one probability per manifest class.
    """
    columns: dict[Any, int] = {c.index: c.index for c in manifest.classes} | {c.name: c.index for c in manifest.classes}
    array = np.zeros((len(rows), len(manifest.classes)), dtype=np.float32)
    for row_index, row in enumerate(rows):
        keys = [int(k) if isinstance(k, int | np.integer) else k for k in row]
        if sorted(columns.get(k, -1) for k in keys) != list(range(len(manifest.classes))):
            raise ModelFailed(f"Model {manifest.id!r} output labels {sorted(map(str, row))} do not match its classes.")
        for key, probability in zip(keys, row.values(), strict=True):
            array[row_index, columns[key]] = probability
    return array


class OnnxRunner:
    """An :class:`InferenceRunner` backed by ONNX Runtime sessions, one per model id.

    Parameters
    ----------
    providers : list[str]
        Requested execution providers, resolved by :func:`resolve_providers`.
    intra_op_threads : int
        Threads per session for one operator; 0 lets ONNX Runtime choose (all cores). Set it when
        several worker processes share a machine, so they do not oversubscribe the cores.

    Notes
    -----
    GPU providers never stop a CPU-only worker: ``"auto"`` takes none where the installed ONNX
    Runtime lacks them, an explicitly named provider that is not available is skipped with a
    warning (:func:`resolve_providers`), and one that is listed but cannot start (onnxruntime-gpu
    without a usable driver or TensorRT libraries) is dropped by ONNX Runtime when the session is
    created, which is logged as a warning; the model then runs on the CPU provider, always last.
    :meth:`providers_in_use` tells what a session really got.
    """

    def __init__(self, providers: list[str], intra_op_threads: int = 0) -> None:
        if intra_op_threads < 0:
            raise ValueError('Argument "intra_op_threads" should be 0 or a positive integer.')
        self._providers = resolve_providers(providers)
        self._intra_op_threads = intra_op_threads
        self._sessions: dict[str, tuple[str, ort.InferenceSession]] = {}
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        """The resolved providers new sessions ask for."""
        return list(self._providers)

    def providers_in_use(self, model_id: str) -> list[str]:
        """Providers the session of ``model_id`` actually got; empty if it has not been loaded yet.

        ONNX Runtime silently drops a provider it cannot initialise (e.g. CUDA without a driver),
        so this, not the request, says whether a model runs on the GPU.
        """
        entry = self._sessions.get(model_id)
        return list(entry[1].get_providers()) if entry is not None else []

    def session(self, package: ModelPackage) -> ort.InferenceSession:
        """The cached session of ``package``, created on first use.

        A package whose SHA-256 differs from the cached one (a model updated in place) gets a new
        session.

        Raises
        ------
        NotFound
            The ONNX file is missing.
        ModelFailed
            ONNX Runtime cannot load the file.
        """
        manifest = package.manifest
        return self._load(
            manifest.id, manifest.sha256, package.onnx_path, f"model {manifest.id!r}", manifest.version, report=True
        )

    def _load(
        self, key: str, sha256: str, path: Path, what: str, version: str, *, report: bool = False
    ) -> ort.InferenceSession:
        """The session cached under ``key``, (re)created when missing or when its SHA-256 changed.

        ``report``: set ``infergate_inference_provider`` for model ``key`` to the provider it got.
        """
        with self._lock:
            entry = self._sessions.get(key)
            if entry is not None and entry[0] == sha256:
                return entry[1]
            if not path.is_file():
                raise NotFound(f"Model file {path} is missing.")
            options = session_options(self._intra_op_threads)
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
            except Exception as exc:  # onnxruntime raises its own pybind exception types
                raise ModelFailed(f"ONNX Runtime cannot load {what}: {exc}") from exc
            in_use = session.get_providers()
            log.info("loaded %s %s on %s", key, version, ",".join(in_use))
            if dropped := [name for name in self._providers if name not in in_use]:
                # e.g. onnxruntime-gpu without a usable driver: ONNX Runtime warns and carries on with the rest
                log.warning("%s runs without %s, which ONNX Runtime could not start", what, ",".join(dropped))
            self._sessions[key] = (sha256, session)
            if report:
                previous = entry[1].get_providers()[0] if entry is not None else None
                metrics.inference_provider(key, in_use[0], previous)
            return session

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        """Run ``package`` on ``batch`` (see :meth:`InferenceRunner.run`)."""
        session = self.session(package)
        manifest = package.manifest
        inputs = {manifest.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (output,) = session.run([manifest.output_name], inputs)
        if isinstance(output, list) and output and isinstance(output[0], dict):
            return zipmap_to_array(output, manifest)
        return np.asarray(output)

    def run_file(self, package: ModelPackage, file: RegionOfInterest, batch: np.ndarray) -> np.ndarray:
        """Run another ONNX file of ``package`` (a region-of-interest model) on ``batch``.

        Its session is cached beside the main one under ``<model id>/<file name>`` and, like it,
        replaced when the file's SHA-256 in the manifest changes.
        """
        manifest = package.manifest
        path = package.folder / file.file
        what = f"{file.file} of model {manifest.id!r}"
        session = self._load(f"{manifest.id}/{file.file}", file.sha256, path, what, manifest.version)
        (output,) = session.run([file.output_name], {file.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(output)
