"""Users' verdicts as a labelled image set to train the next model version from.

The layout is what image-folder loaders read (Keras ``image_dataset_from_directory``, the sketch
trainer's ``--feedback``): ``<out>/<model>/<label>/<sha256>.<ext>``, plus ``<out>/feedback.csv``
with one row per exported verdict.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from anyio import to_thread
from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.examples.models import LabelledExample
from api.app.examples.service import DEFAULT_TEST_SHARE, split_of
from api.app.feedback.models import Feedback
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Job, Prediction
from contracts import spreadsheets

log = logging.getLogger("api.feedback")

MANIFEST = "feedback.csv"
MANIFEST_COLUMNS = (
    "path",
    "model",
    "version",
    "label",
    "predicted",
    "is_correct",
    "feedback_id",
    "prediction_id",
    "sha256",
    "created_at",
    "split",
    "comment",
)
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tiff"}


@dataclass(frozen=True)
class Example:
    """One image with the label a user gave it for one model."""

    feedback_id: str
    prediction_id: str
    model: str
    version: int
    label: str
    predicted: str | None
    is_correct: bool | None
    sha256: str
    format: str
    created_at: datetime
    split: str = "train"
    """The image's split among the model's labelled examples: ``train`` or ``test``."""
    comment: str = ""
    """What the user wrote with the verdict."""

    @property
    def path(self) -> str:
        return f"{self.model}/{folder_name(self.label)}/{self.sha256}.{EXTENSIONS.get(self.format, 'img')}"

    def row(self) -> list[str | int]:
        """The manifest's columns, in MANIFEST_COLUMNS order."""
        correct = "" if self.is_correct is None else str(self.is_correct).lower()
        return [
            self.path,
            self.model,
            self.version,
            self.label,
            self.predicted or "",
            correct,
            self.feedback_id,
            self.prediction_id,
            self.sha256,
            self.created_at.isoformat(),
            self.split,
            spreadsheets.cell(self.comment),
        ]


@dataclass
class ExportSummary:
    examples: int = 0
    """Images written, one per image and model."""
    by_model: dict[str, int] = field(default_factory=dict)
    superseded: int = 0
    """Verdicts replaced by a later one on the same image and model."""
    unlabelled: int = 0
    """Verdicts that say a prediction was wrong without saying what is right."""
    missing: int = 0
    """Labelled images whose file is gone from the blob store (left out)."""


def folder_name(label: str) -> str:
    """A label as one safe path component (labels come from model label files)."""
    name = label.replace("/", "_").replace("\\", "_").replace("\x00", "")
    return "_" + name if name in ("", ".", "..") or name.startswith(".") else name


async def _labelled_examples(
    *, session: AsyncSession, model: str | None = None, version: int | None = None
) -> tuple[list[Example], ExportSummary]:
    """Every verdict with a label, the latest one winning for each image and model name, and a
    summary of the verdicts left out (``export_feedback`` adds what it wrote)."""
    where: list[ColumnElement[bool]] = [Feedback.prediction_id.is_not(None)]
    if model is not None:
        where.append(Prediction.model_name == model)
    if version is not None:
        where.append(Prediction.model_version == version)
    rows = await session.execute(
        select(Feedback, Prediction.model_name, Prediction.model_version, Prediction.label, Image.sha256, Image.format)
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
        .where(*where)
        .order_by(Feedback.created_at, Feedback.id)
    )
    summary = ExportSummary()
    latest: dict[tuple[str, str], Example] = {}
    for feedback, model_name, model_version, predicted, sha256, image_format in rows:
        if feedback.correct_label is None:
            summary.unlabelled += 1
            continue
        key = (sha256, model_name)
        if key in latest:
            summary.superseded += 1
        latest[key] = Example(
            feedback_id=str(feedback.id),
            prediction_id=str(feedback.prediction_id),
            model=model_name,
            version=model_version,
            label=feedback.correct_label,
            predicted=predicted,
            is_correct=feedback.is_correct,
            sha256=sha256,
            format=image_format,
            created_at=feedback.created_at,
            comment=feedback.comment or "",
        )
    splits = {
        (sha256, model_name): split
        for sha256, model_name, split in (
            await session.execute(
                select(LabelledExample.sha256, LabelledExample.model_name, LabelledExample.split).where(
                    *([LabelledExample.model_name == model] if model is not None else [])
                )
            )
        )
    }
    # Every labelled verdict has its example (written with it, or backfilled at start-up); the
    # hash with the default share stands in for one written between the two reads.
    return [
        dataclasses.replace(e, split=splits.get((e.sha256, e.model), split_of(e.sha256, DEFAULT_TEST_SHARE)))
        for e in latest.values()
    ], summary


Write = Callable[[str, bytes], None]
"""Stores one file of the export under its relative path: in a folder or in a zip archive."""


def _manifest(examples: list[Example]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(e.row() for e in examples)
    return buf.getvalue().encode("utf-8")


async def _export(
    *, session: AsyncSession, store: LocalBlobStore, write: Write, model: str | None, version: int | None
) -> ExportSummary:
    examples, summary = await _labelled_examples(session=session, model=model, version=version)
    written: list[Example] = []
    for example in examples:
        try:
            data = await store.get(example.sha256)
        except FileNotFoundError:
            log.warning("feedback export: the file of image %s is missing; left out", example.sha256)
            continue
        await to_thread.run_sync(write, example.path, data)
        written.append(example)
    await to_thread.run_sync(write, MANIFEST, _manifest(written))
    summary.missing = len(examples) - len(written)
    summary.examples = len(written)
    for example in written:
        summary.by_model[example.model] = summary.by_model.get(example.model, 0) + 1
    return summary


def _claim(out: Path) -> Write:
    """A writer into ``out``, which must be new or empty: files of an earlier export whose verdicts
    have changed since would otherwise stay among the new ones."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write


async def export_feedback(
    *,
    session: AsyncSession,
    store: LocalBlobStore,
    out: Path,
    model: str | None = None,
    version: int | None = None,
) -> ExportSummary:
    """Writes the labelled examples and their manifest under ``out`` (new or empty)."""
    write = await to_thread.run_sync(_claim, out)
    return await _export(session=session, store=store, write=write, model=model, version=version)


def _open_archive() -> zipfile.ZipFile:
    fd, name = tempfile.mkstemp(prefix="feedback-", suffix=".zip")
    os.close(fd)
    return zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED)


async def export_archive(
    *, session: AsyncSession, store: LocalBlobStore, model: str | None = None, version: int | None = None
) -> tuple[Path, ExportSummary]:
    """The export as one zip file, written straight from the blob store (the caller deletes it)."""
    archive = await to_thread.run_sync(_open_archive)
    path = Path(str(archive.filename))
    try:
        try:
            summary = await _export(session=session, store=store, write=archive.writestr, model=model, version=version)
        finally:
            await to_thread.run_sync(archive.close)
    except BaseException:
        await to_thread.run_sync(os.unlink, path)
        raise
    return path, summary
