"""Raw model speed: one process, no HTTP, no queue, random inputs already preprocessed.

Each FP32 model runs under every runtime measured here (TensorFlow, as Keras builds it;
OpenVINO and ONNX Runtime, both converted from that same TensorFlow graph); its INT8 version,
when the registry has one, runs under OpenVINO. The agreement check feeds every shared photo
through the service's own preprocessing and compares each runtime's top-1 with TensorFlow's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from contracts.registry import ModelEntry, Registry
from model import preprocessing
from model.config import ModelSettings
from model.quantize import PHOTO_SUFFIXES
from model.runtimes import Classifier, OpenVINOClassifier, graph, keras_model, load_model

log = logging.getLogger("bench.raw")

FP32_RUNTIMES = ("tensorflow", "onnxruntime", "openvino")


@dataclass
class RawResult:
    model: str
    runtime: str
    precision: str
    threads: int
    batch_size: int
    batches: int
    throughput: float
    """Images per second."""
    latency_p50_ms: float
    """Median time of one batch."""
    latency_p90_ms: float


@dataclass
class Agreement:
    model: str
    runtime: str
    precision: str
    photo: str
    top1: str
    reference_top1: str
    agrees: bool


def _onnxruntime(graph_fn: object, entry: ModelEntry, threads: int) -> Classifier:
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    channels = 3 if entry.input.mode == "RGB" else 1
    spec = [tf.TensorSpec([None, entry.input.height, entry.input.width, channels], tf.float32)]
    proto, _ = tf2onnx.convert.from_function(graph_fn, input_signature=spec, opset=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def classifiers(
    entry: ModelEntry, registry: Registry, settings: ModelSettings, runtimes: tuple[str, ...]
) -> dict[tuple[str, str], Classifier]:
    """(runtime, precision) -> classifier, all from the same weights."""
    import openvino as ov
    import tensorflow as tf

    model, _random = keras_model(entry, settings)
    graph_fn = graph(model, entry)
    out: dict[tuple[str, str], Classifier] = {}
    for runtime in runtimes:
        start = time.perf_counter()
        if runtime == "tensorflow":
            out[(runtime, "fp32")] = lambda batch: graph_fn(tf.constant(batch)).numpy()
        elif runtime == "openvino":
            out[(runtime, "fp32")] = OpenVINOClassifier(
                ov.convert_model(graph_fn, share_weights=False), settings.inference_threads
            )
        elif runtime == "onnxruntime":
            out[(runtime, "fp32")] = _onnxruntime(graph_fn, entry, settings.inference_threads)
        else:
            raise ValueError(f"unknown runtime {runtime!r}")
        log.info("%s %s ready in %.1f s", entry.key, runtime, time.perf_counter() - start)
    if "openvino" in runtimes:
        for quantized in registry.models:
            if quantized.quantized_from == entry.key:
                out[("openvino", "int8")] = load_model(quantized, settings).classify
    return out


def time_batches(classify: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, seconds: float) -> list[float]:
    """Seconds per call, after two warm-up calls, for about ``seconds`` (at least five calls)."""
    classify(batch)
    classify(batch)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        classify(batch)
        times.append(time.perf_counter() - t0)
    return times


def measure(
    entry: ModelEntry,
    registry: Registry,
    settings: ModelSettings,
    *,
    batch_sizes: tuple[int, ...],
    seconds: float,
    runtimes: tuple[str, ...] = FP32_RUNTIMES,
    photos: Path | None = None,
) -> tuple[list[RawResult], list[Agreement]]:
    rng = np.random.default_rng(0)
    results: list[RawResult] = []
    agreements: list[Agreement] = []
    shape = (entry.input.height, entry.input.width, 3 if entry.input.mode == "RGB" else 1)
    for (runtime, precision), classify in classifiers(entry, registry, settings, runtimes).items():
        for n in batch_sizes:
            # Values in the range the model's preprocessing produces (about -128..151 or -1..1).
            batch = rng.uniform(-1, 1, size=(n, *shape)).astype(np.float32)
            if entry.preprocessing == "resnet50":
                batch *= 128
            times = np.array(time_batches(classify, batch, seconds))
            results.append(
                RawResult(
                    model=entry.key,
                    runtime=runtime,
                    precision=precision,
                    threads=settings.inference_threads,
                    batch_size=n,
                    batches=len(times),
                    throughput=round(n * len(times) / float(times.sum()), 2),
                    latency_p50_ms=round(float(np.percentile(times, 50)) * 1000, 2),
                    latency_p90_ms=round(float(np.percentile(times, 90)) * 1000, 2),
                )
            )
            log.info("%s", asdict(results[-1]))
        if photos is not None:
            agreements.extend(_top1(entry, runtime, precision, classify, photos))
    reference = {a.photo: a.top1 for a in agreements if a.runtime == "tensorflow" and a.precision == "fp32"}
    for a in agreements:
        a.reference_top1 = reference.get(a.photo, "")
        a.agrees = a.top1 == a.reference_top1
    return results, agreements


def _top1(entry: ModelEntry, runtime: str, precision: str, classify: Classifier, photos: Path) -> list[Agreement]:
    from model.labels import imagenet_labels

    labels = imagenet_labels()
    out = []
    for path in sorted(p for p in photos.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES):
        probs = classify(preprocessing.preprocess(path.read_bytes(), entry)[None])[0]
        out.append(Agreement(entry.key, runtime, precision, path.name, labels[int(np.argmax(probs))], "", False))
    return out
