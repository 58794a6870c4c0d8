"""Typed dependencies every route takes: settings, sessions, Redis, the current user."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings
from api.app.core.security import PasswordHasher, TokenError
from api.app.users import service as users_service
from api.app.users.models import User
from contracts.registry import Registry

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/v1/auth/login")

CREDENTIALS_ERROR = "Could not validate credentials"


# The getters are async although they do no I/O: FastAPI runs a plain-function dependency in its
# thread pool, a hand-off per request that cost measurable CPU under load.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.read_sessionmaker() as session:
        yield session


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


async def get_hasher(request: Request) -> PasswordHasher:
    return request.app.state.hasher


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]
"""For routes that only read: no transaction, so no BEGIN and ROLLBACK round trips."""
RedisDep = Annotated[Redis, Depends(get_redis)]
HasherDep = Annotated[PasswordHasher, Depends(get_hasher)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
TokenDep = Annotated[str, Depends(oauth2_scheme)]


def unauthorized(detail: str = CREDENTIALS_ERROR) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def get_current_user(request: Request, token: TokenDep) -> User:
    """The token's user, loaded outside any transaction together with the token's revocation (one
    round trip, and no connection held while a route reads an upload). The user comes detached: a
    route that changes it adds it to its own session."""
    try:
        claims = request.app.state.tokens.decode(token)
    except TokenError:
        raise unauthorized() from None
    async with request.app.state.read_sessionmaker() as session:
        user, revoked = await users_service.get_token_user(session=session, user_id=claims.user_id, jti=claims.jti)
    if revoked:
        raise unauthorized("Token has been revoked")
    if user is None or not user.is_active:
        raise unauthorized()
    request.state.token_claims = claims
    request.state.user_id = user.id
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_admin_user(user: CurrentUser) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Admins only")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]
