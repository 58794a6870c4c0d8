"""A directory of images as one zip, written to a temporary file so that no collection has to
fit in memory."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock, and an open file cannot be deleted there anyway
    fcntl = None  # type: ignore[assignment]

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
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
"""How an image is opened for the zip: not through a symbolic link, and without waiting for a
writer should a named pipe have taken its place since it was listed (``zip_images``)."""


def readable(path: str | os.PathLike[str]) -> str:
    """``path`` as text that UTF-8 can always encode, for a name sent to the portal or printed.

    A file name that is not valid UTF-8 reaches Python with its odd bytes as lone surrogates
    (PEP 383), which no UTF-8 encoder takes; each of them is shown as U+FFFD instead. Valid names
    come back unchanged, and the same name always gives the same text."""
    return os.fsencode(path).decode("utf-8", "replace")


@dataclass(frozen=True)
class Unreadable:
    """A folder or file of a batch's directory that could not be read, left out of the batch."""

    path: Path
    reason: str
    """Why, in words: the system's (``Permission denied``), or that it is gone since it was listed."""
    folder: bool = False
    """A folder that could not be listed: whatever it holds is left out."""


def _unreadable(path: Path, exc: OSError, *, folder: bool = False) -> Unreadable:
    """``path`` left out for ``exc``, with the reason in words."""
    if exc.errno == errno.ENOENT:
        reason = "gone since it was listed"
    elif exc.errno == errno.ELOOP:
        reason = "a symbolic link since it was listed"
    else:
        reason = exc.strerror or str(exc)
    return Unreadable(path, reason, folder)


@dataclass
class Collected:
    """The files of a directory that go into a batch, and what was left out."""

    images: list[Path]
    """Image files by extension, sorted by their path inside the directory."""
    left_out: int
    """Other regular files (not counting hidden ones)."""
    not_regular: int = 0
    """Symbolic links, pipes and devices: never sent, whatever their name."""
    unreadable: list[Unreadable] = field(default_factory=list)
    """Folders that could not be listed and files that could not be looked at (no permission,
    gone since their folder was listed), in the order met."""


