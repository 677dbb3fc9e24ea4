"""Fixtures for the broker tests: a running broker and MQTT peers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fieldchat.broker.testing import (  # noqa: F401 - fixtures re-exported for this package's tests
    broker_config,
    broker_thread,
    embedded_broker,
)
from tests.broker._peers import Peer


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Collects peers so they are all closed after the test."""
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()
