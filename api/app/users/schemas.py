from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StrictBool

from api.app.core.fields import Name, RequestBody, Text
from api.app.users.models import Role


class UserCreate(RequestBody):
    email: EmailStr
    password: Text
    name: Name = Field(default="", max_length=200)
    role: Role = Role.user


class SignupIn(RequestBody):
    email: EmailStr
    password: Text
    name: Name = Field(default="", max_length=200)


class UserUpdate(RequestBody):
    name: Name | None = Field(default=None, max_length=200)
    role: Role | None = None
    # Strict: "no" or 0 is not a yes-or-no (pydantic would read "no" as false).
    is_active: StrictBool | None = None


class PasswordChange(RequestBody):
    current_password: Text
    new_password: Text


class UserPublic(BaseModel):
    """A user as the API shows it: never the password hash."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    role: Role
    is_active: bool
    created_at: datetime


class UsersPublic(BaseModel):
    data: list[UserPublic]
    count: int
