"""Content-addressed blob store: one file per SHA-256, written atomically, and beside it a small
preview of the images that are costly to decode."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from anyio import to_thread

_PREVIEW = ".preview.jpg"
UNFINISHED_PREFIX = ".upload-"
"""The temporary file of a blob being written, renamed to the blob once complete."""


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

    def _delete(self, sha256: str) -> None:
        self._path(sha256, _PREVIEW).unlink(missing_ok=True)
        self._path(sha256).unlink(missing_ok=True)

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

    async def get(self, sha256: str) -> bytes:
        return await to_thread.run_sync(self._path(sha256).read_bytes)

    async def get_viewable(self, sha256: str) -> bytes:
        """The preview when the blob has one, else the blob itself: what to draw a picture from."""
        preview = await to_thread.run_sync(self._get_preview, sha256)
        return preview if preview is not None else await self.get(sha256)

    async def exists(self, sha256: str) -> bool:
        return await to_thread.run_sync(self._path(sha256).exists)

    async def delete(self, sha256: str) -> None:
        await to_thread.run_sync(self._delete, sha256)

    def _written_before(self, cutoff: float) -> tuple[list[str], list[Path]]:
        blobs: set[str] = set()
        unfinished: list[Path] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []:
            for path in folder.iterdir():
                try:
                    if path.stat().st_mtime >= cutoff:
                        continue
                except FileNotFoundError:
                    continue
                if path.name.startswith(UNFINISHED_PREFIX):
                    unfinished.append(path)
                elif len(name := path.name.removesuffix(_PREVIEW)) == 64:
                    blobs.add(name)
        return sorted(blobs), unfinished

    async def written_before(self, cutoff: float) -> tuple[list[str], list[Path]]:
        """What was written before ``cutoff`` (seconds since the epoch): the SHA-256 of each blob
        or preview, and the temporary files of writes that never finished (their process died)."""
        return await to_thread.run_sync(self._written_before, cutoff)

    async def remove(self, paths: list[Path]) -> None:
        """Removes ``paths`` (from ``written_before``) that are still there."""

        def remove_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        await to_thread.run_sync(remove_all)
