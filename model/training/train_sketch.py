"""Train the QuickDraw sketch CNN.

    python -m model.training.train_sketch --data DIR --categories apple,cat --epochs 4 \
        --batch-size 128 --out DIR [--arch compact|deep|vgg] [--per-category 3000] [--feedback DIR] \
        [--canvas-share 0.3] [--augment [--flip-only]] [--label-smoothing 0.1] [--weight-decay 1e-4] \
        [--warmup 0.1] [--learning-rate 2e-3] [--mixed-precision] [--flip-average]

Reads ``DIR/<category>.npy`` (QuickDraw ``numpy_bitmap`` files: 28x28 white-on-black uint8) and
downloads a missing category from the public QuickDraw bucket (pooch: checked against the MD5 the
bucket gives, a stalled transfer times out, and only a complete file is kept; one that cannot be
downloaded fails saying which category, file and address). Every drawing goes through the
same normalisation the model service applies to uploads, so served and trained inputs agree.
``--feedback`` adds the drawings users labelled, as ``python -m api.cli export-feedback`` writes
them (``<out>/sketch``: a folder per category), to the training split only: the held-out
accuracy stays measured on QuickDraw drawings, comparable between versions.
Writes ``model.keras``, ``labels.txt`` and ``metrics.json`` (per-epoch loss and accuracy,
held-out accuracy, confusion matrix, the feedback used and how the model answers it) to ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import inspect
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pooch
from PIL import Image

from contracts.imaging import ImageRejected, load_image
from contracts.training import ARCHITECTURES
from model.preprocessing import sketch_array

log = logging.getLogger("model.training")

QUICKDRAW_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/{category}.npy"
SEED = 1234


DOWNLOAD_TIMEOUT_S = 60.0

PREPARE_CHUNK = 256
"""Drawings normalised or drawn as the canvas does between two stop checks (``train``'s
``should_stop``): about 20 ms and 90 ms of one core for 256."""


class TrainingCancelled(Exception):
    """``should_stop`` said stop: nothing was written."""


class CategoryUnavailable(OSError):
    """A category's ``<category>.npy`` is not in the data folder and could not be downloaded (no
    such category in the bucket, no network, a folder that cannot be written)."""

    def __init__(self, category: str, path: Path, url: str, reason: str) -> None:
        self.category, self.path, self.url, self.reason = category, path, url, reason
        super().__init__(self.describe())

    def describe(self, folder: str = "the data folder") -> str:
        """The failure as people read it, the data folder called ``folder`` (a setting's name)."""
        return (
            f"category {self.category!r} is not in {folder} ({self.path} is missing) and could not be "
            f"downloaded from {self.url}: {self.reason}"
        )


class _StopCheckingBar:
    """A pooch progress bar that draws nothing: it calls ``check`` as the chunks of a download
    arrive, and what ``check`` raises ends the download (pooch then removes the partial file)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check
        self.total = 0

    def update(self, _size: int) -> None:
        self.check()

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def published_md5(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> str | None:
    """The MD5 (hex) the server publishes for ``url`` in its ``x-goog-hash`` header (Google Cloud
    Storage: ``crc32c=<b64>,md5=<b64>``), from a HEAD request; None when it publishes none.
    Raises OSError (urllib.error.URLError) when the server cannot be reached."""
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
        hashes = ",".join(response.headers.get_all("x-goog-hash") or [])
    for part in hashes.split(","):
        kind, _, value = part.strip().partition("=")
        if kind == "md5" and value:
            return base64.b64decode(value).hex()
    return None


def download(
    url: str, path: Path, timeout: float = DOWNLOAD_TIMEOUT_S, check: Callable[[], None] | None = None
) -> None:
    """Downloads ``url`` to ``path`` through a temporary file that becomes ``path`` only once it is
    complete and matches the server's published MD5; ``timeout`` is per connection and read, in
    seconds. Raises ValueError on a checksum mismatch and requests' errors on a failed or cut-off
    transfer, leaving nothing at ``path``. ``check`` is called as the file's chunks arrive: what it
    raises (``TrainingCancelled``) ends the download there, leaving nothing either."""
    md5 = published_md5(url, timeout)
    if md5 is None:
        log.warning("%s publishes no checksum; only the transfer's completeness is checked", url)
    downloader = pooch.HTTPDownloader(timeout=timeout, progressbar=_StopCheckingBar(check) if check else False)
    pooch.retrieve(url, f"md5:{md5}" if md5 else None, fname=path.name, path=path.parent, downloader=downloader)


def load_category(
    data_dir: Path,
    category: str,
    per_category: int,
    url: str | None = None,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """The first ``per_category`` drawings of ``data_dir/<category>.npy``, shape (n, 28, 28) uint8;
    a missing file is first downloaded from ``url`` (``QUICKDRAW_URL`` by default; ``{category}``
    filled in), see ``download``, which is given ``check``. Raises ``CategoryUnavailable`` (an
    OSError) when the download fails."""
    path = data_dir / f"{category}.npy"
    if not path.exists():
        source = (url or QUICKDRAW_URL).format(category=category)
        log.info("downloading %s to %s", source, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            download(source, path, check=check)
        except (OSError, ValueError) as exc:  # requests' errors are OSErrors; a bad MD5, ValueError
            # urllib's "<urlopen error [Errno -2] Name or service not known>" said neither what nor
            # where; its reason is kept, without the wrapping (an HTTPError's text is its status).
            reason: object = exc
            if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
                reason = exc.reason
            raise CategoryUnavailable(category, path, source, str(reason) or type(exc).__name__) from exc
    raw = np.load(path, mmap_mode="r")
    return np.asarray(raw[:per_category]).reshape(-1, 28, 28)


def _read_in_chunks(
    bitmaps: np.ndarray, read: Callable[[np.ndarray], np.ndarray], check: Callable[[], None] | None
) -> np.ndarray:
    """``read`` of each bitmap, stacked as float32 (n, 28, 28, 1); ``check`` is called before each
    ``PREPARE_CHUNK`` of them (a run's stop check: 60,000 drawings take seconds)."""
    parts = [np.zeros((0, 28, 28, 1), dtype=np.float32)]
    for start in range(0, len(bitmaps), PREPARE_CHUNK):
        if check is not None:
            check()
        parts.append(np.stack([read(b) for b in bitmaps[start : start + PREPARE_CHUNK]]).astype(np.float32))
    return np.concatenate(parts)


def normalise(bitmaps: np.ndarray, check: Callable[[], None] | None = None) -> np.ndarray:
    """Dataset bitmaps (n, 28, 28) as the service reads uploads (``sketch_array``): float32 (n, 28,
    28, 1); ``check``: see ``_read_in_chunks``."""
    return _read_in_chunks(bitmaps, lambda b: sketch_array(Image.fromarray(b)), check)


CANVAS_SIZE = 280
"""The UI canvas's side, in pixels."""


def canvas_image(bitmap: np.ndarray) -> Image.Image:
    """A dataset drawing (28x28, white on black) as the UI canvas sends it: black strokes on
    white, CANVAS_SIZE pixels a side (scaled up bilinearly, so strokes are thick and soft)."""
    return Image.fromarray(255 - np.asarray(bitmap, dtype=np.uint8)).resize(
        (CANVAS_SIZE, CANVAS_SIZE), Image.Resampling.BILINEAR
    )


def canvas_renderings(bitmaps: np.ndarray, check: Callable[[], None] | None = None) -> np.ndarray:
    """``bitmaps`` drawn as the canvas sends them and read back as the service reads uploads
    (``sketch_array``): what the model sees for a drawing made in the UI, shape (n, 28, 28, 1);
    ``check``: see ``_read_in_chunks``."""
    return _read_in_chunks(bitmaps, lambda b: sketch_array(canvas_image(b)), check)


def feedback_splits(folder: Path) -> dict[str, str]:
    """File name to split (``train``/``test``) from the export's manifest beside ``folder`` (the
    export's ``<out>/feedback.csv`` for ``<out>/<model>``); empty without one."""
    manifest = folder.parent / "feedback.csv"
    if not manifest.is_file():
        return {}
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {Path(row["path"]).name: row.get("split") or "train" for row in csv.DictReader(fh)}


def load_feedback(
    folder: Path, categories: list[str], split: str | None = None, check: Callable[[], None] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The labelled uploads under ``folder/<category>/``, normalised as the service reads uploads,
    with their category indices, and what was skipped (folders of other labels, unreadable files).
    ``split``: only the files the export's manifest puts in it (without a manifest every file is
    ``train``). ``check`` is called before each file is read (a run's stop check)."""
    splits = feedback_splits(folder) if split is not None else {}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    if not folder.is_dir():
        raise FileNotFoundError(f"feedback folder {folder} not found")
    skipped = {"other_labels": 0, "unreadable": 0}
    index = {c: i for i, c in enumerate(categories)}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.is_file())
        if sub.name not in index:
            skipped["other_labels"] += len(files)
            log.warning("feedback: %d drawings labelled %r, not one of the categories; skipped", len(files), sub.name)
            continue
        for path in files:
            if split is not None and splits.get(path.name, "train") != split:
                continue
            if check is not None:
                check()
            try:
                xs.append(sketch_array(load_image(path.read_bytes(), mode="L")))
            except (ImageRejected, OSError, ValueError) as exc:
                skipped["unreadable"] += 1
                log.warning("feedback: %s skipped: %s", path, exc)
                continue
            ys.append(index[sub.name])
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, 28, 28, 1), dtype=np.float32)
    return x, np.asarray(ys, dtype=np.int64), skipped


