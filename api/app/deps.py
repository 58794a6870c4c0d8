"""Typed dependencies every route takes: settings, sessions, Redis, shared objects, the current
user, validated path objects and paging. Routes take only these aliases, never ``request.app.state``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.types import Scope as StarletteScope

from api.app.api_keys import service as api_keys_service
from api.app.api_keys.service import KeyGrant
from api.app.auth import service as auth_service
from api.app.catalog.service import WorkerDirectory
from api.app.core.config import Settings
from api.app.core.errors import outage_of
from api.app.core.fields import Skip
from api.app.core.paging import Cursor, KeysetPage
from api.app.core.security import PasswordHasher, TokenError
from api.app.core.throttle import AttemptThrottle
from api.app.images import service as images_service
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.registry.live import LiveRegistry
from api.app.users.models import User
from contracts.api_keys import Scope
from contracts.registry import Registry

# Neither refuses a request by itself: a route needs one of the two, which get_caller decides.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/v1/auth/login", auto_error=False)
api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    scheme_name="APIKey",
    description="An API key (ipk_...) made under /v1/api-keys; 'Authorization: Bearer <key>' works too.",
    auto_error=False,
)
READ_METHODS = frozenset({"GET", "HEAD"})
"""What an API key's ``read`` scope allows; every other method of a user route needs ``predict``."""


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


async def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


async def get_blocking_redis(request: Request) -> Redis:
    return request.app.state.redis_blocking


async def get_hasher(request: Request) -> PasswordHasher:
    return request.app.state.hasher


async def get_live_registry(request: Request) -> LiveRegistry:
    return request.app.state.live_registry


async def get_registry(request: Request) -> Registry:
    """The registry as of the latest revision this process has read (one consistent revision)."""
    return request.app.state.live_registry.current


async def get_store(request: Request) -> LocalBlobStore:
    return request.app.state.store


async def get_workers(request: Request) -> WorkerDirectory:
    return request.app.state.workers


async def get_throttle(request: Request) -> AttemptThrottle:
    return request.app.state.throttle


async def get_client_address(request: Request) -> str:
    """The client's address as the server saw it (a trusted proxy's X-Forwarded-For applied)."""
    return request.client.host if request.client else "unknown"


async def get_drift_refresh_lock(request: Request) -> asyncio.Lock:
    """Held by this process's drift refresh on request: others wait here, not in PostgreSQL on a
    connection of the pool each."""
    return request.app.state.drift_refresh_lock


