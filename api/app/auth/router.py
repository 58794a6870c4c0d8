from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from api.app.auth import service
from api.app.auth.schemas import Token
from api.app.core.config import Settings
from api.app.core.responses import BODY, BODY_TOO_LARGE, CONFLICT, FORBIDDEN, LOGIN, TOO_MANY, UNAUTHORIZED
from api.app.deps import ClientAddressDep, HasherDep, LoginUser, SessionDep, SettingsDep, ThrottleDep
from api.app.users import service as users_service
from api.app.users.models import User
from api.app.users.schemas import SignupIn, UserPublic

router = APIRouter(prefix="/v1/auth", tags=["auth"])
classic = APIRouter(tags=["auth (classic)"])

LoginForm = Annotated[OAuth2PasswordRequestForm, Depends()]
LOGIN_RESPONSES = {**BODY, **UNAUTHORIZED, **FORBIDDEN, **TOO_MANY}


@router.post("/login", response_model=Token, responses=LOGIN_RESPONSES)
async def login(
    response: Response,
    form: LoginForm,
    session: SessionDep,
    throttle: ThrottleDep,
    client: ClientAddressDep,
    hasher: HasherDep,
    settings: SettingsDep,
) -> Token:
    """Log in with email (as username) and password; returns a bearer token."""
    token = await service.login(
        session=session,
        throttle=throttle,
        hasher=hasher,
        settings=settings,
        email=form.username,
        password=form.password,
        client=client,
    )
    return _token_response(response, token, settings)


def _token_response(response: Response, token: str, settings: Settings) -> Token:
    # A token must not be kept by a browser's or a proxy's cache (RFC 6749, section 5.1).
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return Token(access_token=token, expires_in=settings.access_token_expire_minutes * 60)


classic.add_api_route(
    "/login",
    login,
    methods=["POST"],
    response_model=Token,
    responses=LOGIN_RESPONSES,
    summary="Log in with email (as username) and password; returns a bearer token.",
)


@router.post("/refresh", response_model=Token, responses={**LOGIN, **BODY_TOO_LARGE})
async def refresh(request: Request, response: Response, _user: LoginUser, settings: SettingsDep) -> Token:
    """A new token in the same login session, valid for ``expires_in`` seconds from now (the
    session expires after that long without a refresh); 401 when this one is expired or revoked,
    or its user is deactivated; 403 for an API key (a key never becomes a login token)."""
    return _token_response(response, service.refresh(settings=settings, claims=request.state.token_claims), settings)


@router.post("/logout", status_code=204, responses={**LOGIN, **BODY_TOO_LARGE})
async def logout(request: Request, _user: LoginUser, session: SessionDep, settings: SettingsDep) -> Response:
    """Revoke the login session of the token this request carries: that token and every token
    refreshed from the same login."""
    await service.revoke(session=session, settings=settings, claims=request.state.token_claims)
    return Response(status_code=204)


@router.post(
    "/signup",
    response_model=UserPublic,
    status_code=201,
    responses={**BODY, **FORBIDDEN, **CONFLICT, **TOO_MANY},
)
async def signup(
    body: SignupIn,
    session: SessionDep,
    hasher: HasherDep,
    settings: SettingsDep,
    throttle: ThrottleDep,
    client: ClientAddressDep,
) -> User:
    """Create my own account (only when ALLOW_SIGNUP=true, else 403); 409 when the email has an
    account, 429 with Retry-After beyond SIGNUP_MAX_PER_CLIENT sign-ups from one address within
    LOGIN_WINDOW_SECONDS, accepted or refused."""
    if not settings.allow_signup:
        raise HTTPException(status_code=403, detail="Self sign-up is disabled")
    await throttle.count_signup(client=client)
    users_service.check_password_policy(body.password, settings)
    return await users_service.create_user(
        session=session, hasher=hasher, email=body.email, password=body.password, name=body.name
    )
