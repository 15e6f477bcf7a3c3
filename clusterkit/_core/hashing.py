"""Stable hashes: key -> partition, and the scores that break ties in the assignment.

Python's built-in ``hash()`` is salted per process (``PYTHONHASHSEED``), so two nodes, or
one node before and after a restart, would disagree about where a key lives. Nothing here
uses it. MurmurHash3 is specified byte for byte and implemented in every mainstream language
(Go ``github.com/spaolacci/murmur3``, Java Guava ``Hashing.murmur3_32_fixed``, C++, Rust,
...), so the values below are the same in every process, on every platform and in every
language that hashes the same bytes with the same seed. A change to any value here
re-partitions every cluster's keys: the tests pin a few of them on purpose.
"""

from __future__ import annotations

import mmh3

__all__ = ["node_rank", "partition_for", "rendezvous_score"]

_MAX_SEED = 0xFFFF_FFFF
_MASK_64 = 0xFFFF_FFFF_FFFF_FFFF
# Fixed seeds for the tie-breaking hashes, distinct so that the two families are independent.
_RENDEZVOUS_SEED = 0x636B_7276  # "ckrv"
_RANK_SEED = 0x636B_726E  # "ckrn"


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    raise TypeError(f"key must be str or bytes, not {type(key).__name__}")


def partition_for(key: str | bytes, partitions: int, seed: int = 0) -> int:
    """Return the partition that owns ``key``.

    The value is ``MurmurHash3_x86_32(key, seed)``, read as an unsigned 32-bit integer,
    modulo ``partitions``; a ``str`` key is hashed as its UTF-8 bytes. It is stable across
    processes, restarts, machines and languages, unlike Python's ``hash()``.

    Args:
        key: the key; ``str`` is UTF-8 encoded, ``bytes`` are hashed as they are.
        partitions: the cluster's partition count P (at least 1).
        seed: the cluster's hash seed, in ``[0, 2**32)``.

    Returns:
        An integer in ``range(partitions)``.

    Raises:
        ValueError: ``partitions`` is less than 1 or ``seed`` is out of range.
        TypeError: ``key`` is neither ``str`` nor ``bytes``.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32), not {seed}")
    value: int = mmh3.hash(_key_bytes(key), seed, signed=False)
    return value % partitions


def rendezvous_score(node_id: str, partition: int) -> int:
    """Return the rendezvous (highest-random-weight) score of ``node_id`` for ``partition``.

    The score is the low 64 bits of ``MurmurHash3_x64_128`` over the UTF-8 bytes of
    ``f"{node_id}\\x00{partition}"`` with a fixed seed: deterministic everywhere and
    independent for each (node, partition) pair. The assignment uses it to break ties, so
    that equally good choices are spread over the nodes instead of piling onto the first
    one in some iteration order.

    Args:
        node_id: the node's id.
        partition: the partition number.

    Returns:
        An integer in ``[0, 2**64)``.
    """
    data = f"{node_id}\x00{partition}".encode()
    value: int = mmh3.hash128(data, _RENDEZVOUS_SEED, True, False)
    return value & _MASK_64


def node_rank(node_id: str) -> int:
    """Return a stable pseudo-random rank for ``node_id``, in ``[0, 2**64)``.

    The assignment orders nodes by it (then by id) wherever it needs one fixed order, so the
    order does not depend on how node ids happen to be spelled or passed in.
    """
    value: int = mmh3.hash128(node_id.encode(), _RANK_SEED, True, False)
    return value & _MASK_64
