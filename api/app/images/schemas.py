from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from api.app.images.models import ImageSource


class ImagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    sha256: str
    format: str
    width: int
    height: int
    bytes: int
    filename: str
    file_name: str
    ground_truth: str | None = None
    """The uploader's own label, when one was given with a prediction."""
    source: ImageSource = "upload"
    """``upload``: uploaded on its own; ``batch``: a file of one of the person's batches."""
    created_at: datetime


class ImageListItem(ImagePublic):
    thumbnail: str | None = Field(
        default=None, description="Base64 JPEG, at most 280 px a side, when asked for with thumbnails=true."
    )


class ImagesPublic(BaseModel):
    data: list[ImageListItem]
    count: int | None = Field(default=None, description="All of them, when asked for with total=true.")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; None on the last.")
