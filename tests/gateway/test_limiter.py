"""The limits of logins and registrations as pure logic with an injected clock, and
the device cookies that mark a user's own browser."""

from __future__ import annotations

import pytest

from fieldchat.gateway import GatewaySettings, TooManyRequests
from fieldchat.gateway._accounts import Accounts, Limiter, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_attempts_in_flight_take_slots_before_any_hashing():
    clock = Clock()
    limiter = Limiter(5, 60, clock=clock)
    flying = [limiter.acquire("user:erin") for _ in range(5)]
    with pytest.raises(TooManyRequests) as refused:
        limiter.acquire("user:erin")
    assert refused.value.retry_after == 1.0  # busy, not yet failed: ask again soon
    flying[0].done(record=False)  # a success frees its slot
    flying[0].done(record=True)  # and ending twice changes nothing
    limiter.acquire("user:erin").done(record=True)
    for attempt in flying[1:]:
        attempt.done(record=True)
    clock.now += 10
    with pytest.raises(TooManyRequests) as refused:
        limiter.acquire("user:erin")
    assert refused.value.retry_after == pytest.approx(50)  # until the oldest failure ages out
    clock.now += 50
    limiter.acquire("user:erin").done(record=False)


def test_every_key_of_an_attempt_must_have_room():
    limiter = Limiter(2, 60, clock=Clock())
    limiter.acquire("user:a", "addr:1").done(record=True)
    limiter.acquire("user:b", "addr:1").done(record=True)
    with pytest.raises(TooManyRequests):
        limiter.acquire("user:c", "addr:1")  # the address is full
    limiter.acquire("user:c", "addr:2").done(record=False)
    limiter.forget("addr:1")
    limiter.acquire("user:c", "addr:1").done(record=False)


def test_the_limiter_forgets_the_least_recently_used_keys():
    limiter = Limiter(1, 60, clock=Clock(), max_keys=3)
    for n in range(4):
        limiter.acquire(f"user:{n}").done(record=True)
    limiter.acquire("user:0").done(record=True)  # forgotten: a fresh window
    with pytest.raises(TooManyRequests):
        limiter.acquire("user:3")


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "addr:192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "addr:2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "addr:2001:db8:1:2::/64"),  # the same subscriber
        ("::ffff:192.0.2.7", "addr:192.0.2.7"),
        (None, "addr:?"),
        ("not-an-address", "addr:not-an-address"),
    ],
)
def test_address_keys_group_an_ipv6_subscriber(host, key):
    assert address_key(host) == key


async def test_device_cookies_name_one_user_and_expire(store):
    accounts = Accounts(store, GatewaySettings(device_cookie_ttl_s=3600))
    cookie = await accounts.device_cookie("Victim", now=10_000)
    key = await accounts.device_key(cookie, "victim", now=10_000)
    assert key is not None and key.startswith("device:")
    assert await accounts.device_key(cookie, "VICTIM", now=13_000) == key
    assert await accounts.device_key(cookie, "mallory", now=10_000) is None
    assert await accounts.device_key(cookie, "victim", now=13_601) is None  # expired
    body, mac = cookie.split(".")
    assert await accounts.device_key(f"{body}.{mac[:-2]}AA", "victim", now=10_000) is None
    for junk in ("", "x", "a.b.c", "!!.??", "." * 600):
        assert await accounts.device_key(junk, "victim", now=10_000) is None
    # another gateway on the same database accepts it (one shared key)
    other = Accounts(store, GatewaySettings(device_cookie_ttl_s=3600))
    assert await other.device_key(cookie, "victim", now=10_000) == key
