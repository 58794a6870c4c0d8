"""The sketch trainer with users' labelled drawings (the folders ``api.cli export-feedback`` writes)."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from contracts.registry import Registry
from model.config import ModelSettings
from model.preprocessing import preprocess
from model.training import train_sketch
from model.training.train_sketch import (
    TrainingCancelled,
    canvas_renderings,
    download,
    load_category,
    load_dataset,
    load_feedback,
    load_split,
    native_bfloat16,
    split,
    train,
)
from tests.model.drawings import canvas_png, feedback_folder

CATEGORIES = ["cat", "fish"]

DRAWINGS = np.arange(5 * 784, dtype=np.uint32).astype(np.uint8).reshape(5, 784)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class QuickDrawBucket(BaseHTTPRequestHandler):
    """Serves ``/<how>/<category>.npy`` like the QuickDraw bucket (an ``x-goog-hash`` MD5), where
    ``how`` is: ``good``; ``cut`` (the connection drops halfway); ``wrong`` (the MD5 of other
    bytes); ``nohash``; ``stall`` (headers, then nothing for 3 s); ``slow`` (``sending`` set, then
    the body a kilobyte every 0.5 s); ``missing`` (404, as for a category the bucket does not
    have)."""

    body = _npy(DRAWINGS)
    sending = threading.Event()

    def _head(self) -> str:
        how = self.path.split("/")[1]
        if how == "missing":
            self.send_error(404, "Not Found")
            return how
        md5 = hashlib.md5(self.body if how != "wrong" else b"other bytes").digest()
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        if how != "nohash":
            self.send_header("x-goog-hash", "crc32c=AAAAAA==")
            self.send_header("x-goog-hash", f"md5={base64.b64encode(md5).decode()}")
        self.end_headers()
        return how

    def do_HEAD(self) -> None:
        self._head()

    def do_GET(self) -> None:
        how = self._head()
        if how == "missing":
            return
        if how == "stall":
            time.sleep(3)
        if how == "slow":
            type(self).sending.set()
            try:
                for start in range(0, len(self.body), 1024):
                    self.wfile.write(self.body[start : start + 1024])
                    self.wfile.flush()
                    time.sleep(0.5)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up
            return
        self.wfile.write(self.body[: len(self.body) // 2] if how == "cut" else self.body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def bucket() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), QuickDrawBucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_missing_category_is_downloaded_and_checked(tmp_path: Path, bucket: str) -> None:
    drawings = load_category(tmp_path, "cat", 3, url=bucket + "/good/{category}.npy")
    np.testing.assert_array_equal(drawings, DRAWINGS[:3].reshape(-1, 28, 28))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.npy"]
    # Without a published checksum the complete file is still kept.
    assert load_category(tmp_path, "fish", 5, url=bucket + "/nohash/{category}.npy").shape == (5, 28, 28)


@pytest.mark.parametrize("how", ["cut", "wrong"])
def test_a_cut_off_or_corrupted_download_is_not_kept(tmp_path: Path, bucket: str, how: str) -> None:
    with pytest.raises((OSError, ValueError)):  # requests' errors are OSErrors; a bad MD5, ValueError
        load_category(tmp_path, "cat", 3, url=bucket + f"/{how}/{{category}}.npy")
    assert list(tmp_path.iterdir()) == []
    # The next run downloads it again instead of reading half a file.
    assert load_category(tmp_path, "cat", 3, url=bucket + "/good/{category}.npy").shape == (3, 28, 28)


def test_a_stalled_download_times_out(tmp_path: Path, bucket: str) -> None:
    started = time.monotonic()
    with pytest.raises(OSError):
        download(bucket + "/stall/cat.npy", tmp_path / "cat.npy", timeout=0.5)
    assert time.monotonic() - started < 2.5 and list(tmp_path.iterdir()) == []


def test_a_category_that_cannot_be_downloaded_says_which_file_from_where_and_why(tmp_path: Path, bucket: str) -> None:
    """A category neither in the data folder nor downloadable failed with urllib's bare
    ``<urlopen error [Errno -2] Name or service not known>``, naming no category, file or address."""
    with pytest.raises(OSError) as missing:  # train_sketch.CategoryUnavailable
        load_category(tmp_path, "giraffe", 3, url=bucket + "/missing/{category}.npy")
    assert str(missing.value) == (
        f"category 'giraffe' is not in the data folder ({tmp_path / 'giraffe.npy'} is missing) and could not be "
        f"downloaded from {bucket}/missing/giraffe.npy: HTTP Error 404: Not Found"
    )
    assert isinstance(missing.value, train_sketch.CategoryUnavailable)
    assert missing.value.describe("QUICKDRAW_DIR").startswith("category 'giraffe' is not in QUICKDRAW_DIR (")
    with pytest.raises(OSError) as unreachable:  # nothing listens there
        load_category(tmp_path, "giraffe", 3, url="http://127.0.0.1:9/{category}.npy")
    assert str(unreachable.value).endswith(
        "from http://127.0.0.1:9/giraffe.npy: [Errno 111] Connection refused"
    ), unreachable.value
    assert list(tmp_path.iterdir()) == []


def test_a_local_file_is_read_without_downloading(tmp_path: Path) -> None:
    (tmp_path / "cat.npy").write_bytes(_npy(DRAWINGS))
    # No server listens there: a download attempt would fail.
    drawings = load_category(tmp_path, "cat", 2, url="http://127.0.0.1:9/{category}.npy")
    np.testing.assert_array_equal(drawings, DRAWINGS[:2].reshape(-1, 28, 28))


def test_feedback_drawings_are_read_as_the_service_reads_uploads(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry
) -> None:
    folder, _cats = feedback_folder(tmp_path, model_settings)
    x, y, skipped = load_feedback(folder, CATEGORIES)
    assert x.shape == (2, 28, 28, 1) and y.tolist() == [0, 0]
    assert skipped == {"other_labels": 1, "unreadable": 1}
    entry = registry.find("sketch", 1, benchmark_mode=False)
    assert entry is not None
    served = [preprocess((folder / "cat" / f"{i}.png").read_bytes(), entry) for i in range(2)]
    np.testing.assert_array_equal(x, np.stack(served))


def test_training_adds_feedback_to_the_training_split_only(tmp_path: Path, model_settings: ModelSettings) -> None:
    folder, _cats = feedback_folder(tmp_path, model_settings)
    common: dict[str, Any] = {
        "data": model_settings.quickdraw_dir,
        "categories": CATEGORIES,
        "epochs": 1,
        "per_category": 100,
    }
    plain = train(**common, out=tmp_path / "plain")
    metrics = train(**common, out=tmp_path / "with-feedback", feedback=folder)

    assert "feedback" not in plain
    _, _, trained, validated, held_out = load_split(model_settings.quickdraw_dir, CATEGORIES, 100)
    samples = {"train": len(trained), "validation": len(validated), "test": len(held_out)}
    assert metrics["samples"] == {**samples, "train": len(trained) + 2}
    assert plain["samples"] == samples and plain["heldout_per_category"] == 3000
    used = cast(dict[str, Any], metrics["feedback"])
    assert used["drawings"] == 2 and used["per_category"] == {"cat": 2, "fish": 0}
    assert used["skipped"] == {"other_labels": 1, "unreadable": 1}
    assert 0.0 <= used["answered_as_labelled"] <= 1.0
    saved = json.loads((tmp_path / "with-feedback" / "metrics.json").read_text())
    assert saved["feedback"] == used
    assert (tmp_path / "with-feedback" / "model.keras").is_file()


def test_canvas_renderings_join_the_training_split_and_both_held_out_figures_are_reported(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry
) -> None:
    common: dict[str, Any] = {"data": model_settings.quickdraw_dir, "categories": CATEGORIES, "per_category": 100}
    metrics = train(**common, epochs=1, out=tmp_path / "canvas", canvas_share=0.5, augment=True)
    _, _, trained, validated, held_out = load_split(model_settings.quickdraw_dir, CATEGORIES, 100)
    assert metrics["samples"] == {
        "train": len(trained) + len(trained) // 2,
        "validation": len(validated),
        "test": len(held_out),
    }
    assert metrics["canvas_share"] == 0.5 and metrics["augment"] is True
    for key in ("canvas_test_accuracy", "canvas_test_top3_accuracy"):
        assert 0.0 <= cast(float, metrics[key]) <= 1.0
    # What the trainer renders is what the service makes of a canvas upload.
    entry = registry.find("sketch", 1, benchmark_mode=False)
    assert entry is not None
    bitmap = load_category(model_settings.quickdraw_dir, "cat", 1)[0]
    np.testing.assert_array_equal(canvas_renderings(bitmap[None])[0], preprocess(canvas_png(bitmap), entry))


def test_the_vgg_recipe_trains_with_smoothed_labels_and_saves_a_servable_model(
    tmp_path: Path, model_settings: ModelSettings
) -> None:
    import keras

    from model.gradcam import target_layer

    metrics = train(
        data=model_settings.quickdraw_dir,
        categories=CATEGORIES,
        per_category=100,
        epochs=1,
        batch_size=64,
        out=tmp_path / "vgg",
        arch="vgg",
        augment=True,
        flip_only=True,
        label_smoothing=0.1,
        weight_decay=1e-4,
        warmup=0.1,
        learning_rate=3e-3,
        mixed_precision=True,
        flip_average=True,
    )
    assert metrics["arch"] == "vgg" and metrics["label_smoothing"] == 0.1 and metrics["flip_only"] is True
    # bfloat16 where this CPU computes it in hardware, float32 elsewhere; the record says which.
    assert metrics["mixed_precision"] is native_bfloat16() and metrics["flip_average"] is True
    assert 0.0 <= cast(float, metrics["test_accuracy"]) <= 1.0
    model = keras.models.load_model(tmp_path / "vgg" / "model.keras", compile=False)
    assert model.output_shape == (None, len(CATEGORIES))
    # Grad-CAM explains the last convolutional block's 7x7 maps, as for the other sketch CNNs.
    assert tuple(target_layer(model).output.shape[1:3]) == (7, 7)
    names = {type(layer).__name__ for layer in model.layers}
    assert "RandomFlip" in names and "RandomRotation" not in names
    # Saved to compute in float32 whatever trained, reading each drawing with its mirror image.
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"} and "MirrorStack" in names


def test_bfloat16_is_native_only_with_its_cpu_features(tmp_path: Path) -> None:
    """Read from ``/proc/cpuinfo``'s flags: AMX-BF16 or AVX512-BF16 compute bfloat16 in hardware,
    AVX2 alone does not, and without the file nothing is assumed."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\n")
    assert native_bfloat16(info) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert native_bfloat16(info) is True
    info.write_text("flags\t\t: avx2 amx_bf16 amx_int8\n")
    assert native_bfloat16(info) is True
    assert native_bfloat16(tmp_path / "missing") is False


