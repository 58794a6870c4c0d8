from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, Response, UploadFile

from api.app.core.responses import AUTHED, INVALID, NOT_FOUND, TOO_LARGE, UNSUPPORTED
from api.app.deps import CurrentUser, ReadSessionDep, SessionDep, SettingsDep
from api.app.images import service
from api.app.images.models import Image
from api.app.images.schemas import ImageDetail, ImageListItem, ImagePublic, ImagesPublic
from api.app.predictions import service as predictions_service

router = APIRouter(prefix="/v1/images", tags=["images"])

MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


async def owned_image(image_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> Image:
    """The image if it is the caller's; 404 otherwise, so that ids cannot be probed."""
    image = await service.get_owned_image(session=session, owner_id=user.id, image_id=image_id)
    if image is None:
        raise HTTPException(status_code=404, detail="Image not found")
    return image


OwnedImage = Annotated[Image, Depends(owned_image)]


@router.post(
    "",
    response_model=ImagePublic,
    status_code=201,
    responses={**AUTHED, **TOO_LARGE, **UNSUPPORTED, **INVALID},
)
async def upload_image(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG, GIF, BMP, WEBP or TIFF")],
) -> Image:
    """Upload an image."""
    data = await service.read_upload(file, settings)
    return await service.create_image(
        session=session,
        store=request.app.state.store,
        settings=settings,
        owner_id=user.id,
        data=data,
        filename=file.filename or "",
    )


@router.get("", response_model=ImagesPublic, responses=AUTHED)
async def list_images(
    request: Request,
    user: CurrentUser,
    session: ReadSessionDep,
    skip: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    thumbnails: Annotated[bool, Query(description="Add each image's thumbnail")] = False,
) -> ImagesPublic:
    """My uploads, newest first."""
    images, count = await service.list_images(session=session, owner_id=user.id, skip=skip, limit=limit)
    data = [ImageListItem.model_validate(i) for i in images]
    if thumbnails:
        for item, image in zip(data, images, strict=True):
            item.thumbnail = await service.thumbnail(store=request.app.state.store, image=image)
    return ImagesPublic(data=data, count=count)


@router.get("/{image_id}", response_model=ImageDetail, responses={**AUTHED, **NOT_FOUND})
async def read_image(image: OwnedImage, session: SessionDep) -> ImageDetail:
    """One of my uploads with its predictions."""
    jobs = await service.jobs_of_image(session=session, image_id=image.id)
    detail = ImageDetail.model_validate(image)
    detail.jobs = [predictions_service.job_public(j) for j in jobs]
    return detail


@router.get(
    "/{image_id}/file",
    responses={**AUTHED, **NOT_FOUND, 200: {"content": {"image/*": {}}, "description": "The bytes as uploaded"}},
    response_class=Response,
)
async def image_file(request: Request, image: OwnedImage) -> Response:
    """The uploaded file as it was sent."""
    data = await request.app.state.store.get(image.sha256)
    return Response(content=data, media_type=MEDIA_TYPES.get(image.format, "application/octet-stream"))


@router.get(
    "/{image_id}/view",
    responses={**AUTHED, **NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "PNG with predictions"}},
    response_class=Response,
)
async def image_view(request: Request, image: OwnedImage, session: SessionDep) -> Response:
    """The image as PNG with its latest predictions written under it."""
    jobs = await service.jobs_of_image(session=session, image_id=image.id)
    png = await service.render_view(store=request.app.state.store, image=image, jobs=jobs)
    return Response(content=png, media_type="image/png")


@router.delete("/{image_id}", status_code=204, responses={**AUTHED, **NOT_FOUND})
async def delete_image(request: Request, image: OwnedImage, session: SessionDep) -> Response:
    """Delete one of my uploads with its predictions and feedback."""
    await service.delete_image(session=session, store=request.app.state.store, image=image)
    return Response(status_code=204)
