"""The second byte of every fieldchat object after the version byte (PROTOCOL.md §3).

Envelope kinds (1-3) live in ``fieldchat.schemas.envelope``; the values here are the signed
key-distribution objects. Distinct kind bytes domain-separate every signature.
"""

from __future__ import annotations

import enum

__all__ = ["ObjectKind"]


class ObjectKind(enum.IntEnum):
    GRANT = 0x10
    BUNDLE = 0x11
    ROSTER = 0x12
    DELIVERY = 0x13  # unsigned: the roster commits to what it carries
