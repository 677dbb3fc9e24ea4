"""The one error hierarchy of fieldchat.

Every failure a caller can act on is a subclass of :class:`FieldchatError`. Foreign
errors (OSError, paho, database drivers) are mapped to one of these once, at the
boundary, with ``raise Mapped(...) from exc``. Each class carries a short
``reason`` used as the label of rejection counters (metrics and engine stats).

    FieldchatError
    ├── WireError                     bytes that are not a valid fieldchat object
    │   ├── UnsupportedVersion        first byte is not a version we speak
    │   ├── LimitExceeded             a size or count limit of PROTOCOL.md §8
    │   └── MalformedPacket           bytes that are not an MQTT control packet
    │       ├── PacketTooLarge        above the Maximum Packet Size in force
    │       └── UnsupportedProtocol   a CONNECT of a protocol level we do not speak
    ├── InvalidId                     a pid/cid/topic that does not parse
    ├── CryptoError                   authentication or decryption failed (opaque)
    │   └── WeakKey                   all-zero X25519 shared secret, invalid public key
    ├── ProtocolError                 authentic bytes that break a protocol rule
    │   ├── NotAMember                sender or recipient not in the roster
    │   ├── RosterRejected            roster not signed by an admin of the previous one
    │   ├── RosterPending             roster held until the rosters it chains from arrive
    │   ├── GrantRejected             grant for the wrong recipient, epoch or roster
    │   │   └── PrekeyUnknown         sealed to a prekey we no longer (or never) held
    │   ├── StaleEpoch                envelope of a removed member after rotation
    │   ├── ChainClosed               unsigned step past the end its sender stated
    │   ├── ForwardJumpTooLarge       step beyond the forward-jump limit
    │   ├── SkippedKeyMissing         step behind the chain whose key is gone
    │   ├── MissingKey                no grant yet for this chain (may come later)
    │   │   ├── ChainEndUnknown       unsigned old-epoch step, its chain's end not stated yet
    │   │   ├── UnsignedJumpTooFar    unsigned step too far ahead to derive before auth
    │   │   └── EpochKeyPending       we entered an epoch whose secret has not arrived
    │   ├── SignatureRequired         policy says signed, envelope is not
    │   ├── UnknownConversation       no state for this cid
    │   └── UnknownParticipant        no bundle known for this pid
    ├── KeyStoreError                 the key store failed or is corrupt
    │   └── CorruptRecord             one optional record is corrupt: dropped, counted
    ├── ConfigError                   bad configuration file, flag or variable
    ├── IdempotencyConflict           an idempotency key reused for another request
    └── TransportError                broker or network failure (mapped at the edge)
        ├── ConnectFailed
        ├── NotAuthorized
        └── Refused                   the broker refused a publication for good
"""

from __future__ import annotations

__all__ = [
    "ChainClosed",
    "ChainEndUnknown",
    "ConfigError",
    "ConnectFailed",
    "CorruptRecord",
    "CryptoError",
    "EpochKeyPending",
    "FieldchatError",
    "ForwardJumpTooLarge",
    "GrantRejected",
    "IdempotencyConflict",
    "InvalidId",
    "InvalidStatus",
    "KeyStoreError",
    "LimitExceeded",
    "MalformedPacket",
    "MissingKey",
    "NotAMember",
    "NotAuthorized",
    "PacketTooLarge",
    "PrekeyUnknown",
    "ProtocolError",
    "Refused",
    "RosterPending",
    "RosterRejected",
    "SignatureRequired",
    "SkippedKeyMissing",
    "StaleEpoch",
    "TransportError",
    "UnknownConversation",
    "UnknownParticipant",
    "UnsignedJumpTooFar",
    "UnsupportedProtocol",
    "UnsupportedVersion",
    "WeakKey",
    "WireError",
]


class FieldchatError(Exception):
    """Root of every error fieldchat raises on purpose."""

    reason = "error"


class WireError(FieldchatError):
    """Bytes that do not decode to a valid fieldchat object."""

    reason = "malformed"


class UnsupportedVersion(WireError):
    """The version byte is not one this implementation speaks."""

    reason = "version"


class LimitExceeded(WireError):
    """A named size or count limit was exceeded (PROTOCOL.md §8)."""

    reason = "limit"


class InvalidStatus(WireError):
    """A presence status (``p/{pid}/status``) that is not ``online`` or ``offline``,
    or longer than any of them: another participant's bytes, refused and counted."""

    reason = "status"


class MalformedPacket(WireError):
    """Bytes that are not a well-formed MQTT 3.1.1 or 5 control packet (``fieldchat.schemas.mqtt``).

    ``code`` is the MQTT 5 reason code that names the fault (0x81 Malformed Packet,
    0x82 Protocol Error, 0x95 Packet too large): a server sends it in its
    DISCONNECT before closing (MQTT 5 §4.13).
    """

    reason = "malformed"
    code = 0x81

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class PacketTooLarge(MalformedPacket):
    """A remaining length above the Maximum Packet Size in force (checked before buffering)."""

    reason = "too_large"
    code = 0x95


class UnsupportedProtocol(MalformedPacket):
    """A CONNECT whose protocol level we do not speak; ``level`` says which (MQTT-3.1.2-2).

    The server answers CONNACK 0x01 (3.1.1) or 0x84 (5) and closes, rather than
    treating the rest of the CONNECT, whose layout it cannot know, as malformed.
    """

    reason = "protocol_version"
    code = 0x84

    def __init__(self, message: str, *, level: int) -> None:
        super().__init__(message)
        self.level = level


