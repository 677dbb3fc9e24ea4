"""The signed membership list of a conversation, retained on ``c/{cid}/roster`` (PROTOCOL.md §5).

Each roster names its epoch, the digest of the roster before it and the admin who
signed it (with the admin's Ed25519 key, so anyone — the broker included — can
check it without a bundle lookup). Members are listed by their Ed25519 keys (the pid
is the key's hash), so every member's signatures can be checked from the roster
alone. The epoch-0 roster claims its ``cid``: ``cid = cid_for(signer pid, nonce)``.
A member's position in ``members`` is its sender index in envelope headers of that
epoch. ``commit`` binds the epoch secret the signing admin delivers (PROTOCOL.md §6.1).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Annotated

from pydantic import Field, model_validator

from fieldchat.schemas import _signed
from fieldchat.schemas._codec import build, fields
from fieldchat.schemas._model import WireModel
from fieldchat.schemas.crypto import ed25519_verify, sha256
from fieldchat.schemas.envelope import VERSION
from fieldchat.schemas.errors import NotAMember, RosterRejected, WireError
from fieldchat.schemas.ids import ID_BYTES, cid_for, is_valid_id, pid_for
from fieldchat.schemas.kinds import ObjectKind

__all__ = ["MAX_MEMBERS", "Member", "Policy", "Roster", "is_roster", "verify_roster_chain"]

MAX_MEMBERS = 256
MAX_SIGN_EVERY = 1024
_FIELDS = 9
COMMIT_BYTES = 32
_ADMIN = 1
_PQ = 2
_P_COMPRESS = 1
_P_PAD = 2
_P_REQUIRE_PQ = 4

Pid = Annotated[str, Field(min_length=26, max_length=26, pattern=r"^[a-z2-7]{25}[aeimquy4]$")]


class Member(WireModel):
    """One roster entry: the member's Ed25519 key. ``pq``: its prekey has ML-KEM, so
    deliveries to it are hybrid."""

    key: Annotated[bytes, Field(min_length=32, max_length=32)]
    admin: bool = False
    pq: bool = False

    @property
    def pid(self) -> str:
        return pid_for(self.key)


class Policy(WireModel):
    """Per-conversation protocol settings (PROTOCOL.md §6).

    ``sign_every``: 1 signs every envelope (default); N signs steps divisible by N;
    0 signs none. Without a signature a member could forge another member's
    messages (outsiders still cannot, AES-GCM keeps them out).
    ``require_pq`` (the default): every member has an ML-KEM-768 key, so every grant
    is hybrid; a participant without one (a browser lacking WebCrypto ML-KEM) can
    join only a conversation whose admin turned it off.
    """

    sign_every: Annotated[int, Field(ge=0, le=MAX_SIGN_EVERY)] = 1
    compress: bool = False
    pad: bool = False
    require_pq: bool = True

    def must_sign(self, step: int) -> bool:
        return self.sign_every != 0 and step % self.sign_every == 0


class Roster(WireModel):
    cid: Pid
    epoch: Annotated[int, Field(ge=0, lt=2**28)]
    nonce: bytes
    prev: bytes
    members: tuple[Member, ...]
    policy: Policy
    issued_at: Annotated[int, Field(ge=0, lt=2**40)]
    signer_key: Annotated[bytes, Field(min_length=32, max_length=32)]
    commit: Annotated[bytes, Field(min_length=COMMIT_BYTES, max_length=COMMIT_BYTES)]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    @model_validator(mode="after")
    def _check_shape(self) -> Roster:
        if not 1 <= len(self.members) <= MAX_MEMBERS:
            raise ValueError(f"a roster has 1 to {MAX_MEMBERS} members")
        if len({m.key for m in self.members}) != len(self.members):
            raise ValueError("duplicate member")
        if self.epoch == 0 and (len(self.nonce) != ID_BYTES or self.prev):
            raise ValueError("epoch 0 carries a 16-byte nonce and no prev")
        if self.epoch > 0 and (self.nonce or len(self.prev) != 32):
            raise ValueError("later epochs carry a 32-byte prev and no nonce")
        return self

    @property
    def signer(self) -> str:
        return pid_for(self.signer_key)

    @cached_property
    def pids(self) -> tuple[str, ...]:
        """The members' pids by sender index (computed once: each is a SHA-256)."""
        return tuple(m.pid for m in self.members)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The members' Ed25519 keys, by sender index."""
        return tuple(m.key for m in self.members)

    def index_of(self, pid: str) -> int:
        """The member's sender index in this epoch.

        Raises:
            NotAMember: ``pid`` is not listed.
        """
        for i, member in enumerate(self.members):
            if member.pid == pid:
                return i
        raise NotAMember(f"{pid} is not a member of {self.cid} at epoch {self.epoch}")

    def member_at(self, index: int) -> Member:
        """Raises: NotAMember: no member has that index."""
        if 0 <= index < len(self.members):
            return self.members[index]
        raise NotAMember(f"no member {index} in {self.cid} at epoch {self.epoch}")

    def is_admin(self, pid: str) -> bool:
        return any(m.pid == pid and m.admin for m in self.members)

    @staticmethod
    def body(
        cid: str,
        epoch: int,
        nonce: bytes,
        prev: bytes,
        members: tuple[Member, ...],
        policy: Policy,
        issued_at: int,
        signer_key: bytes,
        commit: bytes,
    ) -> bytes:
        pflags = (
            (_P_COMPRESS if policy.compress else 0)
            | (_P_PAD if policy.pad else 0)
            | (_P_REQUIRE_PQ if policy.require_pq else 0)
        )
        return _signed.to_be_signed(
            ObjectKind.ROSTER,
            (
                cid,
                epoch,
                nonce,
                prev,
                tuple((m.key, (_ADMIN if m.admin else 0) | (_PQ if m.pq else 0)) for m in members),
                (policy.sign_every, pflags),
                issued_at,
                signer_key,
                commit,
            ),
        )

    @classmethod
    def create(
        cls,
        *,
        cid: str,
        epoch: int,
        nonce: bytes,
        prev: bytes,
        members: tuple[Member, ...],
        policy: Policy,
        issued_at: int,
        signer_key: bytes,
        commit: bytes,
        sign: Callable[[bytes], bytes],
    ) -> Roster:
        """Build and sign (the signer's key is embedded)."""
        body = cls.body(cid, epoch, nonce, prev, members, policy, issued_at, signer_key, commit)
        return cls(
            cid=cid,
            epoch=epoch,
            nonce=nonce,
            prev=prev,
            members=members,
            policy=policy,
            issued_at=issued_at,
            signer_key=signer_key,
            commit=commit,
            signature=sign(body),
        )

    def signed_bytes(self) -> bytes:
        return self.body(
            self.cid,
            self.epoch,
            self.nonce,
            self.prev,
            self.members,
            self.policy,
            self.issued_at,
            self.signer_key,
            self.commit,
        )

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    def digest(self) -> bytes:
        """SHA-256 of the encoded roster; the next epoch's ``prev``."""
        return sha256(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Roster:
        """Decode and verify the signature (not yet the chain; see :func:`verify_roster_chain`).

        Raises:
            UnsupportedVersion, WireError: malformed.
            CryptoError: the signature does not verify.
        """
        body, signed, signature = _signed.split(data, ObjectKind.ROSTER, _FIELDS)
        cid, epoch, nonce, prev, raw_members, raw_policy, issued_at, signer_key, commit = body
        members = []
        if not isinstance(raw_members, tuple) or len(raw_members) > MAX_MEMBERS:
            raise WireError("roster members must be an array")
        for raw in raw_members:
            key, flags = fields(raw, 2, "roster member")
            if not isinstance(flags, int) or isinstance(flags, bool) or flags & ~(_ADMIN | _PQ):
                raise WireError("invalid roster member flags")
            members.append(
                build(
                    Member,
                    "roster member",
                    key=key,
                    admin=bool(flags & _ADMIN),
                    pq=bool(flags & _PQ),
                )
            )
        sign_every, pflags = fields(raw_policy, 2, "roster policy")
        if not isinstance(pflags, int) or isinstance(pflags, bool) or pflags & ~7:
            raise WireError("invalid roster policy flags")
        policy = build(
            Policy,
            "roster policy",
            sign_every=sign_every,
            compress=bool(pflags & _P_COMPRESS),
            pad=bool(pflags & _P_PAD),
            require_pq=bool(pflags & _P_REQUIRE_PQ),
        )
        roster = build(
            cls,
            "roster",
            cid=cid,
            epoch=epoch,
            nonce=nonce,
            prev=prev,
            members=tuple(members),
            policy=policy,
            issued_at=issued_at,
            signer_key=signer_key,
            commit=commit,
            signature=signature,
        )
        ed25519_verify(roster.signer_key, signature, signed)
        return roster


def is_roster(data: bytes) -> bool:
    """Whether ``data`` is framed as a roster (version byte, kind 0x12), checking nothing
    else: an inbox carries rosters besides grants (PROTOCOL.md §5.2), told apart by
    their kind byte; :meth:`Roster.from_bytes` does the checks."""
    return len(data) >= 2 and data[0] == VERSION and data[1] == ObjectKind.ROSTER


def verify_roster_chain(new: Roster, prev: Roster | None) -> None:
    """Check that ``new`` may follow ``prev`` (``None``: ``new`` founds the conversation).

    Epoch 0 must be signed by its creator, whose pid with the nonce gives the cid,
    and list the creator as admin. Epoch n+1 must name epoch n's digest and be
    signed by an admin of epoch n.

    Raises:
        RosterRejected: any rule broken (the signature itself was checked on decode).
    """
    if not is_valid_id(new.cid):
        raise RosterRejected("invalid cid")
    signer = new.signer
    if prev is None:
        if new.epoch != 0:
            raise RosterRejected(f"first roster of {new.cid} must be epoch 0, not {new.epoch}")
        if cid_for(signer, new.nonce) != new.cid:
            raise RosterRejected(f"epoch-0 roster of {new.cid} not signed by its creator")
        if not new.is_admin(signer):
            raise RosterRejected("the creator must be an admin of epoch 0")
        return
    if new.cid != prev.cid:
        raise RosterRejected("roster for another conversation")
    if new.epoch != prev.epoch + 1:
        raise RosterRejected(f"epoch {new.epoch} does not follow {prev.epoch}")
    if new.prev != prev.digest():
        raise RosterRejected(f"epoch {new.epoch} does not extend the known epoch {prev.epoch}")
    if not prev.is_admin(signer):
        raise RosterRejected(f"epoch {new.epoch} signed by {signer}, not an admin of {prev.epoch}")
    if not any(m.admin for m in new.members):
        raise RosterRejected("a roster needs at least one admin")