def _image_name(name: str) -> bool:
    """Whether a file name ends in an image extension (a batch's only filter on content)."""
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def collect(folder: Path) -> Collected:
    """The image files under ``folder`` (recursively; hidden files and folders skipped, as
    ``.DS_Store`` or ``.git`` are never photos). Only regular files are sent: symbolic links
    (which may point anywhere, or loop) and pipes or devices (which may never end) are left out.
    A folder that cannot be listed or a file that cannot be looked at (no permission, or gone
    since its folder was listed) is left out too, and named in ``unreadable``: never dropped
    without a word, and never the end of the others."""
    found = Collected(images=[], left_out=0)

    def not_listed(exc: OSError) -> None:
        found.unreadable.append(_unreadable(Path(exc.filename), exc, folder=True))

    for root, dirs, files in os.walk(folder, onerror=not_listed, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # A link to a folder is listed among the folders (never followed): left out, and counted.
        linked = [d for d in dirs if Path(root, d).is_symlink()]
        found.not_regular += len(linked)
        dirs[:] = [d for d in dirs if d not in linked]
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError as exc:
                found.unreadable.append(_unreadable(path, exc))
                continue
            if not stat.S_ISREG(mode):
                found.not_regular += 1
            elif _image_name(name):
                found.images.append(path)
            else:
                found.left_out += 1
    return found


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

ZIP_PREFIX = "portal-batch-"
_ZIP_NAME = re.compile(ZIP_PREFIX + r"[0-9]+-[0-9a-f]{32}\.zip")
"""``portal-batch-<pid>-<random hex>.zip``: a name only ``temporary_zip`` gives (the zips of
earlier versions, which held no lock, have no pid in theirs and are never swept)."""


def _lock(fd: int, path: Path) -> bool:
    """Holds an exclusive lock on the open file ``fd`` until it is closed; True when ``path``
    still names that file (a sweep, ``remove_stale_zips``, may have deleted it between its making
    and the lock)."""
    assert fcntl is not None
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


@contextmanager
def temporary_zip() -> Iterator[Path]:
    """A new empty temporary file for a batch's zip, deleted when the block ends, however it
    ends, or else by ``remove_temporary_zips`` as the command exits: a run stopped (Ctrl-C, a
    kill, a closed terminal) between the file's making and the block's start would otherwise leave
    a file that may be gigabytes. The file stays locked (flock) while this process lives, so that
    when it is killed outright (SIGKILL, a crash, the machine's) the next run's
    ``remove_stale_zips`` knows it as a leftover, and never takes a living run's zip for one."""
    path, fd = _new_locked_file()
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: never a moment unlocked
        if fd >= 0:
            os.close(fd)
        _temporary.discard(path)


def _new_locked_file() -> tuple[Path, int]:
    """A new empty file in the temporary folder, listed in ``_temporary`` from before it exists,
    and its descriptor, holding its lock (``_lock``; -1 where there is no flock)."""
    while True:
        path = Path(tempfile.gettempdir()) / f"{ZIP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.zip"
        _temporary.add(path)  # before the file exists: no moment where it exists unlisted
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        if fcntl is None:  # Windows: no flock, nothing swept; an open file could not be deleted
            os.close(fd)
            return path, -1
        try:
            if _lock(fd, path):
                return path, fd
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(fd)
            _temporary.discard(path)
            raise
        # Swept away between its making and the lock: another name.
        os.close(fd)
        _temporary.discard(path)


def remove_stale_zips(folder: Path | None = None) -> int:
    """Deletes the temporary zips (``temporary_zip``) in ``folder`` (default: the temporary folder)
    whose run is gone however it ended (a SIGKILL, a crash, a power cut), which no ``finally`` of
    theirs could delete: those nobody holds the lock of. A living run's zip is locked and left
    alone, as are other users' (which cannot be opened). How many were deleted."""
    if fcntl is None:
        return 0
    removed = 0
    for path in (folder or Path(tempfile.gettempdir())).glob(f"{ZIP_PREFIX}*.zip"):
        if not _ZIP_NAME.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, another user's, or a link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Held: nobody else holds it, and while this lock is held no run can take it up.
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                path.unlink()
                removed += 1
        except OSError:
            pass  # locked by a living run (BlockingIOError), or gone meanwhile
        finally:
            os.close(fd)
    return removed


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


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """``path`` open for reading and its size in bytes; OSError when it cannot be opened (no
    permission, gone) or is no longer a regular file (a link or a folder in its place: ELOOP,
    EISDIR; a pipe or device: ENODEV)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.ENODEV, "no longer a regular file", str(path))
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def zip_images(
    target: Path, folder: Path, images: list[Path], on_added: Callable[[int], None] | None = None
) -> list[Unreadable]:
    """Writes ``images`` (files under ``folder``) into the zip ``target``, named by their path
    relative to ``folder`` with ``/`` separators (the name the results show; bytes of a name that
    are not UTF-8 become U+FFFD, see ``readable``, and a name that two files then share gets ``~2``,
    ``~3``, ... before its extension). ``on_added`` is told how many of ``images`` are done so far.

    An image that cannot be opened (no permission, gone since it was listed, no longer a regular
    file: a folder still being written to) is left out, not the end of the others: the ones left
    out are returned, in order. Entries are stored, not deflated: photos are compressed already,
    and deflating them again would cost CPU for nothing. Every entry has the same time and mode
    (``ENTRY_TIME``, ``ENTRY_MODE``), so the same images zip to the same bytes whatever their
    files' times: a batch sent again after an interruption is the same request to the portal.
    Raises OSError when an image opened fails while it is read, or the disk is full."""
    used: set[str] = set()
    left_out: list[Unreadable] = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for n, image in enumerate(images, start=1):
            try:
                src, size = _open_regular(image)
            except OSError as exc:
                left_out.append(_unreadable(image, exc))
            else:
                # Named once opened: an image left out takes no name another one would get.
                info = zipfile.ZipInfo(
                    _unique(readable(image.relative_to(folder).as_posix()), used), date_time=ENTRY_TIME
                )
                info.external_attr = ENTRY_MODE << 16
                info.file_size = size
                with src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, COPY_CHUNK)
            if on_added:
                on_added(n)
    return left_out
