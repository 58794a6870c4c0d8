"""Loading a registry entry into something that classifies a batch, for each runtime."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from contracts.messages import BEING_TRAINED, NOT_TRAINED_YET
from contracts.registry import ModelEntry, Runtime
from contracts.training import heldout_set_id
from model.config import ModelSettings
from model.labels import file_labels, imagenet_labels
from model.store import read_progress

log = logging.getLogger("model.runtimes")


class ModelUnavailable(Exception):
    """The model cannot serve; the message says why, for users and operators."""


class ModelLoadFailed(ModelUnavailable):
    """The model's files are there but do not load (damaged, incompatible, labels that do not
    match): users read that it failed to load rather than that it is not installed."""


class Classifier(Protocol):
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (batch, classes)."""
        ...


@dataclass
class LoadedModel:
    entry: ModelEntry
    labels: tuple[str, ...]
    classify: Classifier
    random_weights: bool = False
    heldout_accuracy: float | None = None
    heldout_set: str | None = None
    heldout_size: int | None = None
    input_dtype: type = np.float32
    extra: dict[str, object] = field(default_factory=dict)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.classify(batch.astype(self.input_dtype, copy=False))

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        spec = self.entry.input
        channels = 3 if spec.mode == "RGB" else 1
        for n in batch_sizes:
            self.predict(np.zeros((n, spec.height, spec.width, channels), dtype=np.float32))


def resolve(entry: ModelEntry, template: str, settings: ModelSettings) -> Path:
    return entry.resolve(template, models_dir=settings.models_dir, trained_dir=settings.trained_dir)


def model_stamp(entry: ModelEntry, settings: ModelSettings) -> tuple[int, ...] | None:
    """Inode, modification and change times (ns) and size of the version's model file, and of
    its weights beside it for an OpenVINO .xml (the .bin): what changes when the model is written
    again, even as a copy keeping the same modification time. None for a version without a file
    or while a file is missing."""
    if not entry.file:
        return None
    path = resolve(entry, entry.file, settings)
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    try:
        stats = [f.stat() for f in files]
    except OSError:
        return None
    return tuple(n for st in stats for n in (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))


class FailedLoads:
    """Versions whose last load failed, each with its spec and its model file's stamp
    (``model_stamp``) as they were tried: a version is tried again once either changes (`make run`
    trains a version while the portal serves, an operator replaces a broken file), never at every
    check. Shared by the worker and the explainer; used from one thread."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._tried: dict[str, tuple[ModelEntry, tuple[dict[str, Any], tuple[int, ...] | None]]] = {}

    def _as_now(self, entry: ModelEntry) -> tuple[dict[str, Any], tuple[int, ...] | None]:
        return entry.spec(), model_stamp(entry, self.settings)

    def trying(self, entry: ModelEntry) -> None:
        """Before a load: its spec and file as tried, kept should it fail (a file written during
        the load then counts as a change)."""
        self._tried[entry.key] = (entry, self._as_now(entry))

    def forget(self, entry: ModelEntry) -> None:
        """After a load that succeeded, or of a version never to be tried again."""
        self._tried.pop(entry.key, None)

    def unchanged(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` failed as it is now: the same spec and model file."""
        tried = self._tried.get(entry.key)
        return tried is not None and tried[1] == self._as_now(entry)

    def changed(self) -> list[ModelEntry]:
        """The failed versions to try again: their model file changed since (a new spec comes
        with a new entry, which ``unchanged`` tells apart)."""
        return [entry for entry, _ in list(self._tried.values()) if not self.unchanged(entry)]

    def waiting(self) -> list[ModelEntry]:
        """The failed versions unchanged since they were tried."""
        return [entry for entry, _ in list(self._tried.values()) if self.unchanged(entry)]

    def keep(self, keys: set[str]) -> None:
        """Forgets the versions not in ``keys`` (no longer wanted)."""
        for key in [k for k in self._tried if k not in keys]:
            del self._tried[key]

    def __iter__(self) -> Iterator[str]:
        """The failed versions' keys."""
        return iter(list(self._tried))

    def __len__(self) -> int:
        return len(self._tried)


def load_labels(entry: ModelEntry, settings: ModelSettings) -> tuple[str, ...]:
    if entry.labels == "imagenet":
        return imagenet_labels()
    path = resolve(entry, entry.labels, settings)
    if not path.exists():
        raise ModelUnavailable(f"labels file {path} not found")
    return file_labels(path)


