"""Stable hashing: the values are part of the cluster's contract, so they are pinned here."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import mmh3
import pytest

from clusterkit._core.hashing import node_rank, partition_for, rendezvous_score


def test_murmur3_reference_values() -> None:
    # Published MurmurHash3_x86_32 values: if these move, mmh3 itself changed.
    assert mmh3.hash(b"hello", 0, signed=False) == 613153351  # 0x248bfa47
    assert mmh3.hash(b"", 0, signed=False) == 0


@pytest.mark.parametrize(
    ("key", "partitions", "seed", "expected"),
    [
        (b"hello", 2**32, 0, 613153351),
        (b"hello", 256, 0, 71),
        ("hello", 65536, 0, 64071),
        ("user:42", 256, 0, 117),
        ("user:42", 65536, 0, 41845),
        ("é", 65536, 0, 1927),
        (b"", 256, 0, 0),
        ("clusterkit", 1024, 7, 860),
        (b"hello", 1024, 7, 875),
    ],
)
def test_partition_for_is_pinned(
    key: str | bytes, partitions: int, seed: int, expected: int
) -> None:
    assert partition_for(key, partitions, seed) == expected


def test_partition_for_is_murmur3_modulo_partitions() -> None:
    for key in (b"a", b"user:1", b"\x00\xff", "snowman \u2603".encode()):
        for partitions in (1, 7, 256, 65536):
            assert partition_for(key, partitions) == mmh3.hash(key, 0, signed=False) % partitions


def test_str_keys_hash_as_utf8() -> None:
    for key in ("plain", "é", "\u2603", "日本"):
        assert partition_for(key, 4096) == partition_for(key.encode("utf-8"), 4096)


def test_seed_changes_the_partition_of_some_keys() -> None:
    keys = [f"key-{i}" for i in range(100)]
    assert [partition_for(k, 1024, 1) for k in keys] != [partition_for(k, 1024, 0) for k in keys]


def test_partitions_are_roughly_uniform() -> None:
    partitions = 64
    counts = Counter(partition_for(f"user:{i}", partitions) for i in range(64_000))
    assert set(counts) == set(range(partitions))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


def test_partition_for_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        partition_for("k", 0)
    with pytest.raises(ValueError):
        partition_for("k", 16, seed=-1)
    with pytest.raises(ValueError):
        partition_for("k", 16, seed=2**32)
    with pytest.raises(TypeError):
        partition_for(42, 16)  # type: ignore[arg-type]


def test_rendezvous_score_is_pinned_and_64_bit() -> None:
    assert rendezvous_score("node-a", 0) == 14532452499882539968
    assert rendezvous_score("node-a", 1) == 17356960735030231359
    assert rendezvous_score("node-b", 0) == 8485223681949317784
    scores = {rendezvous_score(f"node-{i}", p) for i in range(20) for p in range(50)}
    assert len(scores) == 1000
    assert all(0 <= s < 2**64 for s in scores)


def test_node_rank_is_pinned() -> None:
    assert node_rank("node-a") == 9151891499369562325
    assert node_rank("node-a") != node_rank("node-b")


def test_values_do_not_depend_on_the_process_hash_seed() -> None:
    # Python's own hash() is salted per process; ours must not be.
    code = (
        "from clusterkit._core.hashing import partition_for, rendezvous_score\n"
        "print(partition_for('user:42', 65536), rendezvous_score('node-a', 3))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"41845 {rendezvous_score('node-a', 3)}\n"}
