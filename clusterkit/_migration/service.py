"""``ck.migration``: stream a partition's key-values from one node to another.

Theory of operation
-------------------
The node that *has* a partition's data registers a **source** (``ck.migration.source(fn)``):
``fn(SourceRequest)`` yields the partition's :class:`MigrationEntry` items in ascending byte
order of their keys, starting after ``request.after``. The node that *needs* the data
**pulls** it (``ck.migration.pull(pt, from_node, sink)``) over one peer stream, method
:data:`METHOD`, whose open payload is a ``StreamPartitionRequest`` and whose items are
``PartitionBatch`` messages — both as msgpack maps keyed by the field names of
``protos/migration/migration.proto`` (the mapping is written down in
``protos/migration/README.md``).

Batching. The source cuts the entries into batches of at most ``max_batch_keys`` entries and
about ``max_batch_bytes`` key and value bytes (the puller's hints; a single larger entry goes
alone), never more than fits in one peer message. A batch is cut when the next entry does not
fit, so the batch that carries ``last = true`` is the one with the final entries (an empty
partition sends one empty final batch). Every batch carries ``resume_token`` (the last key it
holds — or, for an empty batch, the position it starts from) and the running ``keys_sent`` and
``bytes_sent`` counters. The source checks its own contract: non-empty ``bytes`` keys, each
greater than the one before and than ``after``; a violation aborts the stream with
``SourceContractError`` instead of sending a batch that could duplicate or skip keys.

Flow control. Peer streams carry per-direction credit (``_peers/session.py``): the sender may
have at most ``STREAM_WINDOW`` items that the receiving *application* has not consumed yet.
The puller consumes a batch only when it is ready for it — after pacing and after the sink
applied the previous one — so a slow sink stops the source after a window of batches instead
of growing a buffer, and nothing here needs a flow-control protocol of its own.

Rate limiting. ``rate_keys`` and ``rate_bytes`` are token buckets (:class:`TokenBucket`,
``BURST_SECONDS`` of burst) on the puller: before a batch goes to the sink the puller waits
until the buckets cover it, so the pull's average rate stays under the limits, and through the
credit above the source slows to the same pace. ``rate_bytes`` is also sent as
``rate_limit_bytes_per_second``, and the source paces its reads and sends with its own bucket,
so even the first window of batches does not leave at full speed.

Resumption. A batch counts as applied when the sink returns; its ``resume_token`` is then the
pull's position. When the stream breaks — the connection dropped (:class:`PeerUnreachable`),
the stream ended before the final batch, or no batch came within ``stall_timeout`` — the
puller opens a new stream with ``resume_after`` = that token, after a jittered exponential
backoff, up to ``max_resumes`` times and within ``timeout``. The source streams only keys
after the token and the puller refuses a key not greater than the last one it applied, so
across resumes the sink sees every key exactly once (as long as the source's data does not
change meanwhile: pin it with ``snapshot_revision``). Errors of the source itself are not
retried: they are raised as :class:`NoMigrationSource` or :class:`MigrationSourceError`; when
resuming gives up, :class:`MigrationInterrupted` carries the progress, whose ``resume_token``
continues the transfer later (``pull(..., after=token)``).

The source side cancels the source when the puller aborts the stream or the connection
breaks (the puller never sends items, so a receive on the stream ends only that way).
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import logging
import math
import random
from collections.abc import AsyncIterable, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from .._core.records import Node
from .._errors import (
    MigrationInterrupted,
    MigrationSourceError,
    NoMigrationSource,
    PeerUnreachable,
    RemoteError,
)
from .._peers.service import Peers
from .._peers.session import PeerStream

METHOD = "clusterkit.migration.stream_partition"
DEFAULT_BATCH_KEYS = 1000
DEFAULT_BATCH_BYTES = 256 * 1024
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


class _Pacer:
    """The puller's key and byte buckets together."""

    def __init__(self, rate_keys: float | None, rate_bytes: float | None, now: float) -> None:
        self._buckets = [
            (TokenBucket(rate, rate * BURST_SECONDS, now), is_bytes)
            for rate, is_bytes in ((rate_keys, False), (rate_bytes, True))
            if rate is not None
        ]

    async def pace(self, keys: int, nbytes: int) -> None:
        now = trio.current_time()
        wait = max(
            (b.take(nbytes if is_bytes else keys, now) for b, is_bytes in self._buckets),
            default=0.0,
        )
        if wait > 0:
            await trio.sleep(wait)


