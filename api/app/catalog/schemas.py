from __future__ import annotations

from pydantic import BaseModel

from contracts.registry import InputSpec


class ModelPublic(BaseModel):
    name: str
    version: int
    ref: str
    display_name: str
    """What people are shown (the registry's ``display_name``, else ``ref``)."""
    channel: str
    description: str
    runtime: str
    precision: str
    input: InputSpec
    num_classes: int
    labels: list[str] | None
    available: bool
    reason: str | None
    workers: int
    random_weights: bool
    default: bool
    explainable: bool = False
    """Whether its answers can be explained (Grad-CAM): it, or the FP32 version it was quantized
    from, has a Keras graph with real weights (``Registry.keras_twin``). TFLite files have none."""


class ModelLabels(BaseModel):
    ref: str
    display_name: str | None = None
    """The name people read for it, as the registry gives it."""
    labels: list[str]
    """In the order of the model's outputs."""


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    default: str | None
