"""Errors of the gateway, under the project hierarchy (``fieldchat.schemas.errors``).

FieldchatError
├── ProtocolError
│   └── Forbidden            the caller may not see or send this
│       └── ClaimRefused     a participant claim without a valid proof of possession
├── NameTaken                a user name or pid that is already registered
├── TooManyRequests          a rate limit: try again after ``retry_after`` seconds
└── TransportError
    └── StorageError         the database failed (mapped from SQLAlchemy/drivers)
"""

from __future__ import annotations

from fieldchat.schemas.errors import FieldchatError, ProtocolError, TransportError

__all__ = ["ClaimRefused", "Forbidden", "NameTaken", "StorageError", "TooManyRequests"]


class Forbidden(ProtocolError):
    """Authenticated, but not allowed: not a member, not the account's participant."""

    reason = "forbidden"


class ClaimRefused(Forbidden):
    """A claim of a participant whose proof (challenge, origin, signature) does not hold."""

    reason = "claim_refused"


class TooManyRequests(FieldchatError):
    """A rate limit was reached; the answer is 429 with ``Retry-After``."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NameTaken(FieldchatError):
    """A user name or participant id that is already registered."""

    reason = "taken"


class StorageError(TransportError):
    """The history database could not be reached or refused the operation."""

    reason = "storage"