class _Broken(Exception):
    """Internal: the transfer broke (resume it)."""


class _PullerGone(Exception):
    """Internal: the puller aborted the stream or the connection broke."""


class Migration:
    """Move partitions between nodes: serve a source, pull from other nodes' sources.

    See the module docstring for batching, flow control, rate limits and resumption.
    """

    def __init__(
        self,
        peers: Peers,
        *,
        node_id: str,
        partitions: int,
        max_frame: int,
        log: logging.Logger | None = None,
    ) -> None:
        self._peers = peers
        self._node_id = node_id
        self._partitions = partitions
        self._max_wire = max_frame - 1024  # room for the frame around the batch
        self._log = log or logging.getLogger("clusterkit")
        self._source: Source | None = None
        self._serving = 0
        self._stats = dict.fromkeys(_COUNTERS, 0)
        peers.add_stream_handler(METHOD, self._serve, _internal=True)

    def __repr__(self) -> str:
        fn = self._source
        source = None if fn is None else getattr(fn, "__qualname__", type(fn).__qualname__)
        return f"<Migration {self._node_id} source={source} serving={self._serving}>"

    def statistics(self) -> dict[str, int]:
        """Counters: streams and keys served, pulls and their resumes, keys pulled."""
        return {**self._stats, "serving": self._serving}

    # -- the source side -----------------------------------------------------------------

    def source(self, fn: S) -> S:
        """Register the partition source of this node (replacing an earlier one).

        Usable as a decorator. ``fn(request: SourceRequest)`` returns an async iterable (an
        async generator, typically) of :class:`MigrationEntry` for ``request.partition``,
        keys in ascending byte order, each greater than ``request.after`` when it is set. It
        may raise to refuse (e.g. a stale ``request.epoch``): the puller gets
        :class:`MigrationSourceError` with the exception's class name and message.

        Returns:
            ``fn`` itself.
        """
        if not callable(fn):
            raise TypeError("a migration source must be callable")
        self._source = fn
        return fn

    async def _serve(self, stream: PeerStream, payload: Any) -> None:
        """The stream handler: decode the request, stream the batches, report failures."""
        request = decode_request(payload, self._partitions)  # ValueError aborts the stream
        source = self._source
        if source is None:
            raise NoMigrationSource(
                f"node {self._node_id} has no partition source (ck.migration.source)"
            )
        self._stats["streams_served"] += 1
        self._serving += 1
        error: tuple[str, str] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_aborted, stream, nursery.cancel_scope)
                try:
                    await self._stream_partition(stream, source, request)
                except _PullerGone:
                    pass
                except SourceContractError as exc:
                    error = ("SourceContractError", str(exc))
                except Exception as exc:
                    error = (type(exc).__name__, str(exc))
                nursery.cancel_scope.cancel()
        finally:
            self._serving -= 1
        if error is not None:
            self._stats["source_errors"] += 1
            self._log.warning(
                "clusterkit %s: migration source for partition %d (to %s) failed: %s: %s",
                self._node_id,
                request.partition,
                stream.remote_id,
                *error,
            )
            await stream.abort(error[0], error[1][:1000])

    async def _stream_partition(
        self, stream: PeerStream, source: Source, request: StreamRequest
    ) -> None:
        batcher = Batcher(
            request.partition,
            request.after,
            max_keys=request.max_batch_keys or DEFAULT_BATCH_KEYS,
            max_bytes=request.max_batch_bytes or DEFAULT_BATCH_BYTES,
            max_wire=self._max_wire,
            snapshot_revision=request.snapshot_revision,
        )
        rate = request.rate_limit_bytes_per_second
        bucket = TokenBucket(rate, rate * BURST_SECONDS, trio.current_time()) if rate else None

        async def send(batch: dict[str, Any], nbytes: int) -> None:
            if bucket is not None:
                wait = bucket.take(nbytes, trio.current_time())
                if wait > 0:
                    await trio.sleep(wait)
            try:
                await stream.send(batch)
            except (RemoteError, PeerUnreachable) as exc:
                raise _PullerGone from exc
            self._stats["keys_served"] += len(batch["kvs"])
            self._stats["bytes_served"] += nbytes

        entries = source(
            SourceRequest(
                partition=request.partition,
                after=request.after,
                requester=stream.remote_id,
                snapshot_revision=request.snapshot_revision,
                epoch=request.epoch,
            )
        )
        iterator = aiter(entries)
        try:
            async for entry in iterator:
                pending = batcher.pending_bytes()
                batch = batcher.add(entry)
                if batch is not None:
                    await send(batch, pending)
            pending = batcher.pending_bytes()
            await send(batcher.finish(), pending)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with trio.move_on_after(1.0) as cleanup:
                    cleanup.shield = True
                    await aclose()

    # -- the puller side -----------------------------------------------------------------

    async def pull(
        self,
        partition: int,
        from_node: Node | str,
        sink: Sink,
        *,
        after: bytes | None = None,
        batch_keys: int = DEFAULT_BATCH_KEYS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        rate_keys: float | None = None,
        rate_bytes: float | None = None,
        snapshot_revision: int | None = None,
        epoch: int | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        max_resumes: int = DEFAULT_MAX_RESUMES,
    ) -> MigrationProgress:
        """Copy ``partition`` from ``from_node``'s source into ``sink``, batch by batch.

        Args:
            partition: the partition number.
            from_node: the source node: a :class:`Node`, a node id, or ``"host:port"``.
            sink: ``async def sink(partition, entries)``, called once per batch, in key
                order; a batch counts as applied when it returns. An exception from it ends
                the pull (the stream is aborted) and is raised as itself.
            after: continue a transfer: the ``resume_token`` of the last applied batch.
            batch_keys, batch_bytes: batch limits asked of the source (a single larger entry
                comes alone).
            rate_keys, rate_bytes: limits in keys/s and key+value bytes/s; None: none.
            snapshot_revision: the revision to read the data at, passed to the source (a
                resumed stream asks for the revision the source reported).
            epoch: the fencing epoch this pull acts on, passed to the source.
            on_progress: called (sync or async) with a copy of the progress after each
                batch is applied, the last time with ``complete=True``.
            timeout: bound on the whole pull, resumes included; None: no bound.
            stall_timeout: the longest wait to connect or for the next batch before the
                transfer counts as broken (and is resumed).
            max_resumes: how many times a broken transfer is resumed before giving up.

        Returns:
            The final progress (``complete=True``).

        Raises:
            NoMigrationSource: ``from_node`` has no source registered.
            MigrationSourceError: the source raised or broke the contract (not retried).
            MigrationInterrupted: the transfer broke more than ``max_resumes`` times, or
                ``timeout`` passed; ``exc.progress.resume_token`` continues it later.
            PeerAuthFailed: ``from_node`` does not share the cluster secret.
            ValueError: an invalid argument.
        """
        _check_pull_args(partition, self._partitions, batch_keys, batch_bytes, max_resumes)
        for name, rate in (("rate_keys", rate_keys), ("rate_bytes", rate_bytes)):
            if rate is not None and not rate > 0:
                raise ValueError(f"{name} must be positive (or None)")
        if not stall_timeout > 0 or (timeout is not None and not timeout > 0):
            raise ValueError("timeouts must be positive")
        self._stats["pulls"] += 1
        started = trio.current_time()
        progress = MigrationProgress(
            partition, resume_token=after or b"", snapshot_revision=snapshot_revision
        )
        pacer = _Pacer(rate_keys, rate_bytes, started)
        last_key: bytes | None = None  # ``after`` is an opaque token, not necessarily a key
        backoff = BACKOFF_MIN
        deadline = math.inf if timeout is None else started + timeout
        with trio.move_on_at(deadline):
            while True:
                keys_before = progress.keys
                try:
                    last_key = await self._pull_once(
                        from_node,
                        sink,
                        progress,
                        pacer,
                        last_key,
                        started,
                        on_progress,
                        epoch=epoch,
                        hints=(batch_keys, batch_bytes, int(rate_bytes or 0)),
                        stall=stall_timeout + (batch_bytes / rate_bytes if rate_bytes else 0),
                    )
                    self._stats["pulls_complete"] += 1
                    return progress
                except _Broken as broken:
                    failure = broken.__cause__ or broken
                progress.elapsed = trio.current_time() - started
                if progress.resumes >= max_resumes:
                    raise MigrationInterrupted(
                        f"pull of partition {partition} from {_name(from_node)} broke "
                        f"{progress.resumes + 1} times; last: {failure}",
                        progress=dataclasses.replace(progress),
                    ) from failure
                if progress.keys > keys_before:
                    backoff = BACKOFF_MIN
                self._log.info(
                    "clusterkit %s: pull of partition %d from %s broke (%s); resuming",
                    self._node_id,
                    partition,
                    _name(from_node),
                    failure,
                )
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
                progress.resumes += 1
                self._stats["pull_resumes"] += 1
        progress.elapsed = trio.current_time() - started
        raise MigrationInterrupted(
            f"pull of partition {partition} from {_name(from_node)} did not finish within "
            f"{timeout}s",
            progress=dataclasses.replace(progress),
        )

    async def _pull_once(
        self,
        from_node: Node | str,
        sink: Sink,
        progress: MigrationProgress,
        pacer: _Pacer,
        last_key: bytes | None,
        started: float,
        on_progress: ProgressCallback | None,
        *,
        epoch: int | None,
        hints: tuple[int, int, int],
        stall: float,
    ) -> bytes | None:
        """One stream, until the final batch is applied (returns the last key applied).

        Raises:
            _Broken: the stream broke; resume from ``progress.resume_token``.
        """
        partition = progress.partition
        payload = encode_request(
            partition,
            progress.resume_token,
            snapshot_revision=progress.snapshot_revision,
            epoch=epoch,
            max_batch_keys=hints[0],
            max_batch_bytes=hints[1],
            rate_limit_bytes_per_second=hints[2],
        )
        async with AsyncExitStack() as stack:
            try:
                stream = await stack.enter_async_context(
                    self._peers.stream(
                        from_node, METHOD, payload, timeout=min(stall, self._peers.timeout)
                    )
                )
            except PeerUnreachable as exc:
                raise _Broken from exc
            while True:
                item = await _receive(stream, stall, partition, from_node)
                batch = decode_batch(item, partition, last_key)
                if batch.snapshot_revision is not None:
                    progress.snapshot_revision = batch.snapshot_revision
                if batch.entries:
                    await pacer.pace(len(batch.entries), batch.nbytes)
                    await sink(partition, batch.entries)
                    last_key = batch.entries[-1].key
                    progress.keys += len(batch.entries)
                    progress.bytes += batch.nbytes
                    progress.batches += 1
                    self._stats["keys_pulled"] += len(batch.entries)
                    self._stats["bytes_pulled"] += batch.nbytes
                if batch.resume_token:
                    progress.resume_token = batch.resume_token
                progress.complete = batch.last
                progress.elapsed = trio.current_time() - started
                if on_progress is not None and (batch.entries or batch.last):
                    result = on_progress(dataclasses.replace(progress))
                    if inspect.isawaitable(result):
                        await result
                if batch.last:
                    await stream.end()
                    return last_key


