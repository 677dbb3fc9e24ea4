"""The gateway: encrypted history archive, history API, accounts and the WebSocket bridge.

It never decrypts: it stores and relays ciphertext, verifying structure and signatures
only. See docs/gateway.md.
"""

from fieldchat.gateway._app import create_app
from fieldchat.gateway._archiver import ArchiveListener, Archiver, MqttFactory, mqtt_factory
from fieldchat.gateway._auth import CLAIM_LABEL, SIGNING_LABEL, claim_message, signed_message
from fieldchat.gateway._errors import (
    ClaimRefused,
    Forbidden,
    NameTaken,
    StorageError,
    TooManyRequests,
)
from fieldchat.gateway._run import GatewayServer, uvicorn_options
from fieldchat.gateway._settings import GatewaySettings, load_settings
from fieldchat.gateway._sql import PostgresStore, SqliteStore, open_store
from fieldchat.gateway._store import (
    Account,
    AccountStore,
    ArchiveBatch,
    ArchiveResult,
    GatewayStore,
    HistoryStore,
    StoredEnvelope,
    StoredGrant,
)

__all__ = [
    "CLAIM_LABEL",
    "SIGNING_LABEL",
    "Account",
    "AccountStore",
    "ArchiveBatch",
    "ArchiveListener",
    "ArchiveResult",
    "Archiver",
    "ClaimRefused",
    "Forbidden",
    "GatewayServer",
    "GatewaySettings",
    "GatewayStore",
    "HistoryStore",
    "MqttFactory",
    "NameTaken",
    "PostgresStore",
    "SqliteStore",
    "StorageError",
    "StoredEnvelope",
    "StoredGrant",
    "TooManyRequests",
    "claim_message",
    "create_app",
    "load_settings",
    "mqtt_factory",
    "open_store",
    "signed_message",
    "uvicorn_options",
]