async def get_request_id(request: Request) -> str:
    """The request's id (set by the request-context middleware), else a fresh one."""
    return getattr(request.state, "request_id", "") or uuid.uuid4().hex


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]
"""For routes that only read: no transaction, so no BEGIN and ROLLBACK round trips."""
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
RedisDep = Annotated[Redis, Depends(get_redis)]
BlockingRedisDep = Annotated[Redis, Depends(get_blocking_redis)]
"""A client without a socket timeout, for commands that block while they wait (BLPOP)."""
HasherDep = Annotated[PasswordHasher, Depends(get_hasher)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
LiveRegistryDep = Annotated[LiveRegistry, Depends(get_live_registry)]
StoreDep = Annotated[LocalBlobStore, Depends(get_store)]
WorkersDep = Annotated[WorkerDirectory, Depends(get_workers)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
DriftRefreshLockDep = Annotated[asyncio.Lock, Depends(get_drift_refresh_lock)]
ThrottleDep = Annotated[AttemptThrottle, Depends(get_throttle)]
ClientAddressDep = Annotated[str, Depends(get_client_address)]
BearerDep = Annotated[str | None, Depends(oauth2_scheme)]
ApiKeyHeaderDep = Annotated[str | None, Depends(api_key_scheme)]


@dataclass(frozen=True)
class Caller:
    """Who makes a request, and with what: a login token (``grant`` is None: every right of the
    user) or an API key (``grant``: its scopes)."""

    user: User
    grant: KeyGrant | None


async def _token_user(request: Request, token: str) -> User:
    """The token's user, loaded outside any transaction together with the token's revocation (one
    round trip, and no connection held while a route reads an upload). The user comes detached: a
    route that changes it adds it to its own session."""
    try:
        claims = request.app.state.tokens.decode(token)
    except TokenError:
        raise auth_service.unauthorized() from None
    user, revoked = await auth_service.get_token_user(engine=request.app.state.engine, claims=claims)
    if revoked:
        raise auth_service.unauthorized("Token has been revoked")
    if user is None:
        raise auth_service.unauthorized()
    if not user.is_active:
        # The holder of a valid token is told why it stopped working, not that it expired.
        raise auth_service.unauthorized(auth_service.DEACTIVATED)
    if user.sessions_valid_after is not None and (claims.auth_time or claims.expires_at) < user.sessions_valid_after:
        raise auth_service.unauthorized("Signed out: the password was changed or the account deactivated since")
    request.state.token_claims = claims
    request.state.user_id = user.id
    return user


async def _key_caller(request: Request, key: str) -> Caller:
    """The key's owner and scopes. Failed keys are counted per client address as failed logins
    are (their own count), and past the limit every key from that address gets 429; a key that
    was found (revoked, expired, its owner deactivated) is not counted: it is no guess (only the
    real key finds its row), and a script still sending one after a rotation would otherwise lock
    every key of its host out."""
    throttle: AttemptThrottle = request.app.state.throttle
    async with throttle.client_attempt(action="api_key", client=await get_client_address(request)) as attempt:
        async with request.app.state.read_sessionmaker() as session:
            try:
                user, grant = await api_keys_service.authenticate(session=session, key=key)
            except api_keys_service.KeyRefused as exc:
                attempt.succeeded = exc.known
                raise
        attempt.succeeded = True
    if Scope.admin not in grant.scopes:
        user.admin_rights = False  # an admin's key without the admin scope acts as a user's
    request.state.user_id = user.id
    return Caller(user=user, grant=grant)


async def refused_key(scope: StarletteScope, key: str) -> tuple[int, str, dict[str, str]] | None:
    """For ``core.body_limits``, before a batch's body is read: why the API key ``key`` would be
    refused by a POST's ``get_current_user`` (status, detail, headers: 401 unknown, revoked or
    expired, 403 without the ``predict`` scope, 429 after too many failed keys from the client,
    each counted as the route counts it), or None when it would pass. None too when it cannot
    be told for another reason; 503 while PostgreSQL or Redis cannot be reached (the route could
    not tell either)."""
    request = Request(scope)
    try:
        caller = await _key_caller(request, key)
    except HTTPException as exc:
        return exc.status_code, str(exc.detail), dict(exc.headers or {})
    except Exception as exc:
        if (dependency := outage_of(exc)) is None:
            return None
        # The route could not tell either: 503 now, not after a body of up to 2 GiB.
        request.app.state.outage_log.report(dependency, exc)
        retry_after = str(request.app.state.settings.retry_after_seconds)
        detail = f"A service the portal needs ({DEPENDENCY_NAMES[dependency]}) is unavailable; retry shortly."
        return status.HTTP_503_SERVICE_UNAVAILABLE, detail, {"Retry-After": retry_after}
    if caller.grant is not None and Scope.predict not in caller.grant.scopes:
        return status.HTTP_403_FORBIDDEN, f"This API key lacks the {Scope.predict} scope", {}
    return None


DEPENDENCY_NAMES = {"redis": "Redis", "postgresql": "PostgreSQL"}


TOKEN_IN_KEY_HEADER = "X-API-Key takes an API key; send a login token as Authorization: Bearer <token>"


def _looks_like_a_token(value: str) -> bool:
    """Whether ``value`` has a JWT's shape (a base64url JSON header, three dot-separated parts;
    RFC 7519): a login token sent in the API key's header, no guess at a key."""
    return value.startswith("eyJ") and value.count(".") == 2


async def get_caller(request: Request, bearer: BearerDep, api_key: ApiKeyHeaderDep) -> Caller:
    """Who makes the request: ``Authorization: Bearer`` with a login token or an API key, or an
    API key in ``X-API-Key`` (when both headers are sent, Authorization counts). Keys are looked
    up only for credentials with the key prefix, so a login token costs what it did before keys
    existed. Raises 401 when neither is sent or the credential is refused, 429 after too many
    failed keys from the client's address (a login token sent as a key is 401 saying where it
    goes, and not counted)."""
    # Spaces around a credential are no part of it (RFC 9110, section 5.5: a field value's
    # surrounding whitespace is not), though some servers pass them on.
    bearer, api_key = (bearer or "").strip(), (api_key or "").strip()
    if bearer and not api_keys_service.is_key(bearer):
        return Caller(user=await _token_user(request, bearer), grant=None)
    key = bearer or api_key
    if not key:
        raise auth_service.unauthorized("Not authenticated")
    if not bearer and _looks_like_a_token(api_key):
        raise auth_service.unauthorized(TOKEN_IN_KEY_HEADER)
    return await _key_caller(request, key)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_current_user(request: Request, caller: CallerDep) -> User:
    """The signed-in user of a user route. A request made with an API key needs the key's
    ``read`` scope for GET and HEAD and its ``predict`` scope otherwise (403 without it)."""
    if caller.grant is not None:
        needed = Scope.read if request.method in READ_METHODS else Scope.predict
        if needed not in caller.grant.scopes:
            raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=f"This API key lacks the {needed} scope")
    return caller.user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_admin_user(caller: CallerDep) -> User:
    """The signed-in admin of an admin route: 403 for others, and for an API key without the
    ``admin`` scope (whatever the method)."""
    if caller.grant is not None and Scope.admin not in caller.grant.scopes:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="This API key lacks the admin scope")
    if not caller.user.is_admin:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Admins only")
    return caller.user


AdminUser = Annotated[User, Depends(get_admin_user)]


