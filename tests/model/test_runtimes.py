"""Real models through the model service's own loading and preprocessing code."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from contracts.registry import ModelEntry, Registry, Runtime
from model.config import ModelSettings
from model.preprocessing import preprocess
from model.quantize import PHOTO_SUFFIXES
from model.runtimes import (
    LoadedModel,
    ModelLoadFailed,
    ModelUnavailable,
    OpenVINOClassifier,
    TFLiteClassifier,
    graph,
    heldout,
    keras_model,
    load_model,
    model_stamp,
    top_k,
)
from tests.conftest import Users
from tests.images import encode
from tests.model.drawings import canvas_png
from tests.support import PHOTOS

CATS = {"tabby", "tiger_cat", "Persian_cat", "Siamese_cat", "Egyptian_cat"}
BIRD_CLASSES = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


def chelsea() -> bytes:
    return encode(Image.fromarray(skdata.chelsea()), "PNG")


def classify(model: LoadedModel, data: bytes, k: int = 5) -> list[tuple[str, float]]:
    probs = model.predict(preprocess(data, model.entry)[None])[0]
    return top_k(probs, model.labels, k)


def test_mobilenet_v2_real_answers(loaded: dict[str, LoadedModel]) -> None:
    m = loaded["mobilenet_v2@1"]
    assert classify(m, (PHOTOS / "parrot.jpg").read_bytes())[0][0] == "macaw"
    assert classify(m, (PHOTOS / "cat.bmp").read_bytes())[0][0] in CATS
    assert classify(m, chelsea())[0][0] in CATS
    owl = classify(m, (PHOTOS / "owl.jpg").read_bytes())[0][0]
    assert m.labels.index(owl) in BIRD_CLASSES  # ImageNet has no burrowing owl; a bird it is


def photo_inputs(entry: ModelEntry) -> dict[str, np.ndarray]:
    photos = sorted(p for p in PHOTOS.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    assert len(photos) >= 10
    return {p.name: preprocess(p.read_bytes(), entry)[None] for p in photos}


def test_openvino_gives_tensorflows_answers_on_every_photo(
    loaded: dict[str, LoadedModel], model_settings: ModelSettings
) -> None:
    import tensorflow as tf

    served = loaded["mobilenet_v2@1"]
    assert served.entry.runtime == Runtime.openvino
    keras_net, _random = keras_model(served.entry, model_settings)
    reference = graph(keras_net, served.entry)
    for name, x in photo_inputs(served.entry).items():
        expected = reference(tf.constant(x)).numpy()[0]
        got = served.predict(x)[0]
        assert np.argmax(got) == np.argmax(expected), name
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=name)


def test_openvino_model_outlives_the_keras_model_it_came_from(
    registry: Registry, model_settings: ModelSettings
) -> None:
    import gc

    import keras

    served = load_model(registry.get("mobilenet_v2@1"), model_settings)
    # Free the Keras model, then let TensorFlow reuse its memory for another one: weights shared
    # with the first would now be the second's random initial values.
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(3)
    other = keras.applications.MobileNetV2(weights=None)
    assert classify(served, (PHOTOS / "parrot.jpg").read_bytes())[0][0] == "macaw"
    del other


def test_int8_version_keeps_the_fp32_answers_and_runs_in_int8(loaded: dict[str, LoadedModel]) -> None:
    fp32, int8 = loaded["mobilenet_v2@1"], loaded["mobilenet_v2@2"]
    assert int8.entry.precision == "int8" and not int8.random_weights
    inputs = photo_inputs(fp32.entry)
    same = [n for n, x in inputs.items() if np.argmax(int8.predict(x)[0]) == np.argmax(fp32.predict(x)[0])]
    # Measured: 11 of the 12 shared photos (imprinting_cat_test_0.bmp: tabby -> tiger_cat, close
    # classes); the stress report lists the photos that differ.
    assert len(same) >= len(inputs) - 1, sorted(set(inputs) - set(same))
    assert int8.labels == fp32.labels
    # How much faster int8 runs depends on the CPU, so `make bench` measures it. What the version
    # guarantees is that its convolutions run on 8-bit integers.
    assert isinstance(int8.classify, OpenVINOClassifier) and isinstance(fp32.classify, OpenVINOClassifier)
    int8_convolutions = int8.classify.precisions("Convolution")
    assert int8_convolutions and int8_convolutions <= {"u8", "i8"}, int8_convolutions
    assert fp32.classify.precisions("Convolution") == {"f32"}


def test_birds_tflite(loaded: dict[str, LoadedModel]) -> None:
    m = loaded["birds@1"]
    label, score = classify(m, (PHOTOS / "owl.jpg").read_bytes())[0]
    assert label == "Athene cunicularia (Burrowing Owl)" and score > 0.9


def test_tflite_runs_on_litert_without_deprecation_warnings(registry: Registry, model_settings: ModelSettings) -> None:
    entry = registry.find("birds", 1, benchmark_mode=False)
    assert entry is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_model(entry, model_settings)
    assert isinstance(m.classify, TFLiteClassifier)
    assert type(m.classify.interpreter).__module__.startswith("ai_edge_litert.")
    assert not [w for w in caught if "deprecated" in str(w.message).lower()], [str(w.message) for w in caught]


def test_resnet50_without_weights_is_unavailable(registry: Registry, model_settings: ModelSettings) -> None:
    entry = registry.find("resnet50", None, benchmark_mode=False)
    assert entry is not None
    with pytest.raises(ModelUnavailable, match="not found"):
        load_model(entry, model_settings)


def test_resnet50_loads_saved_weights_through_the_same_path(
    registry: Registry, model_settings: ModelSettings, tmp_path: Path
) -> None:
    import keras

    keras.utils.set_random_seed(7)
    reference = keras.applications.ResNet50(weights=None)
    reference.save_weights(tmp_path / "resnet50_imagenet.weights.h5")
    entry = registry.find("resnet50", None, benchmark_mode=False)
    assert entry is not None
    loaded = load_model(entry, model_settings.model_copy(update={"models_dir": tmp_path}))
    assert not loaded.random_weights and len(loaded.labels) == 1000
    x = preprocess((PHOTOS / "parrot.jpg").read_bytes(), entry)[None]
    np.testing.assert_allclose(loaded.predict(x), reference(x, training=False).numpy(), rtol=1e-4, atol=1e-5)


def test_broken_weights_are_reported(registry: Registry, model_settings: ModelSettings, tmp_path: Path) -> None:
    (tmp_path / "mobilenet_v2_imagenet.weights.h5").write_bytes(b"not hdf5 at all")
    entry = registry.find("mobilenet_v2", None, benchmark_mode=False)
    assert entry is not None
    with pytest.raises(ModelLoadFailed, match="could not be loaded"):
        load_model(entry, model_settings.model_copy(update={"models_dir": tmp_path}))


def test_an_openvino_model_without_its_weights_file_is_missing_not_broken(
    registry: Registry, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """An IR's .xml without the .bin beside it is a model not (fully) installed, which users read
    as such, not as one that failed to load."""
    entry = registry.get("mobilenet_v2@2")
    settings = model_settings.model_copy(update={"trained_dir": tmp_path})
    xml = entry.resolve(entry.file or "", models_dir=settings.models_dir, trained_dir=tmp_path)
    xml.parent.mkdir(parents=True)
    xml.write_text("<net/>")
    with pytest.raises(ModelUnavailable, match=r"model\.bin not found") as raised:
        load_model(entry, settings)
    assert not isinstance(raised.value, ModelLoadFailed)


def test_a_missing_int8_version_names_the_version_it_is_made_from(
    registry: Registry, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """An INT8 version's file is made from its FP32 version: running model.prepare again cannot
    help while that one does not load (its ImageNet weights missing, say), and the reason says so."""
    entry = registry.get("resnet50@2")
    with pytest.raises(ModelUnavailable) as raised:
        load_model(entry, model_settings.model_copy(update={"trained_dir": tmp_path}))
    reason = str(raised.value)
    assert "model.xml not found" in reason and "from resnet50@1, once that version loads" in reason


def test_a_missing_file_is_not_trained_yet_only_for_a_version_model_prepare_trains(
    registry: Registry, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """A version from registry.yaml's training options waits for ``model.prepare``; one a training
    run registered had its file written before, so its absence is a file missing, not a promise."""
    settings = model_settings.model_copy(update={"trained_dir": tmp_path})
    prepared = registry.get("sketch@1")
    with pytest.raises(ModelUnavailable, match=r"^not trained yet: "):
        load_model(prepared, settings)
    from_a_run = prepared.model_copy(update={"training": {**(prepared.training or {}), "run": "9f0c"}})
    with pytest.raises(ModelUnavailable) as raised:
        load_model(from_a_run, settings)
    assert not str(raised.value).startswith("not trained yet") and "not found" in str(raised.value)


def test_random_resnet_only_in_benchmark_mode(registry: Registry, model_settings: ModelSettings) -> None:
    assert registry.find("resnet50_random", None, benchmark_mode=False) is None
    assert all(not m.benchmark_only for m in registry.public())
    entry = registry.find("resnet50_random", None, benchmark_mode=True)
    assert entry is not None and entry.key == "resnet50_random@1" and entry.weights == "random"
    loaded = load_model(entry, model_settings)
    assert loaded.random_weights


def quickdraw_split(model_settings: ModelSettings, categories: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from model.training.train_sketch import SEED, load_category, split

    bitmaps = [load_category(model_settings.quickdraw_dir, c, 3000) for c in categories]
    x = np.concatenate(bitmaps)
    y = np.concatenate([np.full(len(b), i) for i, b in enumerate(bitmaps)])
    _train, _val, test = split(len(x), np.random.default_rng(SEED))
    return x[test], y[test]


@pytest.mark.parametrize("key", ["sketch@1", "sketch@2"])
def test_sketch_accuracy_from_metrics_and_rechecked(
    key: str, loaded: dict[str, LoadedModel], model_settings: ModelSettings
) -> None:
    model = loaded[key]
    metrics_path = model_settings.trained_dir / "sketch" / f"v{model.entry.version}" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["test_accuracy"] >= 0.95, metrics["test_accuracy"]
    assert len(metrics["history"]) == metrics["epochs"] and metrics["confusion_matrix"]["labels"] == list(model.labels)
    x, y = quickdraw_split(model_settings, list(model.labels))
    from model.training.train_sketch import normalise

    predicted = model.predict(normalise(x)).argmax(axis=1)
    assert abs(float((predicted == y).mean()) - metrics["test_accuracy"]) < 0.002


def test_the_20_category_version_reads_canvas_drawings_as_well_as_dataset_ones(
    loaded: dict[str, LoadedModel], model_settings: ModelSettings
) -> None:
    """sketch@3, the stable sketch version: its record's held-out figures, bitmap and canvas,
    rechecked through the worker's code path on the same held-out drawings."""
    from model.training.train_sketch import canvas_renderings, normalise, top_k_accuracy

    model = loaded["sketch@3"]
    metrics = json.loads((model_settings.trained_dir / "sketch" / "v3" / "metrics.json").read_text())
    assert len(model.labels) == 20 and metrics["confusion_matrix"]["labels"] == list(model.labels)
    x, y = quickdraw_split(model_settings, list(model.labels))
    bitmap, canvas = model.predict(normalise(x)), model.predict(canvas_renderings(x))
    for probs, top1, top3 in (
        (bitmap, "test_accuracy", "test_top3_accuracy"),
        (canvas, "canvas_test_accuracy", "canvas_test_top3_accuracy"),
    ):
        assert abs(top_k_accuracy(probs, y, 1) - metrics[top1]) < 0.002, (top1, metrics[top1])
        assert abs(top_k_accuracy(probs, y, 3) - metrics[top3]) < 0.002, (top3, metrics[top3])
    # What the recipe reaches (README, "The sketch model"): 94.1 % / 97.8 % trained in bfloat16
    # on an AMX host, 93.9 % / 97.9 % in float32 on an AVX2 one; the targets are 94 % and
    # 98.5 %. A point less means the recipe or its data broke.
    assert metrics["test_accuracy"] >= 0.93 and metrics["test_top3_accuracy"] >= 0.975, metrics
    # Trained on canvas renderings too, it reads canvas drawings within a point of dataset ones.
    assert metrics["canvas_test_accuracy"] >= metrics["test_accuracy"] - 0.01, metrics


