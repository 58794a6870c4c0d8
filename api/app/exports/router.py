from __future__ import annotations

import uuid
from pathlib import Path

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import FileResponse

from api.app.core.responses import ADMIN, BODY, BODY_TOO_LARGE, INVALID, NOT_FOUND, Responses, error
from api.app.deps import AdminUser, PageDep, ReadSessionDep, RegistryDep, SessionDep, SettingsDep
from api.app.exports import service
from api.app.exports.schemas import ExportPublic, ExportRequest, ExportsPublic

router = APIRouter(prefix="/v1/admin/exports", tags=["exports"])

NOT_READY: Responses = {409: error("The export is not done: queued, running, failed or cancelled")}
FINISHED: Responses = {409: error("The export is done or failed already: nothing to cancel")}
GONE: Responses = {410: error("The export's zip was deleted (after EXPORT_KEEP_DAYS, or by hand); start a new export")}
ZIP: Responses = {
    200: {"content": {"application/zip": {}}, "description": "A zip of <model>/<label>/<image> and feedback.csv"}
}


def _remove_files(storage_dir: Path, export_id: uuid.UUID) -> None:
    for path in service.leftovers(storage_dir, export_id):
        path.unlink(missing_ok=True)


@router.post(
    "", response_model=ExportPublic, status_code=status.HTTP_202_ACCEPTED, responses={**ADMIN, **NOT_FOUND, **BODY}
)
async def create_export(
    body: ExportRequest, admin: AdminUser, session: SessionDep, registry: RegistryDep
) -> ExportPublic:
    """Start an export of the images users labelled, written in the background (admin).

    202 with the export, ``queued``: an API process takes it up within a second or so; follow it
    with ``GET /v1/admin/exports/{id}`` and download it from ``download`` once ``done``. With
    ``since_last``, only verdicts given after the last finished export of the same model and
    version. 404: a model the registry does not know, or a version it does not have. 422:
    ``version`` without ``model``, or a value out of range."""
    export = await service.create_export(session=session, registry=registry, request=body, requested_by=admin.email)
    return ExportPublic.from_row(export)


@router.get("", response_model=ExportsPublic, responses={**ADMIN, **INVALID})
async def list_exports(_: AdminUser, session: ReadSessionDep, page: PageDep) -> ExportsPublic:
    """Every export, newest first, with its status and progress (admin)."""
    rows, count = await service.list_exports(session=session, skip=page.skip, limit=page.limit)
    return ExportsPublic(data=[ExportPublic.from_row(r) for r in rows], count=count)


@router.get("/{export_id}", response_model=ExportPublic, responses={**ADMIN, **NOT_FOUND, **INVALID})
async def get_export(export_id: uuid.UUID, _: AdminUser, session: ReadSessionDep) -> ExportPublic:
    """One export: status, rows_done of rows_total, bytes written so far, and the summary (admin)."""
    return ExportPublic.from_row(await service.get_export(session=session, export_id=export_id))


@router.get(
    "/{export_id}/download",
    response_class=FileResponse,
    responses={**ZIP, **ADMIN, **NOT_FOUND, **NOT_READY, **GONE, **INVALID},
)
# HEAD too: download managers and resumable clients ask for the size first. Its own route, out of
# the schema (``health.router``); FileResponse answers it with the headers only.
@router.head("/{export_id}/download", include_in_schema=False)
async def download_export(
    export_id: uuid.UUID, _: AdminUser, session: ReadSessionDep, settings: SettingsDep
) -> FileResponse:
    """The zip of a finished export (admin); 409 while it is not done, 410 when its file is gone."""
    export = await service.get_export(session=session, export_id=export_id)
    if export.status != "done":
        raise HTTPException(status_code=409, detail=f"The export is {export.status}; it can be downloaded once done")
    path = settings.storage_dir / export.path if export.path is not None else None
    if path is None or not await to_thread.run_sync(path.is_file):
        raise HTTPException(status_code=410, detail=export.error or "The export's zip is gone; start a new export")
    name = f"feedback-{export.model or 'all'}{f'-v{export.version}' if export.version else ''}"
    return FileResponse(
        path,
        media_type="application/zip",
        filename=f"{name}-{export.created_at:%Y%m%d-%H%M%S}.zip",
        headers={"X-Exported-Images": str((export.summary or {}).get("examples", 0))},
    )


@router.post(
    "/{export_id}/cancel",
    response_model=ExportPublic,
    responses={**ADMIN, **NOT_FOUND, **FINISHED, **INVALID, **BODY_TOO_LARGE},
)
async def cancel_export(export_id: uuid.UUID, _: AdminUser, session: SessionDep, settings: SettingsDep) -> ExportPublic:
    """Cancel a queued or running export; it stops within a few seconds and leaves no file (admin).
    409 for one that is done or failed."""
    export = await service.cancel_export(session=session, export_id=export_id)
    # What is on disk goes now, as when an export is deleted: a process that died writing it
    # would never come back for it, and a cancelled export is never taken up again. A live one
    # deletes what it writes after this itself, once it sees the export cancelled.
    await to_thread.run_sync(_remove_files, settings.storage_dir, export_id)
    return ExportPublic.from_row(export)


@router.delete("/{export_id}", status_code=status.HTTP_204_NO_CONTENT, responses={**ADMIN, **NOT_FOUND, **INVALID})
async def delete_export(export_id: uuid.UUID, _: AdminUser, session: SessionDep, settings: SettingsDep) -> Response:
    """Delete an export and its zip; a queued or running one is cancelled first (admin)."""
    await service.delete_export(session=session, export_id=export_id)
    await to_thread.run_sync(_remove_files, settings.storage_dir, export_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
