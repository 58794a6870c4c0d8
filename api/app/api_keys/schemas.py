from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from api.app.core.fields import RequestBody, refuse_controls, refuse_unstorable, visible
from contracts.api_keys import MAX_EXPIRY_DAYS, Scope


def _trimmed(name: str) -> str:
    name = name.strip()
    if not visible(name):  # blanks, or zero-width characters only: listed as an empty name
        raise ValueError("a key's name needs a character that is not blank")
    return name


KeyName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100),
    AfterValidator(_trimmed),
    AfterValidator(refuse_unstorable),
    AfterValidator(refuse_controls),
]
"""A key's name: 1-100 characters as sent (the length its schema describes), stored with surrounding
blanks trimmed; a name of blanks or zero-width characters only, or with control, line-separator or
text-direction characters, is refused."""


class ApiKeyCreate(RequestBody):
    name: KeyName = Field(description="What the key is for, e.g. the script that uses it")
    scopes: list[Scope] = Field(
        min_length=1,
        max_length=3,
        description="read (GET requests), predict (every other method of the user routes), admin (admin routes; admins only)",
    )
    # Strict: JSON's true is not a number of days (pydantic would read it as 1).
    expires_in_days: int | None = Field(
        default=None, ge=1, le=MAX_EXPIRY_DAYS, strict=True, description="Days until the key stops working; null: never"
    )


class ApiKeyPublic(BaseModel):
    """A key as its owner sees it in lists: never the key itself, nor its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart")
    scopes: list[Scope]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(description="To the minute: updated at most once a minute")
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    """A new key, the only answer that carries it: the portal keeps only its hash."""

    key: str = Field(description="Send as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


class ApiKeysPublic(BaseModel):
    data: list[ApiKeyPublic]
    count: int