def graph(model: object, entry: ModelEntry) -> Any:
    """The model as one TensorFlow graph taking a batch of any size."""
    import tensorflow as tf

    keras_model = cast(Callable[..., Any], model)
    channels = 3 if entry.input.mode == "RGB" else 1
    signature = [tf.TensorSpec([None, entry.input.height, entry.input.width, channels], tf.float32)]

    # One graph for every batch size; model.predict per request would rebuild its machinery each call.
    @tf.function(input_signature=signature, reduce_retracing=True)
    def infer(x: tf.Tensor) -> tf.Tensor:
        return keras_model(x, training=False)

    return infer


def _compiled(model: object, entry: ModelEntry) -> Classifier:
    import tensorflow as tf

    infer = graph(model, entry)
    return lambda batch: infer(tf.constant(batch)).numpy()


@contextmanager
def download_timeout(seconds: float) -> Iterator[None]:
    """Bounds each wait of the downloads Keras makes meanwhile (``keras.utils.get_file`` opens its
    URL with urllib's default timeout, which is none): a server that stops answering raises
    TimeoutError after ``seconds`` instead of hanging the worker, the explainer or
    ``model.prepare`` for good. The default is the process's while this lasts; every other
    socket of these processes (Redis) sets its own timeout."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _keras_application(entry: ModelEntry, settings: ModelSettings) -> tuple[object, bool]:
    import keras

    builder = getattr(keras.applications, entry.architecture or "", None)
    if builder is None:
        raise ModelUnavailable(f"unknown keras.applications architecture {entry.architecture!r}")
    shape = (entry.input.height, entry.input.width, 3)
    if entry.weights == "random":
        keras.utils.set_random_seed(0)
        return builder(weights=None, input_shape=shape), True
    path = resolve(entry, entry.file, settings) if entry.file else None
    if path is not None and path.exists():
        try:
            return builder(weights=str(path), input_shape=shape), False
        except Exception as exc:
            raise ModelLoadFailed(f"weights file {path} could not be loaded: {exc}") from exc
    if entry.weights == "imagenet" and settings.allow_weight_download:
        try:
            with download_timeout(settings.weight_download_timeout_s):
                return builder(weights="imagenet", input_shape=shape), False
        except Exception as exc:
            raise ModelUnavailable(
                f"ImageNet weights are not available: no file at {path} and the download failed ({exc})"
            ) from exc
    raise ModelUnavailable(
        f"weights file {path} not found" + (" and weight downloads are disabled" if entry.weights == "imagenet" else "")
    )


def keras_model(entry: ModelEntry, settings: ModelSettings) -> tuple[Any, bool]:
    """The Keras model of an entry (a keras.applications class with weights, or a model file) and
    whether its weights are random."""
    import keras

    if entry.architecture:
        return _keras_application(entry, settings)
    path = resolve(entry, entry.file or "", settings)
    if not path.exists():
        raise ModelUnavailable(f"model file {path} not found")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        # Keras' own error for such a file is "File not found", read as a missing model.
        raise ModelLoadFailed(
            f"model file {path} could not be loaded: it is no Keras archive (a .keras file is a zip; "
            "this one is damaged or of another format)"
        )
    from model import layers  # noqa: F401  (registers the portal's own layers with Keras' loader)

    try:
        return keras.models.load_model(path, compile=False), False
    except Exception as exc:
        raise ModelLoadFailed(f"model file {path} could not be loaded: {exc}") from exc


def _check_outputs(outputs: int, labels: tuple[str, ...]) -> None:
    if outputs != len(labels):
        raise ModelLoadFailed(f"the model has {outputs} outputs but {len(labels)} labels")


def _load_keras(entry: ModelEntry, settings: ModelSettings, labels: tuple[str, ...]) -> LoadedModel:
    model, random_weights = keras_model(entry, settings)
    _check_outputs(int(model.output_shape[-1]), labels)
    return LoadedModel(entry=entry, labels=labels, classify=_compiled(model, entry), random_weights=random_weights)


def openvino_model(entry: ModelEntry, settings: ModelSettings) -> tuple[Any, bool]:
    """An OpenVINO model of the entry: converted in memory from its Keras model, or read from an
    OpenVINO IR file (.xml beside its .bin), and whether its weights are random."""
    import openvino as ov

    if entry.file and entry.file.endswith(".xml"):
        path = resolve(entry, entry.file, settings)
        if missing := next((p for p in (path, path.with_suffix(".bin")) if not p.exists()), None):
            reason = f"model file {missing} not found"
            if entry.quantized_from:
                # Made from another version's weights: running model.prepare again helps only
                # once that version loads (its own reason says why it does not).
                reason += (
                    f": python -m model.prepare quantizes it from {entry.quantized_from}, once that version"
                    " loads (its log says why it could not)"
                )
            raise ModelUnavailable(reason)
        try:
            return ov.Core().read_model(str(path)), entry.weights == "random"
        except Exception as exc:
            raise ModelLoadFailed(f"OpenVINO model {path} could not be loaded: {exc}") from exc
    cached = _conversion_path(entry, settings)
    if cached is not None and cached.exists():
        try:
            return ov.Core().read_model(str(cached)), False
        except Exception as exc:  # a damaged copy: convert again and replace it
            log.warning("converted copy %s of %s could not be read (%s); converting again", cached, entry.key, exc)
            shutil.rmtree(cached.parent, ignore_errors=True)
    model, random_weights = keras_model(entry, settings)
    try:
        # share_weights=False: shared constants would point into TensorFlow's buffers, which are
        # freed with the Keras model; the model then answered garbage once the memory was reused.
        converted = ov.convert_model(graph(model, entry), share_weights=False)
    except Exception as exc:
        raise ModelLoadFailed(f"conversion to OpenVINO failed: {exc}") from exc
    if cached is not None and not random_weights:
        _keep_conversion(converted, cached)
    return converted, random_weights


CONVERSION_FORMAT = 1
"""Part of each converted copy's key: raise it when ``graph`` or the conversion changes."""


