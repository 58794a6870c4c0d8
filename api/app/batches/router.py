from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse

from api.app.batches import lane, service
from api.app.batches.models import Batch
from api.app.batches.schemas import (
    BatchDetail,
    BatchesPublic,
    BatchPublic,
    BatchResult,
    BatchResults,
    ResultStatus,
)
from api.app.catalog.service import requested_refs
from api.app.core.errors import outage_of
from api.app.core.responses import (
    AUTHED,
    BAD_REQUEST,
    INVALID,
    NOT_FOUND,
    RETRY_AFTER,
    TOO_LARGE,
    TOO_MANY,
    UNAVAILABLE,
    Responses,
    error,
)
from api.app.deps import (
    CurrentUser,
    CursorParam,
    KnownFormFields,
    PageDep,
    ReadSessionDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    WorkersDep,
)

router = APIRouter(prefix="/v1/batches", tags=["batches"])

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY = r"^[\x21-\x7e]{1,255}$"
"""What an ``Idempotency-Key`` may be: 1 to 255 visible ASCII characters (a UUID is the usual choice)."""
REPLAYED = "Idempotent-Replayed"
"""Set to ``true`` on the answer that returns the batch an earlier request with the same key made."""
IN_PROGRESS: Responses = {
    409: error(
        "A request with this Idempotency-Key is still being received; its batch is at Location",
        headers={**RETRY_AFTER, "Location": {"description": "The batch's URL", "schema": {"type": "string"}}},
    )
}
CREATE_RESPONSES = {
    **BAD_REQUEST,
    **AUTHED,
    **IN_PROGRESS,
    **TOO_LARGE,
    415: error("Not a form: send the batch as multipart/form-data"),
    **INVALID,
    **TOO_MANY,
    **UNAVAILABLE,
}


def _ids(text: str) -> list[uuid.UUID]:
    try:
        return [uuid.UUID(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise HTTPException(status_code=422, detail="image_ids must be image ids separated by commas.") from None


async def _owned(session: SessionDep | ReadSessionDep, user: CurrentUser, batch_id: uuid.UUID) -> Batch:
    batch = await service.get_owned_batch(session=session, owner_id=user.id, batch_id=batch_id)
    if batch is None:
        raise HTTPException(status_code=404, detail="Batch not found")
    return batch


@router.post(
    "", response_model=BatchDetail, status_code=202, responses=CREATE_RESPONSES, dependencies=[KnownFormFields]
)
async def create_batch(
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    workers: WorkersDep,
    registry: RegistryDep,
    settings: SettingsDep,
    file: Annotated[list[UploadFile], File(description="Images, or zip archives of images")] = [],  # noqa: B006
    models: Annotated[
        list[str], Form(description="Model references separated by commas (or repeated); none: the default")
    ] = [],  # noqa: B006
    models_in_query: Annotated[
        list[str] | None, Query(alias="models", description="The same, in the query, as /model/predict takes them")
    ] = None,
    image_ids: Annotated[
        list[str], Form(description="Ids of images already uploaded, separated by commas (or repeated)")
    ] = [],  # noqa: B006
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            pattern=IDEMPOTENCY_KEY,
            description="Any unique value (a UUID): the same request sent again with it returns the first "
            "one's batch instead of making a second",
        ),
    ] = None,
    *,
    request: Request,
    response: Response,
) -> BatchDetail:
    """Classify many images: ``file`` parts (images or zips of images; at most MAX_BATCH_BYTES in
    all) and/or ``image_ids``, each by the ``models``. 202 with the batch and its counts; follow
    it with ``GET /v1/batches/{id}``. Bad files are listed as skipped (see the results), the rest
    go on. 413: more than MAX_BATCH_IMAGES files or MAX_BATCH_BYTES (zip entries unpacked); 422:
    an unreadable zip, an entry name that leaves the archive, an empty batch, unknown models,
    ``models`` both in the form and in the query, a form field other than these three; 429: too
    many of your batch images waiting.

    With an ``Idempotency-Key`` header, a request sent again (after a lost answer) gets the batch
    the first one made, as it is now, with ``Idempotent-Replayed: true``; 409 while the first is
    still being received (its batch at ``Location``), 422 when the key came before with other files,
    image ids or models (that batch at ``Location``) or when two keys are sent. A batch cancelled
    before it was fully received, or whose process stopped while receiving it, releases its key."""
    if len(request.headers.getlist(IDEMPOTENCY_HEADER)) > 1:
        raise HTTPException(status_code=422, detail="Send one Idempotency-Key header, not several.")
    refs = requested_refs(form=models, query=models_in_query)
    batch, replayed = await service.create_batch(
        session=session,
        store=store,
        workers=workers,
        registry=registry,
        settings=settings,
        owner_id=user.id,
        files=file,
        image_ids=_ids(",".join(image_ids)),
        refs=refs,
        idempotency_key=idempotency_key,
    )
    if replayed:
        response.headers[REPLAYED] = "true"
    counts = await service.counts(session=session, batch=batch)
    return BatchDetail(**BatchPublic.model_validate(batch).model_dump(), counts=counts)


