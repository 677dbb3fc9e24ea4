"""Project Wycheproof vectors through the primitives layer the engine uses (schemas.crypto)."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldchat.schemas.crypto import (
    aead_open,
    aead_seal,
    chain_step,
    ed25519_verify,
    hkdf_sha256,
    mlkem768_decapsulate,
    mlkem768_encapsulate,
    mlkem768_public_from_seed,
    x25519_exchange,
)
from fieldchat.schemas.errors import FieldchatError, WeakKey

ROOT = Path(__file__).resolve().parents[2]
WYCHEPROOF = Path(os.environ.get("FIELDCHAT_WYCHEPROOF", ROOT.parent / "shared/vectors/wycheproof"))


def cases(name: str, **group_filter: object) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    path = WYCHEPROOF / name
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [
        (group, test)
        for group in data["testGroups"]
        if all(group.get(k) == v for k, v in group_filter.items())
        for test in group["tests"]
    ]


def ids(case: tuple[dict[str, Any], dict[str, Any]]) -> str:
    return f"tc{case[1]['tcId']}"


def h(s: str) -> bytes:
    return bytes.fromhex(s)


@pytest.mark.parametrize("case", cases("aes_gcm_test.json", ivSize=96, tagSize=128), ids=ids)
def test_aes_gcm(case):
    _, t = case
    key, iv, aad, msg = h(t["key"]), h(t["iv"]), h(t["aad"]), h(t["msg"])
    sealed = h(t["ct"]) + h(t["tag"])
    if t["result"] == "valid":
        assert aead_seal(key, iv, msg, aad) == sealed
        assert aead_open(key, iv, sealed, aad) == msg
    else:
        with pytest.raises(FieldchatError):
            aead_open(key, iv, sealed, aad)


@pytest.mark.parametrize("case", cases("x25519_test.json"), ids=ids)
def test_x25519(case):
    _, t = case
    private, public, shared = h(t["private"]), h(t["public"]), h(t["shared"])
    if t["result"] == "valid":
        assert x25519_exchange(private, public) == shared
        return
    # "acceptable": low-order or non-canonical points; rejecting is allowed, and the
    # all-zero shared secret must be rejected (PROTOCOL.md §5.3).
    try:
        got = x25519_exchange(private, public)
    except WeakKey:
        return
    assert any(shared), "the all-zero shared secret must be refused"
    assert got == shared


@pytest.mark.parametrize("case", cases("ed25519_test.json"), ids=ids)
def test_ed25519(case):
    group, t = case
    public = h(group["publicKey"]["pk"])
    if t["result"] == "valid":
        ed25519_verify(public, h(t["sig"]), h(t["msg"]))
    else:
        with pytest.raises(FieldchatError):
            ed25519_verify(public, h(t["sig"]), h(t["msg"]))


@pytest.mark.parametrize("case", cases("hkdf_sha256_test.json"), ids=ids)
def test_hkdf_sha256(case):
    _, t = case
    run = lambda: hkdf_sha256(h(t["ikm"]), salt=h(t["salt"]), info=h(t["info"]), length=t["size"])  # noqa: E731
    if t["result"] == "valid":
        assert run() == h(t["okm"])
    else:
        with pytest.raises(FieldchatError):
            run()


@pytest.mark.parametrize("case", cases("mlkem_768_test.json"), ids=ids)
def test_mlkem768_decapsulation(case):
    _, t = case
    seed, c = h(t["seed"]), h(t.get("c", ""))
    if t["result"] == "valid":
        assert mlkem768_public_from_seed(seed) == h(t["ek"])
        assert mlkem768_decapsulate(seed, c) == h(t["K"])
    else:
        with pytest.raises(FieldchatError):
            mlkem768_decapsulate(seed, c)


@pytest.mark.parametrize("case", cases("mlkem_768_keygen_seed_test.json"), ids=ids)
def test_mlkem768_keygen_from_seed(case):
    _, t = case
    assert mlkem768_public_from_seed(h(t["seed"])) == h(t["ek"])


@pytest.mark.parametrize("case", cases("mlkem_768_encaps_test.json"), ids=ids)
def test_mlkem768_encapsulation_key_checks(case):
    """``m`` cannot be injected: valid keys encapsulate, invalid ones are refused."""
    _, t = case
    if t["result"] == "valid":
        secret, ciphertext = mlkem768_encapsulate(h(t["ek"]))
        assert len(secret) == 32 and len(ciphertext) == 1088
    else:
        with pytest.raises(WeakKey):
            mlkem768_encapsulate(h(t["ek"]))


@pytest.mark.skipif(not WYCHEPROOF.is_dir(), reason=f"Wycheproof vectors not at {WYCHEPROOF}")
def test_vector_files_were_found():
    assert len(cases("aes_gcm_test.json", ivSize=96, tagSize=128)) >= 190
    assert len(cases("mlkem_768_test.json")) == 193


@settings(max_examples=500)
@given(st.binary(min_size=32, max_size=32))
def test_chain_step_is_hmac_sha512_with_the_label_as_key(chain_key):
    """The precomputed-pad HMAC equals the standard library's HMAC."""
    assert chain_step(chain_key) == hmac.digest(b"fieldchat chain step v1", chain_key, "sha512")