class InvalidId(FieldchatError):
    """A participant id, conversation id or topic that does not parse."""

    reason = "invalid_id"


class CryptoError(FieldchatError):
    """Authentication or decryption failed.

    Deliberately opaque: the message never says which check failed, so that an
    attacker learns nothing from the error (as Fernet's ``InvalidToken``).
    """

    reason = "auth"


class WeakKey(CryptoError):
    """A public key or key agreement result that must not be used."""

    reason = "weak_key"


class ProtocolError(FieldchatError):
    """Authentic input that breaks a rule of the protocol."""

    reason = "protocol"


class NotAMember(ProtocolError):
    """The sender or recipient is not a member of the conversation's roster."""

    reason = "not_member"


class RosterRejected(ProtocolError):
    """A roster that does not follow from the previous one (forged, stale, bad signer)."""

    reason = "roster"


class RosterPending(ProtocolError):
    """A roster that does not chain to the rosters held yet (PROTOCOL.md §5.2).

    The engine keeps it (a bounded pool per conversation) and adopts it as soon as
    the epochs between arrive, in any order; until then it trusts it for nothing.
    Fetch the missing rosters: the gateway serves them
    (``GET /v1/conversations/{cid}/rosters``), an admin who invites sends them to the
    new member's inbox.
    """

    reason = "roster_pending"

    def __init__(self, message: str, *, cid: str = "", have: int = -1, want: int = -1) -> None:
        super().__init__(message)
        self.cid = cid
        self.have = have  # the newest epoch of the verified chain held (-1: none)
        self.want = want  # the epoch of the roster held back


class GrantRejected(ProtocolError):
    """A key grant that is not addressed to us or does not match the roster."""

    reason = "grant"


class PrekeyUnknown(GrantRejected):
    """A delivery or grant sealed to a prekey whose private keys we do not hold: deleted
    after its grace period (forward secrecy, PROTOCOL.md §2.5) or never ours. Ask an
    admin for a new epoch (a REKEY control)."""

    reason = "prekey_unknown"


class StaleEpoch(ProtocolError):
    """An envelope from an epoch whose sender has since been removed."""

    reason = "stale_epoch"


class ChainClosed(ProtocolError):
    """An unsigned envelope of an old epoch at or past the end its sender stated.

    Once a roster removes a member, that member still holds the epoch's chain keys:
    only steps the sender itself declared sealed (in its signed grant of the next
    epoch, PROTOCOL.md §5.3, §6.4) are accepted unsigned.
    """

    reason = "chain_closed"


class ForwardJumpTooLarge(ProtocolError):
    """A step further ahead of the chain than ``MAX_FORWARD_JUMP``."""

    reason = "forward_jump"


class SkippedKeyMissing(ProtocolError):
    """A step behind the chain whose key was used or evicted from the window."""

    reason = "old_step"


class MissingKey(ProtocolError):
    """No key for this chain yet: the grant may still be on its way.

    Callers hold such envelopes and retry after the next grant is accepted.
    """

    reason = "missing_key"


class ChainEndUnknown(MissingKey):
    """An unsigned envelope of an old epoch after a removal, whose sender has not
    stated yet where that chain ended: hold it; the sender's grant of the new epoch
    brings the end (PROTOCOL.md §6.4)."""

    reason = "chain_end_unknown"


class UnsignedJumpTooFar(MissingKey):
    """An unsigned step further ahead than a receiver derives before authenticating.

    Hold it: it opens once the chain (or the receiver's cache of derived keys) comes
    within ``MAX_UNSIGNED_JUMP`` of it (PROTOCOL.md §6.4).
    """

    reason = "unsigned_jump"


class EpochKeyPending(MissingKey):
    """We entered an epoch whose secret the admin has not delivered to us yet: nothing
    can be sealed in it (the message waits, unsealed) and its envelopes are held until
    the delivery arrives (PROTOCOL.md §6.6)."""

    reason = "epoch_key_pending"


class SignatureRequired(ProtocolError):
    """The conversation policy requires a signature this envelope lacks."""

    reason = "unsigned"


class UnknownConversation(ProtocolError):
    """No local state for this conversation id."""

    reason = "unknown_conversation"


class UnknownParticipant(ProtocolError):
    """No bundle is known for this participant: fetch ``p/{pid}/bundle`` first."""

    reason = "unknown_participant"


class KeyStoreError(FieldchatError):
    """The key store could not be read or written, or holds corrupt state."""

    reason = "keystore"


class CorruptRecord(KeyStoreError):
    """One record the engine can do without (it only resumes work in progress) is
    corrupt or oversized: the loader drops it and counts it instead of refusing to start."""

    reason = "corrupt_record"


class ConfigError(FieldchatError):
    """A configuration file, flag or environment variable is invalid."""

    reason = "config"


class IdempotencyConflict(FieldchatError):
    """A send's idempotency key was used before for a different conversation or text:
    the first one stands, this one is not queued (``fieldchat.device.idempotency``)."""

    reason = "idempotency_conflict"


class TransportError(FieldchatError):
    """The broker or network failed; mapped from paho/aiomqtt/OSError at the edge."""

    reason = "transport"


class ConnectFailed(TransportError):
    """The broker could not be reached."""

    reason = "connect"


class NotAuthorized(TransportError):
    """The broker refused the credentials or the operation."""

    reason = "not_authorized"


class Refused(TransportError):
    """The broker refused a publication for good (an MQTT 5 negative PUBACK, e.g.
    0x87 Not authorized): sending it again would be refused again."""

    reason = "refused"