def _conversion_path(entry: ModelEntry, settings: ModelSettings) -> Path | None:
    """Where the OpenVINO conversion of the entry's Keras file is kept: a folder named by the
    SHA-256 of the file's bytes, the entry's input and architecture, and the versions of OpenVINO,
    TensorFlow and Keras; None for an entry without a file (random weights, downloads)."""
    if not entry.file or entry.weights == "random":
        return None
    source = resolve(entry, entry.file, settings)
    try:
        digest = hashlib.sha256()
        with source.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    versions = {p: _version(p) for p in ("openvino", "tensorflow", "keras")}
    key = json.dumps(
        [CONVERSION_FORMAT, digest.hexdigest(), entry.architecture, entry.input.model_dump(), versions], sort_keys=True
    )
    return settings.conversion_cache_dir / hashlib.sha256(key.encode()).hexdigest()[:16] / "model.xml"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _keep_conversion(model: Any, path: Path) -> None:
    """Saves the converted model in full precision (``save_model`` halves weights by default),
    written beside its place and renamed into it, so a worker never reads half a copy. A cache
    that cannot be written only costs the next start its conversion."""
    import openvino as ov

    try:
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent.parent, prefix=".converting-"))
        ov.save_model(model, str(staging / path.name), compress_to_fp16=False)
        try:
            staging.rename(path.parent)
        except OSError:  # another worker kept the same conversion first
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as exc:
        log.warning("could not keep the conversion at %s: %s", path.parent, exc)


