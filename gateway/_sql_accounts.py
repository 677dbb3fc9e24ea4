"""Accounts, sessions, claimed participants, claim challenges, request nonces and
shared secrets, once for both engines. Functions of a SQLAlchemy ``Connection``, run by
a :class:`~gateway._db.Database`.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, delete, select, update

from fieldchat.gateway._errors import NameTaken
from fieldchat.gateway._schema import (
    accounts,
    claim_challenges,
    gateway_secrets,
    participants,
    request_nonces,
    sessions,
)
from fieldchat.gateway._sql_archive import dialect_insert, upsert_bundles
from fieldchat.gateway._store import Account


def create_account(conn: Connection, username: str, password_hash: str, is_admin: bool) -> int:
    """The new account's id (an ``IntegrityError`` when the name is taken)."""
    result = conn.execute(
        accounts.insert().returning(accounts.c.id),
        {
            "username": username,
            "password_hash": password_hash,
            "is_admin": is_admin,
            "created_at": time.time(),
        },
    )
    return int(result.scalar_one())


def account_login(conn: Connection, username: str) -> tuple[int, str] | None:
    row = conn.execute(
        select(accounts.c.id, accounts.c.password_hash).where(accounts.c.username == username)
    ).first()
    return (int(row.id), str(row.password_hash)) if row is not None else None


def set_password_hash(conn: Connection, account_id: int, password_hash: str) -> None:
    conn.execute(
        update(accounts).where(accounts.c.id == account_id).values(password_hash=password_hash)
    )


def account(conn: Connection, account_id: int) -> Account | None:
    row = conn.execute(
        select(accounts.c.id, accounts.c.username, accounts.c.is_admin).where(
            accounts.c.id == account_id
        )
    ).first()
    if row is None:
        return None
    owned = conn.execute(
        select(participants.c.pid, participants.c.verified)
        .where(participants.c.account_id == account_id)
        .order_by(participants.c.pid)
    ).all()
    return Account(
        int(row.id),
        row.username,
        bool(row.is_admin),
        pids=tuple(p.pid for p in owned if p.verified),
        unverified=tuple(p.pid for p in owned if not p.verified),
    )


def list_accounts(conn: Connection) -> list[Account]:
    rows = conn.execute(
        select(accounts.c.id, accounts.c.username, accounts.c.is_admin).order_by(accounts.c.id)
    )
    return [Account(int(r.id), r.username, bool(r.is_admin)) for r in rows]


def add_participant(
    conn: Connection, account_id: int, pid: str, bundle: bytes, created_at: int
) -> None:
    """Own ``pid``, verified, and keep its bundle (see ``AccountStore.add_participant``).

    Raises:
        NameTaken: another account proved it holds ``pid``.
    """
    found = conn.execute(
        select(participants.c.account_id, participants.c.verified).where(participants.c.pid == pid)
    ).first()
    if found is not None and found.account_id != account_id and found.verified:
        raise NameTaken(f"participant {pid} belongs to another account")
    if found is None:
        conn.execute(
            participants.insert(), {"pid": pid, "account_id": account_id, "verified": True}
        )
    else:
        conn.execute(
            update(participants)
            .where(participants.c.pid == pid)
            .values(account_id=account_id, verified=True)
        )
    upsert_bundles(conn, [{"pid": pid, "created_at": created_at, "data": bundle}])


# -- sessions --------------------------------------------------------------------------


def create_session(conn: Connection, token_hash: bytes, account_id: int, expires_at: float) -> None:
    conn.execute(delete(sessions).where(sessions.c.expires_at < time.time()))
    conn.execute(
        sessions.insert(),
        {"token_hash": token_hash, "account_id": account_id, "expires_at": expires_at},
    )


def session_account(conn: Connection, token_hash: bytes, now: float) -> Account | None:
    account_id = conn.execute(
        select(sessions.c.account_id).where(
            sessions.c.token_hash == token_hash, sessions.c.expires_at > now
        )
    ).scalar()
    return account(conn, int(account_id)) if account_id is not None else None


def delete_session(conn: Connection, token_hash: bytes) -> None:
    conn.execute(delete(sessions).where(sessions.c.token_hash == token_hash))


# -- claim challenges, nonces, secrets --------------------------------------------------


def add_challenge(
    conn: Connection, digest: bytes, account_id: int, expires_at: float, now: float, keep: int
) -> None:
    conn.execute(delete(claim_challenges).where(claim_challenges.c.expires_at <= now))
    older = (
        select(claim_challenges.c.digest)
        .where(claim_challenges.c.account_id == account_id)
        .order_by(claim_challenges.c.expires_at.desc())
        .offset(max(keep - 1, 0))
    )
    conn.execute(delete(claim_challenges).where(claim_challenges.c.digest.in_(older)))
    conn.execute(
        claim_challenges.insert(),
        {"digest": digest, "account_id": account_id, "expires_at": expires_at},
    )


def take_challenge(conn: Connection, digest: bytes, account_id: int, now: float) -> bool:
    result = conn.execute(
        delete(claim_challenges)
        .where(
            claim_challenges.c.digest == digest,
            claim_challenges.c.account_id == account_id,
            claim_challenges.c.expires_at > now,
        )
        .returning(claim_challenges.c.digest)
    )
    return result.first() is not None


def remember_nonce(conn: Connection, pid: str, nonce: str, expires_at: float, now: float) -> bool:
    """True when ``(pid, nonce)`` is new or its earlier use expired.

    One statement: a new (pid, nonce) is inserted, an expired one renewed; a live one is
    left alone and returns no row. Atomic on both engines, so two gateways receiving the
    same request at once accept it once.
    """
    stmt = dialect_insert(conn, request_nonces)
    result = conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[request_nonces.c.pid, request_nonces.c.nonce],
            set_={"expires_at": stmt.excluded.expires_at},
            where=request_nonces.c.expires_at <= now,
        ).returning(request_nonces.c.pid),
        {"pid": pid, "nonce": nonce, "expires_at": expires_at},
    )
    return result.first() is not None


def purge_nonces(conn: Connection, now: float) -> int:
    result = conn.execute(delete(request_nonces).where(request_nonces.c.expires_at <= now))
    return int(result.rowcount or 0)


def secret(conn: Connection, name: str, candidate: bytes) -> bytes:
    """The secret ``name``, ``candidate`` when it is the first (every replica agrees)."""
    conn.execute(
        dialect_insert(conn, gateway_secrets).on_conflict_do_nothing(),
        {"name": name, "value": candidate},
    )
    value = conn.execute(
        select(gateway_secrets.c.value).where(gateway_secrets.c.name == name)
    ).scalar_one()
    return bytes(value)
