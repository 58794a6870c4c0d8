"""Reading a batch's zip archives safely: the listing is checked before anything is extracted.

Refused outright (the whole batch, 4xx): an archive that is not a readable zip, one whose entries
would exceed the batch's limits (count, uncompressed size), and an entry name that could escape a
folder when extracted (absolute, ``..``, a Windows drive such as ``C:``: the "zip slip" of Snyk's
2018 report). Listed and skipped with a reason: nested archives, encrypted entries, entries larger
than one image may be, and entries compressed other than by deflate (or stored); directories'
placeholders are ignored. Whether an entry is an image is decided later, as for any upload, but an
entry whose first bytes no supported format starts with is skipped without unpacking the rest.

A zip bomb (David Fifield's "A better zip bomb", 2019, overlaps entries to reach ratios in the
millions) is stopped by caps on the bytes unpacked, not by a compression ratio, which would refuse
flat images (a screenshot saved as BMP deflates several hundred times): each entry is read with a
cap of the size its header declares, at most the upload limit, so a header that understates cannot
unpack more; and the declared sizes of the entries read add up to at most the batch's limit,
checked before anything is unpacked. Only deflated and stored entries are unpacked, because
Python's bzip2 and LZMA readers take no output limit (one read of a few KiB of bzip2 can make
gigabytes).
"""

from __future__ import annotations

import string
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from contracts import imaging

NESTED = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")
"""File name endings of archives, which a batch does not open."""
IGNORED_FOLDERS = ("__MACOSX/",)
"""Folders of metadata some archivers add (resource forks), never images."""
UNPACKED = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
"""Compression methods whose entries are read: their readers unpack at most what is asked for."""
METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}
"""Names of the other methods Python's zipfile reads, for the reason an entry is skipped."""


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
    """Whether extracting ``name`` could write outside the target folder: an absolute path
    (``/x``, ``C:/x``, ``C:\\x``) or one with a ``..`` part, '/' and '\\' both separators."""
    normal = name.replace("\\", "/")
    # A drive is a letter, ':' and a separator (C:/x). Without the separator, 'D:holiday.jpg' is
    # a file name POSIX allows, as '4:3/owl.jpg' and '1:30 pm.jpg' are: entries are only read,
    # never extracted, and a user's ordinary file name must not cost the whole batch.
    if normal.startswith("/") or (normal[:1] in string.ascii_letters and normal[1:3] == ":/"):
        return True
    return ".." in PurePosixPath(normal).parts


def members(
    archive: zipfile.ZipFile, *, label: str, max_entries: int, batch_limit: int, max_bytes: int, max_file_bytes: int
) -> list[Member]:
    """The files of ``archive`` (called ``label`` in messages), checked as the module says; an
    entry declared larger than ``max_file_bytes`` is listed as skipped. ``max_entries``: the files
    the batch can still take, of its ``batch_limit`` (MAX_BATCH_IMAGES, named in the refusal).

    Raises ArchiveRefused: 413 past ``max_entries`` files or past ``max_bytes`` declared by the
    entries to read, 422 for an unsafe name."""
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
        if len(listed) >= max_entries:
            files = sum(1 for i in archive.infolist() if not i.is_dir() and not i.filename.startswith(IGNORED_FOLDERS))
            besides = batch_limit - max_entries
            raise ArchiveRefused(
                413,
                f"{label}: {files:,} files"
                + (f", and {besides:,} more in the rest of the batch" if besides else "")
                + f"; a batch takes at most {batch_limit:,} images (MAX_BATCH_IMAGES): send it as several batches.",
            )
        if name.lower().endswith(NESTED):
            listed.append(Member(name, None, "an archive inside the archive; nested archives are not opened"))
        elif info.flag_bits & 0x1:
            listed.append(Member(name, None, "encrypted; the batch cannot read it"))
        elif info.compress_type not in UNPACKED:
            method = METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
            listed.append(Member(name, None, f"compressed with {method}; only deflated or stored entries are unpacked"))
        elif info.file_size > max_file_bytes:
            listed.append(Member(name, None, f"{info.file_size:,} bytes; at most {max_file_bytes:,} bytes per image"))
        else:
            # Entries skipped above are never unpacked, so only these count against the batch's size.
            total += info.file_size
            if total > max_bytes:
                raise ArchiveRefused(
                    413, f"{label}: the batch would be past its size limit once unpacked (MAX_BATCH_BYTES)."
                )
            listed.append(Member(name, info))
    return listed


def open_archive(file: IO[bytes], *, label: str) -> zipfile.ZipFile:
    """The zip in ``file``; ArchiveRefused (422) when it is not a readable zip."""
    try:
        return zipfile.ZipFile(file)
    except Exception as exc:  # untrusted bytes: whatever the reader trips on (a bad name's encoding...)
        raise ArchiveRefused(422, f"{label} is not a readable zip archive ({type(exc).__name__}: {exc}).") from None


def read_member(archive: zipfile.ZipFile, member: Member, *, max_file_bytes: int) -> tuple[bytes | None, str | None]:
    """The entry's bytes, or None with why it was not read: corrupt, not starting as any supported
    image does (then only its first ``imaging.HEAD_BYTES`` bytes are taken; the zip reader inflates
    a few KiB at most), or larger once unpacked than its header declares or than ``max_file_bytes``
    (then unpacking stops one byte past it)."""
    assert member.info is not None
    cap = min(member.info.file_size, max_file_bytes)
    try:
        with archive.open(member.info) as fh:
            data = fh.read(min(imaging.HEAD_BYTES, cap + 1))
            # An empty entry goes on, to be refused as an empty upload is.
            if data and not imaging.may_be_image(data):
                return None, imaging.NOT_SUPPORTED
            data += fh.read(cap + 1 - len(data))
    except Exception as exc:  # untrusted bytes: zlib and the zip reader each raise their own errors
        return None, f"cannot be unpacked ({type(exc).__name__}: {exc})"
    if len(data) > cap:
        return None, f"larger once unpacked than its header declares or than {max_file_bytes:,} bytes"
    return data, None


def is_zip(head: bytes, name: str) -> bool:
    """Whether an uploaded file starting with ``head`` (its first ``imaging.HEAD_BYTES`` bytes) is
    a zip archive: its signature, or its name when its first bytes are no image's (a damaged zip is
    then refused as one, saying so, while a photo someone named ``holiday.zip`` is a photo)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return True
    return name.lower().endswith(".zip") and not imaging.may_be_image(head)