def load_dataset(
    data: Path, categories: list[str], per_category: int, check: Callable[[], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every category's bitmaps, in the order of ``categories`` (``load_category``: uint8, shape
    (n, 28, 28)), and each one's class index (int64, (n,)). ``check`` is called before each
    category and as a download's chunks arrive (a run's stop check)."""
    raw = []
    for category in categories:
        if check is not None:
            check()
        raw.append(load_category(data, category, per_category, check=check))
    labels = [np.full(len(bitmaps), index, dtype=np.int64) for index, bitmaps in enumerate(raw)]
    return np.concatenate(raw), np.concatenate(labels)


def split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """80 % train, 10 % validation, 10 % held-out test."""
    order = rng.permutation(n)
    a, b = int(n * 0.8), int(n * 0.9)
    return order[:a], order[a:b], order[b:]


REFERENCE_PER_CATEGORY = 3000
"""Drawings per category whose split every run shares, whatever its ``per_category``: the first
this many of each category, cut by ``split`` with ``SEED``. Its held-out tenth is the held-out set
of every run on the same categories (6,000 drawings for 20 categories), so a run on 50 drawings
per category and one on 3,000 are scored on the same drawings and their accuracies compare."""


def load_split(
    data: Path, categories: list[str], per_category: int, check: Callable[[], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bitmaps and class indices of ``load_dataset`` (the first ``max(per_category,
    REFERENCE_PER_CATEGORY)`` drawings of each category), then the indices of the training,
    validation and held-out drawings. The held-out set is the reference split's (see
    ``REFERENCE_PER_CATEGORY``); training and validation keep the reference split's drawings among
    the first ``per_category`` of each category (validation all of the reference's when that
    leaves none), and training also takes those past the reference
    ones when ``per_category`` is larger. With ``per_category`` equal to the reference, this is
    ``split`` of ``load_dataset`` as every earlier version was trained. ``check``: see
    ``load_dataset``."""
    bitmaps, y = load_dataset(data, categories, max(per_category, REFERENCE_PER_CATEGORY), check)
    position = np.concatenate([np.arange(int((y == index).sum())) for index in range(len(categories))])
    reference = np.flatnonzero(position < REFERENCE_PER_CATEGORY)
    train_idx, val_idx, test_idx = (reference[part] for part in split(len(reference), np.random.default_rng(SEED)))
    used = position < per_category
    beyond = np.flatnonzero(used & (position >= REFERENCE_PER_CATEGORY))
    # A few drawings per category may hold no validation drawing: then all the reference's, none trained on.
    validation = val_idx[used[val_idx]] if used[val_idx].any() else val_idx
    return bitmaps, y, np.concatenate([train_idx[used[train_idx]], beyond]), validation, test_idx


NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""The x86 CPU features (``/proc/cpuinfo`` flags) that compute bfloat16 in hardware."""


def native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 in hardware (one of ``NATIVE_BFLOAT16_FLAGS`` among the
    flags of ``cpuinfo``); False where there is no such file. Elsewhere bfloat16 is emulated:
    measured on a 2-core AVX2 host (AMD EPYC, no AVX512-BF16), one training step of ``vgg`` at
    batch 256 took 6.8 s in bfloat16 and 0.69 s in float32."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(NATIVE_BFLOAT16_FLAGS & set(line.partition(":")[2].split()))
    return False


PROGRESS_EVERY_S = 5.0
"""``train`` tells ``on_step`` how far the epoch in progress is at most this often, in seconds:
an epoch takes from 40 s to minutes, and each report is an event the API writes into the run."""
STOP_CHECK_EVERY_S = 1.0
"""``train`` asks ``should_stop`` at most this often, in seconds, while it prepares its data,
within an epoch and while it evaluates (a Redis EXISTS in the trainer, against training steps of
a few milliseconds each): a cancel stops the run within about this long after it is asked for,
plus the training step, ``PREPARE_CHUNK`` of drawings or batch of predictions in progress."""


class StopCheck:
    """``train``'s ``should_stop``, asked at most every ``STOP_CHECK_EVERY_S`` (or ``now``); called,
    it raises ``TrainingCancelled`` saying the ``phase`` the run is in when told to stop."""

    PREPARING = "while preparing its data"
    EVALUATING = "while evaluating, after its last epoch"

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop
        self.phase = self.PREPARING
        self.asked: float | None = None

    def due(self, *, now: bool = False) -> bool:
        """``should_stop``'s answer when it is asked; False when it was asked less than
        ``STOP_CHECK_EVERY_S`` ago (unless ``now``) or there is none."""
        if self.should_stop is None:
            return False
        at = time.monotonic()
        if not now and self.asked is not None and at - self.asked < STOP_CHECK_EVERY_S:
            return False
        self.asked = at
        return bool(self.should_stop())

    def __call__(self, *, now: bool = False) -> None:
        if self.due(now=now):
            raise TrainingCancelled(f"cancelled {self.phase}")


def per_class_scores(confusion: np.ndarray, labels: list[str]) -> tuple[dict[str, dict[str, float]], float]:
    """Precision, recall and F1 of each class from a confusion matrix (rows true, columns
    predicted), and their unweighted mean F1 (macro-F1, as scikit-learn's ``f1_score(average=
    "macro")``); a class never predicted or never present scores 0 where it divides by zero."""
    scores: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = float(confusion[i, i])
        predicted, actual = float(confusion[:, i].sum()), float(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[label] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}
    macro = float(np.mean([s["f1"] for s in scores.values()])) if scores else 0.0
    return scores, round(macro, 4)


def top_k_accuracy(probs: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest probabilities; probs (n, classes)."""
    if not len(truth):
        return 0.0
    return float((np.argsort(-probs, axis=1)[:, :k] == truth[:, None]).any(axis=1).mean())