class OpenVINOClassifier:
    """One synchronous request per process: a worker runs one batch at a time, on all its threads."""

    def __init__(self, model: Any, threads: int) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(
            model,
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
                # CPUs with bf16 units would otherwise run in bf16 silently; int8 layers stay int8.
                "INFERENCE_PRECISION_HINT": "f32",
                # Pinned threads cannot move off a core the API is using, and two one-thread workers
                # were both pinned to the same core (0.9 cores used of 2).
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._request = self.compiled.create_infer_request()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.array(self._request.infer({0: batch})[0], copy=True)

    def precisions(self, layer_type: str) -> set[str]:
        """The precisions the CPU runs this type of layer in ("u8", "f32", ...)."""
        ops = [op.get_rt_info() for op in self.compiled.get_runtime_model().get_ops()]
        return {rt["runtimePrecision"].astype(str) for rt in ops if rt["layerType"].astype(str) == layer_type}


def _load_openvino(entry: ModelEntry, settings: ModelSettings, labels: tuple[str, ...]) -> LoadedModel:
    model, random_weights = openvino_model(entry, settings)
    _check_outputs(int(model.output(0).get_partial_shape()[-1].get_length()), labels)
    classify = OpenVINOClassifier(model, settings.inference_threads)
    return LoadedModel(entry=entry, labels=labels, classify=classify, random_weights=random_weights)


class TFLiteClassifier:
    """A ``.tflite`` file run by LiteRT (``ai_edge_litert``), the maintained successor of
    ``tf.lite.Interpreter``; outputs are dequantized to float32 scores."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def outputs(self) -> int:
        return int(self.output["shape"][-1])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        scale, zero = self.output["quantization"]
        rows = []
        # The quantized graph has a fixed batch of one.
        for item in batch:
            self.interpreter.set_tensor(self.input["index"], item[None].astype(self.input["dtype"]))
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self.output["index"])[0].astype(np.float32)
            rows.append((raw - zero) * scale if scale else raw)
        return np.stack(rows)


def _load_tflite(entry: ModelEntry, settings: ModelSettings, labels: tuple[str, ...]) -> LoadedModel:
    path = resolve(entry, entry.file or "", settings)
    if not path.exists():
        raise ModelUnavailable(f"model file {path} not found")
    try:
        classify = TFLiteClassifier(path, settings.inference_threads)
    except Exception as exc:
        raise ModelLoadFailed(f"TFLite model {path} could not be loaded: {exc}") from exc
    _check_outputs(classify.outputs, labels)
    return LoadedModel(entry=entry, labels=labels, classify=classify, input_dtype=np.uint8)


LOADERS = {Runtime.keras: _load_keras, Runtime.tflite: _load_tflite, Runtime.openvino: _load_openvino}


def not_trained_reason(path: Path) -> str:
    """Why a version with training options whose model file ``path`` is missing cannot answer
    (``NOT_TRAINED_YET``), with how far its training is while one runs (``BEING_TRAINED``)."""
    progress = read_progress(path)
    being = "; " + BEING_TRAINED.format(epoch=progress[0], epochs=progress[1]) if progress else ""
    return f"{NOT_TRAINED_YET}: {path} not found{being}; workers load it once it is written"


def load_model(entry: ModelEntry, settings: ModelSettings) -> LoadedModel:
    """Loads one registry entry, or raises ModelUnavailable with the reason. A missing file of a
    version ``model.prepare`` trains is "not trained yet"; one a training run registered (its
    ``training`` names the run) had its file written before, so its loss is said as missing."""
    if (
        entry.training
        and "run" not in entry.training
        and entry.file
        and not (path := resolve(entry, entry.file, settings)).exists()
    ):
        raise ModelUnavailable(not_trained_reason(path))
    labels = load_labels(entry, settings)
    loaded = LOADERS[entry.runtime](entry, settings, labels)
    loaded.heldout_accuracy, loaded.heldout_set, loaded.heldout_size = heldout(entry, settings)
    return loaded


def heldout(entry: ModelEntry, settings: ModelSettings) -> tuple[float | None, str | None, int | None]:
    """From the training record (``metrics.json``) beside the model file, if any: the held-out
    top-1 accuracy (``test_accuracy``), which drawings it was measured on
    (``contracts.training.heldout_set_id`` of its categories and ``heldout_per_category``, or
    ``per_category`` in older records) and how many (``samples.test``); None for what the record
    does not say."""
    if entry.file is None:
        return None, None, None
    path = resolve(entry, entry.file, settings).parent / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(record, dict):
        return None, None, None
    value, categories = record.get("test_accuracy"), record.get("categories")
    # Records written before every run shared the reference held-out set were scored on a split of
    # their own drawings per category.
    per_category = record.get("heldout_per_category", record.get("per_category"))
    samples = record.get("samples")
    size = samples.get("test") if isinstance(samples, dict) else None
    heldout_set = (
        heldout_set_id(categories, per_category)
        if isinstance(categories, list) and all(isinstance(c, str) for c in categories) and type(per_category) is int
        else None
    )
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None,
        heldout_set,
        size if type(size) is int else None,
    )


def configure_tensorflow(settings: ModelSettings) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(settings.inference_threads)
    tf.config.threading.set_inter_op_parallelism_threads(settings.tf_inter_op_threads)


def top_k(probs: np.ndarray, labels: tuple[str, ...], k: int) -> list[tuple[str, float]]:
    order = np.argsort(probs)[::-1][:k]
    return [(labels[i], float(probs[i])) for i in order]
