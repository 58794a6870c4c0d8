"""A directory of images as one zip, written to a temporary file so that no collection has to
fit in memory."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "jpe", "jfif", "png", "gif", "bmp", "webp", "tif", "tiff"})
"""File name endings the portal accepts (``contracts.imaging.UPLOAD_EXTENSIONS``; this package is
installed without the portal's code, and a test keeps the two equal)."""


ENTRY_TIME = (1980, 1, 1, 0, 0, 0)
"""The time of every entry: the earliest a zip can hold (the files' own times would make a touched
file, or one dated before 1980, another zip or none)."""
ENTRY_MODE = 0o100644
"""A regular file, readable by all, for every entry."""
COPY_CHUNK = 1 << 20
"""Bytes copied at a time from an image into the zip."""


def readable(path: str | os.PathLike[str]) -> str:
    """``path`` as text that UTF-8 can always encode, for a name sent to the portal or printed.

    A file name that is not valid UTF-8 reaches Python with its odd bytes as lone surrogates
    (PEP 383), which no UTF-8 encoder takes; each of them is shown as U+FFFD instead. Valid names
    come back unchanged, and the same name always gives the same text."""
    return os.fsencode(path).decode("utf-8", "replace")


@dataclass
class Collected:
    """The files of a directory that go into a batch, and what was left out."""

    images: list[Path]
    """Image files by extension, sorted by their path inside the directory."""
    left_out: int
    """Other regular files (not counting hidden ones)."""
    not_regular: int = 0
    """Symbolic links, pipes and devices: never sent, whatever their name."""


def _image_name(name: str) -> bool:
    """Whether a file name ends in an image extension (a batch's only filter on content)."""
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def collect(folder: Path) -> Collected:
    """The image files under ``folder`` (recursively; hidden files and folders skipped, as
    ``.DS_Store`` or ``.git`` are never photos). Only regular files are sent: symbolic links
    (which may point anywhere, or loop) and pipes or devices (which may never end) are left out."""
    images: list[Path] = []
    left_out = not_regular = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # A link to a folder is listed among the folders (never followed): left out, and counted.
        linked = [d for d in dirs if Path(root, d).is_symlink()]
        not_regular += len(linked)
        dirs[:] = [d for d in dirs if d not in linked]
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                not_regular += 1
                continue
            if _image_name(name):
                images.append(Path(root, name))
            else:
                left_out += 1
    return Collected(images=images, left_out=left_out, not_regular=not_regular)


def would_collect(folder: Path, path: Path) -> bool:
    """Whether the file ``path`` resolves to is one ``collect(folder)`` takes: an existing regular
    file with an image extension inside ``folder``, under no hidden folder."""
    folder, target = folder.resolve(), path.resolve()
    if not target.is_relative_to(folder) or target == folder:
        return False
    parts = target.relative_to(folder).parts
    return target.is_file() and _image_name(parts[-1]) and not any(part.startswith(".") for part in parts)


_temporary: set[Path] = set()
"""Temporary zips not deleted yet, named here before they are made."""


@contextmanager
def temporary_zip() -> Iterator[Path]:
    """A new empty temporary file for a batch's zip, deleted when the block ends, however it
    ends, or else by ``remove_temporary_zips`` as the command exits: a run stopped (Ctrl-C, a
    kill, a closed terminal) between the file's making and the block's start would otherwise leave
    a file that may be gigabytes."""
    path = Path(tempfile.gettempdir()) / f"portal-batch-{uuid.uuid4().hex}.zip"
    _temporary.add(path)  # before the file exists: no moment where it exists unlisted
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        yield path
    finally:
        path.unlink(missing_ok=True)
        _temporary.discard(path)


def remove_temporary_zips() -> None:
    """Deletes the temporary zips a stopped run left (``temporary_zip``)."""
    for path in list(_temporary):
        path.unlink(missing_ok=True)
        _temporary.discard(path)


def _unique(name: str, used: set[str]) -> str:
    """``name``, or when ``used`` holds it already the first of ``stem~2.ext``, ``stem~3.ext``, ...
    that it does not; added to ``used``."""
    stem, dot, extension = name.rpartition(".")
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}~{n}{dot}{extension}" if dot else f"{name}~{n}"
    used.add(candidate)
    return candidate


def zip_images(target: Path, folder: Path, images: list[Path], on_added: Callable[[int], None] | None = None) -> None:
    """Writes ``images`` (files under ``folder``) into the zip ``target``, named by their path
    relative to ``folder`` with ``/`` separators (the name the results show; bytes of a name that
    are not UTF-8 become U+FFFD, see ``readable``, and a name that two files then share gets ``~2``,
    ``~3``, ... before its extension). ``on_added`` is told how many files are in so far.

    Entries are stored, not deflated: photos are compressed already, and deflating them again
    would cost CPU for nothing. Every entry has the same time and mode (``ENTRY_TIME``,
    ``ENTRY_MODE``), so the same images zip to the same bytes whatever their files' times: a batch
    sent again after an interruption is the same request to the portal. Raises OSError when a
    file cannot be read or the disk is full."""
    used: set[str] = set()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for n, image in enumerate(images, start=1):
            info = zipfile.ZipInfo(_unique(readable(image.relative_to(folder).as_posix()), used), date_time=ENTRY_TIME)
            info.external_attr = ENTRY_MODE << 16
            info.file_size = image.stat().st_size
            with image.open("rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
            if on_added:
                on_added(n)