AUGMENT_ROTATION = 0.04
"""Largest random rotation when augmenting, as a fraction of a full turn (0.04: about 14 degrees)."""
AUGMENT_ZOOM = 0.08
"""Largest random zoom in or out when augmenting (0.08: 8 %)."""


def build_model(
    arch: str,
    num_classes: int,
    total_steps: int = 1000,
    learning_rate: float = 2e-3,
    augment: bool = False,
    *,
    flip_only: bool = False,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    warmup: float = 0.0,
    flip_average: bool = False,
) -> Any:
    """``compact``: three conv blocks, one conv each; ``deep``: two convs per block and a wide head;
    ``vgg``: one conv at full resolution, then two blocks of two convs (32, 64-64, 128-128
    filters), global average pooling and no hidden dense layer (about twice ``compact``'s work per
    drawing, and more accurate for it).
    ``augment``: random horizontal flips, rotations and zooms in front (``flip_only``: flips only),
    active in training only (Keras' preprocessing layers: inference passes drawings through
    unchanged). ``label_smoothing``: the model then expects one-hot labels. ``weight_decay``:
    AdamW's decoupled decay (0: Adam). ``warmup``: that share of the steps raises the learning rate
    linearly from a tenth of ``learning_rate`` before the cosine decay. ``flip_average``:
    horizontal-flip test-time augmentation in the network (``model.layers``): every drawing is read
    with its mirror image and the two logits averaged; it adds no weights, so a model trained
    without it takes it on with ``set_weights``."""
    import keras
    from keras import layers

    from model.layers import MeanOfMirrors, MirrorStack

    inputs = keras.Input((28, 28, 1))
    x = MirrorStack()(inputs) if flip_average else inputs
    if augment:
        x = layers.RandomFlip("horizontal")(x)
        if not flip_only:
            x = layers.RandomRotation(AUGMENT_ROTATION, fill_mode="constant")(x)
            x = layers.RandomZoom(AUGMENT_ZOOM, fill_mode="constant")(x)
    if arch == "compact":
        for filters in (32, 64, 128):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
            x = layers.MaxPooling2D()(x)
        x = layers.Flatten()(x)
        x = layers.Dropout(0.5)(x)
    elif arch == "deep":
        for filters in (32, 64):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.BatchNormalization()(x)
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.MaxPooling2D()(x)
            x = layers.Dropout(0.25)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(256, activation="relu")(x)
        x = layers.Dropout(0.5)(x)
    elif arch == "vgg":

        def conv(x: Any, filters: int) -> Any:
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            # Momentum 0.9: the moving statistics settle within the few hundred steps of a short run.
            x = layers.BatchNormalization(momentum=0.9)(x)
            return layers.Activation("relu")(x)

        x = layers.MaxPooling2D()(conv(x, 32))
        x = layers.MaxPooling2D()(conv(conv(x, 64), 64))
        x = conv(conv(x, 128), 128)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.3)(x)
    else:
        raise ValueError(f"unknown architecture {arch!r} (compact, deep or vgg)")
    if flip_average:
        x = MeanOfMirrors()(x)
    # float32 whatever the policy: a bfloat16 softmax rounds small probabilities away.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=f"sketch_{arch}")
    # XLA makes these small convolutions about four times slower on CPU (measured: 82 s against
    # 23 s per epoch for "deep").
    # A cosine-decayed learning rate settles the last epochs instead of bouncing around the optimum.
    warmup_steps = int(total_steps * warmup)
    schedule = (
        keras.optimizers.schedules.CosineDecay(
            learning_rate / 10,
            decay_steps=max(1, total_steps - warmup_steps),
            warmup_target=learning_rate,
            warmup_steps=warmup_steps,
        )
        if warmup_steps
        else keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    )
    optimizer = (
        keras.optimizers.AdamW(schedule, weight_decay=weight_decay) if weight_decay else keras.optimizers.Adam(schedule)
    )
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        if label_smoothing
        else "sparse_categorical_crossentropy"
    )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=["accuracy"],
        jit_compile=False,
    )
    return model


