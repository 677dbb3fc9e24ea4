"""Pytest fixtures and helpers for tests that need a broker (any package's tests).

In a ``conftest.py``::

    from fieldchat.broker.testing import broker_config, broker_thread, embedded_broker  # noqa: F401

``broker_config``: a :class:`BrokerConfig` on 127.0.0.1, ephemeral ports, data in
``tmp_path``, short CONNECT timeout. ``broker_thread``: a running
:class:`BrokerThread` (synchronous tests). ``embedded_broker``: a running
:class:`EmbeddedBroker` on the test's event loop (``async def`` tests).

:func:`participant` makes a deterministic identity (Ed25519 key and pid);
:func:`found_roster` / :func:`next_roster` make signed rosters, so tests can create
conversations the way devices do (publish the roster, retained).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fieldchat.broker._config import BrokerConfig, Limits
from fieldchat.broker._server import EmbeddedBroker
from fieldchat.broker._thread import BrokerThread
from fieldchat.schemas.crypto import Signer
from fieldchat.schemas.ids import cid_for, pid_for
from fieldchat.schemas.roster import Member, Policy, Roster

__all__ = [
    "Participant",
    "broker_config",
    "broker_thread",
    "embedded_broker",
    "found_roster",
    "make_config",
    "next_roster",
    "participant",
]


@dataclass(frozen=True)
class Participant:
    signer: Signer
    pid: str


def participant(seed: int | bytes) -> Participant:
    """A deterministic participant identity (not for production: the seed is public)."""
    raw = bytes([seed]) * 32 if isinstance(seed, int) else seed
    signer = Signer(raw)
    return Participant(signer, pid_for(signer.public))


def found_roster(
    creator: Participant, members: Sequence[Participant] = (), *, nonce: bytes = b"\x01" * 16
) -> Roster:
    """The epoch-0 roster of a new conversation, the creator an admin."""
    listed = (
        Member(key=creator.signer.public, admin=True),
        *tuple(Member(key=m.signer.public) for m in members if m.pid != creator.pid),
    )
    return Roster.create(
        cid=cid_for(creator.pid, nonce),
        epoch=0,
        nonce=nonce,
        prev=b"",
        members=listed,
        policy=Policy(),
        issued_at=int(time.time()),
        signer_key=creator.signer.public,
        commit=bytes(32),  # no epoch secret: these rosters test routing, not keys
        sign=creator.signer.sign,
    )


def next_roster(prev: Roster, signer: Participant, members: Sequence[Participant]) -> Roster:
    """The next epoch, signed by ``signer`` (an admin of ``prev``), ``signer`` admin again."""
    listed = (
        Member(key=signer.signer.public, admin=True),
        *tuple(Member(key=m.signer.public) for m in members if m.pid != signer.pid),
    )
    return Roster.create(
        cid=prev.cid,
        epoch=prev.epoch + 1,
        nonce=b"",
        prev=prev.digest(),
        members=listed,
        policy=prev.policy,
        issued_at=int(time.time()),
        signer_key=signer.signer.public,
        commit=bytes(32),
        sign=signer.signer.sign,
    )


def make_config(data_dir: Path, **limits: float) -> BrokerConfig:
    """Loopback, ephemeral port, 2 s CONNECT timeout, no login-failure delay."""
    base: dict[str, float] = {"connect_timeout_s": 2.0, "auth_failure_delay_s": 0.0}
    return BrokerConfig(data_dir=data_dir, port=0, limits=Limits.model_validate(base | limits))


@pytest.fixture
def broker_config(tmp_path: Path) -> BrokerConfig:
    return make_config(tmp_path / "broker")


@pytest.fixture
def broker_thread(broker_config: BrokerConfig) -> Iterator[BrokerThread]:
    with BrokerThread(broker_config) as broker:
        yield broker


@pytest.fixture
async def embedded_broker(broker_config: BrokerConfig) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(broker_config) as broker:
        yield broker
