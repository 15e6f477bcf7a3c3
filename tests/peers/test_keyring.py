"""The keyring a rotation writes: what each side accepts and dials with, and its stored form."""

from __future__ import annotations

import pytest

from clusterkit._peers.keyring import Keyring

OLD = b"old-secret-0123456789abcdef"
NEW = b"new-secret-0123456789abcdef"


def test_a_plain_secret_is_stored_as_itself_and_read_back() -> None:
    keys = Keyring(OLD)
    assert keys.encode() == OLD  # what clusterkit stored before rotations existed
    assert Keyring.decode(OLD) == keys
    assert keys.accepted() == (OLD,)
    assert keys.dialing() == OLD
    assert not keys.rotating()


def test_a_rotation_accepts_both_then_only_the_new_and_dials_old_then_new() -> None:
    keys = Keyring(NEW, OLD, rotated_at=1000.0, window=60.0)
    assert Keyring.decode(keys.encode()) == keys
    assert keys.accepted(now=1000.0) == (NEW, OLD)
    assert keys.dialing(now=1000.0) == OLD  # a peer may not have seen the rotation yet
    assert keys.dialing(now=1029.0) == OLD
    assert keys.dialing(now=1030.0) == NEW  # every peer accepts the new one by now
    assert keys.accepted(now=1059.0) == (NEW, OLD)
    assert keys.accepted(now=1060.0) == (NEW,)
    assert keys.ends_in(now=1050.0) == 10.0
    settled = keys.settled()
    assert settled.current == NEW and settled.previous is None
    assert OLD not in settled.encode()  # only a fingerprint of the old secret is kept
    assert Keyring.decode(settled.encode()) == settled
    assert "secret" not in repr(keys) and OLD.decode() not in repr(keys)


def test_adopt_changes_every_holder_of_the_object() -> None:
    keys = Keyring(OLD)
    held_by_pool = keys
    keys.adopt(Keyring(NEW, OLD, rotated_at=5.0, window=10.0))
    assert held_by_pool.accepted(now=6.0) == (NEW, OLD)


@pytest.mark.parametrize(
    "value",
    [
        b"short",
        b"{not json",
        b'{"current": "x"}',
        b'{"current": "new-secret-0123456789", "previous": 7, "rotated_at": 1, "window": 1}',
        b'{"current": "new-secret-0123456789", "previous": "old-secret-0123456789", '
        b'"rotated_at": -1, "window": 1}',
        b'{"current": "new-secret-0123456789", "previous": "old-secret-0123456789", '
        b'"rotated_at": 1, "window": true}',
        b'{"current": "new-secret-0123456789", "previous": "old-secret-0123456789", '
        b'"rotated_at": 1, "window": Infinity}',
        b'{"current": "new-secret-0123456789", "rotated_from": "short"}',
        pytest.param(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-deeply"),
    ],
)
def test_garbage_is_not_a_keyring(value: bytes) -> None:
    with pytest.raises(ValueError):
        Keyring.decode(value)


def test_what_a_node_holding_the_old_secret_accepts_as_a_rotation() -> None:
    mine = Keyring(OLD)
    rotating = Keyring(NEW, OLD, rotated_at=1.0, window=60.0)
    assert rotating.follows(mine)
    assert rotating.settled().follows(mine)  # it missed the whole window: still a rotation
    assert not Keyring(NEW).follows(mine)  # a plain overwrite is not
    assert not Keyring(NEW, b"someone-elses-secret-000", rotated_at=1.0, window=60.0).follows(mine)
    stranger = Keyring(b"unrelated-secret-0123456789").settled()
    assert not Keyring(NEW, rotated_from=stranger.rotated_from).follows(mine)
