"""Steps 2 and 3 of a CONNECT (:mod:`broker._connection`): the credential, the client
id and the will are checked before any session is touched.

A refusal is a value (:class:`Refusal`: its CONNACK code at each protocol level and
the label it is counted under); the connection writes the CONNACK.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from broker._acl import Principal
from broker._credentials import verify_credential
from broker._router import Router
from schemas import mqtt

__all__ = ["Evicted", "Refusal", "Refused", "authenticate"]

log = logging.getLogger("broker")

R = mqtt.ReasonCode


class Refusal(enum.Enum):
    """Why a CONNECT is refused: ``(denials label, 3.1.1 return code, MQTT 5 reason code)``
    (MQTT 5 §3.2.2.2 maps the 3.1.1 codes)."""

    PROTOCOL = ("protocol", 0x01, R.UNSUPPORTED_PROTOCOL_VERSION)  # MQTT-3.1.2-2
    CLIENT_ID = ("client_id", 0x02, R.CLIENT_IDENTIFIER_NOT_VALID)
    CREDENTIALS = ("auth", 0x04, R.BAD_USER_NAME_OR_PASSWORD)
    WILL = ("will", 0x05, R.NOT_AUTHORIZED)
    AUTH_METHOD = ("auth", R.BAD_AUTHENTICATION_METHOD, R.BAD_AUTHENTICATION_METHOD)  # 5 only

    def __init__(self, label: str, v311: int, v5: int) -> None:
        self.label = label
        self.v311 = v311
        self.v5 = v5

    def code(self, level: int) -> int:
        return self.v5 if level == mqtt.ProtocolLevel.V5 else self.v311


class Refused(Exception):
    """The CONNECT is refused for :attr:`refusal`."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.name)
        self.refusal = refusal


class Evicted(Exception):
    """The connection was closed (evicted from those waiting) while it logged in."""


async def authenticate(
    router: Router, connect: mqtt.Connect, *, peer: str, closed: Callable[[], bool]
) -> Principal:
    """The principal a CONNECT logs in as.

    The credential is verified off the event loop; ``closed()`` then says whether the
    connection was evicted meanwhile. A wrong credential is answered after
    ``auth_failure_delay_s``. MQTT 5 lets a client send an empty client id and take
    the one the server assigns (MQTT-3.1.3-6, -7): ours is always the username;
    3.1.1 refuses it.

    Raises:
        Refused: a refusal, touching nothing.
        Evicted: ``closed()`` became true while the credential was checked.
    """
    if connect.properties.authentication_method is not None:  # no enhanced auth
        raise Refused(Refusal.AUTH_METHOD)
    account = router.account(connect.username or "")
    ok = False
    if account is not None and connect.password is not None:
        ok = await asyncio.to_thread(verify_credential, connect.password, account.hash)
        # The account may have been revoked while we were hashing.
        ok = ok and router.access.accounts.get(account.username) is account
    if closed():
        raise Evicted
    if not ok or account is None:
        log.info("login refused for %r from %s", (connect.username or "")[:64], peer)
        await asyncio.sleep(router.limits.auth_failure_delay_s)
        raise Refused(Refusal.CREDENTIALS)
    assigned = account.username if connect.protocol_level == mqtt.ProtocolLevel.V5 else ""
    if (connect.client_id or assigned) != account.username:
        raise Refused(Refusal.CLIENT_ID)
    principal = Principal(account.username, account.role)
    will = connect.will
    if will is not None:
        rules = router.access.rules
        denial = rules.will(principal, will.topic, will.payload, retain=will.retain)
        if denial is not None:
            log.info("%s: will on %r refused (%s)", principal.username, will.topic[:120], denial)
            raise Refused(Refusal.WILL)
    return principal