def test_every_run_on_the_same_categories_is_scored_on_the_same_held_out_drawings(
    model_settings: ModelSettings,
) -> None:
    """A run on 100 drawings per category is scored on the held-out tenth of the first 3,000 of
    each, the drawings every version trained on 3,000 was scored on, and never trains on them: a
    quick run's 27 % and the stable version's 94 % are then figures of one test, compared."""
    data = model_settings.quickdraw_dir
    bitmaps, y = load_dataset(data, CATEGORIES, 3000)
    full_train, full_validation, full_held_out = split(len(y), np.random.default_rng(1234))
    pool, labels, trained, validated, held_out = load_split(data, CATEGORIES, 3000)
    np.testing.assert_array_equal(pool, bitmaps)  # as every earlier version was trained
    for ours, theirs in ((trained, full_train), (validated, full_validation), (held_out, full_held_out)):
        np.testing.assert_array_equal(ours, theirs)
    _, _, few_trained, few_validated, few_held_out = load_split(data, CATEGORIES, 100)
    np.testing.assert_array_equal(few_held_out, full_held_out)
    assert len(few_held_out) == 600 and not set(few_held_out) & (set(few_trained) | set(few_validated))
    # Training and validation keep to the first 100 drawings of each category.
    position = np.concatenate([np.arange(3000), np.arange(3000)])
    assert position[few_trained].max() < 100 and position[few_validated].max() < 100
    assert 150 <= len(few_trained) <= 170 and np.bincount(labels[few_trained]).min() >= 70
    # So few per category that no validation drawing is among them: the reference's, never trained on.
    _, _, tiny_trained, tiny_validated, _ = load_split(data, CATEGORIES, 10)
    if not (position[tiny_validated] < 10).all():
        np.testing.assert_array_equal(tiny_validated, full_validation)
    assert not set(tiny_validated) & set(tiny_trained)


