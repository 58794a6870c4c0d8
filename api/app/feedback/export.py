"""Users' verdicts as a labelled image set to train the next model version from.

The layout is what image-folder loaders read (Keras ``image_dataset_from_directory``, the sketch
trainer's ``--feedback``): ``<out>/<model>/<label>/<sha256>.<ext>``, plus ``<out>/feedback.csv``
with one row per exported verdict.

The latest verdict per image and model is chosen by PostgreSQL, a page of verdicts at a time by
key, so no export ever holds the whole history in memory or walks more than it writes; the files are read from the blob
store and written by a worker thread (``ExportWriter``), so an export never runs on the event loop.
Every way out (a folder, a zip answered at once, an export job) goes through ``write_export``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from anyio import to_thread
from sqlalchemy import ColumnElement, Select, bindparam, func, select, tuple_
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from api.app.examples.models import LabelledExample
from api.app.examples.service import DEFAULT_TEST_SHARE, split_of
from api.app.feedback.models import Feedback
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Job, Prediction
from contracts import spreadsheets

log = logging.getLogger("api.feedback")

FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
"""Where the first page starts: after every verdict."""

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
COMPRESSED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP"})
"""Formats whose bytes are compressed already: deflating them again costs CPU and saves nothing."""
BATCH_ROWS = 500
"""Images read from PostgreSQL and written per step (their examples, one per model judged):
what an export holds in memory at once."""
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Example:
    """One image with the label a user gave it for one model."""

    feedback_id: str
    """The verdict's id; empty for an uploader's own label (``ground_truth``)."""
    prediction_id: str
    model: str
    version: int | None
    """The version the verdict judged; None for an uploader's own label."""
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
            "" if self.version is None else self.version,
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


@dataclass(frozen=True)
class Selection:
    """Which verdicts an export takes: of one model (and version), given in a time window."""

    model: str | None = None
    version: int | None = None
    since: datetime | None = None
    """Only verdicts given after this (exclusive): an incremental export."""
    until: datetime | None = None
    """Only verdicts given up to this (inclusive); None: up to when the export starts."""


@dataclass(frozen=True)
class Counts:
    """What an export will hold, counted by PostgreSQL before it starts."""

    examples: int
    """Distinct images and models with a labelled verdict: the rows the export goes through."""
    superseded: int
    unlabelled: int


@dataclass(frozen=True)
class ExportProgress:
    """Where an export stands after a step."""

    rows_total: int
    rows_done: int
    """Examples gone through: written, or left out as missing."""
    bytes_written: int
    summary: ExportSummary


class ExportInterrupted(Exception):
    """The export was told to stop (cancelled, taken over, or the process is stopping)."""


def folder_name(label: str) -> str:
    """A label as one safe path component (labels come from model label files)."""
    name = label.replace("/", "_").replace("\\", "_").replace("\x00", "")
    return "_" + name if name in ("", ".", "..") or name.startswith(".") else name


