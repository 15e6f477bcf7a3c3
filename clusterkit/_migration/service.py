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

import contextlib
import dataclasses
import inspect
import logging
import math
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from .._core.records import Node
from .._errors import (
    MigrationInterrupted,
    MigrationRefused,
    MigrationSourceError,
    NoMigrationSink,
    NoMigrationSource,
    PeerUnreachable,
    RemoteError,
)
from .._grpc.channel import GrpcPool
from .._peers.service import Peers
from .._peers.session import PeerStream
from . import grpc_transport
from .wire import (
    _COUNTERS,
    BACKOFF_MAX,
    BACKOFF_MIN,
    BURST_SECONDS,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_KEYS,
    DEFAULT_GRPC_BATCH_BYTES,
    DEFAULT_MAX_RESUMES,
    DEFAULT_STALL_TIMEOUT,
    METHOD,
    RECEIVE_METHOD,
    Batcher,
    K,
    MigrationEntry,
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

_MAX_TRANSFERS = 4096  # pushes whose position a receiver remembers


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
        partition_of: Callable[[bytes], int] | None = None,
        epoch_of: Callable[[int], int | None] | None = None,
    ) -> None:
        self._peers = peers
        self._node_id = node_id
        self._partitions = partitions
        self._max_wire = max_frame - 1024  # room for the frame around the batch
        self._log = log or logging.getLogger("clusterkit")
        self._partition_of = partition_of
        self._epoch_of = epoch_of or (lambda partition: None)
        self._source: Source | None = None
        self._sink: Sink | None = None
        self._serving = 0
        self._stats = dict.fromkeys(_COUNTERS, 0)
        # The receiver's position in each push it was sent: (partition, transfer) -> (token,
        # complete), the most recent _MAX_TRANSFERS.
        self._positions: OrderedDict[tuple[int, str], tuple[bytes, bool]] = OrderedDict()
        self._active: dict[tuple[int, str], tuple[trio.CancelScope, trio.Event]] = {}
        self.grpc: GrpcPool | None = None  # set by the node when it serves gRPC
        self.grpc_max_wire = 4 * 1024 * 1024 - 1024  # its gRPC message limit, less room
        peers.add_stream_handler(METHOD, self._serve, _internal=True)
        peers.add_stream_handler(RECEIVE_METHOD, self._serve_receive, _internal=True)

    def __repr__(self) -> str:
        fn = self._source
        source = None if fn is None else getattr(fn, "__qualname__", type(fn).__qualname__)
        return f"<Migration {self._node_id} source={source} serving={self._serving}>"

    def statistics(self) -> dict[str, int]:
        """Counters: streams and keys served, pulls and pushes, resumes, keys moved."""
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

    def sink(self, fn: K) -> K:
        """Register the partition sink of this node: where pushes to it are applied.

        Usable as a decorator. ``async def fn(partition, entries)`` is called once per batch
        a pusher sends (``ck.migration.push`` on another node, or a gRPC client of
        ``MigrationService.ReceivePartition``); the batch counts as applied when it returns.
        An exception refuses the push: the pusher gets :class:`MigrationRefused` with its
        class name and message.

        Returns:
            ``fn`` itself.
        """
        if not callable(fn):
            raise TypeError("a migration sink must be callable")
        self._sink = fn
        return fn

    def _open_batches(
        self, payload: Any, requester: str, transport: str = "peer"
    ) -> AsyncGenerator[tuple[dict[str, Any], int], None]:
        """Check a ``StreamRequest`` map; the batches to serve for it (counted as serving).

        Raises:
            ValueError: an invalid request.
            NoMigrationSource: no source is registered.
        """
        request = decode_request(payload, self._partitions)
        source = self._source
        if source is None:
            raise NoMigrationSource(
                f"node {self._node_id} has no partition source (ck.migration.source)"
            )
        self._stats["streams_served"] += 1
        return self._counted(self._batches(source, request, requester, transport))

    async def _counted(
        self, batches: AsyncGenerator[tuple[dict[str, Any], int], None]
    ) -> AsyncGenerator[tuple[dict[str, Any], int], None]:
        self._serving += 1
        try:
            async with contextlib.aclosing(batches):
                async for item in batches:
                    yield item
        finally:
            self._serving -= 1

    def _source_failed(self, exc: Exception, partition: int, to: str | None) -> tuple[str, str]:
        """Log and count a failure of this node's source; the (type, message) to send."""
        kind = "SourceContractError" if isinstance(exc, SourceContractError) else type(exc).__name__
        self._stats["source_errors"] += 1
        self._log.warning(
            "clusterkit %s: migration source for partition %d (to %s) failed: %s: %s",
            self._node_id,
            partition,
            to,
            kind,
            exc,
        )
        return kind, str(exc)[:1000]

    async def _serve(self, stream: PeerStream, payload: Any) -> None:
        """The stream handler: decode the request, stream the batches, report failures."""
        batches = self._open_batches(payload, stream.remote_id)  # errors abort the stream
        error: tuple[str, str] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_aborted, stream, nursery.cancel_scope)
            try:
                await self._stream_partition(stream, batches)
            except _PullerGone:
                pass
            except Exception as exc:
                error = self._source_failed(exc, payload.get("partition", -1), stream.remote_id)
            nursery.cancel_scope.cancel()
        if error is not None:
            await stream.abort(*error)

    async def _stream_partition(
        self, stream: PeerStream, batches: AsyncGenerator[tuple[dict[str, Any], int], None]
    ) -> None:
        async with contextlib.aclosing(batches):
            async for batch, nbytes in batches:
                try:
                    await stream.send(batch)
                except (RemoteError, PeerUnreachable) as exc:
                    raise _PullerGone from exc
                self._count_served(batch, nbytes)

    def _count_served(self, batch: dict[str, Any], nbytes: int) -> None:
        self._stats["keys_served"] += len(batch["kvs"])
        self._stats["bytes_served"] += nbytes

    async def _batches(
        self, source: Source, request: StreamRequest, requester: str, transport: str = "peer"
    ) -> AsyncGenerator[tuple[dict[str, Any], int], None]:
        """The source's entries for ``request`` as ``(PartitionBatch map, key+value bytes)``,
        paced by the request's rate limit; the last batch has ``last = true``."""
        batcher = Batcher(
            request.partition,
            request.after,
            max_keys=request.max_batch_keys or DEFAULT_BATCH_KEYS,
            max_bytes=request.max_batch_bytes or DEFAULT_BATCH_BYTES,
            max_wire=self._max_wire if transport == "peer" else self.grpc_max_wire,
            snapshot_revision=request.snapshot_revision,
        )
        rate = request.rate_limit_bytes_per_second
        bucket = TokenBucket(rate, rate * BURST_SECONDS, trio.current_time()) if rate else None

        async def paced(batch: dict[str, Any], nbytes: int) -> tuple[dict[str, Any], int]:
            if bucket is not None:
                wait = bucket.take(nbytes, trio.current_time())
                if wait > 0:
                    await trio.sleep(wait)
            return batch, nbytes

        entries = source(
            SourceRequest(
                partition=request.partition,
                after=request.after,
                requester=requester,
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
                    yield await paced(batch, pending)
            pending = batcher.pending_bytes()
            yield await paced(batcher.finish(), pending)
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
        batch_bytes: int | None = None,
        rate_keys: float | None = None,
        rate_bytes: float | None = None,
        snapshot_revision: int | None = None,
        epoch: int | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        transport: str = "peer",
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
                comes alone). ``batch_bytes`` None: 256 KiB over peers, 1 MiB over gRPC (both
                hold about 16 MiB in flight: 64 peer-stream credits, 8 + 8 gRPC messages).
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
            transport: ``"peer"`` (the peer endpoint, websocket) or ``"grpc"`` (the source
                node's ``MigrationService`` on its gRPC port).

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
        batch_bytes = _batch_bytes(batch_bytes, transport)
        _check_transfer_args(
            partition,
            self._partitions,
            batch_keys,
            batch_bytes,
            max_resumes,
            (rate_keys, rate_bytes, stall_timeout, timeout),
        )
        self._check_transport(transport)
        self._stats["pulls"] += 1
        started = trio.current_time()
        progress = MigrationProgress(
            partition, resume_token=after or b"", snapshot_revision=snapshot_revision
        )
        pacer = _Pacer(rate_keys, rate_bytes, started)
        last_key: bytes | None = None  # ``after`` is an opaque token, not necessarily a key

        async def attempt() -> None:
            nonlocal last_key
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
                transport=transport,
            )

        what = f"pull of partition {partition} from {_name(from_node)}"
        await self._with_resumes(what, attempt, progress, started, timeout, max_resumes, "pull")
        self._stats["pulls_complete"] += 1
        return progress

    async def _with_resumes(
        self,
        what: str,
        attempt: Callable[[], Awaitable[None]],
        progress: MigrationProgress,
        started: float,
        timeout: float | None,
        max_resumes: int,
        kind: str,
    ) -> None:
        """Run ``attempt()`` until it completes; after a break, resume it (jittered exponential
        backoff, reset by progress) up to ``max_resumes`` times within ``timeout``.

        Raises:
            MigrationInterrupted: too many breaks, or ``timeout`` passed.
        """
        backoff = BACKOFF_MIN
        deadline = math.inf if timeout is None else started + timeout
        with trio.move_on_at(deadline):
            while True:
                keys_before = progress.keys
                try:
                    await attempt()
                    return
                except _Broken as broken:
                    failure = broken.__cause__ or broken
                progress.elapsed = trio.current_time() - started
                if progress.resumes >= max_resumes:
                    raise MigrationInterrupted(
                        f"{what} broke {progress.resumes + 1} times; last: {failure}",
                        progress=dataclasses.replace(progress),
                    ) from failure
                if progress.keys > keys_before:
                    backoff = BACKOFF_MIN
                self._log.info(
                    "clusterkit %s: %s broke (%s); resuming", self._node_id, what, failure
                )
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
                progress.resumes += 1
                self._stats[f"{kind}_resumes"] += 1
        progress.elapsed = trio.current_time() - started
        raise MigrationInterrupted(
            f"{what} did not finish within {timeout}s", progress=dataclasses.replace(progress)
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
        transport: str,
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
                    self._open_pull(from_node, payload, min(stall, self._peers.timeout), transport)
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

    # -- transports -----------------------------------------------------------------------

    def _check_transport(self, transport: str) -> None:
        if transport not in ("peer", "grpc"):
            raise ValueError(f"transport must be 'peer' or 'grpc', not {transport!r}")
        if transport == "grpc" and self.grpc is None:
            raise ValueError("transport='grpc' needs the node's gRPC server (grpc_server=True)")

    @contextlib.asynccontextmanager
    async def _open_pull(
        self, node: Node | str, payload: dict[str, Any], timeout: float, transport: str
    ) -> AsyncIterator[Any]:
        if transport == "grpc":
            assert self.grpc is not None
            channel = self.grpc.get(node)
            async with grpc_transport.open_pull(channel, payload, _name(node), timeout) as s:
                yield s
        else:
            async with self._peers.stream(node, METHOD, payload, timeout=timeout) as stream:
                yield stream

    # -- the pusher side -----------------------------------------------------------------

    async def push(
        self,
        partition: int,
        to_node: Node | str,
        source: Source | None = None,
        *,
        epoch: int | None = None,
        batch_keys: int = DEFAULT_BATCH_KEYS,
        batch_bytes: int | None = None,
        rate_keys: float | None = None,
        rate_bytes: float | None = None,
        snapshot_revision: int | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        transport: str = "peer",
    ) -> MigrationProgress:
        """Copy ``partition`` from ``source`` into ``to_node``'s sink, batch by batch (push).

        The mirror of :meth:`pull`, for a node that hands data over (a draining owner, a
        leader seeding a new replica). The receiving node must have registered a sink
        (:meth:`sink`). A broken transfer resumes where the *receiver* says it stands, so
        every key reaches its sink once while that node keeps running.

        Args:
            partition: the partition number.
            to_node: the receiving node: a :class:`Node`, a node id, or ``"host:port"``.
            source: the entries, as for :meth:`source` (called again, with ``after``, on a
                resume); None: this node's registered source.
            epoch: the fencing epoch this push acts on: the receiver refuses it
                (:class:`MigrationRefused`, ``StaleEpoch``) if the partition has a newer
                leader epoch there.
            batch_keys, batch_bytes, rate_keys, rate_bytes, snapshot_revision, on_progress,
                timeout, stall_timeout, max_resumes: as for :meth:`pull` (``keys`` and
                ``bytes`` of the progress count what was sent).
            transport: ``"peer"`` or ``"grpc"`` (the receiver's ``ReceivePartition``).

        Returns:
            The final progress (``complete=True``).

        Raises:
            NoMigrationSource: no ``source`` and none registered.
            NoMigrationSink: ``to_node`` has no sink registered.
            MigrationRefused: the receiver refused the push or its sink raised.
            MigrationSourceError: ``source`` broke the contract (keys not ascending).
            MigrationInterrupted: as for :meth:`pull`.
            ValueError: an invalid argument.
        """
        batch_bytes = _batch_bytes(batch_bytes, transport)
        _check_transfer_args(
            partition,
            self._partitions,
            batch_keys,
            batch_bytes,
            max_resumes,
            (rate_keys, rate_bytes, stall_timeout, timeout),
        )
        self._check_transport(transport)
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            raise ValueError("epoch must be a non-negative integer (or None)")
        source = source or self._source
        if source is None:
            raise NoMigrationSource(f"node {self._node_id} has no partition source to push from")
        self._stats["pushes"] += 1
        started = trio.current_time()
        transfer = f"{self._node_id}/{secrets.token_hex(8)}"
        progress = MigrationProgress(partition, snapshot_revision=snapshot_revision)
        pacer = _Pacer(rate_keys, rate_bytes, started)

        async def attempt() -> None:
            await self._push_once(
                to_node,
                source,
                progress,
                pacer,
                transfer,
                started,
                on_progress,
                epoch=epoch,
                hints=(batch_keys, batch_bytes),
                stall=stall_timeout + (batch_bytes / rate_bytes if rate_bytes else 0),
                transport=transport,
            )

        what = f"push of partition {partition} to {_name(to_node)}"
        await self._with_resumes(what, attempt, progress, started, timeout, max_resumes, "push")
        self._stats["pushes_complete"] += 1
        return progress

    async def _push_once(
        self,
        to_node: Node | str,
        source: Source,
        progress: MigrationProgress,
        pacer: _Pacer,
        transfer: str,
        started: float,
        on_progress: ProgressCallback | None,
        *,
        epoch: int | None,
        hints: tuple[int, int],
        stall: float,
        transport: str,
    ) -> None:
        """One stream, from the receiver's position to the receiver's summary.

        Raises:
            _Broken: the stream broke; resume.
        """
        partition = progress.partition
        name = _name(to_node)
        try:
            async with self._open_push(to_node, partition, transfer, epoch, stall, transport) as (
                position,
                push,
            ):
                token, complete = position
                if token:
                    progress.resume_token = token
                if complete:
                    progress.complete = True
                    return
                request = StreamRequest(
                    partition=partition,
                    after=token or None,
                    snapshot_revision=progress.snapshot_revision,
                    epoch=epoch,
                    max_batch_keys=hints[0],
                    max_batch_bytes=hints[1],
                    rate_limit_bytes_per_second=0,
                )
                batches = self._batches(source, request, name, transport)
                async with contextlib.aclosing(batches):
                    try:
                        async for batch, nbytes in batches:
                            batch["transfer_id"] = transfer
                            if epoch is not None:
                                batch["epoch"] = epoch
                            await pacer.pace(len(batch["kvs"]), nbytes)
                            with trio.move_on_after(stall) as waited:
                                await push.send(batch)
                            if waited.cancelled_caught:
                                raise _Broken(f"{name} took no batch in {stall:.1f}s")
                            progress.keys += len(batch["kvs"])
                            progress.bytes += nbytes
                            progress.batches += bool(batch["kvs"])
                            progress.elapsed = trio.current_time() - started
                            self._stats["keys_pushed"] += len(batch["kvs"])
                            self._stats["bytes_pushed"] += nbytes
                            if on_progress is not None and batch["kvs"]:
                                result = on_progress(dataclasses.replace(progress))
                                if inspect.isawaitable(result):
                                    await result
                    except SourceContractError as exc:
                        raise MigrationSourceError("SourceContractError", str(exc)) from None
                with trio.move_on_after(stall):
                    summary = await push.finish()
                    progress.resume_token = summary["last_resume_token"] or progress.resume_token
                    progress.complete = bool(summary["complete"])
                    progress.elapsed = trio.current_time() - started
                    if on_progress is not None:
                        result = on_progress(dataclasses.replace(progress))
                        if inspect.isawaitable(result):
                            await result
                    return
                raise _Broken(f"no summary from {name} in {stall:.1f}s")
        except trio.EndOfChannel:
            raise _Broken(f"{name} ended the push stream early") from None
        except PeerUnreachable as exc:
            raise _Broken from exc
        except RemoteError as exc:
            if exc.remote_type in ("NoMigrationSink", "UnknownMethod"):
                raise NoMigrationSink(f"{name}: {exc.remote_message}") from None
            raise MigrationRefused(exc.remote_type, exc.remote_message) from None

    @contextlib.asynccontextmanager
    async def _open_push(
        self,
        node: Node | str,
        partition: int,
        transfer: str,
        epoch: int | None,
        stall: float,
        transport: str,
    ) -> AsyncIterator[tuple[tuple[bytes, bool], Any]]:
        """The receiver's position ``(token, complete)`` and a sender of batches."""
        if transport == "grpc":
            assert self.grpc is not None
            push = grpc_transport.GrpcPush(self.grpc.get(node), _name(node))
            with trio.move_on_after(stall) as waited:
                answer = await push.probe(partition, transfer, stall)
            if waited.cancelled_caught:
                raise _Broken(f"no answer from {_name(node)} in {stall:.1f}s")
            try:
                yield (answer["last_resume_token"], bool(answer["complete"])), push
            finally:
                push.abort()
            return
        payload: dict[str, Any] = {"partition": partition, "transfer_id": transfer}
        if epoch is not None:
            payload["epoch"] = epoch
        timeout = min(stall, self._peers.timeout)
        async with self._peers.stream(node, RECEIVE_METHOD, payload, timeout=timeout) as stream:
            first: Any = None
            with trio.move_on_after(stall):
                first = await stream.receive()
            if first is None:
                raise _Broken(f"no answer from {_name(node)} in {stall:.1f}s")
            yield _position(first), _PeerPush(stream)

    # -- the receiver side ---------------------------------------------------------------

    async def _serve_receive(self, stream: PeerStream, payload: Any) -> None:
        """The peer stream handler of a push: position first, batches in, summary out."""
        if not isinstance(payload, dict):
            raise ValueError("a push must open with a map")
        try:
            await self._receive_peer(stream, payload)
        except RemoteError as exc:  # a refusal: the pusher sees its type, as over gRPC
            await stream.abort(exc.remote_type, exc.remote_message)

    async def _receive_peer(self, stream: PeerStream, payload: dict[str, Any]) -> None:
        partition, transfer, epoch = self._check_push(payload)
        await self._take_over((partition, transfer))
        token, complete = self._positions.get((partition, transfer), (b"", False))
        await stream.send({"last_resume_token": token, "complete": complete})

        async def next_batch() -> Any:
            try:
                return await stream.receive()
            except trio.EndOfChannel:
                return None

        summary = await self._apply_push(partition, transfer, epoch, next_batch, stream.remote_id)
        await stream.send(summary)
        await stream.end()

    def _check_push(self, first: dict[str, Any]) -> tuple[int, str, int | None]:
        """The partition, transfer id and epoch a push opens with (RemoteError: refused)."""
        partition = first.get("partition", 0)
        transfer = first.get("transfer_id", "")
        epoch = first.get("epoch")
        if type(partition) is not int or not 0 <= partition < self._partitions:
            raise RemoteError("MalformedBatch", f"partition {partition!r} out of range")
        if type(transfer) is not str or not 0 < len(transfer) <= 256:
            raise RemoteError("MalformedBatch", "a push needs a transfer_id of 1-256 chars")
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            raise RemoteError("MalformedBatch", "epoch must be a non-negative integer")
        known = self._epoch_of(partition)
        if epoch is not None and known is not None and epoch < known:
            raise RemoteError(
                "StaleEpoch",
                f"push of partition {partition} under epoch {epoch}; its leader epoch here "
                f"is {known}",
            )
        if self._sink is None:
            raise self._no_sink()
        return partition, transfer, epoch

    def _no_sink(self) -> RemoteError:
        return RemoteError(
            "NoMigrationSink", f"node {self._node_id} has no partition sink (ck.migration.sink)"
        )

    async def _apply_push(
        self,
        partition: int,
        transfer: str,
        epoch: int | None,
        next_batch: Callable[[], Awaitable[Any]],
        remote: str,
    ) -> dict[str, Any]:
        """Apply a push's batches (``next_batch()`` until None) to the sink, recording the
        position after each."""
        sink = self._sink
        assert sink is not None
        self._stats["pushes_received"] += 1
        started = trio.current_time()
        key = (partition, transfer)
        await self._take_over(key)
        done = trio.Event()
        scope = trio.CancelScope()
        self._active[key] = (scope, done)  # (no checkpoint since _take_over returned)
        try:
            with scope:
                return await self._apply_batches(key, next_batch, remote, sink, started)
            raise RemoteError("Superseded", "a newer stream of this push took over")
        finally:
            if self._active.get(key) == (scope, done):
                del self._active[key]
            done.set()

    async def _take_over(self, key: tuple[int, str]) -> None:
        """Stop any older stream of the same push and wait until it stopped: the position
        is then final, and a resumed stream never overlaps the one it replaces. Returns when
        none is active; the caller registers itself with no checkpoint in between, so two
        streams that take over at once still run one after the other."""
        while (active := self._active.get(key)) is not None:
            active[0].cancel()
            await active[1].wait()

    async def _apply_batches(
        self,
        key: tuple[int, str],
        next_batch: Callable[[], Awaitable[Any]],
        remote: str,
        sink: Sink,
        started: float,
    ) -> dict[str, Any]:
        partition, transfer = key
        token, complete = self._positions.get(key, (b"", False))
        keys = nbytes = 0
        last_key: bytes | None = None
        while (item := await next_batch()) is not None:
            if isinstance(item, dict) and item.get("transfer_id", transfer) != transfer:
                raise RemoteError("MalformedBatch", "a batch of another transfer in this push")
            try:
                batch = decode_batch(item, partition, last_key)
            except MigrationSourceError as exc:
                raise RemoteError("MalformedBatch", exc.remote_message) from None
            if batch.entries:
                try:
                    await sink(partition, batch.entries)
                except Exception as exc:
                    self._log.warning(
                        "clusterkit %s: migration sink for partition %d (from %s) failed: %r",
                        self._node_id,
                        partition,
                        remote,
                        exc,
                    )
                    raise RemoteError(type(exc).__name__, str(exc)[:1000]) from None
                last_key = batch.entries[-1].key
                keys += len(batch.entries)
                nbytes += batch.nbytes
                self._stats["keys_received"] += len(batch.entries)
            token = batch.resume_token or token
            complete = complete or batch.last
            self._remember(key, token, complete)
        return {
            "partition": partition,
            "keys": keys,
            "bytes": nbytes,
            "elapsed_seconds": trio.current_time() - started,
            "last_resume_token": token,
            "complete": complete,
            "success": True,
        }

    def _remember(self, key: tuple[int, str], token: bytes, complete: bool) -> None:
        self._positions[key] = (token, complete)
        self._positions.move_to_end(key)
        while len(self._positions) > _MAX_TRANSFERS:
            self._positions.popitem(last=False)

    async def _receive_grpc(self, requests: AsyncIterator[Any], remote: str) -> dict[str, Any]:
        """``ReceivePartition``: a batched push (clusterkit's) or one KeyValue per key."""
        try:
            message = await anext(requests)
        except StopAsyncIteration:
            return {"success": True}
        first = grpc_transport.first_batch(message)
        if first is None:
            return await self._receive_keys(message, requests, remote)
        partition, transfer, epoch = self._check_push(first)
        if first.get("probe"):
            await self._take_over((partition, transfer))
            token, complete = self._positions.get((partition, transfer), (b"", False))
            return {
                "partition": partition,
                "last_resume_token": token,
                "complete": complete,
                "success": True,
            }

        pending = [first]

        async def next_batch() -> Any:
            if pending:
                return pending.pop()
            try:
                later = await anext(requests)
            except StopAsyncIteration:
                return None
            batch = grpc_transport.first_batch(later)
            if batch is None:
                raise RemoteError("MalformedBatch", "a plain KeyValue in a batched push")
            return batch

        return await self._apply_push(partition, transfer, epoch, next_batch, remote)

    async def _receive_keys(
        self, first: Any, requests: AsyncIterator[Any], remote: str
    ) -> dict[str, Any]:
        """A plain client's push: each KeyValue goes to its partition's sink, in runs."""
        sink = self._sink
        if sink is None:
            raise self._no_sink()
        started = trio.current_time()
        run: list[MigrationEntry] = []
        run_partition = -1
        keys = nbytes = 0

        async def flush() -> None:
            if run:
                try:
                    await sink(run_partition, list(run))
                except Exception as exc:
                    raise RemoteError(type(exc).__name__, str(exc)[:1000]) from None
                run.clear()

        message = first
        while message is not None:
            fields = grpc_transport.entry_fields(message)
            key, value = fields.get("key", b""), fields.get("value", b"")
            if not key or "batch" in fields:
                raise RemoteError("MalformedBatch", "a per-key push needs a key in every message")
            partition = fields.get("partition")
            if partition is None:
                if self._partition_of is None:
                    raise RemoteError("MalformedBatch", "set KeyValue.partition")
                partition = self._partition_of(key)
            if not 0 <= partition < self._partitions:
                raise RemoteError("MalformedBatch", f"partition {partition} out of range")
            if partition != run_partition or len(run) >= DEFAULT_BATCH_KEYS:
                await flush()
                run_partition = partition
            run.append(MigrationEntry(key, value, fields.get("version"), fields.get("epoch")))
            keys += 1
            nbytes += len(key) + len(value)
            message = await anext(requests, None)
        await flush()
        self._stats["keys_received"] += keys
        return {
            "partition": max(run_partition, 0),
            "keys": keys,
            "bytes": nbytes,
            "elapsed_seconds": trio.current_time() - started,
            "complete": True,
            "success": True,
        }


class _PeerPush:
    """The pusher's end of a push over a peer stream."""

    def __init__(self, stream: PeerStream) -> None:
        self._stream = stream

    async def send(self, batch: dict[str, Any]) -> None:
        await self._stream.send(batch)

    async def finish(self) -> dict[str, Any]:
        await self._stream.end()
        summary = await self._stream.receive()
        if not isinstance(summary, dict):
            raise RemoteError("MalformedBatch", "the push summary must be a map")
        token, complete = _position(summary)
        return {**summary, "last_resume_token": token, "complete": complete}


def _position(answer: Any) -> tuple[bytes, bool]:
    if not isinstance(answer, dict):
        raise RemoteError("MalformedBatch", "the receiver's position must be a map")
    token = answer.get("last_resume_token", b"")
    complete = answer.get("complete", False)
    if type(token) is not bytes or type(complete) is not bool:
        raise RemoteError("MalformedBatch", "the receiver's position is malformed")
    return token, complete


async def _receive(stream: Any, stall: float, partition: int, node: Node | str) -> Any:
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


def _batch_bytes(batch_bytes: int | None, transport: str) -> int:
    if batch_bytes is not None:
        return batch_bytes
    return DEFAULT_GRPC_BATCH_BYTES if transport == "grpc" else DEFAULT_BATCH_BYTES


def _check_transfer_args(
    partition: int,
    partitions: int,
    batch_keys: int,
    batch_bytes: int,
    max_resumes: int,
    limits: tuple[float | None, float | None, float, float | None],
) -> None:
    if type(partition) is not int or not 0 <= partition < partitions:
        raise ValueError(f"partition {partition!r} is not in range({partitions})")
    if type(batch_keys) is not int or not 0 < batch_keys < 2**32:
        raise ValueError("batch_keys must be a positive integer below 2**32")
    if type(batch_bytes) is not int or not batch_bytes > 0:
        raise ValueError("batch_bytes must be a positive integer")
    if type(max_resumes) is not int or max_resumes < 0:
        raise ValueError("max_resumes must be a non-negative integer")
    rate_keys, rate_bytes, stall_timeout, timeout = limits
    for name, rate in (("rate_keys", rate_keys), ("rate_bytes", rate_bytes)):
        if rate is not None and not rate > 0:
            raise ValueError(f"{name} must be positive (or None)")
    if not stall_timeout > 0 or (timeout is not None and not timeout > 0):
        raise ValueError("timeouts must be positive")


def _name(node: Node | str) -> str:
    return node.id if isinstance(node, Node) else node
