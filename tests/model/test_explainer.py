"""An explainer loads a version whose model file is written after it started."""

from __future__ import annotations

import shutil
from pathlib import Path

from contracts import keys
from model.config import ModelSettings
from model.explainer import Explainer
from tests.support import RedisServer


def test_a_version_trained_after_the_start_is_explained_once_written(
    private_redis: RedisServer, tmp_path: Path, model_settings: ModelSettings
) -> None:
    """`make run` trains in the background while the portal serves: an explainer that started
    before a version's model file was written waits for it, then builds its Grad-CAM."""
    settings = model_settings.model_copy(
        update={"redis_url": private_redis.url, "trained_dir": tmp_path, "explain_models": "sketch@1"}
    )
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    assert stream not in explainer.cams and "sketch@1" in explainer.unwritten
    assert not explainer.load_written()

    written = tmp_path / "sketch" / "v1"
    shutil.copytree(model_settings.trained_dir / "sketch" / "v1", written)
    assert explainer.load_written()
    assert stream in explainer.cams and not explainer.unwritten
