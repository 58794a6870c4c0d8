"""Grad-CAM's input is the worker's: a heatmap is taken of the very input the answer came from."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.registry import load_registry
from model import preprocessing
from model.config import ModelSettings
from model.gradcam import decode
from tests.support import PHOTOS


@pytest.mark.parametrize(("key", "photo"), [("mobilenet_v2@1", "cat_720p.jpg"), ("sketch@1", "cat_720p.jpg")])
def test_an_upload_is_decoded_for_its_heatmap_as_the_worker_decodes_it(key: str, photo: str) -> None:
    """A 1280x720 JPEG: decoded at a reduced scale for a photo model (as the worker does, JPEG's
    draft mode), in full for a sketch model; either way the model's input is the worker's."""
    entry = load_registry(ModelSettings().registry_path).get(key)
    data = (PHOTOS / photo).read_bytes()
    img = decode(data, entry)
    assert img.size == ((640, 360) if key.startswith("mobilenet") else (1280, 720)), img.size
    np.testing.assert_array_equal(preprocessing.preprocess_image(img, entry), preprocessing.preprocess(data, entry))
