"""Loading a registry entry into something that classifies a batch, for each runtime."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from contracts.registry import ModelEntry, Runtime
from model.config import ModelSettings
from model.labels import file_labels, imagenet_labels

log = logging.getLogger("model.runtimes")


class ModelUnavailable(Exception):
    """The model cannot serve; the message says why, for users and operators."""


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


def load_labels(entry: ModelEntry, settings: ModelSettings) -> tuple[str, ...]:
    if entry.labels == "imagenet":
        return imagenet_labels()
    path = resolve(entry, entry.labels, settings)
    if not path.exists():
        raise ModelUnavailable(f"labels file {path} not found")
    return file_labels(path)


def _compiled(model: object, entry: ModelEntry) -> Classifier:
    import tensorflow as tf

    channels = 3 if entry.input.mode == "RGB" else 1
    signature = [tf.TensorSpec([None, entry.input.height, entry.input.width, channels], tf.float32)]

    # One graph for every batch size; model.predict per request would rebuild its machinery each call.
    @tf.function(input_signature=signature, reduce_retracing=True)
    def infer(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)  # type: ignore[operator]

    return lambda batch: infer(tf.constant(batch)).numpy()


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
            raise ModelUnavailable(f"weights file {path} could not be loaded: {exc}") from exc
    if entry.weights == "imagenet" and settings.allow_weight_download:
        try:
            return builder(weights="imagenet", input_shape=shape), False
        except Exception as exc:
            raise ModelUnavailable(
                f"ImageNet weights are not available: no file at {path} and the download failed ({exc})"
            ) from exc
    raise ModelUnavailable(
        f"weights file {path} not found" + (" and weight downloads are disabled" if entry.weights == "imagenet" else "")
    )


def _load_keras(entry: ModelEntry, settings: ModelSettings, labels: tuple[str, ...]) -> LoadedModel:
    import keras

    random_weights = False
    if entry.architecture:
        model, random_weights = _keras_application(entry, settings)
    else:
        path = resolve(entry, entry.file or "", settings)
        if not path.exists():
            raise ModelUnavailable(f"model file {path} not found")
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise ModelUnavailable(f"model file {path} could not be loaded: {exc}") from exc
    outputs = int(model.output_shape[-1])  # type: ignore[attr-defined]
    if outputs != len(labels):
        raise ModelUnavailable(f"the model has {outputs} outputs but {len(labels)} labels")
    return LoadedModel(entry=entry, labels=labels, classify=_compiled(model, entry), random_weights=random_weights)


def _load_tflite(entry: ModelEntry, settings: ModelSettings, labels: tuple[str, ...]) -> LoadedModel:
    import tensorflow as tf

    path = resolve(entry, entry.file or "", settings)
    if not path.exists():
        raise ModelUnavailable(f"model file {path} not found")
    try:
        interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=settings.tf_intra_op_threads)
        interpreter.allocate_tensors()
    except Exception as exc:
        raise ModelUnavailable(f"TFLite model {path} could not be loaded: {exc}") from exc
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    if int(out["shape"][-1]) != len(labels):
        raise ModelUnavailable(f"the model has {out['shape'][-1]} outputs but {len(labels)} labels")
    scale, zero = out["quantization"]

    def classify(batch: np.ndarray) -> np.ndarray:
        rows = []
        # The quantized graph has a fixed batch of one.
        for item in batch:
            interpreter.set_tensor(inp["index"], item[None].astype(inp["dtype"]))
            interpreter.invoke()
            raw = interpreter.get_tensor(out["index"])[0].astype(np.float32)
            rows.append((raw - zero) * scale if scale else raw)
        return np.stack(rows)

    return LoadedModel(entry=entry, labels=labels, classify=classify, input_dtype=np.uint8)


LOADERS = {Runtime.keras: _load_keras, Runtime.tflite: _load_tflite}


def load_model(entry: ModelEntry, settings: ModelSettings) -> LoadedModel:
    """Loads one registry entry, or raises ModelUnavailable with the reason."""
    labels = load_labels(entry, settings)
    return LOADERS[entry.runtime](entry, settings, labels)


def configure_tensorflow(settings: ModelSettings) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(settings.tf_intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(settings.tf_inter_op_threads)


def top_k(probs: np.ndarray, labels: tuple[str, ...], k: int) -> list[tuple[str, float]]:
    order = np.argsort(probs)[::-1][:k]
    return [(labels[i], float(probs[i])) for i in order]
