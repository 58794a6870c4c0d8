from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

from api.app.core.fields import INT32_MAX, Name, RequestBody, Text, visible
from contracts.registry import MAX_VERSION, MAX_WEIGHT, InputSpec, Preprocessing, Runtime


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
    undoes: int | None = Field(
        default=None, description="For a rollback: the id of the promotion (or rollout) it undid"
    )


class RegistryChangesPublic(BaseModel):
    data: list[RegistryChangePublic]
    count: int


def _not_blank(value: str) -> str:
    if not visible(value):
        raise ValueError("say why: a reason is not blank")
    return value.strip()


Reason = Annotated[
    Name,
    Field(min_length=1, max_length=1000, description="Why, for the audit trail (one line, not blank)"),
    AfterValidator(_not_blank),
]


class VersionCreate(RequestBody):
    """A new version: how to load and feed it. Its files are ``{models_dir}/...`` or
    ``{trained_dir}/...`` templates, resolved on each worker."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", max_length=64)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION, description="None: one above the highest")
    channel: Literal["canary", "shadow"] = "canary"
    display_name: Text | None = Field(default=None, max_length=200)
    description: Text = Field(default="", max_length=1000)
    runtime: Runtime = Runtime.keras
    file: Text = Field(max_length=500)
    architecture: Text | None = Field(default=None, max_length=100)
    weights: Literal["imagenet", "file"] = "file"
    input: InputSpec
    preprocessing: Preprocessing
    labels: Text = Field(default="imagenet", max_length=500)
    top_k: int = Field(default=5, ge=1, le=100)
    reason: Reason


_VERSION_KEY = re.compile(r"\s*\+?[0-9]+\s*")


def _one_key_per_version(weights: Any) -> Any:
    """Refuses keys that are not a version number in digits (``"1.0"`` and ``"1_0"`` would
    otherwise be read as 1 and 10) and keys that name one version twice (``"1"`` and ``"01"``):
    the last would win unsaid."""
    if isinstance(weights, dict):
        keys = [key for key in weights if isinstance(key, str)]
        if any(not _VERSION_KEY.fullmatch(key) for key in keys):
            raise ValueError('each key is a version number in digits, such as "3"')
        parsed = [int(key) for key in keys]
        if len(set(parsed)) < len(parsed):
            raise ValueError("each version may be named once")
    return weights


class WeightsUpdate(RequestBody):
    weights: Annotated[
        dict[Annotated[int, Field(ge=1, le=INT32_MAX)], Annotated[StrictInt, Field(ge=0, le=MAX_WEIGHT)]],
        BeforeValidator(_one_key_per_version),
    ] = Field(min_length=1, max_length=100, description='Version to weight, e.g. {"1": 90, "2": 10}')
    reason: Reason
    force: StrictBool = False
    """Give traffic even to a version that knows fewer classes than the stable one (what was forced
    goes into the audit trail)."""


class VersionUpdate(RequestBody):
    channel: Literal["canary", "shadow", "retired"] | None = None
    enabled: StrictBool | None = None
    reason: Reason


class ChangeReason(RequestBody):
    reason: Reason


class RollbackBody(ChangeReason):
    from_version: StrictInt | None = Field(
        default=None,
        ge=1,
        le=INT32_MAX,
        description="The version the caller sees stable: if another one is stable now (a rollback or a promotion "
        "meanwhile, say the same click sent twice), the rollback is refused (409) instead of undoing an older "
        "promotion",
    )


class ModelVersionsPublic(BaseModel):
    name: str
    revision: int
    versions: list[ModelVersionPublic]
