"""Fixtures of the gateway tests (defined in ``_support``)."""

from tests.gateway._support import (  # noqa: F401 - pytest finds fixtures by name
    database_url,
    gateway,
    mosquitto,
    pg_url,
    prefix,
    store,
)
