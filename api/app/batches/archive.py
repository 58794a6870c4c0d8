"""Reading a batch's zip archives safely: the listing is checked before anything is extracted.

Refused outright (the whole batch, 4xx): an archive that is not a readable zip, one whose entries
would exceed the batch's limits (count, uncompressed size), an entry name that could escape a
folder when extracted (absolute, ``..``, a Windows drive such as ``C:``: the "zip slip" of
Snyk's 2018 report), and an entry compressed more than ``MAX_RATIO`` times (a zip bomb: David Fifield's
"A better zip bomb", 2019, overlaps entries to reach ratios in the millions; ordinary images
compress less than 10 times). Listed and skipped: directories' placeholders are ignored, nested
archives and encrypted entries are skipped with a reason; whether an entry is an image is decided
later, as for any upload.

Each entry is read with a cap (the upload limit plus one byte), so an entry that inflates past its
declared size cannot take more memory than one upload.
"""

from __future__ import annotations

import string
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

MAX_RATIO = 100
"""Largest uncompressed / compressed size of an entry above 1 MiB."""
NESTED = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")
"""File name endings of archives, which a batch does not open."""
IGNORED_FOLDERS = ("__MACOSX/",)
"""Folders of metadata some archivers add (resource forks), never images."""


class ArchiveRefused(Exception):
    """The archive cannot be taken at all; ``status`` and ``message`` are the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Member:
    """One file of an archive to read, or to list as skipped (``error``)."""

    name: str
    info: zipfile.ZipInfo | None
    error: str | None = None


def unsafe_name(name: str) -> bool:
    """Whether extracting ``name`` could write outside the target folder."""
    normal = name.replace("\\", "/")
    # A drive is a letter then ':' (C:, c:/x); '4:3/owl.jpg' or '1:30 pm.jpg' are plain names.
    if normal.startswith("/") or (normal[:1] in string.ascii_letters and normal[1:2] == ":"):
        return True
    return ".." in PurePosixPath(normal).parts


def members(
    archive: zipfile.ZipFile, *, label: str, max_entries: int, max_bytes: int, max_file_bytes: int
) -> list[Member]:
    """The files of ``archive`` (called ``label`` in messages), checked as the module says.

    Raises ArchiveRefused: 413 past ``max_entries`` files or ``max_bytes`` uncompressed, 422 for
    an unsafe name or a zip bomb."""
    listed: list[Member] = []
    total = 0
    for info in archive.infolist():
        name = info.filename
        if unsafe_name(name):
            raise ArchiveRefused(
                422, f"{label}: the entry name {name!r} points outside the archive; nothing was taken."
            )
        if info.is_dir() or name.startswith(IGNORED_FOLDERS):
            continue
        if info.file_size > 1024 * 1024 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ArchiveRefused(
                422,
                f"{label}: {name!r} would grow {info.file_size // max(info.compress_size, 1):,} times when"
                " unpacked, which no image does (a zip bomb?); nothing was taken.",
            )
        total += info.file_size
        if total > max_bytes:
            raise ArchiveRefused(
                413, f"{label}: the batch would be past its size limit once unpacked (MAX_BATCH_BYTES)."
            )
        if len(listed) >= max_entries:
            raise ArchiveRefused(413, f"{label}: the batch would hold more files than its limit (MAX_BATCH_IMAGES).")
        if name.lower().endswith(NESTED):
            listed.append(Member(name, None, "an archive inside the archive; nested archives are not opened"))
        elif info.flag_bits & 0x1:
            listed.append(Member(name, None, "encrypted; the batch cannot read it"))
        elif info.file_size > max_file_bytes:
            listed.append(Member(name, None, f"{info.file_size:,} bytes; at most {max_file_bytes:,} bytes per image"))
        else:
            listed.append(Member(name, info))
    return listed


def open_archive(file: IO[bytes], *, label: str) -> zipfile.ZipFile:
    """The zip in ``file``; ArchiveRefused (422) when it is not a readable zip."""
    try:
        return zipfile.ZipFile(file)
    except Exception as exc:  # untrusted bytes: whatever the reader trips on (a bad name's encoding...)
        raise ArchiveRefused(422, f"{label} is not a readable zip archive ({type(exc).__name__}: {exc}).") from None


def read_member(archive: zipfile.ZipFile, member: Member, *, max_file_bytes: int) -> tuple[bytes | None, str | None]:
    """The entry's bytes, or None with why it could not be read (corrupt, larger than declared)."""
    assert member.info is not None
    try:
        with archive.open(member.info) as fh:
            data = fh.read(max_file_bytes + 1)
    except Exception as exc:  # untrusted bytes: zlib, LZMA and bz2 each raise their own errors
        return None, f"cannot be unpacked ({type(exc).__name__}: {exc})"
    if len(data) > max_file_bytes:
        return None, f"larger than {max_file_bytes:,} bytes once unpacked"
    return data, None


def is_zip(head: bytes, name: str) -> bool:
    """Whether an uploaded file is a zip archive (its signature, or its name)."""
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or name.lower().endswith(".zip")
