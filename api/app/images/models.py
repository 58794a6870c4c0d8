from __future__ import annotations

import uuid
from typing import Literal

from sqlalchemy import BigInteger, Float, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, OwnedMixin, TimestampMixin, new_uuid

ImageSource = Literal["upload", "batch"]


class Image(OwnedMixin, Base):
    """One user's upload; the bytes live once per sha256 in the blob store."""

    __tablename__ = "images"
    # Keyset paging of a person's uploads, newest first.
    __table_args__ = (
        Index("ix_images_owner_created", "owner_id", text("created_at DESC"), text("id DESC")),
        # The same for one source alone (a person's uploads however many batch files they sent,
        # or their batch files however many uploads).
        Index("ix_images_owner_source_created", "owner_id", "source", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255), default="")
    source: Mapped[str] = mapped_column(String(8), default="upload", server_default="upload")
    """``upload``: uploaded on its own (a prediction, ``POST /v1/images``); ``batch``: a file of a batch."""
    ground_truth: Mapped[str | None] = mapped_column(String(200), default=None)
    """The uploader's own label for it, given with a prediction (one of the chosen models' labels)."""
    # Pixel statistics taken at upload (contracts.imaging.PixelStats) for the drift monitor;
    # None for uploads stored before they were taken.
    brightness: Mapped[float | None] = mapped_column(Float, default=None)
    contrast: Mapped[float | None] = mapped_column(Float, default=None)
    colourfulness: Mapped[float | None] = mapped_column(Float, default=None)

    @property
    def file_name(self) -> str:
        """The content-addressed name existing clients know the image by."""
        return f"{self.sha256}.{self.format.lower()}"


class BlobDeletion(TimestampMixin, Base):
    """A blob to delete once no upload references it, queued in the transaction that deleted its
    last upload (a user's deletion, an upload's). The file goes after that commits, under the
    blob's lock, and its row with it; a row still here later (the process stopped, the disk or the
    database failed meanwhile) is tried again by ``images.service.retry_blob_deletions``. The
    files of a deleted account are not left behind."""

    __tablename__ = "blob_deletions"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
