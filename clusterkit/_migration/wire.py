"""The pure core of the migration service: entry types, the msgpack mapping of
``protos/migration/migration.proto``, the batcher and the token bucket (no I/O, no Trio).

See ``service.py`` for the theory of operation and ``protos/migration/README.md`` for the
mapping.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .._errors import MigrationSourceError

METHOD = "clusterkit.migration.stream_partition"
RECEIVE_METHOD = "clusterkit.migration.receive_partition"
DEFAULT_BATCH_KEYS = 1000
DEFAULT_BATCH_BYTES = 256 * 1024
DEFAULT_GRPC_BATCH_BYTES = 1024 * 1024  # 8 + 8 messages in flight (grpc): 16 MiB, as peers
DEFAULT_STALL_TIMEOUT = 30.0
DEFAULT_MAX_RESUMES = 10
BURST_SECONDS = 0.1  # a token bucket holds this many seconds of its rate
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0  # seconds before a resume, doubling per failed attempt
KV_OVERHEAD = 64  # msgpack bytes of a KeyValue map beyond its key and value, at most (53)
BATCH_OVERHEAD = 256  # msgpack bytes of a PartitionBatch beyond its kvs, at most
_MAX_U64 = 2**64 - 1
_COUNTERS = (
    "streams_served",
    "keys_served",
    "bytes_served",
    "source_errors",
    "pulls",
    "pulls_complete",
    "pull_resumes",
    "keys_pulled",
    "bytes_pulled",
    "pushes",
    "pushes_complete",
    "push_resumes",
    "keys_pushed",
    "bytes_pushed",
    "pushes_received",
    "keys_received",
)


@dataclass(frozen=True, slots=True)
class MigrationEntry:
    """One key-value of a partition, as a source yields it and a sink receives it.

    Attributes:
        key: the key (non-empty).
        value: the value.
        version: the entry's version in the source store (e.g. a per-key write counter), so
            the receiver can keep newer data on conflict; None: the source keeps none.
        epoch: the partition epoch the entry was last written under; None: unknown.
    """

    key: bytes
    value: bytes
    version: int | None = None
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class SourceRequest:
    """What a source is asked for.

    Attributes:
        partition: the partition number.
        after: yield only keys greater than this one (a resume token); None: from the start.
        requester: the node id of the puller (authenticated by the peer handshake).
        snapshot_revision: the revision the puller expects the data at, or None.
        epoch: the fencing epoch the puller acts on, or None; a source that knows a newer
            epoch for the partition should raise.
    """

    partition: int
    after: bytes | None
    requester: str
    snapshot_revision: int | None
    epoch: int | None


@dataclass
class MigrationProgress:
    """How far a pull got; reported after each batch and returned at the end.

    Attributes:
        partition: the partition number.
        keys: entries applied (the sink returned) by this pull, over all its attempts.
        bytes: key and value bytes applied.
        batches: non-empty batches applied.
        elapsed: seconds since the pull started.
        resumes: times the transfer broke and was resumed.
        complete: the final batch was applied: the sink holds the whole partition.
        resume_token: where to continue (the last applied batch's token); ``b""``: from the
            start.
        snapshot_revision: the revision the source reported for the data, if any.
    """

    partition: int
    keys: int = 0
    bytes: int = 0
    batches: int = 0
    elapsed: float = 0.0
    resumes: int = 0
    complete: bool = False
    resume_token: builtins.bytes = b""
    snapshot_revision: int | None = None


Source = Callable[[SourceRequest], AsyncIterable[MigrationEntry]]
"""A partition source: ``fn(request)`` returns the entries, keys ascending, after ``after``."""

Sink = Callable[[int, list[MigrationEntry]], Awaitable[None]]
"""A sink: ``async def sink(partition, entries)``; a batch is applied when it returns."""

ProgressCallback = Callable[[MigrationProgress], Awaitable[None] | None]

S = TypeVar("S", bound=Source)
K = TypeVar("K", bound=Sink)


# -- the pure core: token bucket, msgpack mapping, batcher ----------------------------------


class TokenBucket:
    """Tokens accrue at ``rate`` per second up to ``burst``; :meth:`take` may go into debt
    and says how long to wait until the debt is repaid. Pure: time is an argument."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0:
            raise ValueError("a rate must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens at time ``now``; returns the seconds to wait (0: none)."""
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def _opt_uint(value: Any, what: str, limit: int = _MAX_U64) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= limit:
        raise ValueError(f"{what} must be an integer in [0, {limit}]")
    return value


def encode_request(
    partition: int,
    after: bytes | None,
    *,
    snapshot_revision: int | None = None,
    epoch: int | None = None,
    max_batch_keys: int = 0,
    max_batch_bytes: int = 0,
    rate_limit_bytes_per_second: int = 0,
) -> dict[str, Any]:
    """The ``StreamPartitionRequest`` map (unset ``optional`` fields are left out)."""
    request: dict[str, Any] = {
        "partition": partition,
        "resume_after": after or b"",
        "max_batch_keys": max_batch_keys,
        "max_batch_bytes": max_batch_bytes,
        "rate_limit_bytes_per_second": rate_limit_bytes_per_second,
    }
    if snapshot_revision is not None:
        request["snapshot_revision"] = snapshot_revision
    if epoch is not None:
        request["epoch"] = epoch
    return request


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A decoded ``StreamPartitionRequest`` (zero hints mean: the source's default)."""

    partition: int
    after: bytes | None
    snapshot_revision: int | None
    epoch: int | None
    max_batch_keys: int
    max_batch_bytes: int
    rate_limit_bytes_per_second: int


def decode_request(payload: Any, partitions: int) -> StreamRequest:
    """Check and decode a ``StreamPartitionRequest`` map; missing fields are proto3 zeros.

    Raises:
        ValueError: not a valid request (unknown keys are ignored, for later fields).
    """
    if not isinstance(payload, dict):
        raise ValueError("a StreamPartitionRequest must be a map")
    partition = payload.get("partition", 0)
    if type(partition) is not int or not 0 <= partition < partitions:
        raise ValueError(f"partition {partition!r} is not in range({partitions})")
    after = payload.get("resume_after", b"")
    if type(after) is not bytes:
        raise ValueError("resume_after must be bytes")
    revision = payload.get("snapshot_revision")
    if revision is not None and (type(revision) is not int or abs(revision) >= 2**63):
        raise ValueError("snapshot_revision must be a 64-bit integer")
    return StreamRequest(
        partition=partition,
        after=after or None,
        snapshot_revision=revision,
        epoch=_opt_uint(payload.get("epoch"), "epoch"),
        max_batch_keys=_opt_uint(payload.get("max_batch_keys", 0), "max_batch_keys", 2**32 - 1)
        or 0,
        max_batch_bytes=_opt_uint(payload.get("max_batch_bytes", 0), "max_batch_bytes") or 0,
        rate_limit_bytes_per_second=_opt_uint(
            payload.get("rate_limit_bytes_per_second", 0), "rate_limit_bytes_per_second"
        )
        or 0,
    )


class SourceContractError(Exception):
    """Raised on the source node when its source broke the contract (sent to the puller as
    a ``SourceContractError`` abort, which the puller raises as MigrationSourceError)."""


class Batcher:
    """Cuts a source's entries into ``PartitionBatch`` maps, checking the source's contract.

    Pure. :meth:`add` returns the batch to send *before* the entry when the entry does not fit
    in the current one; :meth:`finish` returns the final batch (``last = true``).

    Args:
        max_keys, max_bytes: the batch limits (a single larger entry still goes alone).
        max_wire: the most msgpack bytes one batch may take (the peer message limit).
    """

    def __init__(
        self,
        partition: int,
        after: bytes | None,
        *,
        max_keys: int,
        max_bytes: int,
        max_wire: int,
        snapshot_revision: int | None = None,
    ) -> None:
        self.partition = partition
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.max_wire = max_wire
        self.keys_sent = 0
        self.bytes_sent = 0
        self.batches = 0
        self._after = after
        self._prev = after
        self._token = after or b""
        self._revision = snapshot_revision
        self._kvs: list[dict[str, Any]] = []
        self._size = 0
        self._wire = BATCH_OVERHEAD

    def add(self, entry: Any) -> dict[str, Any] | None:
        """Take the next entry.

        Raises:
            SourceContractError: not a MigrationEntry of bytes, an empty key, or a key not
                greater than the previous one (or than ``after``), or too big for a message.
        """
        if not isinstance(entry, MigrationEntry):
            raise SourceContractError(
                f"partition {self.partition}: the source yielded {type(entry).__name__}, "
                "not a MigrationEntry"
            )
        key, value = entry.key, entry.value
        if not isinstance(key, bytes) or not isinstance(value, bytes) or not key:
            raise SourceContractError(
                f"partition {self.partition}: keys must be non-empty bytes and values bytes"
            )
        prev = self._prev
        if prev is not None and key <= prev:
            where = "the resume point" if prev is self._after else "the previous key"
            raise SourceContractError(
                f"partition {self.partition}: the source yielded key {key[:64]!r} after "
                f"{prev[:64]!r}: keys must ascend and be greater than {where}"
            )
        n = len(key) + len(value)
        # On the wire the key may appear twice: in its KeyValue and as the resume_token.
        if n + len(key) + KV_OVERHEAD + BATCH_OVERHEAD > self.max_wire:
            raise SourceContractError(
                f"partition {self.partition}: the entry of key {key[:64]!r} has {n} bytes, "
                f"more than fit in one peer message ({self.max_wire})"
            )
        kv: dict[str, Any] = {"key": key, "value": value}
        if entry.version is not None:
            kv["version"] = _contract_uint(entry.version, "version", self.partition)
        if entry.epoch is not None:
            kv["epoch"] = _contract_uint(entry.epoch, "epoch", self.partition)
        out = None
        if self._kvs and (
            len(self._kvs) >= self.max_keys
            or self._size + n > self.max_bytes
            or self._wire + n + len(key) + KV_OVERHEAD > self.max_wire
        ):
            out = self._cut(last=False)
        self._kvs.append(kv)
        self._size += n
        self._wire += n + KV_OVERHEAD
        self._prev = key
        return out

    def pending_bytes(self) -> int:
        """Key and value bytes in the batch being filled."""
        return self._size

    def finish(self) -> dict[str, Any]:
        """The final batch: what is left, with ``last = true`` (maybe no entries)."""
        return self._cut(last=True)

    def _cut(self, *, last: bool) -> dict[str, Any]:
        kvs, self._kvs = self._kvs, []
        if kvs:
            self._token = kvs[-1]["key"]
        self.keys_sent += len(kvs)
        self.bytes_sent += self._size
        batch: dict[str, Any] = {
            "partition": self.partition,
            "kvs": kvs,
            "resume_token": self._token,
            "last": last,
            "keys_sent": self.keys_sent,
            "bytes_sent": self.bytes_sent,
        }
        if self.batches == 0 and self._revision is not None:
            batch["snapshot_revision"] = self._revision
        self.batches += 1
        self._size, self._wire = 0, BATCH_OVERHEAD
        return batch


def _contract_uint(value: Any, what: str, partition: int) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise SourceContractError(f"partition {partition}: an entry's {what} must be a uint64")
    return value


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A checked ``PartitionBatch`` as the puller applies it."""

    entries: list[MigrationEntry]
    nbytes: int
    resume_token: bytes
    last: bool
    snapshot_revision: int | None


def decode_batch(item: Any, partition: int, last_key: bytes | None) -> DecodedBatch:
    """Check and decode one ``PartitionBatch`` map.

    Args:
        last_key: the last key applied so far; every key must be greater.

    Raises:
        MigrationSourceError: ``MalformedBatch`` (not a batch of this partition) or
            ``SourceContractError`` (keys out of order).
    """

    def bad(why: str) -> MigrationSourceError:
        return MigrationSourceError("MalformedBatch", f"partition {partition}: {why}")

    if not isinstance(item, dict):
        raise bad("a PartitionBatch must be a map")
    if item.get("partition", 0) != partition:
        raise bad(f"a batch of partition {item.get('partition')!r} in this stream")
    kvs = item.get("kvs", [])
    token = item.get("resume_token", b"")
    last = item.get("last", False)
    revision = item.get("snapshot_revision")
    if type(kvs) is not list or type(token) is not bytes or type(last) is not bool:
        raise bad("kvs must be a list, resume_token bytes and last a bool")
    if revision is not None and type(revision) is not int:
        raise bad("snapshot_revision must be an integer")
    entries: list[MigrationEntry] = []
    nbytes = 0
    prev = last_key
    for kv in kvs:
        if type(kv) is not dict:
            raise bad("a KeyValue must be a map")
        key, value = kv.get("key", b""), kv.get("value", b"")
        version, epoch = kv.get("version"), kv.get("epoch")
        if type(key) is not bytes or type(value) is not bytes or not key:
            raise bad("a KeyValue's key must be non-empty bytes and its value bytes")
        if (version is not None and type(version) is not int) or (
            epoch is not None and type(epoch) is not int
        ):
            raise bad("a KeyValue's version and epoch must be integers")
        if prev is not None and key <= prev:
            raise MigrationSourceError(
                "SourceContractError",
                f"partition {partition}: key {key[:64]!r} came after {prev[:64]!r}",
            )
        prev = key
        nbytes += len(key) + len(value)
        entries.append(MigrationEntry(key, value, version, epoch))
    return DecodedBatch(entries, nbytes, token, last, revision)


# -- the service ------------------------------------------------------------------------------
