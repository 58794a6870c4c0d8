"""A cancelled export leaves no file, even when the process that was writing it died first and
will never come back to delete what it had half written."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
from fastapi import FastAPI

from api.app.core.config import Settings
from api.app.exports import service
from tests.api.test_exports import running_elsewhere


async def test_cancelling_an_export_whose_process_died_deletes_its_half_written_zip(
    client: httpx.AsyncClient, app: FastAPI, admin_headers: dict[str, str], settings: Settings
) -> None:
    # Its process was killed a moment ago: the lease has not run out, so nothing has taken it over.
    export_id = uuid.uuid4()
    half = settings.storage_dir / service.archive_name(export_id, 1, part=True)
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"PK half a zip")
    await running_elsewhere(app, lease=timedelta(seconds=20), export_id=export_id)

    r = await client.post(f"/v1/admin/exports/{export_id}/cancel", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # A cancelled export is never taken up again, so no runner would ever delete it later.
    assert service.leftovers(settings.storage_dir, export_id) == []
    again = await client.post(f"/v1/admin/exports/{export_id}/cancel", headers=admin_headers)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
