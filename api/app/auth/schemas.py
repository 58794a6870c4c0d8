from pydantic import BaseModel


class Token(BaseModel):
    """An OAuth 2.0 token response (RFC 6749, section 5.1)."""

    access_token: str
    token_type: str = "bearer"
    expires_in: int
    """Seconds the token stays valid; ``POST /v1/auth/refresh`` before then renews the session."""
