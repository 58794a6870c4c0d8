"""API keys as the API and the UI both know them: the key's recognisable prefix, its scopes and the
bounds of its lifetime."""

from __future__ import annotations

from enum import StrEnum

KEY_PREFIX = "ipk_"
"""Every key starts with this ("image portal key"): a credential that does not is a login token,
so the API looks keys up only for credentials that carry it, and a leaked key is easy to spot
(secret scanners match such prefixes)."""
KEY_LENGTH = len(KEY_PREFIX) + 43
"""A key's length: the prefix and 32 random bytes in unpadded base64url."""
DISPLAY_LENGTH = len(KEY_PREFIX) + 6
"""Characters of a key kept in clear to tell keys apart in lists (the prefix and 36 random bits)."""
MAX_EXPIRY_DAYS = 365
"""Longest lifetime a key can be given; a key may also never expire."""


class Scope(StrEnum):
    """What a request made with a key may do. Scopes do not imply one another."""

    read = "read"
    """GET and HEAD on the user routes: my uploads, predictions, feedback, the model catalog."""
    predict = "predict"
    """Every other method on the user routes: upload, predict, give feedback, delete my uploads."""
    admin = "admin"
    """The admin routes (``/v1/admin/*``, users, registry, training) and the admin's view of user
    routes; only an admin's key can have it."""


SCOPE_WORDS = {
    Scope.read: "read: see my uploads, predictions and feedback",
    Scope.predict: "predict: upload, classify, give feedback",
    Scope.admin: "admin: the administration routes",
}
"""Each scope as a person reads it."""
