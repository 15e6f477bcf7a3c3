"""Peer frames and the handshake MACs (pure), including a fuzzed decoder."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterkit._peers import frames as f
from clusterkit._peers.handshake import client_mac, new_nonce, server_mac, verify

NONCE = bytes(range(32))

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
ids = st.integers(0, 2**63 - 1)
names = st.text(min_size=1, max_size=256)

frame_strategy = st.one_of(
    st.builds(f.Request, ids, names, payloads),
    st.builds(f.Response, ids, payloads),
    st.builds(f.ErrorReply, ids, names, st.text(), payloads),
    st.builds(f.Notify, names, payloads),
    st.builds(f.StreamItem, ids, payloads),
    st.builds(f.StreamEnd, ids, st.none() | st.tuples(names, st.text())),
    st.builds(f.StreamOpen, ids, names, payloads),
    st.builds(f.StreamCredit, ids, ids),
    st.builds(f.Challenge, st.just(NONCE)),
    st.builds(f.Answer, names, st.just(NONCE), st.just(NONCE)),
    st.builds(f.Proof, names, st.just(NONCE)),
)


@given(frame_strategy)
def test_every_frame_round_trips(frame: f.Frame) -> None:
    assert f.decode(f.encode(frame)) == frame


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_the_decoder_only_ever_raises_frame_error(data: bytes) -> None:
    try:
        f.decode(data)
    except f.FrameError as exc:
        assert exc.close_code in (1002, 1009)


@given(st.lists(payloads, max_size=6))
def test_arbitrary_msgpack_arrays_are_refused_or_valid(items: list[object]) -> None:
    data = msgpack.packb(items, use_bin_type=True)
    try:
        frame = f.decode(data)
    except f.FrameError:
        return
    assert f.encode(frame) == data or f.decode(f.encode(frame)) == frame


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"kind": 0},
        [42, 1],
        [0, -1, "m", None],
        [0, 1, "", None],
        [0, 1, "m"],
        [0, True, "m", None],
        [2, 1, "E", b"bytes", None],
        [2, 1, "E", "m"],
        [5, 1, 7],
        [5, 1, "E"],
        [5, 1, ["E"]],
        [5, 1, ["", "m"]],
        [10, 1, "", None],
        [11, ["x"]],
        [11, b"x"],
        [7, b"short"],
        [8, "n", NONCE, b"x" * 31],
    ],
)
def test_malformed_frames_are_refused(obj: object) -> None:
    with pytest.raises(f.FrameError):
        f.decode(msgpack.packb(obj, use_bin_type=True))


def test_limits_and_garbage() -> None:
    big = f.encode(f.Notify("m", b"x" * 1000))
    with pytest.raises(f.FrameError) as info:
        f.decode(big, max_size=500)
    assert info.value.close_code == 1009
    with pytest.raises(f.FrameError):
        f.decode(f.encode(f.Notify("m", 1)) + b"\x00")  # trailing bytes
    with pytest.raises(f.FrameError):
        f.decode(msgpack.packb([3, "m", msgpack.ExtType(1, b"x")]))


def test_handshake_macs_bind_role_nonces_and_id() -> None:
    secret, other = b"s" * 32, b"t" * 32
    sn, cn = new_nonce(), new_nonce()
    assert sn != cn and len(sn) == 32
    mac = client_mac(secret, sn, cn, "n1")
    assert verify(client_mac(secret, sn, cn, "n1"), mac)
    assert not verify(client_mac(other, sn, cn, "n1"), mac)  # wrong secret
    assert not verify(client_mac(secret, sn, cn, "n2"), mac)  # another id
    assert not verify(client_mac(secret, new_nonce(), cn, "n1"), mac)  # replayed
    assert not verify(server_mac(secret, sn, cn, "n1"), mac)  # reflected


def test_batches_flatten_one_level_and_refuse_nesting() -> None:
    a = f.encode(f.Response(1, "a"))
    b = f.encode(f.StreamItem(3, b"b"))
    assert f.decode_batch(f.encode(f.Batch((a, b)))) == [f.Response(1, "a"), f.StreamItem(3, b"b")]
    assert f.decode_batch(a) == [f.Response(1, "a")]
    nested = f.encode(f.Batch((f.encode(f.Batch((a,))),)))
    with pytest.raises(f.FrameError):
        f.decode_batch(nested)
    with pytest.raises(f.FrameError):
        f.decode_batch(f.encode(f.Batch((b"\xc1",))))