def test_a_cancel_stops_the_training_within_its_epoch_and_reports_no_part_of_it(
    tmp_path: Path, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``should_stop`` was asked only once an epoch (and its validation) was over, which takes 40 s
    to minutes: it is asked within the epoch too, and the training stops there, reporting the
    steps done but no epoch for the one it left part-way (Keras' ``stop_training`` would have
    validated and reported it as a whole epoch)."""
    # Every step here: the training is a few steps of milliseconds.
    monkeypatch.setattr(train_sketch, "STOP_CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(train_sketch, "PROGRESS_EVERY_S", 0.0)
    epochs: list[dict[str, float]] = []
    steps: list[dict[str, float]] = []
    out = tmp_path / "cancelled"
    with pytest.raises(TrainingCancelled) as cancelled:
        train(
            data=model_settings.quickdraw_dir,
            categories=CATEGORIES,
            per_category=100,
            epochs=3,
            batch_size=16,
            out=out,
            on_epoch=epochs.append,
            on_step=steps.append,
            # Cancelled once the second epoch has reported its third step.
            should_stop=lambda: any((s["epoch"], s["step"]) == (2, 3) for s in steps),
        )
    per_epoch = int(steps[0]["steps"])
    assert per_epoch >= 8, steps  # 160 or so drawings at 16 a step: the stop is well inside the epoch
    assert str(cancelled.value) == f"cancelled during epoch 2 of 3, after step 4 of {per_epoch}"
    assert [e["epoch"] for e in epochs] == [1] and "val_accuracy" in epochs[0]
    # Each step until the cancel was reported, and none after it.
    assert [(s["epoch"], s["step"]) for s in steps] == [(1, n) for n in range(1, per_epoch + 1)] + [
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    assert {s["steps"] for s in steps} == {per_epoch}
    assert all(0 <= a["seconds"] <= b["seconds"] for a, b in itertools.pairwise(steps))
    assert not out.exists()


def one_category_folder(tmp_path: Path, model_settings: ModelSettings) -> Path:
    """A data folder holding QuickDraw's cat drawings only."""
    folder = tmp_path / "quickdraw"
    folder.mkdir()
    (folder / "cat.npy").symlink_to(model_settings.quickdraw_dir / "cat.npy")
    return folder


def test_a_cancel_sent_while_the_data_is_prepared_stops_it_within_the_rendering(
    tmp_path: Path, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``should_stop`` was asked only within training steps: a cancel sent while the drawings were
    read and drawn as the canvas does (14 to 22 s for 20 categories) took effect only at the first
    step, whose error named a step never trained. It is asked between chunks of drawings."""
    monkeypatch.setattr(train_sketch, "STOP_CHECK_EVERY_S", 0.0)
    drawn: list[np.ndarray] = []
    draw = train_sketch.canvas_image

    def drawing(bitmap: np.ndarray) -> Any:
        drawn.append(bitmap)
        return draw(bitmap)

    monkeypatch.setattr(train_sketch, "canvas_image", drawing)
    steps: list[dict[str, float]] = []
    out = tmp_path / "cancelled"
    with pytest.raises(TrainingCancelled) as cancelled:
        train(
            data=model_settings.quickdraw_dir,
            categories=CATEGORIES,
            per_category=1000,
            canvas_share=1.0,  # 1,600 training drawings drawn again as the canvas does
            epochs=1,
            batch_size=64,
            out=out,
            on_step=steps.append,
            should_stop=lambda: bool(drawn),  # cancelled once the first is drawn
        )
    assert str(cancelled.value) == "cancelled while preparing its data"
    assert 0 < len(drawn) <= train_sketch.PREPARE_CHUNK, len(drawn)
    assert steps == [] and not out.exists()


def test_a_cancel_sent_while_a_category_downloads_stops_the_download(
    tmp_path: Path, model_settings: ModelSettings, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A category missing from the data folder is downloaded first (the full QuickDraw file: about
    100 MB): the cancel ends the download, which leaves nothing behind."""
    monkeypatch.setattr(train_sketch, "STOP_CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(train_sketch, "QUICKDRAW_URL", bucket + "/slow/{category}.npy")
    QuickDrawBucket.sending.clear()
    data = one_category_folder(tmp_path, model_settings)
    with pytest.raises(TrainingCancelled) as cancelled:
        train(
            data=data,
            categories=["cat", "giraffe"],
            per_category=100,
            epochs=1,
            out=tmp_path / "cancelled",
            should_stop=QuickDrawBucket.sending.is_set,
        )
    assert str(cancelled.value) == "cancelled while preparing its data"
    assert sorted(p.name for p in data.iterdir()) == ["cat.npy"]  # no half-downloaded file either
    assert not (tmp_path / "cancelled").exists()


def test_a_cancel_sent_while_an_epoch_is_validated_stops_the_validation(
    tmp_path: Path, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch's validation (seconds for the VGG recipe) asked ``should_stop`` only once it was
    over, and reported the epoch first."""
    monkeypatch.setattr(train_sketch, "STOP_CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(train_sketch, "PROGRESS_EVERY_S", 0.0)
    epochs: list[dict[str, float]] = []
    steps: list[dict[str, float]] = []
    with pytest.raises(TrainingCancelled) as cancelled:
        train(
            data=model_settings.quickdraw_dir,
            categories=CATEGORIES,
            per_category=100,
            epochs=2,
            batch_size=16,
            out=tmp_path / "cancelled",
            on_epoch=epochs.append,
            on_step=steps.append,
            # Cancelled once the first epoch's last step is trained: its validation comes next.
            should_stop=lambda: bool(steps) and steps[-1]["step"] == steps[-1]["steps"],
        )
    assert str(cancelled.value) == "cancelled during epoch 1 of 2, while validating it"
    assert epochs == [] and not (tmp_path / "cancelled").exists()


def test_a_cancel_sent_after_the_last_epoch_stops_the_evaluation(
    tmp_path: Path, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel sent once the last epoch was over took effect only after the whole evaluation on
    the held-out sets (30 to 40 s for the VGG recipe): ``should_stop`` is asked between its
    batches, so the held-out drawings are never drawn as the canvas does here."""
    monkeypatch.setattr(train_sketch, "STOP_CHECK_EVERY_S", 0.0)
    drawn: list[np.ndarray] = []
    draw = train_sketch.canvas_image

    def drawing(bitmap: np.ndarray) -> Any:
        drawn.append(bitmap)
        return draw(bitmap)

    monkeypatch.setattr(train_sketch, "canvas_image", drawing)
    epochs: list[dict[str, float]] = []
    asked_after_the_last: list[bool] = []

    def should_stop() -> bool:
        # The first ask after the last epoch is its own end's: the cancel arrives just after it.
        if epochs:
            asked_after_the_last.append(True)
        return len(asked_after_the_last) > 1

    out = tmp_path / "cancelled"
    with pytest.raises(TrainingCancelled) as cancelled:
        train(
            data=model_settings.quickdraw_dir,
            categories=CATEGORIES,
            per_category=40,
            epochs=1,
            batch_size=16,
            out=out,
            on_epoch=epochs.append,
            should_stop=should_stop,
        )
    assert str(cancelled.value) == "cancelled while evaluating, after its last epoch"
    assert [e["epoch"] for e in epochs] == [1]
    assert drawn == [] and not out.exists()
