"""Grad-CAM heatmaps of a Keras classifier's top-1 class, mapped onto the uploaded image.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017, arXiv:1610.02391): the gradients of the class score y^c with respect to
the feature maps A^k of the last convolutional layer, averaged over the map's positions, weigh the
maps: L^c = ReLU(sum_k alpha_k^c A^k), alpha_k^c = mean_ij dy^c/dA^k_ij. As in the paper, y^c is
the score before the softmax (the softmax's saturation would flatten the gradients of a confident
answer). A model that reads each input with its mirror image (``model.layers.MirrorStack``) has
both halves in that layer: each half's weighted sum is taken with its own gradients, the mirror's
is flipped back onto the input, and the ReLU applies to their sum, the map of the averaged score.
The map has the layer's resolution (7x7 for MobileNetV2, ResNet50 and the sketch CNNs at
their input sizes); it is scaled to [0, 1] and drawn over the image with bilinear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from contracts.imaging import load_image
from contracts.messages import EXPLANATION_GRID
from contracts.registry import ModelEntry, Preprocessing
from model import preprocessing
from model.preprocessing import SketchPlacement


class NotExplainable(Exception):
    """The model has no convolutional layer to explain with, or no such class."""


def target_layer(model: Any) -> Any:
    """The last layer with a spatial (batch, height, width, channels) output that is not a pooling
    layer: Grad-CAM's "last convolutional layer" (MobileNetV2's ``out_relu``, the sketch CNN's last
    ReLU before its pooling)."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4 and "Pooling" not in type(layer).__name__:
            return layer
    raise NotExplainable(f"{model.name} has no convolutional layer")


@dataclass
class GradCam:
    """Grad-CAM for one Keras model, built once (the gradient model shares the model's weights)."""

    entry: ModelEntry
    labels: tuple[str, ...]
    layer_name: str
    _grad_model: Any
    _head: Any
    mirrored: bool = False

    @classmethod
    def build(cls, model: Any, entry: ModelEntry, labels: tuple[str, ...]) -> GradCam:
        import keras

        from model.layers import MirrorStack

        layer = target_layer(model)
        head = model.layers[-1]
        # A softmax Dense head is applied by hand without its activation: the logits are y^c.
        softmax_head = isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax
        outputs = [layer.output, head.input if softmax_head else model.output]
        grad_model = keras.Model(model.inputs, outputs)
        mirrored = any(isinstance(m, MirrorStack) for m in model.layers)
        return cls(entry, labels, layer.name, grad_model, head if softmax_head else None, mirrored)

    def cam(self, x: np.ndarray, class_index: int) -> np.ndarray:
        """The class's map for one preprocessed input ``x`` (H, W, C): the layer's resolution, in
        [0, 1] (all zeros when no position raises the class's score)."""
        import tensorflow as tf

        if not 0 <= class_index < len(self.labels):
            raise NotExplainable(f"class index {class_index} out of range")
        with tf.GradientTape() as tape:
            maps, features = self._grad_model(tf.constant(x[None], dtype=tf.float32), training=False)
            scores = features
            if self._head is not None:
                scores = tf.matmul(features, self._head.kernel) + self._head.bias
            score = scores[:, class_index]
        grads = tape.gradient(score, maps)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        sums = tf.reduce_sum(maps * weights[:, None, None, :], axis=-1)
        # (the mirror image's half, when there is one, flipped back left to right)
        total = sums[0] + sums[1, :, ::-1] if self.mirrored else sums[0]
        cam = tf.nn.relu(total).numpy()
        peak = float(cam.max())
        return (cam / peak if peak > 0 else cam).astype(np.float32)

    def explain(self, data: bytes, label: str) -> np.ndarray:
        """The heatmap of ``label`` on the uploaded bytes, EXPLANATION_GRID cells a side over the
        whole upright image, values in [0, 1]. Raises NotExplainable for a label the model does
        not have; ImageRejected for bytes that do not decode."""
        try:
            class_index = self.labels.index(label)
        except ValueError:
            raise NotExplainable(f"{label!r} is not a class of {self.entry.key}") from None
        img = decode(data, self.entry)
        x = preprocessing.preprocess_image(img, self.entry)
        cam = self.cam(x, class_index)
        placement = preprocessing.sketch_placement(img) if self.entry.preprocessing == Preprocessing.sketch else None
        return onto_image(cam, self.entry, img.size, placement)


def _upsample(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(cam, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def decode(data: bytes, entry: ModelEntry) -> Image.Image:
    """The upload decoded as a worker decodes it for ``entry`` (``preprocessing.preprocess``): a
    photo's JPEG at a reduced scale near the model's input, a sketch in full (it is cropped to its
    strokes), so that the heatmap is of the input the answer came from. Raises ImageRejected."""
    draft = None if entry.preprocessing == Preprocessing.sketch else (entry.input.width, entry.input.height)
    return load_image(data, mode=entry.input.mode, draft_size=draft)


def onto_image(
    cam: np.ndarray,
    entry: ModelEntry,
    image_size: tuple[int, int],
    placement: SketchPlacement | None,
    grid: int = EXPLANATION_GRID,
) -> np.ndarray:
    """A map over the model's input as a ``grid`` x ``grid`` map over the image it came from.

    Photos: the whole image was resized to the input, so the map stretches over it. Sketches: only
    the strokes' bounding box was scaled into the input (``placement``); the map is read back
    inside that box and is zero outside it (the model never saw those pixels).
    """
    in_w, in_h = entry.input.width, entry.input.height
    dense = _upsample(cam, in_w, in_h)
    if entry.preprocessing != Preprocessing.sketch:
        return np.clip(_upsample(dense, grid, grid), 0.0, 1.0)
    out = np.zeros((grid, grid), dtype=np.float32)
    if placement is None:
        return out
    width, height = image_size
    # Centre of each grid cell in image pixels, then in input pixels through the crop's scaling.
    ys = (np.arange(grid) + 0.5) * height / grid
    xs = (np.arange(grid) + 0.5) * width / grid
    (r0, r1), (c0, c1) = placement.rows, placement.cols
    my = placement.top + (ys - r0) * placement.new_h / (r1 - r0)
    mx = placement.left + (xs - c0) * placement.new_w / (c1 - c0)
    inside_y = (ys >= r0) & (ys < r1)
    inside_x = (xs >= c0) & (xs < c1)
    iy = np.clip(my.astype(int), 0, in_h - 1)
    ix = np.clip(mx.astype(int), 0, in_w - 1)
    out = dense[np.ix_(iy, ix)] * np.outer(inside_y, inside_x)
    peak = float(out.max())
    return (out / peak if peak > 0 else out).astype(np.float32)
