"""The cache's memory: every partition's entries in one LRU, bounded in bytes, with TTLs (pure).

Theory of operation
-------------------
An entry is ``(value, version, deadline)``. ``version`` is ``(epoch, seq)``: the leader's
fencing epoch and a per-partition counter, so a newer write always wins, wherever and in
whatever order a copy arrives (replication, a warm-up pull, a retry). A delete is a write of
no value: it leaves a *tombstone* with its version, so a late copy of an older value cannot
bring the key back; tombstones are bounded like entries and expire with ``TOMBSTONE_TTL``.

Deadlines are in the node's own monotonic clock (``now`` is passed in). Between nodes a TTL
travels as the seconds *remaining*, so clocks need not agree.

Memory: every entry and tombstone is charged ``len(key) + len(value) + OVERHEAD`` bytes; after
each insertion the least recently used entries are evicted until the total is within
``max_bytes``. An evicted key is a miss on this node (the cache's normal answer). Eviction
forgets the key's version too, so the node that warms a partition up skips copies of keys
written while it warmed (``node.py``): an old copy never replaces a newer value it evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

Version = tuple[int, int]  # (leader epoch, sequence within the partition)
OVERHEAD = 96  # bytes charged per entry beyond its key and value (dict slots, tuples)
TOMBSTONE_TTL = 60.0


@dataclass(slots=True)
class Item:
    """One key's newest state on this node; ``value`` None is a tombstone (a delete)."""

    value: bytes | None
    version: Version
    deadline: float

    def size(self, key: bytes) -> int:
        return len(key) + (len(self.value) if self.value is not None else 0) + OVERHEAD


class Cache:
    """All partitions' entries in one LRU (see the module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lru: OrderedDict[tuple[int, bytes], Item] = OrderedDict()
        self._by_partition: dict[int, set[bytes]] = {}
        self.seq: dict[int, Version] = {}  # the newest version stamped or seen, per partition
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, pt: int, key: bytes, now: float) -> Item | None:
        """The live entry for ``key`` (tombstones and expired entries: None); a use for LRU."""
        item = self._lru.get((pt, key))
        if item is None:
            return None
        if item.deadline <= now:
            self._remove(pt, key)
            self.expirations += 1
            return None
        self._lru.move_to_end((pt, key))
        return item if item.value is not None else None

    def apply(
        self, pt: int, key: bytes, value: bytes | None, version: Version, ttl: float, now: float
    ) -> bool:
        """Take a write (``value`` None: a delete) unless this node holds a newer one."""
        current = self._lru.get((pt, key))
        if current is not None and current.version >= version:
            return False
        if self.seq.get(pt, (0, 0)) < version:
            self.seq[pt] = version
        if current is not None:
            self._remove(pt, key)
        ttl = TOMBSTONE_TTL if value is None else ttl
        if ttl <= 0:
            return True  # already expired: only the version moved
        item = Item(value, version, now + ttl)
        self._lru[(pt, key)] = item
        self._by_partition.setdefault(pt, set()).add(key)
        self.bytes += item.size(key)
        self._evict()
        return True

    def stamp(self, pt: int, epoch: int) -> Version:
        """The next version the leader of ``pt`` under ``epoch`` writes with."""
        last_epoch, last_seq = self.seq.get(pt, (0, 0))
        version = (epoch, last_seq + 1) if epoch >= last_epoch else (last_epoch, last_seq + 1)
        self.seq[pt] = version
        return version

    def entries(self, pt: int, after: bytes | None, now: float) -> list[tuple[bytes, Item, float]]:
        """The partition's live entries and tombstones after ``after``, keys ascending, with
        the seconds each has left (for a warm-up pull)."""
        keys = sorted(k for k in self._by_partition.get(pt, ()) if after is None or k > after)
        out = []
        for key in keys:
            item = self._lru[(pt, key)]
            left = item.deadline - now
            if left > 0:
                out.append((key, item, left))
        return out

    def drop(self, pt: int) -> None:
        """Forget a partition (this node no longer holds it)."""
        for key in self._by_partition.pop(pt, set()):
            item = self._lru.pop((pt, key))
            self.bytes -= item.size(key)
        self.seq.pop(pt, None)

    def partitions(self) -> set[int]:
        return set(self._by_partition)

    def _remove(self, pt: int, key: bytes) -> None:
        item = self._lru.pop((pt, key))
        self.bytes -= item.size(key)
        keys = self._by_partition[pt]
        keys.discard(key)
        if not keys:
            del self._by_partition[pt]

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._lru:
            (pt, key), _ = next(iter(self._lru.items()))
            self._remove(pt, key)
            self.evictions += 1
