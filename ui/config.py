"""UI settings, read from the environment or ``.env``."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.imaging import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_UPLOAD_BYTES


class UISettings(BaseSettings):
    """Everything the Streamlit UI can be told."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", use_attribute_docstrings=True)

    api_url: str = "http://localhost:8000"
    """Base URL of the portal's API, as the UI server reaches it. Left unset, ``make run``
    (scripts/run.py) gives the UI the API it starts, from API_HOST and API_PORT."""
    ui_host: str = "127.0.0.1"
    """Interface the UI binds to (0.0.0.0 to be reachable from other machines, as in containers)."""
    ui_port: int = 9090
    """Port the UI listens on."""
    ui_trusted_proxies: str = ""
    """Comma-separated addresses of the reverse proxies (nginx in compose) whose X-Forwarded-For
    the UI believes: the browser's address it then sends on to the API, so that people behind one
    proxy are not one client to the login throttle. Empty: no proxy is trusted."""
    api_timeout_seconds: float = 40.0
    """How long the UI waits for one API call (above the API's own predict deadline)."""
    answer_wait_seconds: float = 60.0
    """How long a page waits for the models' answers to a photo or a drawing before saying it stays
    queued (its answers then come in History)."""
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    """Largest upload, in bytes: the API's setting of the same name, read here so the uploader
    states and checks the real limit before sending."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """The most pixels of an image: the API's setting of the same name, read here so that a picture
    the API would refuse is never decoded for its preview."""

    max_batch_bytes: int = 2 * 1024**3
    """Largest batch, in bytes: the API's setting of the same name."""

    @property
    def max_upload_mb(self) -> int:
        """The limit in whole megabytes (MiB) for Streamlit's uploader, rounded up."""
        return max(1, -(-self.max_upload_bytes // (1024 * 1024)))

    @property
    def max_batch_mb(self) -> int:
        """The batch limit in whole megabytes (MiB), rounded up."""
        return max(1, -(-self.max_batch_bytes // (1024 * 1024)))

    @property
    def uploader_mb(self) -> int:
        """``max_upload_bytes`` in the megabytes Streamlit's uploader counts (10^6 bytes, where the
        API counts MiB), rounded up: the uploader never refuses a photo the API takes, and the
        page refuses the few bytes between the two (``classify._photo_changed``)."""
        return max(1, -(-self.max_upload_bytes // 1_000_000))

    @property
    def batch_uploader_mb(self) -> int:
        """``max_batch_bytes`` in the uploader's megabytes (10^6 bytes), rounded up."""
        return max(1, -(-self.max_batch_bytes // 1_000_000))


@lru_cache
def get_ui_settings() -> UISettings:
    return UISettings()
