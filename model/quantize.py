"""INT8 versions: post-training quantization of an FP32 OpenVINO model with NNCF.

Activation ranges come from random crops and flips of a few photos (CALIBRATION_DIR), fed
through the same preprocessing the service uses, so the ranges match what the model sees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import ImageOps

from contracts.imaging import load_image
from contracts.registry import ModelEntry
from model import preprocessing
from model.config import ModelSettings
from model.runtimes import ModelUnavailable, openvino_model, resolve

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def calibration_photos(settings: ModelSettings) -> list[Path]:
    photos = sorted(p for p in settings.calibration_dir.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise ModelUnavailable(f"no calibration photos in {settings.calibration_dir} (CALIBRATION_DIR)")
    return photos


def calibration_inputs(entry: ModelEntry, settings: ModelSettings) -> list[np.ndarray]:
    """CALIBRATION_SAMPLES model inputs; the same photos and seed always give the same inputs."""
    rng = np.random.default_rng(0)
    images = [load_image(p.read_bytes(), mode=entry.input.mode) for p in calibration_photos(settings)]
    inputs = []
    for i in range(settings.calibration_samples):
        img = images[i % len(images)]
        # Crops keeping 40-100 % of each side, like the framing of real uploads.
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        inputs.append(preprocessing.preprocess_image(crop, entry))
    return inputs


def quantization_key(entry: ModelEntry, source: ModelEntry, settings: ModelSettings) -> str:
    """Changes whenever the quantized model could change."""
    import nncf
    import openvino

    digest = hashlib.sha256(
        json.dumps(
            {
                "entry": entry.model_dump(mode="json", exclude={"description", "channel", "enabled"}),
                "source": source.model_dump(mode="json", exclude={"description", "channel", "enabled"}),
                "samples": settings.calibration_samples,
                "versions": [nncf.__version__, openvino.__version__],
            },
            sort_keys=True,
        ).encode()
    )
    if source.file:
        weights = resolve(source, source.file, settings)
        digest.update(f"{weights.name}:{weights.stat().st_size if weights.exists() else 'missing'}".encode())
    for path in calibration_photos(settings):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    for code in (Path(preprocessing.__file__ or ""), Path(__file__)):
        digest.update(code.read_bytes())
    return digest.hexdigest()[:16]


def quantize(entry: ModelEntry, source: ModelEntry, settings: ModelSettings, out: Path) -> None:
    """Writes the INT8 model of ``source`` to ``out`` (an OpenVINO .xml with its .bin)."""
    import nncf
    import openvino as ov

    model, _random = openvino_model(source, settings)
    inputs = calibration_inputs(source, settings)
    dataset = nncf.Dataset(inputs, lambda x: x[None])
    # MIXED: asymmetric activations. The symmetric PERFORMANCE preset turned MobileNetV2's outputs
    # into NaN here (0 of 12 photos right); MIXED keeps 11 of the 12 top-1 answers.
    quantized = nncf.quantize(model, dataset, subset_size=len(inputs), preset=nncf.QuantizationPreset.MIXED)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
