"""Content-addressed blob store: one file per SHA-256, written atomically, and beside it a small
preview of the images that are costly to decode."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from anyio import to_thread

from api.app.core.errors import BlobMissing

_PREVIEW = ".preview.jpg"
UNFINISHED_PREFIX = ".upload-"
"""The temporary file of a blob being written, renamed to the blob once complete."""
UNFINISHED_MIN_AGE_SECONDS = 3600.0
"""A temporary file this old belongs to a write that died: a write takes seconds at most."""
UNSETTLED_FOLDER = ".unsettled"
"""Beside the shards: one empty file per blob of a failed upload whose deletion could not be
decided then (``note_unsettled``)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")


class LocalBlobStore:
    """Blobs under a local directory; the one place that touches the API's disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str, suffix: str = "") -> Path:
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def _put(self, sha256: str, data: bytes, suffix: str = "") -> None:
        path = self._path(sha256, suffix)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=UNFINISHED_PREFIX)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def _delete(self, sha256: str) -> bool:
        removed = False
        for path in (self._path(sha256, _PREVIEW), self._path(sha256)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        return removed

    def _get_preview(self, sha256: str) -> bytes | None:
        try:
            return self._path(sha256, _PREVIEW).read_bytes()
        except FileNotFoundError:
            return None

    async def put(self, sha256: str, data: bytes, *, preview: bytes | None = None) -> None:
        """Stores the blob, and its preview when there is one (the preview first: a blob on disk
        without one is drawn from the original). Nothing is written that is there already."""
        await to_thread.run_sync(self._put_with_preview, sha256, data, preview)

    def _put_with_preview(self, sha256: str, data: bytes, preview: bytes | None) -> None:
        if preview is not None:
            self._put(sha256, preview, _PREVIEW)
        self._put(sha256, data)

    def open(self, sha256: str) -> BinaryIO:
        """The blob opened for reading, for code that already runs in a worker thread (it blocks);
        FileNotFoundError when it is gone."""
        return self._path(sha256).open("rb")

    def _read(self, sha256: str) -> bytes:
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise BlobMissing(exc.errno, exc.strerror, exc.filename) from None

    async def get(self, sha256: str) -> bytes:
        """The blob's bytes; ``BlobMissing`` when it is gone."""
        return await to_thread.run_sync(self._read, sha256)

    async def get_viewable(self, sha256: str) -> bytes:
        """The preview when the blob has one, else the blob itself: what to draw a picture from;
        ``BlobMissing`` when neither is there."""
        preview = await to_thread.run_sync(self._get_preview, sha256)
        return preview if preview is not None else await self.get(sha256)

    async def exists(self, sha256: str) -> bool:
        return await to_thread.run_sync(self._path(sha256).exists)

    async def delete(self, sha256: str) -> bool:
        """Deletes the blob and its preview; False when neither was there (deleted already, by
        another sweep or deletion that held the blob's lock before)."""
        return await to_thread.run_sync(self._delete, sha256)

    def _written_before(self, cutoff: float, unfinished_cutoff: float) -> tuple[list[str], list[Path]]:
        blobs: set[str] = set()
        unfinished: list[Path] = []
        if not self.root.is_dir():
            return [], []
        for folder in sorted(self.root.iterdir()):
            if folder.is_symlink() or not folder.is_dir() or not _SHARD.fullmatch(folder.name):
                continue
            with os.scandir(folder) as found:
                for entry in found:
                    # Only the regular files this store writes: anything else is not ours to delete.
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        written = entry.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
                    if entry.name.startswith(UNFINISHED_PREFIX):
                        if written < unfinished_cutoff:
                            unfinished.append(Path(entry.path))
                    elif written < cutoff:
                        name = entry.name.removesuffix(_PREVIEW)
                        if _SHA256.fullmatch(name) and name.startswith(folder.name):
                            blobs.add(name)
        return sorted(blobs), unfinished

    async def written_before(self, cutoff: float) -> tuple[list[str], list[Path]]:
        """What was written before ``cutoff`` (seconds since the epoch): the SHA-256 of each blob
        or preview, and the temporary files of writes that never finished (their process died),
        those only when older than ``UNFINISHED_MIN_AGE_SECONDS`` too (nothing protects a write in
        progress). Only regular files named as this store names them, in their own shard folder."""
        unfinished_cutoff = min(cutoff, time.time() - UNFINISHED_MIN_AGE_SECONDS)
        return await to_thread.run_sync(self._written_before, cutoff, unfinished_cutoff)

    async def remove(self, paths: list[Path]) -> None:
        """Removes ``paths`` (from ``written_before``) that are still there."""

        def remove_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        await to_thread.run_sync(remove_all)

    def _note_unsettled(self, sha256: str) -> None:
        folder = self.root / UNSETTLED_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        (folder / sha256).touch()

    async def note_unsettled(self, sha256: str) -> None:
        """Notes that the blob of an upload whose transaction failed may be referenced by no row,
        and that this could not be checked then (PostgreSQL unreachable): ``unsettled`` lists it
        until ``settle``. Raises OSError when the disk refuses."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        await to_thread.run_sync(self._note_unsettled, sha256)

    def _unsettled(self, cutoff: float) -> list[str]:
        folder = self.root / UNSETTLED_FOLDER
        if not folder.is_dir():
            return []
        found: list[str] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if _SHA256.fullmatch(entry.name) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        found.append(entry.name)
                except OSError:
                    continue
        return sorted(found)

    async def unsettled(self, cutoff: float) -> list[str]:
        """The SHA-256 of the blobs noted unsettled (``note_unsettled``) before ``cutoff`` (seconds
        since the epoch)."""
        return await to_thread.run_sync(self._unsettled, cutoff)

    async def settle(self, sha256s: list[str]) -> None:
        """Forgets the notes of ``sha256s`` (their blobs were deleted, or found referenced)."""

        def remove_all() -> None:
            for sha256 in sha256s:
                (self.root / UNSETTLED_FOLDER / sha256).unlink(missing_ok=True)

        await to_thread.run_sync(remove_all)
