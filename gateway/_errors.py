"""Errors of the gateway, under the project hierarchy (``schemas.errors``).

FieldchatError
├── ProtocolError
│   └── Forbidden            the caller may not see or send this
├── NameTaken                a user name or pid that is already registered
└── TransportError
    └── StorageError         the database failed (mapped from SQLAlchemy/drivers)
"""

from __future__ import annotations

from schemas.errors import FieldchatError, ProtocolError, TransportError

__all__ = ["Forbidden", "NameTaken", "StorageError"]


class Forbidden(ProtocolError):
    """Authenticated, but not allowed: not a member, not the account's participant."""

    reason = "forbidden"


class NameTaken(FieldchatError):
    """A user name or participant id that is already registered."""

    reason = "taken"


class StorageError(TransportError):
    """The history database could not be reached or refused the operation."""

    reason = "storage"
