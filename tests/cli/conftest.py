"""The CLI against the real portal (the ``portal`` fixture: API subprocess and model worker), each
test with its own user and its own config folder."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from portal_cli.config import config_path
from portal_cli.main import app

PASSWORD = "a-good-password"


@dataclass
class Account:
    url: str
    email: str
    password: str

    def headers(self) -> dict[str, str]:
        """A fresh login of this account, for checking what the CLI did through the API itself."""
        r = httpx.post(f"{self.url}/v1/auth/login", data={"username": self.email, "password": self.password})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config folder of this test's own; no portal settings from the environment."""
    folder = tmp_path / "portal-config"
    monkeypatch.setenv("PORTAL_CONFIG", str(folder / "config.json"))
    for name in ("PORTAL_URL", "PORTAL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def account(portal: tuple[str, str, str]) -> Account:
    """A new user of the test portal (so that its batches are only this test's)."""
    url, admin_email, admin_password = portal
    token = httpx.post(f"{url}/v1/auth/login", data={"username": admin_email, "password": admin_password}).json()
    email = f"cli-{uuid.uuid4().hex[:10]}@example.com"
    r = httpx.post(
        f"{url}/v1/users",
        json={"email": email, "password": PASSWORD},
        headers={"Authorization": f"Bearer {token['access_token']}"},
    )
    assert r.status_code == 201, r.text
    return Account(url=url, email=email, password=PASSWORD)


def run(*args: str, input: str | None = None) -> Result:
    """``portal ARGS`` in this process; stdout and stderr apart."""
    return CliRunner().invoke(app, list(args), input=input)


@pytest.fixture
def logged_in(account: Account, config_dir: Path) -> Iterator[Account]:
    """``account`` logged in through ``portal login``."""
    result = run("login", "--url", account.url, "--email", account.email, input=account.password + "\n")
    assert result.exit_code == 0, result.output
    yield account


def stored() -> dict[str, object]:
    """The config file's content."""
    body = json.loads(config_path().read_text())
    assert isinstance(body, dict)
    return body