@router.get("", response_model=BatchesPublic, responses={**AUTHED, **INVALID})
async def list_batches(
    user: CurrentUser,
    session: ReadSessionDep,
    page: PageDep,
    idempotency_key: Annotated[
        str | None,
        Query(
            pattern=IDEMPOTENCY_KEY,
            description="Only the batch made by a request with this Idempotency-Key (none, or one): a client "
            "whose send was cut off learns whether it arrived without sending it again",
        ),
    ] = None,
) -> BatchesPublic:
    """My batches, newest first; with ``idempotency_key``, the one its request made, if any."""
    rows, count = await service.list_batches(
        session=session, owner_id=user.id, skip=page.skip, limit=page.limit, idempotency_key=idempotency_key
    )
    return BatchesPublic(data=[BatchPublic.model_validate(r) for r in rows], count=count)


@router.get("/{batch_id}", response_model=BatchDetail, responses={**AUTHED, **NOT_FOUND, **INVALID})
async def get_batch(
    batch_id: uuid.UUID, user: CurrentUser, session: ReadSessionDep, workers: WorkersDep, registry: RegistryDep
) -> BatchDetail:
    """A batch of mine with its counts (queued, running, done, failed, skipped), an ETA in seconds,
    and the model versions its queued images wait for because no live worker serves them now (a
    retired version is not waited for: its images expire)."""
    batch = await _owned(session, user, batch_id)
    counts = await service.counts(session=session, batch=batch)
    waiting_for: list[str] = []
    served_unknown = False
    if batch.status == "running" and counts.queued:
        try:
            availability = await workers.availability()
        except Exception as exc:
            if outage_of(exc) != "redis":
                raise
            # The batch is all in PostgreSQL; only which workers serve is out of reach.
            served_unknown = True
        else:
            waiting_for = service.waiting_for(models=batch.models, availability=availability, registry=registry)
    if waiting_for or served_unknown:
        # The last minute's pace says nothing of when a version will be served again.
        counts = counts.model_copy(update={"eta_seconds": None})
    return BatchDetail(**BatchPublic.model_validate(batch).model_dump(), counts=counts, waiting_for=waiting_for)


@router.get(
    "/{batch_id}/results",
    response_model=BatchResults,
    responses={
        **AUTHED,
        **NOT_FOUND,
        **INVALID,
        200: {"content": {"text/csv": {}}, "description": "A page of the results as JSON, or all of them as CSV"},
    },
)
async def batch_results(
    batch_id: uuid.UUID,
    user: CurrentUser,
    session: ReadSessionDep,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    cursor: CursorParam = None,
    limit: Annotated[
        int, Query(ge=1, le=service.MAX_RESULTS_PAGE_ROWS, description="rows of the page (JSON)")
    ] = service.RESULTS_PAGE_ROWS,
    status: Annotated[ResultStatus | None, Query(description="only the rows in this status")] = None,
) -> BatchResults | Response:
    """The batch's answers so far, one row per file and model version (one per file without
    answers: skipped, with why, or deleted since), in the batch's order: file name, sha256, model,
    version, status, label, score, top 5, error; with ``status``, only the rows in it. JSON: a
    page of ``limit`` rows (100 unless asked, at most 200) with ``count`` (rows on all pages) and
    ``next_cursor`` (None on the last page). ``format=csv``: every row in one CSV file (top 5 as
    JSON text), streamed (``cursor`` and ``limit`` are for JSON pages). 422: a bad ``limit``,
    ``status`` or cursor."""
    try:
        after = service.ResultKey.decode(cursor) if cursor is not None else None
    except ValueError:
        raise HTTPException(status_code=422, detail="Invalid cursor: use a next_cursor this API returned.") from None
    batch = await _owned(session, user, batch_id)
    if format == "csv":
        return StreamingResponse(
            await service.results_csv(session=session, batch=batch, status=status),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="batch-{batch.id}.csv"'},
        )
    if after is not None and after.batch_id != batch.id:
        raise HTTPException(status_code=422, detail="Invalid cursor: it pages another batch's results.")
    rows, count, next_cursor = await service.result_page(
        session=session, batch=batch, after=after, limit=limit, status=status
    )
    return BatchResults(
        batch_id=batch.id,
        status=batch.status,
        data=[BatchResult(**r) for r in rows],
        count=count,
        next_cursor=next_cursor,
    )


@router.delete("/{batch_id}", response_model=BatchDetail, responses={**AUTHED, **NOT_FOUND, **INVALID})
async def cancel_batch(batch_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> BatchDetail:
    """Cancels what of the batch has not been queued (what is already queued still gets its
    answer); the batch with its counts."""
    batch = await _owned(session, user, batch_id)
    if batch.status in ("running", "receiving"):
        await lane.cancel(session=session, batch=batch)
    counts = await service.counts(session=session, batch=batch)
    return BatchDetail(**BatchPublic.model_validate(batch).model_dump(), counts=counts)