def _conditions(
    selection: Selection, feedback: Any = Feedback, prediction: Any = Prediction
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [feedback.prediction_id.is_not(None)]
    if selection.model is not None:
        where.append(prediction.model_name == selection.model)
    if selection.version is not None:
        where.append(prediction.model_version == selection.version)
    if selection.since is not None:
        where.append(feedback.created_at > selection.since)
    if selection.until is not None:
        where.append(feedback.created_at <= selection.until)
    return where


SelectT = TypeVar("SelectT", bound=Select)


def _joined(query: SelectT) -> SelectT:
    """``query`` over the verdicts on predictions, joined to their prediction and image."""
    return (
        query.select_from(Feedback)
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
    )


async def count_verdicts(*, session: AsyncSession, selection: Selection) -> Counts:
    """How many images and models an export of ``selection`` goes through, and the verdicts it
    leaves out (superseded, unlabelled): one aggregate in PostgreSQL."""
    labelled = Feedback.correct_label.is_not(None)
    per_key = (
        _joined(
            select(
                func.count().filter(labelled).label("labelled"),
                func.count().filter(Feedback.correct_label.is_(None)).label("unlabelled"),
            )
        )
        .where(*_conditions(selection))
        .group_by(Image.sha256, Prediction.model_name)
        .subquery()
    )
    row = (
        await session.execute(
            select(
                func.count().filter(per_key.c.labelled > 0),
                func.coalesce(func.sum(per_key.c.labelled), 0),
                func.coalesce(func.sum(per_key.c.unlabelled), 0),
            )
        )
    ).one()
    examples, labelled_verdicts, unlabelled = (int(v) for v in row)
    return Counts(examples=examples, superseded=labelled_verdicts - examples, unlabelled=unlabelled)


@dataclass(frozen=True)
class Page:
    """One page of examples, and where the next one starts."""

    examples: list[Example]
    after: tuple[datetime, uuid.UUID] | None
    """The ``created_at`` and id of the page's last verdict; None: it was the last page."""


def _verdict_columns(image: type[Image]) -> Select[*tuple[Any, ...]]:
    """The columns of an example, from labelled verdicts joined to their prediction and image."""
    return (
        select(
            Feedback.id,
            Feedback.prediction_id,
            Prediction.model_name,
            Prediction.model_version,
            Feedback.correct_label,
            Prediction.label,
            Feedback.is_correct,
            image.sha256,
            image.format,
            Feedback.created_at,
            Feedback.comment,
        )
        .select_from(image)
        .join(Job, Job.image_id == image.id)
        .join(Prediction, Prediction.job_id == Job.id)
        .join(Feedback, Feedback.prediction_id == Prediction.id)
    )


def _split_of(latest: Any) -> Any:
    """The split of the examples of ``latest``'s content and model (all of them have the same)."""
    return (
        select(LabelledExample.split)
        .where(LabelledExample.sha256 == latest.c.sha256, LabelledExample.model_name == latest.c.model_name)
        .limit(1)
        .scalar_subquery()
        .label("split")
    )


@functools.lru_cache(maxsize=32)
def _page_query(selection: Selection, examples: int) -> Select[*tuple[Any, ...]]:
    """The query of one page: the next ``examples`` labelled verdicts of the selection, newest
    first from ``(after_at, after_id)`` (the feedback's ``(created_at DESC, id DESC)`` index), that
    are the latest labelled verdict of the selection on their image's content and model (no later
    one exists: a few index lookups per verdict). The walk covers the selection's verdicts only,
    so an export costs what it writes, whatever the history of images and verdicts around it.
    Built once per export: building it costs more than running it."""
    image = aliased(Image)
    later_feedback, later_prediction = aliased(Feedback), aliased(Prediction)
    later_job, later_image = aliased(Job), aliased(Image)
    newer = (
        select(1)
        .select_from(later_image)
        .join(later_job, later_job.image_id == later_image.id)
        .join(later_prediction, later_prediction.job_id == later_job.id)
        .join(later_feedback, later_feedback.prediction_id == later_prediction.id)
        .where(
            later_image.sha256 == image.sha256,
            later_prediction.model_name == Prediction.model_name,
            later_feedback.correct_label.is_not(None),
            *_conditions(selection, later_feedback, later_prediction),
            tuple_(later_feedback.created_at, later_feedback.id) > tuple_(Feedback.created_at, Feedback.id),
        )
        .exists()
    )
    latest = (
        _verdict_columns(image)
        .where(
            Feedback.correct_label.is_not(None),
            *_conditions(selection),
            tuple_(Feedback.created_at, Feedback.id) < tuple_(bindparam("after_at"), bindparam("after_id")),
            ~newer,
        )
        .order_by(Feedback.created_at.desc(), Feedback.id.desc())
        .limit(examples)
        .subquery("latest")
    )
    return select(latest, _split_of(latest)).order_by(latest.c.created_at.desc(), latest.c.id.desc())


def _example(r: Any) -> Example:
    # Every labelled verdict has its example (written with it, or backfilled at start-up); the
    # hash with the default share stands in for one written between the two reads.
    return Example(
        feedback_id=str(r.id),
        prediction_id=str(r.prediction_id),
        model=r.model_name,
        version=r.model_version,
        label=r.correct_label,
        predicted=r.label,
        is_correct=r.is_correct,
        sha256=r.sha256,
        format=r.format,
        created_at=r.created_at,
        split=r.split or split_of(r.sha256, DEFAULT_TEST_SHARE),
        comment=r.comment or "",
    )


def _page(rows: Sequence[Any], examples: int) -> Page:
    """The rows of a page as examples (in a worker thread: a few milliseconds of CPU a page)."""
    last = rows[-1]
    return Page([_example(r) for r in rows], (last.created_at, last.id) if len(rows) >= examples else None)


async def latest_examples(
    *,
    session: AsyncSession,
    selection: Selection,
    after: tuple[datetime, uuid.UUID] | None = None,
    examples: int = BATCH_ROWS,
) -> Page:
    """The next ``examples`` examples after the verdict ``after`` (its ``created_at`` and id;
    None: from the newest), newest verdict first: for each image and model, its latest verdict
    with a label (by ``created_at``, then id), chosen by PostgreSQL (see ``_page_query``)."""
    at, key = after if after is not None else (FAR_FUTURE, uuid.UUID(int=0))
    rows = (await session.execute(_page_query(selection, examples), {"after_at": at, "after_id": key})).all()
    return await to_thread.run_sync(_page, rows, examples) if rows else Page([], None)


def _examples(rows: Sequence[Any]) -> list[Example]:
    return [_example(r) for r in rows]


async def all_latest_examples(*, session: AsyncSession, selection: Selection) -> list[Example]:
    """Every example of ``selection`` at once (``DISTINCT ON`` image and model over the
    selection), in (sha256, model) order: for a selection known to hold a page or less, one query
    rather than pages (an incremental export, a model with few verdicts)."""
    image = aliased(Image)
    latest = (
        _verdict_columns(image)
        .where(Feedback.correct_label.is_not(None), *_conditions(selection))
        .ext(distinct_on(image.sha256, Prediction.model_name))
        .order_by(image.sha256, Prediction.model_name, Feedback.created_at.desc(), Feedback.id.desc())
        .subquery("latest")
    )
    rows = await session.execute(select(latest, _split_of(latest)).order_by(latest.c.sha256, latest.c.model_name))
    return await to_thread.run_sync(_examples, rows.all())


class Sink(Protocol):
    """Where the files of an export go: a folder or a zip archive. Blocking: the worker thread's."""

    def open(self, name: str, *, compress: bool) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A new file ``name`` (a relative path) to write."""
        ...

    def size(self) -> int:
        """Bytes written so far."""
        ...

    def close(self) -> None: ...


class FolderSink:
    """Files under a folder, which must be new or empty: files of an earlier export whose verdicts
    have changed since would otherwise stay among the new ones."""

    def __init__(self, out: Path) -> None:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty; export into a new folder")
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.written = 0

    @contextlib.contextmanager
    def open(self, name: str, *, compress: bool) -> Iterator[IO[bytes]]:
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            yield fh
            self.written += fh.tell()

    def size(self) -> int:
        return self.written

    def close(self) -> None:
        pass


class ZipSink:
    """Files in a new zip archive at ``target``: a path, or a file open for writing and reading."""

    def __init__(self, target: Path | IO[bytes]) -> None:
        self.path = target if isinstance(target, Path) else None
        self.file = None if isinstance(target, Path) else target
        self.archive = zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED)

    def open(self, name: str, *, compress: bool) -> contextlib.AbstractContextManager[IO[bytes]]:
        info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        return self.archive.open(info, "w")

    def size(self) -> int:
        if self.file is not None:
            self.file.flush()
            return os.fstat(self.file.fileno()).st_size
        assert self.path is not None
        return self.path.stat().st_size

    def close(self) -> None:
        self.archive.close()


def _digest(sha256: str) -> bytes:
    """An image's sha256 as the 32 bytes it spells (as given when it is not hex)."""
    try:
        return bytes.fromhex(sha256)
    except ValueError:
        return sha256.encode()


class ExportWriter:
    """Writes examples, each image copied from the blob store in chunks, and at the end the
    manifest. Every method blocks: call them in a worker thread. ``close`` may come from another
    thread while a ``write`` runs (its task was cancelled, the thread goes on): it stops that
    write at its next chunk and waits for it, as the sink cannot be closed under an open file."""

    def __init__(self, sink: Sink, store: LocalBlobStore, stop: threading.Event | None = None) -> None:
        self.sink = sink
        self.store = store
        self.stop = stop or threading.Event()
        self._closing = threading.Event()
        self._busy = threading.RLock()  # held by write and finish (which closes), taken by close
        # The manifest's rows wait on disk, not in memory, until the images are written.
        self._rows = tempfile.TemporaryFile(mode="w+", encoding="utf-8", newline="")  # noqa: SIM115 (closed by close)
        self._csv = csv.writer(self._rows)
        self._csv.writerow(MANIFEST_COLUMNS)
        self.summary = ExportSummary()
        # The images written so far, per model (their sha256 as 32 bytes: about 10 MB for 100,000
        # images). Each page of a walk is read in a snapshot of its own: a verdict written from
        # one page can be deleted (or replaced, which moves it past the export's end) before the
        # next, and the verdict it had superseded on the same image and model is then the latest
        # there. The first one written (the newest) stands.
        self._written: dict[str, set[bytes]] = {}

    def write(self, examples: Sequence[Example]) -> None:
        """Writes each example whose file the store has; counts the others as missing; leaves
        out an image and model written already (by an earlier page). Blocking: called in a
        worker thread. Raises ExportInterrupted as soon as ``stop`` is set or ``close`` is called,
        between two chunks of a file."""
        with self._busy:
            self._write(examples)

    def _interrupted(self) -> bool:
        return self.stop.is_set() or self._closing.is_set()

    def _write(self, examples: Sequence[Example]) -> None:
        for example in examples:
            if self._interrupted():
                raise ExportInterrupted
            written, key = self._written.setdefault(example.model, set()), _digest(example.sha256)
            if key in written:  # counted as superseded before the walk began
                continue
            written.add(key)
            try:
                src = self.store.open(example.sha256)
            except FileNotFoundError:
                log.debug("feedback export: the file of image %s is missing; left out", example.sha256)
                self.summary.missing += 1
                continue
            with src, self.sink.open(example.path, compress=example.format not in COMPRESSED_FORMATS) as dst:
                while chunk := src.read(_COPY_CHUNK):
                    if self._interrupted():
                        raise ExportInterrupted
                    dst.write(chunk)
            self._csv.writerow(example.row())
            self.summary.examples += 1
            self.summary.by_model[example.model] = self.summary.by_model.get(example.model, 0) + 1
            # This runs in a worker thread (``to_thread``), never on the event loop: the zero sleep
            # hands the GIL over between files, which the loop would otherwise wait for up to the
            # interpreter's switch interval (5 ms) each time it wakes while this thread computes.
            time.sleep(0)

    def finish(self) -> None:
        """Writes the manifest and closes the sink."""
        with self._busy:
            self._rows.seek(0)
            with self.sink.open(MANIFEST, compress=True) as dst:
                while chunk := self._rows.read(_COPY_CHUNK):
                    dst.write(chunk.encode("utf-8"))
            self.close()

    def close(self) -> None:
        """Closes the sink and drops the manifest's rows (also after a failure), once a ``write``
        running in another thread has stopped."""
        self._closing.set()
        with self._busy:
            try:
                self.sink.close()
            finally:
                self._rows.close()


Reader = Callable[[], AbstractAsyncContextManager[AsyncSession]]
"""A session for one read: each page of an export is read in a session of its own, so no
connection is held while files are written."""
OnProgress = Callable[[ExportProgress], Awaitable[None]]


async def _step(writer: ExportWriter, examples: list[Example], counts: Counts, on_progress: OnProgress | None) -> None:
    if examples:
        await to_thread.run_sync(writer.write, examples)
    if on_progress is not None:
        try:
            size = await to_thread.run_sync(writer.sink.size)
        except FileNotFoundError:
            # Deleted under it: the export was cancelled or deleted meanwhile (its routes delete
            # the half-written file), which is no failure of the export's.
            raise ExportInterrupted from None
        done = writer.summary.examples + writer.summary.missing
        await on_progress(ExportProgress(max(counts.examples, done), done, size, writer.summary))


async def write_export(
    *,
    read: Reader,
    writer: ExportWriter,
    selection: Selection,
    batch_rows: int = BATCH_ROWS,
    on_progress: OnProgress | None = None,
) -> ExportSummary:
    """Writes every example of ``selection`` through ``writer``, ``batch_rows`` at a time (read by
    key in PostgreSQL, written in a worker thread), calling ``on_progress`` after each step, then
    the manifest. Leaves the sink closed, whatever happens."""
    try:
        async with read() as session:
            if selection.until is None:
                # A fixed end: the count and the pages see the same verdicts, whatever arrives meanwhile.
                selection = Selection(
                    model=selection.model,
                    version=selection.version,
                    since=selection.since,
                    until=await session.scalar(select(func.now())),
                )
            counts = await count_verdicts(session=session, selection=selection)
        summary = writer.summary
        summary.superseded, summary.unlabelled = counts.superseded, counts.unlabelled
        if counts.examples <= batch_rows:
            # A page at most (an incremental export, a model with few verdicts): one query rather
            # than a walk over every image.
            async with read() as session:
                examples = await all_latest_examples(session=session, selection=selection)
            await _step(writer, examples, counts, on_progress)
        else:
            after: tuple[datetime, uuid.UUID] | None = None
            while True:
                async with read() as session:
                    page = await latest_examples(session=session, selection=selection, after=after, examples=batch_rows)
                await _step(writer, page.examples, counts, on_progress)
                if page.after is None:
                    break
                after = page.after
        await to_thread.run_sync(writer.finish)
    finally:
        await to_thread.run_sync(writer.close)
    if summary.missing:
        log.warning("feedback export: %d images missing from the blob store were left out", summary.missing)
    return summary


@functools.lru_cache(maxsize=4)
def _labelled_page_query(examples: int) -> Select[*tuple[Any, ...]]:
    """The next ``examples`` contents of model ``model`` after the content ``after`` (by sha256),
    each with its latest label (``DISTINCT ON`` over the model's examples by content, newest
    first), and the verdict and prediction it came from when it came from one."""
    image_format = select(Image.format).where(Image.sha256 == LabelledExample.sha256).limit(1).scalar_subquery()
    return (
        select(
            LabelledExample.sha256,
            LabelledExample.label,
            LabelledExample.split,
            LabelledExample.updated_at,
            LabelledExample.feedback_id,
            image_format.label("format"),
            Prediction.id.label("prediction_id"),
            Prediction.model_version,
            Prediction.label.label("predicted"),
            Feedback.is_correct,
            Feedback.comment,
        )
        .select_from(LabelledExample)
        .outerjoin(Feedback, Feedback.id == LabelledExample.feedback_id)
        .outerjoin(Prediction, Prediction.id == Feedback.prediction_id)
        .where(LabelledExample.model_name == bindparam("model"), LabelledExample.sha256 > bindparam("after"))
        .ext(distinct_on(LabelledExample.sha256))
        .order_by(LabelledExample.sha256, LabelledExample.updated_at.desc(), LabelledExample.id.desc())
        .limit(examples)
    )


def _labelled_examples(rows: Sequence[Any], model: str) -> list[Example]:
    return [
        Example(
            feedback_id="" if r.feedback_id is None else str(r.feedback_id),
            prediction_id="" if r.prediction_id is None else str(r.prediction_id),
            model=model,
            version=r.model_version,
            label=r.label,
            predicted=r.predicted,
            is_correct=r.is_correct,
            sha256=r.sha256,
            format=r.format or "",
            created_at=r.updated_at,
            split=r.split,
            comment=r.comment or "",
        )
        for r in rows
    ]


async def export_examples(
    *, session: AsyncSession, store: LocalBlobStore, out: Path, model: str, batch_rows: int = BATCH_ROWS
) -> ExportSummary:
    """Writes the training data of ``model`` under ``out`` (new or empty; FileExistsError
    otherwise), laid out as ``export_feedback`` lays out verdicts: each labelled image content
    once, with its latest label (a verdict's or its uploader's own, from ``labelled_examples``),
    as ``out/<model>/<label>/<sha256>.<ext>``, and ``out/feedback.csv`` whose ``split`` column
    says ``train`` or ``test`` (``feedback_id`` empty for an uploader's label). Reads
    ``batch_rows`` contents at a time, by key, so memory stays bounded whatever the history."""
    sink = await to_thread.run_sync(FolderSink, out)
    writer = await to_thread.run_sync(ExportWriter, sink, store, None)
    try:
        after = ""
        while True:
            query = _labelled_page_query(batch_rows)
            rows = (await session.execute(query, {"model": model, "after": after})).all()
            if rows:
                await to_thread.run_sync(writer.write, _labelled_examples(rows, model))
            if len(rows) < batch_rows:
                break
            after = rows[-1].sha256
        await to_thread.run_sync(writer.finish)
    finally:
        await to_thread.run_sync(writer.close)
    if writer.summary.missing:
        log.warning("training data: %d images missing from the blob store were left out", writer.summary.missing)
    return writer.summary


def _borrowed(session: AsyncSession) -> Reader:
    return lambda: contextlib.nullcontext(session)


async def export_feedback(
    *,
    session: AsyncSession,
    store: LocalBlobStore,
    out: Path,
    model: str | None = None,
    version: int | None = None,
) -> ExportSummary:
    """Writes the labelled examples and their manifest under ``out`` (new or empty; FileExistsError
    otherwise)."""
    sink = await to_thread.run_sync(FolderSink, out)
    writer = await to_thread.run_sync(ExportWriter, sink, store, None)
    return await write_export(read=_borrowed(session), writer=writer, selection=Selection(model, version))


def _new_archive(directory: Path) -> IO[bytes]:
    # Unnamed (O_TMPFILE where the file system has it, else deleted at once): the kernel frees it
    # when the answer is sent or the process dies, so no half-sent download is ever left behind.
    directory.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile(dir=directory)


async def export_archive(
    *,
    session: AsyncSession,
    store: LocalBlobStore,
    directory: Path,
    model: str | None = None,
    version: int | None = None,
) -> tuple[IO[bytes], ExportSummary]:
    """The export as one zip in an unnamed temporary file in ``directory`` (on the storage
    volume: a zip can be as large as the images), read from its start; the caller closes it."""
    archive = await to_thread.run_sync(_new_archive, directory)
    try:
        writer = await to_thread.run_sync(ExportWriter, await to_thread.run_sync(ZipSink, archive), store, None)
        summary = await write_export(read=_borrowed(session), writer=writer, selection=Selection(model, version))
        await to_thread.run_sync(archive.seek, 0)
    except BaseException:
        await to_thread.run_sync(archive.close)
        raise
    return archive, summary