async def _receive(stream: PeerStream, stall: float, partition: int, node: Node | str) -> Any:
    """The next batch off ``stream``; source errors typed, breaks as :class:`_Broken`."""
    with trio.move_on_after(stall):
        try:
            return await stream.receive()
        except trio.EndOfChannel:
            raise _Broken(f"{_name(node)} ended the stream before the last batch") from None
        except PeerUnreachable as exc:
            raise _Broken from exc
        except RemoteError as exc:
            if exc.remote_type in ("NoMigrationSource", "UnknownMethod"):
                raise NoMigrationSource(
                    f"{_name(node)} serves no source for partition {partition}: "
                    f"{exc.remote_message}"
                ) from None
            raise MigrationSourceError(exc.remote_type, exc.remote_message) from None
    raise _Broken(f"no batch from {_name(node)} in {stall:.1f}s")


async def _cancel_when_aborted(stream: PeerStream, scope: trio.CancelScope) -> None:
    """Cancel the source when the puller aborts the stream or the connection breaks.

    The puller sends no items, so a receive ends only by an abort (RemoteError), a broken
    connection (PeerUnreachable) or the puller half-closing (then its abort still fails our
    next send)."""
    try:
        while True:
            await stream.receive()
    except trio.EndOfChannel:
        return
    except (RemoteError, PeerUnreachable):
        scope.cancel()


def _check_pull_args(
    partition: int, partitions: int, batch_keys: int, batch_bytes: int, max_resumes: int
) -> None:
    if type(partition) is not int or not 0 <= partition < partitions:
        raise ValueError(f"partition {partition!r} is not in range({partitions})")
    if type(batch_keys) is not int or not 0 < batch_keys < 2**32:
        raise ValueError("batch_keys must be a positive integer below 2**32")
    if type(batch_bytes) is not int or not batch_bytes > 0:
        raise ValueError("batch_bytes must be a positive integer")
    if type(max_resumes) is not int or max_resumes < 0:
        raise ValueError("max_resumes must be a non-negative integer")


def _name(node: Node | str) -> str:
    return node.id if isinstance(node, Node) else node
