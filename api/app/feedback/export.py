"""Users' verdicts as a labelled image set to train the next model version from.

The layout is what image-folder loaders read (Keras ``image_dataset_from_directory``, the sketch
trainer's ``--feedback``): ``<out>/<model>/<label>/<sha256>.<ext>``, plus ``<out>/feedback.csv``
with one row per exported verdict.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from anyio import to_thread
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.feedback.models import Feedback
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Job, Prediction

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
    where = [Feedback.prediction_id.is_not(None)]
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
    for feedback, model_name, model_version, predicted, sha256, image_format in rows.tuples():
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
        )
    return list(latest.values()), summary


def _claim(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)


def _write_image(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_manifest(out: Path, examples: list[Example]) -> None:
    with (out / MANIFEST).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(e.row() for e in examples)


async def export_feedback(
    *,
    session: AsyncSession,
    store: LocalBlobStore,
    out: Path,
    model: str | None = None,
    version: int | None = None,
) -> ExportSummary:
    """Writes the labelled examples under ``out``, which must be new or empty: files of an earlier
    export whose verdicts have changed since would otherwise stay among the new ones."""
    await to_thread.run_sync(_claim, out)
    examples, summary = await _labelled_examples(session=session, model=model, version=version)
    written: list[Example] = []
    for example in examples:
        try:
            data = await store.get(example.sha256)
        except FileNotFoundError:
            log.warning("feedback export: the file of image %s is missing; left out", example.sha256)
            continue
        await to_thread.run_sync(_write_image, out / example.path, data)
        written.append(example)
    await to_thread.run_sync(_write_manifest, out, written)
    summary.missing = len(examples) - len(written)
    summary.examples = len(written)
    for example in written:
        summary.by_model[example.model] = summary.by_model.get(example.model, 0) + 1
    return summary


def _zip(folder: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix="feedback-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return Path(name)


async def export_archive(
    *, session: AsyncSession, store: LocalBlobStore, model: str | None = None, version: int | None = None
) -> tuple[Path, ExportSummary]:
    """The export as one zip file (the caller deletes it), for a download."""
    work = Path(await to_thread.run_sync(tempfile.mkdtemp))
    try:
        summary = await export_feedback(session=session, store=store, out=work / "export", model=model, version=version)
        return await to_thread.run_sync(_zip, work / "export"), summary
    finally:
        await to_thread.run_sync(shutil.rmtree, work)
