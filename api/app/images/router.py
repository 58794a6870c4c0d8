from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Response, UploadFile

from api.app.core.responses import AUTHED, INVALID, NOT_FOUND, UPLOAD
from api.app.deps import (
    CurrentUser,
    KeysetPageDep,
    OneFilePart,
    OwnedImage,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from api.app.images import service
from api.app.images.models import Image, ImageSource
from api.app.images.schemas import ImageListItem, ImagePublic, ImagesPublic

router = APIRouter(prefix="/v1/images", tags=["images"])

MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


@router.post(
    "",
    response_model=ImagePublic,
    status_code=201,
    responses=UPLOAD,
    dependencies=[OneFilePart],
)
async def upload_image(
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG, GIF, BMP, WEBP or TIFF")],
) -> Image:
    """Upload an image."""
    filename = service.upload_filename(file)
    data = await service.read_upload(file, settings)
    return await service.create_image(
        session=session,
        store=store,
        settings=settings,
        owner_id=user.id,
        data=data,
        filename=filename,
    )


@router.get("", response_model=ImagesPublic, responses={**AUTHED, **INVALID})
async def list_images(
    user: CurrentUser,
    session: ReadSessionDep,
    store: StoreDep,
    settings: SettingsDep,
    page: KeysetPageDep,
    thumbnails: Annotated[bool, Query(description="Add each image's thumbnail")] = False,
    source: Annotated[
        ImageSource | None,
        Query(description="upload: only images uploaded on their own; batch: only files of batches; none: all"),
    ] = None,
) -> ImagesPublic:
    """My images, newest first; follow ``next_cursor`` for older ones (``total=true`` counts them).
    ``source=upload`` leaves out the files of my batches, which may be thousands."""
    images, count, next_cursor = await service.list_images(session=session, owner_id=user.id, page=page, source=source)
    data = [ImageListItem.model_validate(i) for i in images]
    if thumbnails:
        drawn = await service.thumbnails(session=session, store=store, settings=settings, images=images)
        for item, thumbnail in zip(data, drawn, strict=True):
            item.thumbnail = thumbnail
    return ImagesPublic(data=data, count=count, next_cursor=next_cursor)


@router.get(
    "/{image_id}/file",
    responses={
        **AUTHED,
        **NOT_FOUND,
        **INVALID,
        200: {"content": {"image/*": {}}, "description": "The bytes as uploaded"},
    },
    response_class=Response,
)
# HEAD too (``exports.router.download_export``); the server sends no body for it.
@router.head("/{image_id}/file", include_in_schema=False)
async def image_file(image: OwnedImage, store: StoreDep) -> Response:
    """The uploaded file as it was sent."""
    data = await store.get(image.sha256)
    return Response(content=data, media_type=MEDIA_TYPES.get(image.format, "application/octet-stream"))


@router.delete("/{image_id}", status_code=204, responses={**AUTHED, **NOT_FOUND, **INVALID})
async def delete_image(image: OwnedImage, session: SessionDep, store: StoreDep) -> Response:
    """Delete one of my uploads with its predictions and feedback."""
    await service.delete_image(session=session, store=store, image=image)
    return Response(status_code=204)
