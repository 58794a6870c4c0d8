"""Content-addressed blob store: one file per SHA-256, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from anyio import to_thread


class LocalBlobStore:
    """Blobs under a local directory; the one place that touches the API's disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def _put(self, sha256: str, data: bytes) -> None:
        path = self._path(sha256)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def _delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    async def put(self, sha256: str, data: bytes) -> None:
        await to_thread.run_sync(self._put, sha256, data)

    async def get(self, sha256: str) -> bytes:
        return await to_thread.run_sync(self._path(sha256).read_bytes)

    async def exists(self, sha256: str) -> bool:
        return await to_thread.run_sync(self._path(sha256).exists)

    async def delete(self, sha256: str) -> None:
        await to_thread.run_sync(self._delete, sha256)
