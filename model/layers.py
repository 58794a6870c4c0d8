"""Keras layers of the portal's own models, registered so a saved ``model.keras`` loads with them.

Horizontal-flip test-time augmentation inside the network: ``MirrorStack`` puts each drawing's
mirror image behind the batch, the convolutional layers read both halves in one pass, and
``MeanOfMirrors`` averages each drawing's pooled features with its mirror's. The classifier head is
linear up to its softmax, so this averages the two logits. Keeping it one path (rather than two
calls of a shared sub-network) leaves every layer with a single output, which Grad-CAM reads
(``model.gradcam``).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

PACKAGE = "image_portal"


@keras.saving.register_keras_serializable(package=PACKAGE)
class MirrorStack(keras.layers.Layer):
    """(n, height, width, channels) to (2n, height, width, channels): the batch, then its mirror
    images (flipped left to right), in the same order."""

    def call(self, inputs: Any) -> Any:
        return ops.concatenate([inputs, ops.flip(inputs, axis=2)], axis=0)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        batch = input_shape[0]
        return (None if batch is None else 2 * batch, *input_shape[1:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class MeanOfMirrors(keras.layers.Layer):
    """(2n, ...) from ``MirrorStack``'s batch to (n, ...): each item averaged with its mirror's."""

    def call(self, inputs: Any) -> Any:
        originals, mirrors = ops.split(inputs, 2, axis=0)
        return (originals + mirrors) / 2

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        batch = input_shape[0]
        return (None if batch is None else batch // 2, *input_shape[1:])
