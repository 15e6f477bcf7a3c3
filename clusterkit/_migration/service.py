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

import dataclasses
import inspect
import logging
import math
import random
from contextlib import AsyncExitStack
from typing import Any

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
from .wire import (
    _COUNTERS,
    BACKOFF_MAX,
    BACKOFF_MIN,
    BURST_SECONDS,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_KEYS,
    DEFAULT_MAX_RESUMES,
    DEFAULT_STALL_TIMEOUT,
    METHOD,
    Batcher,
    MigrationProgress,
    ProgressCallback,
    S,
    Sink,
    Source,
    SourceContractError,
    SourceRequest,
    StreamRequest,
    TokenBucket,
    decode_batch,
    decode_request,
    encode_request,
)


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
