"""Personal access tokens for scripts. Managed with a login token only: a key cannot make, list or
revoke keys, so a leaked key cannot give itself a successor or more scopes. A key can read its own
row (``/current``), so that a script can check its scopes before it sends anything."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, Response

from api.app.api_keys import service
from api.app.api_keys.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeysPublic
from api.app.core.responses import BODY, INVALID, LOGIN, NOT_FOUND, Responses, error
from api.app.deps import CallerDep, LoginUser, PageDep, ReadSessionDep, SessionDep

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])

CREATE: Responses = {
    **BODY,
    **LOGIN,
    403: error("Sent with an API key, or the admin scope asked for by someone who is not an admin"),
}


@router.post("", response_model=ApiKeyCreated, status_code=201, responses=CREATE)
async def create_api_key(body: ApiKeyCreate, user: LoginUser, session: SessionDep, response: Response) -> ApiKeyCreated:
    """Make an API key; the answer is the only one that shows the key."""
    row, key = await service.create_api_key(
        session=session, owner=user, name=body.name, scopes=body.scopes, expires_in_days=body.expires_in_days
    )
    # A secret must not be kept by a browser's or a proxy's cache (as a token response, RFC 6749 5.1).
    response.headers["Cache-Control"] = "no-store"
    return ApiKeyCreated(**ApiKeyPublic.model_validate(row).model_dump(), key=key)


@router.get("", response_model=ApiKeysPublic, responses={**LOGIN, **INVALID})
async def list_api_keys(user: LoginUser, session: ReadSessionDep, page: PageDep) -> ApiKeysPublic:
    """My API keys, newest first, revoked and expired ones too (never the keys themselves), each
    with the scopes it acts with now (``admin`` only while I am an admin, and not for a key made
    before I was last made one); a key made before my account was last deactivated is listed as
    revoked then."""
    rows, count = await service.list_api_keys(session=session, owner_id=user.id, skip=page.skip, limit=page.limit)
    listed = []
    for row in rows:
        public = ApiKeyPublic.model_validate(row)
        public.scopes = service.scopes_in_force(row, user)
        # Listed as revoked when the account's deactivation voided it.
        public.revoked_at = public.revoked_at or service.voided_at(row, user)
        listed.append(public)
    return ApiKeysPublic(data=listed, count=count)


@router.get(
    "/current",
    response_model=ApiKeyPublic,
    responses={**LOGIN, 404: error("The request is not made with an API key")},
)
async def current_api_key(caller: CallerDep, session: ReadSessionDep) -> ApiKeyPublic:
    """The API key this request is made with, whatever its scopes, with the scopes it grants now
    (``admin`` acts only while its owner is an admin, and not for a key made before the owner was
    last made one). 404 for a request made with a login token."""
    key = None if caller.grant is None else await service.get_api_key(session=session, key_id=caller.grant.key_id)
    if caller.grant is None or key is None:
        raise HTTPException(status_code=404, detail="This request is not made with an API key")
    public = ApiKeyPublic.model_validate(key)
    public.scopes = service.scopes_in_force(key, caller.user)
    return public


@router.delete("/{key_id:uuid}", status_code=204, responses={**LOGIN, **NOT_FOUND, **INVALID})
async def revoke_api_key(key_id: uuid.UUID, user: LoginUser, session: SessionDep) -> Response:
    """Revoke one of my API keys: it is refused (401) from now on."""
    await service.revoke_api_key(session=session, owner_id=user.id, key_id=key_id)
    return Response(status_code=204)
