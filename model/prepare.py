"""``python -m model.prepare``: make every served model loadable before the workers start.

Writes the ImageNet weights file of each ``keras.applications`` version whose file is missing
(fetched by Keras, when ALLOW_WEIGHT_DOWNLOAD allows it), trains each registry model that has
``training`` options and no model file yet, and quantizes each INT8 version (``quantized_from``)
whose file is missing. A model made before from the same options, code and data is copied from
TRAINING_CACHE_DIR instead (training takes minutes on two cores, quantizing ResNet50 about a
minute). A file that could not be made is reported by the worker as the model's unavailability
reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from contracts.registry import ModelEntry, Registry, RegistryUnreadable, load_registry, parse_model_ref, read_registry
from model import preprocessing
from model.config import ModelRefInvalid, ModelSettings, load_model_settings
from model.runtimes import ModelUnavailable, download_timeout, resolve
from model.store import ProgressNote, version_lock, written_into
from model.training import train_sketch

log = logging.getLogger("model.prepare")
DEFAULT_CATEGORIES = "apple,bicycle,cat,diamond,eye,fish"


def training_key(options: dict[str, Any], categories: list[str], data: Path, feedback: Path | None = None) -> str:
    """Changes whenever the result of training could change."""
    digest = hashlib.sha256(json.dumps({**options, "categories": categories}, sort_keys=True).encode())
    for module in (train_sketch, preprocessing):
        digest.update(Path(module.__file__ or "").read_bytes())
    for category in categories:
        path = data / f"{category}.npy"
        digest.update(f"{category}:{path.stat().st_size if path.exists() else 'download'}".encode())
    if feedback is not None:
        # An export names each file by its content's hash: names and sizes change with the drawings.
        for path in sorted(p for p in feedback.rglob("*") if p.is_file()):
            digest.update(f"feedback:{path.relative_to(feedback).as_posix()}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def training_entry(ref: str, settings: ModelSettings) -> ModelEntry:
    """The registry version ``ref`` names (``name@N``; a bare name means its stable version, as
    everywhere else) if it has training options; SystemExit saying why for a malformed reference
    or a version without them (for command-line tools)."""
    try:
        name, version = parse_model_ref(ref)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    entry = load_registry(settings.registry_path).find(name, version, benchmark_mode=True)
    if entry is None or not entry.training:
        raise SystemExit(f"{ref}: no registry version with training options")
    return entry


def prepare_trained(entry: ModelEntry, out: Path, settings: ModelSettings, *, train: bool = True) -> None:
    """Trains the entry (or copies the same training from the cache); without ``train``, only
    copies it from the cache. A ``feedback`` option names a folder of labelled drawings
    (``api.cli export-feedback``'s ``<out>/sketch``) to train on too.

    Its files are written aside and moved in with the model file last (``written_into``), so a
    worker waiting for it (``make run`` serves while this trains) never reads a part of it."""
    options = dict(entry.training or {})
    categories = str(options.pop("categories", DEFAULT_CATEGORIES)).split(",")
    feedback = options.pop("feedback", None)
    folder = (
        entry.resolve(str(feedback), models_dir=settings.models_dir, trained_dir=settings.trained_dir)
        if feedback
        else None
    )
    if folder is not None and not folder.is_dir():
        # The worker then reports the missing model file as the version's unavailability reason.
        log.warning("%s: feedback folder %s not found; not trained", entry.key, folder)
        return
    cached = settings.training_cache_dir / training_key(options, categories, settings.quickdraw_dir, folder)
    if (cached / "model.keras").exists():
        with written_into(out / "model.keras") as staging:
            shutil.copytree(cached, staging, dirs_exist_ok=True)
        log.info("%s: copied from the training cache %s", entry.key, cached)
        return
    if not train:
        log.info("%s: not trained yet; left for a run of python -m model.prepare", entry.key)
        return
    log.info(
        "%s: training into %s with %s (data: %s, feedback: %s)", entry.key, out, options, settings.quickdraw_dir, folder
    )
    model_file = out / "model.keras"
    # Workers tell users how far it is while the portal serves (make run); the note goes with the run.
    with ProgressNote(model_file, int(options.get("epochs", 4))) as note, written_into(model_file) as staging:
        metrics = train_sketch.train(
            data=settings.quickdraw_dir,
            categories=categories,
            out=staging,
            feedback=folder,
            on_epoch=lambda numbers: note.epoch(int(numbers["epoch"])),
            **options,
        )
        keep_in_cache(entry.key, staging, cached)
    log.info("%s: held-out accuracy %.4f in %.0f s", entry.key, metrics["test_accuracy"], metrics["seconds"])


def prepare_quantized(entry: ModelEntry, source: ModelEntry, out: Path, settings: ModelSettings) -> None:
    from model import quantize

    cached = settings.training_cache_dir / quantize.quantization_key(entry, source, settings)
    if (cached / out.name).exists():
        with written_into(out) as staging:
            shutil.copytree(cached, staging, dirs_exist_ok=True)
        log.info("%s: copied from the cache %s", entry.key, cached)
        return
    log.info("%s: quantizing %s to INT8 into %s", entry.key, source.key, out)
    start = time.perf_counter()
    # The .bin goes in before its .xml: a worker never finds the model without its weights.
    with written_into(out) as staging:
        quantize.quantize(entry, source, settings, staging / out.name)
        keep_in_cache(entry.key, staging, cached)
    log.info("%s: quantized in %.0f s", entry.key, time.perf_counter() - start)


def imagenet_entries(entries: list[ModelEntry], registry: Registry) -> list[ModelEntry]:
    """The ``keras.applications`` versions with ImageNet weights from a file that ``entries``
    need: those among them, and the FP32 versions their INT8 versions are quantized from (each
    once, in the registry's order)."""
    needed = {e.key: e for e in entries}
    for entry in entries:
        if entry.quantized_from:
            source = registry.get(entry.quantized_from)
            needed.setdefault(source.key, source)
    return [e for e in needed.values() if e.architecture and e.weights == "imagenet" and e.file]


def imagenet_model(entry: ModelEntry) -> Any:
    """``entry``'s ``keras.applications`` model built with ``weights='imagenet'``: Keras downloads
    them into its cache (KERAS_HOME) unless they are there already. Raises what Keras raises for
    a failed download, AttributeError for an unknown architecture."""
    import keras

    builder = getattr(keras.applications, entry.architecture or "")
    return builder(weights="imagenet", input_shape=(entry.input.height, entry.input.width, 3))


def fetch_imagenet_weights(entries: list[ModelEntry], settings: ModelSettings, *, wait: bool = True) -> list[str]:
    """Writes the weights file (``file``, under MODELS_DIR, a ``.weights.h5``) of each entry with
    ImageNet weights whose file is missing, so that a worker loads it without a download (the
    model image's workers run with ALLOW_WEIGHT_DOWNLOAD=false); the keys of the entries whose
    file is still missing. Without ALLOW_WEIGHT_DOWNLOAD, or when the download fails (no
    network), it logs and goes on: the worker reports the version unavailable with the reason.
    ``wait``: wait for another process writing the same file (else leave it to that one)."""
    for entry in entries:
        path = resolve(entry, entry.file or "", settings)
        if path.exists():
            log.info("%s: %s present", entry.key, path)
            continue
        if not settings.allow_weight_download:
            log.info("%s: %s missing and weight downloads are disabled; not fetched", entry.key, path)
            continue
        try:
            # Downloaded before the lock is taken: a run that cannot download (no network) leaves
            # nothing in MODELS_DIR, which may be a shared folder of weights.
            with download_timeout(settings.weight_download_timeout_s):
                model = imagenet_model(entry)
            with version_lock(path, entry.key, wait=wait) as held:
                if not held:
                    log.info("%s: another python -m model.prepare is writing it; not waited for", entry.key)
                elif path.exists():
                    log.info("%s: %s made meanwhile by another python -m model.prepare", entry.key, path)
                else:
                    # Written aside and renamed in: a worker never reads half of it.
                    with written_into(path) as staging:
                        model.save_weights(staging / path.name)
                    log.info("%s: ImageNet weights written to %s", entry.key, path)
        except Exception as exc:  # no network, a read-only MODELS_DIR: the worker says why it is missing
            log.warning("%s: ImageNet weights not written to %s: %s", entry.key, path, exc)
    return [e.key for e in entries if not resolve(e, e.file or "", settings).exists()]


def keep_in_cache(key: str, folder: Path, cached: Path) -> None:
    # A name of this process's own: two checkouts sharing the cache never write into one folder.
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    try:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        tmp.replace(cached)
    except OSError as exc:  # a read-only cache, or another run kept it first: the next run copies that
        log.warning("could not keep %s in the cache: %s", key, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--defer-training",
        action="store_true",
        help="quantize and copy what the training cache holds, but train nothing: `make run` starts "
        "serving after this and trains the rest in the background, its workers loading each model once written",
    )
    parser.add_argument(
        "--require-weights",
        action="store_true",
        help="exit with status 1, before training anything, when an ImageNet weights file a served "
        "version needs could not be written (the model image's build: its workers download nothing)",
    )
    args = parser.parse_args(argv)
    # supervisord and `kill` stop it with SIGTERM: exiting as Python does lets the staging folder
    # and the progress note go with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_model_settings("python -m model.prepare")
    try:
        served = settings.served_entries(registry := read_registry(settings.registry_path))
    except (RegistryUnreadable, ModelRefInvalid) as exc:
        raise SystemExit(f"python -m model.prepare refuses to start: {exc}") from None
    # Before quantizing: an INT8 version is made from its FP32 version's weights file (and the
    # quantization cache's key names that file).
    missing = fetch_imagenet_weights(imagenet_entries(served, registry), settings, wait=not args.defer_training)
    if missing and args.require_weights:
        log.error("ImageNet weights missing: %s", ", ".join(missing))
        return 1
    failed = []
    # Trained models first: a quantized version may be made from one of them. Otherwise in the
    # registry's order, which lists the quick 6-category sketch versions first: with `make run`
    # the sketch page has a version to offer minutes after the start.
    for entry in sorted(served, key=lambda e: e.quantized_from is not None):
        if not (entry.training or entry.quantized_from) or entry.file is None:
            continue
        path = entry.resolve(entry.file, models_dir=settings.models_dir, trained_dir=settings.trained_dir)
        if path.exists():
            log.info("%s: %s present", entry.key, path)
            continue
        with version_lock(path, entry.key, wait=not args.defer_training) as held:
            if not held:
                log.info("%s: another python -m model.prepare is making it; not waited for", entry.key)
            elif path.exists():
                log.info("%s: %s made meanwhile by another python -m model.prepare", entry.key, path)
            elif entry.training:
                try:
                    prepare_trained(entry, path.parent, settings, train=not args.defer_training)
                except Exception:  # the next versions are still made; the exit status says it failed
                    log.exception("%s: training failed", entry.key)
                    failed.append(entry.key)
            elif entry.quantized_from:
                try:
                    prepare_quantized(entry, registry.get(entry.quantized_from), path, settings)
                except ModelUnavailable as exc:  # the worker reports the entry unavailable, with this reason
                    log.warning("%s: cannot be quantized: %s", entry.key, exc)
                except Exception:
                    log.exception("%s: quantizing failed", entry.key)
                    failed.append(entry.key)
    if failed:
        log.error("not made: %s", ", ".join(failed))
    # `make run` serves whatever this made: what failed is in the log, and its versions are
    # reported unavailable by the workers.
    return 1 if failed and not args.defer_training else 0


if __name__ == "__main__":
    sys.exit(main())