TRAINING_OPTIONS = frozenset(inspect.signature(build_model).parameters) - {
    "arch",
    "num_classes",
    "total_steps",
    "flip_average",
}
"""The registry's ``training`` options that shape the network and its optimizer (``build_model``'s
own keywords): what a copy of a version's network, as ``bench.training_step`` builds, takes."""


def train(
    *,
    data: Path,
    categories: list[str],
    out: Path,
    epochs: int = 4,
    batch_size: int = 128,
    arch: str = "compact",
    per_category: int = 3000,
    feedback: Path | None = None,
    learning_rate: float = 2e-3,
    seed: int = SEED,
    canvas_share: float = 0.0,
    augment: bool = False,
    flip_only: bool = False,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    warmup: float = 0.0,
    mixed_precision: bool = False,
    flip_average: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, object]:
    """Trains, evaluates and writes ``out/model.keras``, ``labels.txt`` and ``metrics.json`` (the
    training record); returns the record. ``augment``, ``flip_only``, ``label_smoothing``,
    ``weight_decay`` and ``warmup``: see ``build_model``. ``mixed_precision``: trains with Keras'
    ``mixed_bfloat16`` policy (bfloat16 arithmetic, float32 weights) where the CPU computes
    bfloat16 in hardware (``native_bfloat16``), in float32 elsewhere (emulated bfloat16 is about
    ten times slower), and saves a float32 copy, so the served model and every figure of the record
    compute in float32; the record says which precision trained. ``flip_average``: the saved model reads each
    drawing with its mirror image (see ``build_model``; training reads each once, its random flips
    already teach both), and the record's figures are its answers. ``canvas_share``:
    that share of the training drawings is added again as the UI canvas renders them
    (``canvas_renderings``), so drawings made in the UI are read as well as the dataset's; the
    held-out drawings are scored both ways whatever it is. ``on_epoch`` gets each epoch's numbers
    (epoch, loss, accuracy, val_loss, val_accuracy, seconds) once the epoch and its validation are
    over. ``on_step`` gets, at most every ``PROGRESS_EVERY_S``, how far the epoch in progress is:
    epoch (1-based), step (training steps done in it), steps (in an epoch) and seconds (since the
    training began, as ``on_epoch``'s). ``should_stop``, asked at most every
    ``STOP_CHECK_EVERY_S`` while the data is prepared (between categories, chunks of a download and
    ``PREPARE_CHUNK`` of drawings), within each epoch (its training steps and validation), while
    the held-out sets are evaluated (between batches), and once at the end of each of these,
    cancels the run at once (``TrainingCancelled``, saying in which phase, epoch and step;
    nothing written): an epoch stopped part-way is never given to ``on_epoch``. An exception
    from ``on_epoch``, ``on_step`` or ``should_stop`` ends the training and is raised as it is."""
    import keras

    keras.utils.set_random_seed(seed)
    started = time.time()
    stop = StopCheck(should_stop)
    bitmaps, y, train_idx, val_idx, test_idx = load_split(data, categories, per_category, stop)
    x_train, y_train = normalise(bitmaps[train_idx], stop), y[train_idx]
    x_val, x_test = normalise(bitmaps[val_idx], stop), normalise(bitmaps[test_idx], stop)
    if canvas_share > 0:
        rng = np.random.default_rng(seed)
        copies = np.sort(rng.choice(train_idx, int(len(train_idx) * canvas_share), replace=False))
        x_train = np.concatenate([x_train, canvas_renderings(bitmaps[copies], stop)])
        y_train = np.concatenate([y_train, y[copies]])
    if feedback is not None:
        fx, fy, skipped = load_feedback(feedback, categories, split="train", check=stop)
        tx, ty, _ = load_feedback(feedback, categories, split="test", check=stop)
        x_train, y_train = np.concatenate([x_train, fx]), np.concatenate([y_train, fy])

    def build(precision: str, *, serving: bool) -> Any:
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(precision)
        try:
            return build_model(
                arch,
                len(categories),
                total_steps=epochs * -(-len(x_train) // batch_size),
                learning_rate=learning_rate,
                augment=augment,
                flip_only=flip_only,
                label_smoothing=label_smoothing,
                weight_decay=weight_decay,
                warmup=warmup,
                flip_average=flip_average and serving,
            )
        finally:
            keras.mixed_precision.set_global_policy(policy)

    if mixed_precision and not native_bfloat16():
        log.warning("this CPU has no bfloat16 arithmetic (%s): training in float32", ", ".join(NATIVE_BFLOAT16_FLAGS))
        mixed_precision = False
    model = build("mixed_bfloat16" if mixed_precision else "float32", serving=False)
    # Whatever the last chunk's check skipped: a cancel sent while preparing never reaches fit,
    # whose first step (tracing the model) takes seconds.
    stop(now=True)

    class Progress(keras.callbacks.Callback):
        # Overriding on_train_batch_end and on_test_batch_end makes Keras call them in the
        # training's own thread, after each step (no asynchronous dispatch): what they raise ends
        # fit there.
        def __init__(self) -> None:
            super().__init__()
            self.started = time.time()
            self.epoch = 0
            self.reported = time.monotonic()

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            now = time.monotonic()
            steps = int(self.params.get("steps") or 0)
            if stop.due():
                # Raised rather than Keras' stop_training, which ends the epoch's loop but then
                # validates the part trained and reports it as a whole epoch.
                raise TrainingCancelled(
                    f"cancelled during epoch {self.epoch} of {epochs}, after step {batch + 1} of {steps}"
                )
            if on_step is not None and now - self.reported >= PROGRESS_EVERY_S:
                self.reported = now
                seconds = round(time.time() - self.started, 1)
                on_step({"epoch": self.epoch, "step": batch + 1, "steps": steps, "seconds": seconds})

        def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            # The epoch's validation: seconds for 6,000 drawings of the VGG recipe.
            if stop.due():
                raise TrainingCancelled(f"cancelled during epoch {self.epoch} of {epochs}, while validating it")

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            numbers = {k: float(v) for k, v in (logs or {}).items()}
            if on_epoch is not None:
                on_epoch({"epoch": epoch + 1, "seconds": round(time.time() - self.started, 1), **numbers})
            if stop.due(now=True):
                raise TrainingCancelled(f"cancelled after epoch {epoch + 1} of {epochs}")

    class Stopping(keras.callbacks.Callback):
        # Overridden, so Keras calls it in this thread after each batch: what it raises ends predict.
        def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            stop()

    # Label smoothing needs one-hot labels (Keras' sparse cross-entropy has no smoothing).
    def targets(labels: np.ndarray) -> np.ndarray:
        return np.eye(len(categories), dtype=np.float32)[labels] if label_smoothing else labels

    history = model.fit(
        x_train,
        targets(y_train),
        validation_data=(x_val, targets(y[val_idx])),
        epochs=epochs,
        batch_size=batch_size,
        verbose=2,
        callbacks=[Progress()],
    )
    # The held-out sets, drawn both ways, and the feedback: 30 to 40 s for the VGG recipe.
    stop.phase = StopCheck.EVALUATING
    if mixed_precision or flip_average:
        # The same layers in float32, with the mirror images read too when asked (mixed precision
        # keeps its weights in float32, and the mirroring adds none: copied as they are).
        trained, model = model, build("float32", serving=True)
        model.set_weights(trained.get_weights())
    probs = model.predict(x_test, batch_size=512, verbose=0, callbacks=[Stopping()])
    predicted = probs.argmax(axis=1)
    truth = y[test_idx]
    confusion = np.zeros((len(categories), len(categories)), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    per_class, macro_f1 = per_class_scores(confusion, categories)
    top3 = top_k_accuracy(probs, truth, 3)
    canvas_x = canvas_renderings(bitmaps[test_idx], stop)
    canvas_probs = model.predict(canvas_x, batch_size=512, verbose=0, callbacks=[Stopping()])

    metrics: dict[str, object] = {
        "arch": arch,
        "categories": categories,
        "epochs": epochs,
        "batch_size": batch_size,
        "per_category": per_category,
        # Which drawings the held-out figures were measured on: see REFERENCE_PER_CATEGORY.
        "heldout_per_category": REFERENCE_PER_CATEGORY,
        "samples": {"train": len(x_train), "validation": len(val_idx), "test": len(test_idx)},
        "history": [
            {
                "epoch": i + 1,
                "loss": float(history.history["loss"][i]),
                "accuracy": float(history.history["accuracy"][i]),
                "val_loss": float(history.history["val_loss"][i]),
                "val_accuracy": float(history.history["val_accuracy"][i]),
            }
            for i in range(epochs)
        ],
        "learning_rate": learning_rate,
        "seed": seed,
        "test_accuracy": float((predicted == truth).mean()),
        "test_top3_accuracy": round(top3, 4),
        # The same held-out drawings as the UI canvas sends them (black on white, 280 px).
        "canvas_test_accuracy": round(top_k_accuracy(canvas_probs, truth, 1), 4),
        "canvas_test_top3_accuracy": round(top_k_accuracy(canvas_probs, truth, 3), 4),
        "canvas_share": canvas_share,
        "augment": augment,
        "flip_only": flip_only,
        "label_smoothing": label_smoothing,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "mixed_precision": mixed_precision,
        "flip_average": flip_average,
        "per_class": per_class,
        "macro_f1": macro_f1,
        "machine": {"host": socket.gethostname(), "cpus": os.cpu_count()},
        "confusion_matrix": {"labels": categories, "rows_true_columns_predicted": confusion.tolist()},
        "seconds": round(time.time() - started, 1),
    }
    if feedback is not None:
        answered = model.predict(fx, verbose=0, callbacks=[Stopping()]).argmax(axis=1) if len(fx) else fy
        metrics["feedback"] = {
            "folder": str(feedback),
            "drawings": len(fx),
            "per_category": {c: int((fy == i).sum()) for i, c in enumerate(categories)},
            "skipped": skipped,
            # Measured on drawings the model trained on: whether it learned them, not how it generalises.
            "answered_as_labelled": float((answered == fy).mean()) if len(fx) else None,
            # The feedback test split: users' drawings it never saw, reported apart from QuickDraw's.
            "test_drawings": len(tx),
            "test_accuracy": (
                float((model.predict(tx, verbose=0, callbacks=[Stopping()]).argmax(axis=1) == ty).mean())
                if len(tx)
                else None
            ),
        }
    # Whatever the last batch's check skipped: nothing is written for a run cancelled meanwhile.
    stop(now=True)
    # Written last and atomically, so a half-trained model never looks finished.
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("\n".join(categories) + "\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    tmp = out / "model.tmp.keras"
    model.save(tmp)
    os.replace(tmp, out / "model.keras")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.train_sketch", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of <category>.npy files")
    parser.add_argument("--categories", required=True, help="comma-separated QuickDraw categories")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="compact")
    parser.add_argument("--per-category", type=int, default=3000, help="drawings used per category")
    parser.add_argument(
        "--canvas-share",
        type=float,
        default=0.0,
        help="share of the training drawings added as the canvas renders them",
    )
    parser.add_argument("--augment", action="store_true", help="random flips, rotations and zooms while training")
    parser.add_argument("--flip-only", action="store_true", help="with --augment: random flips only")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's weight decay (0: Adam)")
    parser.add_argument("--warmup", type=float, default=0.0, help="share of the steps warming the learning rate up")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--flip-average", action="store_true", help="the saved model averages each drawing with its mirror image"
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="train in bfloat16 where the CPU has it in hardware (AMX, AVX512-BF16), save in float32",
    )
    parser.add_argument(
        "--feedback", type=Path, help="labelled uploads to train on too: export-feedback's <out>/sketch folder"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    metrics = train(
        data=args.data,
        categories=[c.strip() for c in args.categories.split(",") if c.strip()],
        epochs=args.epochs,
        batch_size=args.batch_size,
        out=args.out,
        arch=args.arch,
        per_category=args.per_category,
        feedback=args.feedback,
        canvas_share=args.canvas_share,
        augment=args.augment,
        flip_only=args.flip_only,
        label_smoothing=args.label_smoothing,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        mixed_precision=args.mixed_precision,
        flip_average=args.flip_average,
        learning_rate=args.learning_rate,
    )
    log.info("held-out accuracy %.4f in %.0f s -> %s", metrics["test_accuracy"], metrics["seconds"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
