"""The KV store's local storage: per partition, versioned entries (in memory).

Theory of operation
-------------------
Every write is stamped by the partition's leader with a version ``(epoch, seq)``: ``epoch`` is
the leader's fencing epoch (``ck.leader_epoch``, strictly increasing per partition) and
``seq`` counts the leader's writes within it. An entry is only replaced by a strictly newer
version, so the order in which replication and migration deliver copies of a key does not
matter: every replica converges on the newest version. Deletes are kept as tombstones
(``value is None``) for the same reason — a late, older copy must not resurrect the key.

``max_epoch`` is the newest leader epoch a partition has seen; a replica refuses writes from
an older epoch (a stale leader that has not yet noticed it lost its lease).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Version = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored value; ``value is None`` is a tombstone."""

    value: bytes | None
    epoch: int
    seq: int

    @property
    def version(self) -> Version:
        return (self.epoch, self.seq)


@dataclass
class PartitionData:
    """One partition's entries on this node.

    ``entries`` is what reads see. On the leader, a write sits in ``inflight`` until every
    replica has it, and only then enters ``entries``: a read never returns a value that a
    failed write left behind on the leader alone. Migration snapshots include in-flight
    writes (a puller registered while they replicate would otherwise miss them).
    """

    entries: dict[bytes, Entry] = field(default_factory=dict)
    inflight: dict[bytes, Entry] = field(default_factory=dict)
    max_epoch: int = 0
    next_seq: int = 0
    seq_epoch: int = 0

    def apply(self, key: bytes, entry: Entry) -> bool:
        """Store ``entry`` unless a newer version is already there; True if stored."""
        current = self.entries.get(key)
        if current is not None and current.version >= entry.version:
            return False
        self.entries[key] = entry
        self.max_epoch = max(self.max_epoch, entry.epoch)
        return True

    def stamp(self, epoch: int) -> int:
        """The next sequence number of a write led under ``epoch``."""
        if epoch != self.seq_epoch:
            self.seq_epoch, self.next_seq = epoch, 0
        self.next_seq += 1
        return self.next_seq

    def begin(self, key: bytes, entry: Entry) -> None:
        """A write the leader is replicating (see the class docstring)."""
        current = self.inflight.get(key)
        if current is None or current.version < entry.version:
            self.inflight[key] = entry
        self.max_epoch = max(self.max_epoch, entry.epoch)

    def finish(self, key: bytes, entry: Entry, *, committed: bool) -> None:
        """The write is on every replica (``committed``), or it failed."""
        if self.inflight.get(key) is entry:
            del self.inflight[key]
        if committed:
            self.apply(key, entry)

    def snapshot(self, after: bytes | None) -> list[tuple[bytes, Entry]]:
        """Entries (with in-flight writes) after ``after``, in key order (a copy)."""
        merged = {k: e for k, e in self.entries.items() if after is None or k > after}
        for k, e in self.inflight.items():
            if (after is None or k > after) and (k not in merged or merged[k].version < e.version):
                merged[k] = e
        return sorted(merged.items())

    def live_keys(self) -> int:
        return sum(1 for e in self.entries.values() if e.value is not None)


@dataclass
class Store:
    """All partitions this node holds."""

    partitions: dict[int, PartitionData] = field(default_factory=dict)

    def part(self, pt: int) -> PartitionData:
        data = self.partitions.get(pt)
        if data is None:
            data = self.partitions[pt] = PartitionData()
        return data

    def drop(self, pt: int) -> None:
        self.partitions.pop(pt, None)


def encode_value(entry: Entry) -> bytes:
    """An entry's value on the migration wire: a tag byte, then the value."""
    return b"\x00" if entry.value is None else b"\x01" + entry.value


def decode_value(data: bytes) -> bytes | None:
    if data[:1] == b"\x01":
        return data[1:]
    if data == b"\x00":
        return None
    raise ValueError("not a kv_store migration value")
