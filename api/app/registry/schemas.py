from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    version: int
    display_name: str
    channel: str
    enabled: bool
    weight: int
    spec: dict[str, Any]
    """How the version is loaded and fed (runtime, file, input, preprocessing, labels, ...)."""
    created_at: datetime
    updated_at: datetime


class RegistryPublic(BaseModel):
    revision: int
    """The id of the latest change: it grows with every change of the registry."""
    versions: list[ModelVersionPublic]


class RegistryChangePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    model: str
    version: int | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str


class RegistryChangesPublic(BaseModel):
    data: list[RegistryChangePublic]
    count: int
