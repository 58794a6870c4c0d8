"""The CLI's HTTP client (``portal_cli.client``) against servers that misbehave."""

from __future__ import annotations

import io

import pytest

from portal_cli.client import Portal, PortalError
from tests.support import cut_off_http_server


def test_a_results_download_cut_off_says_so_not_that_the_portal_is_unreachable() -> None:
    sink = io.BytesIO()
    with cut_off_http_server() as url, Portal(url, api_key="ipk_x") as portal, pytest.raises(PortalError) as raised:
        portal.download_results("b", sink)
    assert "cut its answer off before its end" in str(raised.value)
    assert "Cannot reach" not in str(raised.value)