async def get_login_user(request: Request, bearer: BearerDep) -> User:
    """The user of a login token, for what an API key must never do: manage API keys, change the
    password, renew or end a login session (a key could otherwise make itself a key or a login
    token with more rights than its scopes). 403 for a request made with a key, 401 without a
    valid login token."""
    sent_as_key = (request.headers.get("x-api-key") or "").strip()
    if not bearer and _looks_like_a_token(sent_as_key):
        raise auth_service.unauthorized(TOKEN_IN_KEY_HEADER)
    if (bearer and api_keys_service.is_key(bearer)) or (not bearer and sent_as_key):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail="API keys cannot do this; log in with your password"
        )
    if not bearer:
        raise auth_service.unauthorized("Not authenticated")
    return await _token_user(request, bearer)


LoginUser = Annotated[User, Depends(get_login_user)]


async def get_admin_login_user(user: LoginUser) -> User:
    """The admin of a login token, for managing accounts (creating users, changing a role or the
    active flag, deleting): with an ``admin`` key, a leaked key could make an admin account with a
    password it chose, or promote one it holds, and so become a login token. 403 for a key or a
    non-admin, 401 without a valid login token."""
    if not user.is_admin:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Admins only")
    return user


AdminLoginUser = Annotated[User, Depends(get_admin_login_user)]


async def owned_image(image_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> Image:
    """The image if it is the caller's; 404 otherwise, so that ids cannot be probed."""
    image = await images_service.get_owned_image(session=session, owner_id=user.id, image_id=image_id)
    if image is None:
        raise HTTPException(status_code=404, detail="Image not found")
    return image


OwnedImage = Annotated[Image, Depends(owned_image)]


async def known_form_fields(request: Request, _user: CurrentUser) -> None:
    """422 when a form carries a field its route does not take (``ground_truth`` sent to ``POST
    /v1/images``, ``model`` for ``models`` to ``POST /v1/batches``): FastAPI would drop it without
    a word and answer as if the default had been asked for, where a JSON body's unknown key is 422.
    Reads the form FastAPI has already parsed (cached); after the login check, so a caller without
    one learns nothing of the form."""
    form = await request.form()
    route = request.scope.get("route")
    if isinstance(route, APIRoute):
        taken = {field.alias for field in route.dependant.body_params}
        # _charset_: what a browser's HTML form adds to name its encoding (HTML, 4.10.21.8).
        if unknown := sorted(name for name in set(form.keys()) - taken if name.lower() != "_charset_"):
            names = ", ".join(repr(name[:40]) for name in unknown[:5])
            raise HTTPException(
                status_code=422,
                detail=f"This route takes the form fields {', '.join(sorted(taken))}; not {names}.",
            )


KnownFormFields = Depends(known_form_fields)


async def one_file_part(request: Request, _user: CurrentUser) -> None:
    """422 when a single-image upload carries more than one ``file`` part (FastAPI would keep the
    last file and drop the rest without a word), or a form field its route does not take
    (``known_form_fields``). Reads the form FastAPI has already parsed (cached)."""
    form = await request.form()
    parts = len(form.getlist("file"))
    if parts > 1:
        raise HTTPException(
            status_code=422,
            detail=f"One image per upload: this request has {parts} 'file' parts. /v1/batches takes many.",
        )
    await known_form_fields(request, _user)


OneFilePart = Depends(one_file_part)


@dataclass(frozen=True)
class Page:
    """Offset paging of a list route: ``skip`` rows, then at most ``limit``."""

    skip: int
    limit: int


async def get_page(
    skip: Skip = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Page:
    return Page(skip=skip, limit=limit)


PageDep = Annotated[Page, Depends(get_page)]


CursorParam = Annotated[
    str | None, Query(max_length=200, description="the previous page's next_cursor: the page after it")
]
TotalParam = Annotated[bool, Query(description="also count every row (reads them all: ask once)")]


def keyset_page_of(*, cursor: str | None, skip: int, limit: int, total: bool) -> KeysetPage:
    """The page asked for; 422 for a cursor this API did not give or one used with ``skip``."""
    if cursor is not None and skip:
        raise HTTPException(status_code=422, detail="Use either cursor or skip, not both.")
    try:
        after = Cursor.decode(cursor) if cursor is not None else None
    except ValueError:
        raise HTTPException(status_code=422, detail="Invalid cursor: use a next_cursor this API returned.") from None
    return KeysetPage(limit=limit, after=after, skip=skip, total=total)


async def get_keyset_page(
    cursor: CursorParam = None,
    skip: Skip = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    total: TotalParam = False,
) -> KeysetPage:
    return keyset_page_of(cursor=cursor, skip=skip, limit=limit, total=total)


async def get_feedback_page(
    cursor: CursorParam = None,
    skip: Skip = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    total: TotalParam = False,
) -> KeysetPage:
    return keyset_page_of(cursor=cursor, skip=skip, limit=limit, total=total)


KeysetPageDep = Annotated[KeysetPage, Depends(get_keyset_page)]
"""Keyset paging (``cursor``, ``limit`` up to 200, default 50, ``total``; ``skip`` bounded)."""
FeedbackPageDep = Annotated[KeysetPage, Depends(get_feedback_page)]
"""The same for feedback lists: ``limit`` up to 500, default 100."""
