from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.fields import Skip, UserId
from api.app.core.responses import (
    ADMIN,
    AUTHED,
    BODY,
    CONFLICT,
    HEAD_TOO_LARGE,
    INVALID,
    LOGIN,
    NOT_FOUND,
    PLAIN_TEXT,
    TOO_MANY,
    Responses,
    error,
)
from api.app.deps import (
    AdminLoginUser,
    AdminUser,
    ClientAddressDep,
    CurrentUser,
    HasherDep,
    LoginUser,
    ReadSessionDep,
    RedisDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    ThrottleDep,
)
from api.app.users import service
from api.app.users.models import User
from api.app.users.schemas import (
    PasswordChange,
    UserCreate,
    UserPublic,
    UsersPublic,
    UserUpdate,
)
from contracts.streams import REDIS_ERRORS

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/users", tags=["users"])
classic = APIRouter(prefix="/user", tags=["users (classic)"])

LIST: Responses = {**ADMIN, **INVALID}
CREATE: Responses = {**BODY, **ADMIN, **CONFLICT}
READ: Responses = {**AUTHED, **NOT_FOUND, **INVALID}
DELETE: Responses = {**ADMIN, **NOT_FOUND, **CONFLICT, **INVALID}
PASSWORD: Responses = {
    **BODY,
    **LOGIN,
    **TOO_MANY,
    400: {
        **error(f"The current password is wrong, or the body cannot be parsed, or {HEAD_TOO_LARGE}"),
        "content": PLAIN_TEXT,
    },
}

Limit = Annotated[int, Query(ge=1, le=500)]


async def _existing_user(session: AsyncSession, user_id: int) -> User:
    user = await service.get_user(session=session, user_id=user_id)
    if user is None:
        raise HTTPException(status_code=404, detail="User not found")
    return user


@router.get("", response_model=UsersPublic, responses=LIST)
async def list_users(session: ReadSessionDep, _: AdminUser, skip: Skip = 0, limit: Limit = 100) -> UsersPublic:
    """List users (admin)."""
    users = await service.list_users(session=session, skip=skip, limit=limit)
    count = await service.count_users(session=session)
    return UsersPublic(data=[UserPublic.model_validate(u) for u in users], count=count)


@router.post("", response_model=UserPublic, status_code=201, responses=CREATE)
async def create_user(
    body: UserCreate, session: SessionDep, hasher: HasherDep, settings: SettingsDep, _: AdminLoginUser
) -> User:
    """Create a user (an admin's login token; 403 for an API key)."""
    service.check_password_policy(body.password, settings)
    return await service.create_user(
        session=session,
        hasher=hasher,
        email=body.email,
        password=body.password,
        name=body.name,
        role=body.role,
    )


@router.get("/me", response_model=UserPublic, responses=AUTHED)
async def read_me(user: CurrentUser) -> User:
    """The signed-in user."""
    return user


@router.patch("/me/password", status_code=204, responses=PASSWORD)
async def change_password(
    body: PasswordChange,
    user: LoginUser,
    session: SessionDep,
    hasher: HasherDep,
    throttle: ThrottleDep,
    client: ClientAddressDep,
    settings: SettingsDep,
) -> Response:
    """Change my password (needs the current one and a login token, not an API key; throttled as logins are)."""
    await service.change_password(
        session=session,
        hasher=hasher,
        throttle=throttle,
        client=client,
        settings=settings,
        user=user,
        current=body.current_password,
        new=body.new_password,
    )
    return Response(status_code=204)


@router.get("/{user_id:int}", response_model=UserPublic, responses=READ)
async def read_user(user_id: UserId, user: CurrentUser, session: ReadSessionDep) -> User:
    """A user (self, or any for admins)."""
    if user.id != user_id and not user.is_admin:
        raise HTTPException(status_code=404, detail="User not found")
    return await _existing_user(session, user_id)


@router.patch("/{user_id:int}", response_model=UserPublic, responses={**BODY, **ADMIN, **NOT_FOUND, **CONFLICT})
async def update_user(user_id: UserId, body: UserUpdate, session: SessionDep, admin: AdminLoginUser) -> User:
    """Change a user's name, role or active flag (an admin's login token, 403 for an API key;
    never oneself's or the last admin's rights)."""
    target = await _existing_user(session, user_id)
    return await service.update_user(session=session, actor=admin, user=target, changes=body)


@router.delete("/{user_id:int}", status_code=204, responses=DELETE)
async def delete_user(
    user_id: UserId, session: SessionDep, store: StoreDep, redis: RedisDep, admin: AdminLoginUser
) -> Response:
    """Delete a user, everything they own, their files no one else uploaded and their cached
    answers and explanations (an admin's login token; 403 for an API key)."""
    target = await _existing_user(session, user_id)
    await service.delete_user(session=session, store=store, actor=admin, user=target)
    try:
        await service.forget_cached_data(redis=redis, user_id=user_id)
    except REDIS_ERRORS as exc:
        # The account is gone, as answered; the keys left expire by their TTLs.
        log.warning("user %d deleted; their cached answers stay until they expire: %r", user_id, exc)
    return Response(status_code=204)


@classic.get("/", response_model=list[UserPublic], responses=LIST)
async def classic_list_users(session: ReadSessionDep, _: AdminUser, skip: Skip = 0, limit: Limit = 100) -> list[User]:
    """List users (admin)."""
    return await service.list_users(session=session, skip=skip, limit=limit)


classic.add_api_route(
    "/",
    create_user,
    methods=["POST"],
    response_model=UserPublic,
    status_code=201,
    responses=CREATE,
    summary="Create a user (admin).",
)
classic.add_api_route(
    "/{user_id:int}",
    read_user,
    methods=["GET"],
    response_model=UserPublic,
    responses=READ,
    summary="A user (self, or any for admins).",
)
classic.add_api_route(
    "/{user_id:int}",
    delete_user,
    methods=["DELETE"],
    status_code=204,
    responses=DELETE,
    summary="Delete a user (admin).",
)
