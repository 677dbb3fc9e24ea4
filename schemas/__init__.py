"""fieldchat wire format: envelope, key-distribution objects, messages, topics, errors.

Pure: no I/O, no stored secrets. The one place that turns wire objects into bytes
and back (PROTOCOL.md).

The names below are imported on first use (PEP 562), as in :mod:`fieldchat.device`:
``fieldchat.schemas.errors`` or ``.signals`` alone (what the command line needs
before it knows its command) then loads neither pydantic nor cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fieldchat.schemas.bundle import Bundle
    from fieldchat.schemas.envelope import (
        MAX_ENVELOPE_BYTES,
        VERSION,
        Envelope,
        EnvelopeKind,
        Header,
    )
    from fieldchat.schemas.errors import (
        ConfigError,
        ConnectFailed,
        CryptoError,
        FieldchatError,
        ForwardJumpTooLarge,
        GrantRejected,
        InvalidId,
        KeyStoreError,
        LimitExceeded,
        MissingKey,
        NotAMember,
        NotAuthorized,
        ProtocolError,
        Refused,
        RosterRejected,
        SignatureRequired,
        SkippedKeyMissing,
        StaleEpoch,
        TransportError,
        UnknownConversation,
        UnknownParticipant,
        UnsupportedVersion,
        WeakKey,
        WireError,
    )
    from fieldchat.schemas.grant import ChainGrant, Grant, GrantMode
    from fieldchat.schemas.ids import (
        cid_for,
        decode_id,
        encode_id,
        is_valid_id,
        pid_for,
        validate_id,
    )
    from fieldchat.schemas.messages import (
        Control,
        ControlOp,
        Message,
        Receipt,
        ReceiptRange,
        ReceiptType,
        TextMessage,
        decode_plaintext,
        encode_plaintext,
    )
    from fieldchat.schemas.roster import MAX_MEMBERS, Member, Policy, Roster, verify_roster_chain
    from fieldchat.schemas.topics import DEFAULT_PREFIX, Topic, TopicKind, Topics

_HOMES = {
    "Bundle": "bundle",
    "ChainGrant": "grant",
    "ConfigError": "errors",
    "ConnectFailed": "errors",
    "Control": "messages",
    "ControlOp": "messages",
    "CryptoError": "errors",
    "DEFAULT_PREFIX": "topics",
    "Envelope": "envelope",
    "EnvelopeKind": "envelope",
    "FieldchatError": "errors",
    "ForwardJumpTooLarge": "errors",
    "Grant": "grant",
    "GrantMode": "grant",
    "GrantRejected": "errors",
    "Header": "envelope",
    "InvalidId": "errors",
    "KeyStoreError": "errors",
    "LimitExceeded": "errors",
    "MAX_ENVELOPE_BYTES": "envelope",
    "MAX_MEMBERS": "roster",
    "Member": "roster",
    "Message": "messages",
    "MissingKey": "errors",
    "NotAMember": "errors",
    "NotAuthorized": "errors",
    "Policy": "roster",
    "ProtocolError": "errors",
    "Receipt": "messages",
    "ReceiptRange": "messages",
    "ReceiptType": "messages",
    "Refused": "errors",
    "Roster": "roster",
    "RosterRejected": "errors",
    "SignatureRequired": "errors",
    "SkippedKeyMissing": "errors",
    "StaleEpoch": "errors",
    "TextMessage": "messages",
    "Topic": "topics",
    "TopicKind": "topics",
    "Topics": "topics",
    "TransportError": "errors",
    "UnknownConversation": "errors",
    "UnknownParticipant": "errors",
    "UnsupportedVersion": "errors",
    "VERSION": "envelope",
    "WeakKey": "errors",
    "WireError": "errors",
    "cid_for": "ids",
    "decode_id": "ids",
    "decode_plaintext": "messages",
    "encode_id": "ids",
    "encode_plaintext": "messages",
    "is_valid_id": "ids",
    "pid_for": "ids",
    "validate_id": "ids",
    "verify_roster_chain": "roster",
}

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_ENVELOPE_BYTES",
    "MAX_MEMBERS",
    "VERSION",
    "Bundle",
    "ChainGrant",
    "ConfigError",
    "ConnectFailed",
    "Control",
    "ControlOp",
    "CryptoError",
    "Envelope",
    "EnvelopeKind",
    "FieldchatError",
    "ForwardJumpTooLarge",
    "Grant",
    "GrantMode",
    "GrantRejected",
    "Header",
    "InvalidId",
    "KeyStoreError",
    "LimitExceeded",
    "Member",
    "Message",
    "MissingKey",
    "NotAMember",
    "NotAuthorized",
    "Policy",
    "ProtocolError",
    "Receipt",
    "ReceiptRange",
    "ReceiptType",
    "Refused",
    "Roster",
    "RosterRejected",
    "SignatureRequired",
    "SkippedKeyMissing",
    "StaleEpoch",
    "TextMessage",
    "Topic",
    "TopicKind",
    "Topics",
    "TransportError",
    "UnknownConversation",
    "UnknownParticipant",
    "UnsupportedVersion",
    "WeakKey",
    "WireError",
    "cid_for",
    "decode_id",
    "decode_plaintext",
    "encode_id",
    "encode_plaintext",
    "is_valid_id",
    "pid_for",
    "validate_id",
    "verify_roster_chain",
]


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whichever name is asked for
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fieldchat.schemas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fieldchat.schemas.{home}"), name)
    globals()[name] = value  # the next lookup is a plain one
    return value
