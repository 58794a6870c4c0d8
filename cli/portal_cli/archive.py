"""A directory of images as one zip, written to a temporary file so that no collection has to
fit in memory."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"})
"""File name endings the portal accepts (``contracts.imaging.UPLOAD_EXTENSIONS``; this package is
installed without the portal's code, and a test keeps the two equal)."""


ENTRY_TIME = (1980, 1, 1, 0, 0, 0)
"""The time of every entry: the earliest a zip can hold (the files' own times would make a touched
file, or one dated before 1980, another zip or none)."""
ENTRY_MODE = 0o100644
"""A regular file, readable by all, for every entry."""
COPY_CHUNK = 1 << 20
"""Bytes copied at a time from an image into the zip."""


@dataclass
class Collected:
    """The files of a directory that go into a batch, and what was left out."""

    images: list[Path]
    """Image files by extension, sorted by their path inside the directory."""
    left_out: int
    """Other files (not counting hidden ones)."""


def collect(folder: Path) -> Collected:
    """The image files under ``folder`` (recursively; hidden files and folders skipped, as
    ``.DS_Store`` or ``.git`` are never photos). Only regular files are sent: symbolic links
    (which may point anywhere, or loop) and pipes or devices (which may never end) are left out."""
    images: list[Path] = []
    left_out = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                left_out += 1
                continue
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and "." in name:
                images.append(Path(root, name))
            else:
                left_out += 1
    return Collected(images=images, left_out=left_out)


def zip_images(folder: Path, images: list[Path], on_added: Callable[[int], None] | None = None) -> Path:
    """Writes ``images`` (files under ``folder``) into a new temporary zip, named by their path
    relative to ``folder`` with ``/`` separators (the name the results show); returns its path,
    which the caller deletes. ``on_added`` is told how many files are in so far.

    Entries are stored, not deflated: photos are compressed already, and deflating them again
    would cost CPU for nothing. Every entry has the same time and mode (``ENTRY_TIME``,
    ``ENTRY_MODE``), so the same images zip to the same bytes whatever their files' times: a batch
    sent again after an interruption is the same request to the portal. Raises OSError when a
    file cannot be read or the disk is full."""
    fd, name = tempfile.mkstemp(prefix="portal-batch-", suffix=".zip")
    os.close(fd)
    path = Path(name)
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for n, image in enumerate(images, start=1):
                info = zipfile.ZipInfo(image.relative_to(folder).as_posix(), date_time=ENTRY_TIME)
                info.external_attr = ENTRY_MODE << 16
                info.file_size = image.stat().st_size
                with image.open("rb") as src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, COPY_CHUNK)
                if on_added:
                    on_added(n)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
