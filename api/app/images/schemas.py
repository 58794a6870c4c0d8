from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict


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
    created_at: datetime


class ImagesPublic(BaseModel):
    data: list[ImagePublic]
    count: int
