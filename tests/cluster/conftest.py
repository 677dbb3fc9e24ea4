"""Fixtures of the cluster tests: a three-node NATS cluster (gateway processes are
``tests.gateway._support.GatewayProcess``).

The cluster is made per test (it starts in well under a second) and enrolled before it
starts, so nothing depends on a configuration reload. Tests skip, with the reason,
where Debian's nats-server is not installed; CI installs it (``.ci/run``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster._nats import NATS_SERVER, Cluster


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Cluster]:
    """Three NATS nodes, configured but not started: enroll users, then ``start()``."""
    if not Path(NATS_SERVER).exists():
        pytest.skip(f"{NATS_SERVER} is not installed (apt-get install nats-server)")
    cluster = Cluster(tmp_path / "nats")
    yield cluster
    cluster.stop()
