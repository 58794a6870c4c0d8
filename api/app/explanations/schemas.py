from __future__ import annotations

import uuid

from pydantic import BaseModel, Field


class ExplanationPublic(BaseModel):
    """Which regions of the image drove a prediction's top-1 class (Grad-CAM)."""

    prediction_id: uuid.UUID
    model: str
    version: int
    explained_with: str = Field(description="name@version of the Keras model whose gradients were taken")
    label: str = Field(description="The class explained: the prediction's top-1 label")
    method: str = Field(description="grad-cam (Selvaraju et al. 2017, arXiv:1610.02391)")
    layer: str = Field(description="The convolutional layer whose activations were weighted")
    size: int = Field(description="Cells a side of the heatmap")
    heatmap: list[list[float]] = Field(
        description="size x size values in [0, 1] over the whole image, rows top to bottom: 1 is "
        "where the class's score rose most"
    )
    cached: bool = Field(description="Computed earlier for the same image and version")