def test_canvas_drawings_classified_like_dataset_bitmaps(
    loaded: dict[str, LoadedModel], model_settings: ModelSettings
) -> None:
    model = loaded["sketch@1"]
    x, y = quickdraw_split(model_settings, list(model.labels))
    picks = np.concatenate([np.where(y == c)[0][:20] for c in range(len(model.labels))])
    raw_right = canvas_right = 0
    for i in picks:
        as_uploaded = encode(Image.fromarray(x[i]), "PNG")
        raw_right += classify(model, as_uploaded, 1)[0][0] == model.labels[y[i]]
        canvas_right += classify(model, canvas_png(x[i]), 1)[0][0] == model.labels[y[i]]
    assert canvas_right >= raw_right - 2 and canvas_right / len(picks) >= 0.9, (raw_right, canvas_right)
    first_cat = int(np.where(y == list(model.labels).index("cat"))[0][0])
    assert classify(model, canvas_png(x[first_cat]), 1)[0][0] == "cat"


@pytest.mark.usefixtures("worker")
async def test_scores_identical_in_service_and_through_api(
    loaded: dict[str, LoadedModel], client: httpx.AsyncClient, users: Users
) -> None:
    _, headers = await users.create()
    for name in ("parrot.jpg", "cat.bmp", "owl.jpg"):
        data = (PHOTOS / name).read_bytes()
        direct = classify(loaded["mobilenet_v2@1"], data)
        r = await client.post(
            "/model/predict", params={"models": "mobilenet_v2"}, files={"file": (name, data)}, headers=headers
        )
        assert r.status_code == 200, r.text
        via_api = [(t["label"], t["score"]) for t in r.json()["results"]["mobilenet_v2@1"]["top_k"]]
        assert [label for label, _ in via_api] == [label for label, _ in direct]
        np.testing.assert_allclose([s for _, s in via_api], [s for _, s in direct], atol=1e-5)


