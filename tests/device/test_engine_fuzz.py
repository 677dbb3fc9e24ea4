"""Any bytes fed to the engine: a typed FieldchatError or a duplicate, never anything else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldchat.schemas import FieldchatError, TextMessage
from tests.device._mesh import Mesh, text_of

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

MESH = Mesh("alice", "bob")
CID = MESH.create("alice", "bob", sign_every=2)
VALID = [MESH["alice"].seal(CID, TextMessage(sent_at=i, text="m" * i)) for i in range(8)]


def mutated() -> st.SearchStrategy[bytes]:
    """A valid envelope with a few bytes changed, cut or extended."""

    def mutate(base: bytes, edits: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
        data = bytearray(base)
        for pos, value in edits:
            data[pos % len(data)] = value
        return bytes(data[: max(0, len(data) - cut)]) + tail

    return st.builds(
        mutate,
        st.sampled_from(VALID),
        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
        st.integers(0, 80),
        st.binary(max_size=8),
    )


@FUZZ
@given(st.one_of(st.binary(max_size=400), mutated()))
def test_open_raises_typed_errors_only(data):
    try:
        opened = MESH["bob"].open(CID, data)
    except FieldchatError:
        return
    # Accepted: either a duplicate (None) or authentic content sealed by alice.
    assert opened is None or opened.sender == MESH["alice"].pid


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=1500), st.builds(lambda r: b"\x01\x10" + r, st.binary(max_size=1500))
    )
)
def test_grants_rosters_and_bundles_raise_typed_errors_only(data):
    bob = MESH["bob"]
    for handler in (bob.handle_grant, bob.handle_roster, bob.learn_bundle):
        try:
            handler(data)
        except FieldchatError:
            pass


def test_valid_traffic_still_flows_after_the_fuzzing():
    envelope = MESH["alice"].seal(CID, TextMessage(sent_at=1, text="still fine"))
    assert text_of(MESH["bob"].open(CID, envelope)) == "still fine"
