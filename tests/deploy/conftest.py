"""Fixtures of the deployment-recipe tests: the gateway tests' Mosquitto, topic prefix and
PostgreSQL database (defined in ``tests.gateway._support``)."""

from tests.gateway._support import (  # noqa: F401 - pytest finds fixtures by name
    mosquitto,
    pg_url,
    prefix,
)