_LOAD_FROM_CACHE = """
import json, sys
from pathlib import Path
import numpy as np
from contracts.registry import ModelEntry
from model.config import ModelSettings
from model.runtimes import load_model
entry = ModelEntry.model_validate_json(sys.argv[1])
settings = ModelSettings(_env_file=None, allow_weight_download=False, models_dir=Path(sys.argv[2]),
                         conversion_cache_dir=Path(sys.argv[3]))
loaded = load_model(entry, settings)
batch = np.load(sys.argv[4])
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "probs": loaded.predict(batch).tolist()}))
"""


def test_a_converted_model_is_kept_and_read_back_without_tensorflow(
    model_settings: ModelSettings, registry: Registry, tmp_path: Path
) -> None:
    """The first load converts MobileNetV2's Keras file and keeps the OpenVINO copy in full
    precision; a new process then reads that copy without importing TensorFlow and answers as the
    conversion did. A damaged copy is converted again and replaced."""
    import subprocess
    import sys

    entry = registry.get("mobilenet_v2@1")
    cache = tmp_path / "openvino"
    settings = model_settings.model_copy(update={"conversion_cache_dir": cache})
    batch = np.concatenate(list(photo_inputs(entry).values())[:4])
    np.save(tmp_path / "batch.npy", batch)
    expected = load_model(entry, settings).predict(batch)
    (kept,) = cache.glob("*/model.xml")
    assert kept.with_suffix(".bin").stat().st_size > 13_000_000  # float32 weights, not halved

    def load_in_a_new_process() -> tuple[bool, np.ndarray]:
        args = [entry.model_dump_json(), str(settings.models_dir), str(cache), str(tmp_path / "batch.npy")]
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_FROM_CACHE, *args], capture_output=True, text=True, check=True, timeout=300
        )
        out = json.loads(done.stdout.strip().splitlines()[-1])
        return out["tensorflow"], np.array(out["probs"])

    imported_tensorflow, probs = load_in_a_new_process()
    assert not imported_tensorflow
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    kept.with_suffix(".bin").write_bytes(b"damaged")
    imported_tensorflow, probs = load_in_a_new_process()
    assert imported_tensorflow  # converted again
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    (kept,) = cache.glob("*/model.xml")
    assert kept.with_suffix(".bin").stat().st_size > 13_000_000


def test_a_models_stamp_changes_with_each_of_its_files(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry
) -> None:
    """What workers and explainers compare to load a version again: an OpenVINO model is its .xml
    and its .bin, and writing either changes the stamp; a missing one leaves none."""
    entry = registry.get("mobilenet_v2@2")
    settings = model_settings.model_copy(update={"trained_dir": tmp_path})
    xml = tmp_path / "mobilenet_v2" / "v2" / "model.xml"
    xml.parent.mkdir(parents=True)
    xml.write_text("<net/>")
    assert model_stamp(entry, settings) is None
    xml.with_suffix(".bin").write_bytes(b"1")
    first = model_stamp(entry, settings)
    assert first is not None and len(first) == 8
    os.utime(xml.with_suffix(".bin"), ns=(first[5] + 10**9, first[5] + 10**9))
    assert model_stamp(entry, settings) not in (None, first)
    # A copy that keeps the modification time (shutil.copy2, as copytree does) changes it too.
    again = model_stamp(entry, settings)
    shutil.copy2(xml.with_suffix(".bin"), tmp_path / "copy.bin")
    os.replace(tmp_path / "copy.bin", xml.with_suffix(".bin"))
    assert model_stamp(entry, settings) not in (None, again)
    keras_entry = registry.get("sketch@1")
    assert model_stamp(keras_entry, settings) is None
    (tmp_path / "sketch" / "v1").mkdir(parents=True)
    (tmp_path / "sketch" / "v1" / "model.keras").write_bytes(b"x")
    stamp = model_stamp(keras_entry, settings)
    assert stamp is not None and len(stamp) == 4


def test_a_heartbeat_names_the_held_out_drawings_of_each_record(
    model_settings: ModelSettings, registry: Registry, tmp_path: Path
) -> None:
    """The held-out accuracy goes out with which drawings it was measured on and how many, so the
    API compares only records of the same held-out set; the two 6-class versions share theirs."""
    from contracts.training import heldout_set_id

    records = {}
    for version in (1, 2, 3):
        entry = registry.find("sketch", version, benchmark_mode=False)
        assert entry is not None
        records[version] = heldout(entry, model_settings)
    six = ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    assert records[1][1:] == records[2][1:] == (heldout_set_id(six, 3000), 1800)
    assert records[3][1] != records[1][1] and records[3][2] == 6000
    # A record that does not say is None, never a guess.
    (tmp_path / "sketch" / "v1").mkdir(parents=True)
    (tmp_path / "sketch" / "v1" / "metrics.json").write_text('{"test_accuracy": 0.9, "per_category": "3000"}')
    entry = registry.find("sketch", 1, benchmark_mode=False)
    assert entry is not None
    assert heldout(entry, model_settings.model_copy(update={"trained_dir": tmp_path})) == (0.9, None, None)
    # A quick run on 50 drawings per category was scored on the reference held-out set of 3,000.
    record = {"test_accuracy": 0.27, "categories": six, "per_category": 50, "heldout_per_category": 3000}
    (tmp_path / "sketch" / "v1" / "metrics.json").write_text(json.dumps({**record, "samples": {"test": 1800}}))
    assert heldout(entry, model_settings.model_copy(update={"trained_dir": tmp_path})) == (
        0.27,
        heldout_set_id(six, 3000),
        1800,
    )


def test_a_weights_download_that_stalls_fails_at_its_timeout_and_says_so(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that sends the start of the weights file and then nothing: Keras' download has
    no timeout of its own, so the worker or explainer loading the version hung for good. It now
    fails after WEIGHT_DOWNLOAD_TIMEOUT_S, the version unavailable with the reason."""
    import socket
    import threading
    import time

    from keras.src.applications import mobilenet_v2
    from keras.src.backend import config as keras_config

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def stall() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 14000000\r\n\r\n" + b"\x89HDF" * 100)
        held.append(conn)  # open, silent

    threading.Thread(target=stall, daemon=True).start()
    monkeypatch.setattr(mobilenet_v2, "BASE_WEIGHT_PATH", f"http://127.0.0.1:{listener.getsockname()[1]}/")
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))
    settings = model_settings.model_copy(
        update={"models_dir": tmp_path, "allow_weight_download": True, "weight_download_timeout_s": 2.0}
    )
    result: list[BaseException] = []

    def load() -> None:
        try:
            keras_model(registry.get("mobilenet_v2@1"), settings)
        except BaseException as exc:
            result.append(exc)

    started = time.monotonic()
    loading = threading.Thread(target=load, daemon=True)
    loading.start()
    loading.join(timeout=60)
    try:
        assert not loading.is_alive(), "the download still hangs"
        assert held, "the download never reached the server"
        assert len(result) == 1 and isinstance(result[0], ModelUnavailable), result
        assert "download failed" in str(result[0]) and time.monotonic() - started < 30
        assert socket.getdefaulttimeout() is None, "the process's default timeout was left changed"
    finally:
        for conn in held:
            conn.close()
        listener.close()
