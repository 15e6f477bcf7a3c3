"""ck.migration: the msgpack mapping and batcher (pure), then pulls between two real nodes.

Wall-clock waits are ``trio.fail_after`` deadlines; the rate-limit tests assert only lower
bounds of elapsed time (a loaded machine may be slower, never faster than the limit).
"""

from __future__ import annotations

import bisect
import gc
import itertools
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from cluster_helpers import node_config, start_node
from tcp_proxy import open_proxy

import clusterkit
from clusterkit._errors import (
    MigrationError,
    MigrationInterrupted,
    MigrationSourceError,
    NoMigrationSource,
)
from clusterkit._migration.pb import migration_pb2 as pb
from clusterkit._migration.wire import (
    BURST_SECONDS,
    Batcher,
    MigrationEntry,
    MigrationProgress,
    SourceContractError,
    SourceRequest,
    TokenBucket,
    decode_batch,
    decode_request,
    encode_request,
)
from clusterkit._peers.session import STREAM_WINDOW

# A socket left to the garbage collector is a leak: collect inside each test, so a
# ResourceWarning fails the test that caused it (filterwarnings = error).


@pytest.fixture(autouse=True)
def _collect_sockets_inside_the_test() -> Iterator[None]:
    yield
    gc.collect()


P = 8


def make_entries(n: int, value_size: int = 100) -> list[MigrationEntry]:
    return [
        MigrationEntry(
            b"k%08d" % i,
            bytes([i % 251]) * value_size,
            version=i if i % 3 else None,
            epoch=7 if i % 2 else None,
        )
        for i in range(n)
    ]


class ListSource:
    """A partition source over a sorted list; records the requests it served."""

    def __init__(self, data: list[MigrationEntry]) -> None:
        self.data = data
        self.keys = [e.key for e in data]
        self.requests: list[SourceRequest] = []
        self.yielded = 0

    async def __call__(self, request: SourceRequest) -> AsyncIterator[MigrationEntry]:
        self.requests.append(request)
        start = 0 if request.after is None else bisect.bisect_right(self.keys, request.after)
        for entry in self.data[start:]:
            self.yielded += 1
            yield entry


class Collect:
    """A sink that keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[list[MigrationEntry]] = []

    async def __call__(self, partition: int, entries: list[MigrationEntry]) -> None:
        self.batches.append(entries)

    @property
    def entries(self) -> list[MigrationEntry]:
        return [e for batch in self.batches for e in batch]


@asynccontextmanager
async def two_nodes(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> AsyncIterator[tuple[clusterkit.ClusterKit, clusterkit.ClusterKit]]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            src, dst = [
                await start_node(
                    nursery,
                    node_config(name, etcd.endpoints, prefix, partitions=P, replica_factor=2),
                )
                for name in ("src", "dst")
            ]
        yield src.ck, dst.ck
        nursery.cancel_scope.cancel()


# -- pure: the mapping, the batcher, the bucket ----------------------------------------------


def test_the_msgpack_mapping_uses_the_proto_field_names() -> None:
    fields = {
        name: set(message.DESCRIPTOR.fields_by_name)
        for name, message in [
            ("request", pb.StreamRequest),
            ("batch", pb.PartitionBatch),
            ("kv", pb.KeyValue),
        ]
    }
    bare = encode_request(3, None)
    assert bare == {
        "partition": 3,
        "resume_after": b"",
        "max_batch_keys": 0,
        "max_batch_bytes": 0,
        "rate_limit_bytes_per_second": 0,
    }  # unset optional fields are left out
    full = encode_request(
        3,
        b"k1",
        snapshot_revision=-1,
        epoch=9,
        max_batch_keys=5,
        max_batch_bytes=100,
        rate_limit_bytes_per_second=7,
    )
    # ``batched`` is for gRPC callers only: a peer stream always carries batches.
    assert set(full) == fields["request"] - {"batched"}
    decoded = decode_request(full, P)
    assert (decoded.partition, decoded.after, decoded.snapshot_revision, decoded.epoch) == (
        3,
        b"k1",
        -1,
        9,
    )
    assert decode_request({}, P).after is None  # proto3: missing fields are zero values

    batcher = Batcher(3, None, max_keys=2, max_bytes=1000, max_wire=10_000, snapshot_revision=4)
    entries = [MigrationEntry(b"a", b"1", version=1, epoch=2), MigrationEntry(b"b", b"22")]
    assert [batcher.add(e) for e in entries] == [None, None]
    batch = batcher.finish()
    assert set(batch) <= fields["batch"]
    # A batch's entries use the key-value fields; ``batch`` and ``partition`` are for the
    # gRPC forms (a KeyValue carrying a batch, a plain client's per-key push).
    assert set(batch["kvs"][0]) == fields["kv"] - {"batch", "partition"}
    assert batch["kvs"][1] == {"key": b"b", "value": b"22"}  # no version, no epoch
    assert batch["resume_token"] == b"b" and batch["last"] is True
    assert (batch["keys_sent"], batch["bytes_sent"], batch["snapshot_revision"]) == (2, 5, 4)
    back = decode_batch(batch, 3, None)
    assert back.entries == entries and back.nbytes == 5 and back.last

    for bad in [None, {"partition": P}, {"partition": 1, "resume_after": "text"}]:
        with pytest.raises(ValueError):
            decode_request(bad, P)


def test_batches_are_cut_by_keys_bytes_and_message_size() -> None:
    def cut(b: Batcher, entries: list[MigrationEntry]) -> list[list[bytes]]:
        out = [b.add(e) for e in entries] + [b.finish()]
        return [[kv["key"] for kv in batch["kvs"]] for batch in out if batch is not None]

    e = [MigrationEntry(b"k%d" % i, b"v" * size) for i, size in enumerate([8, 8, 8, 98, 8])]
    assert cut(Batcher(0, None, max_keys=2, max_bytes=10**6, max_wire=10**6), e) == [
        [b"k0", b"k1"],
        [b"k2", b"k3"],
        [b"k4"],
    ]
    # 10 bytes each, the big one 100: it goes alone, and the batch before it is cut early.
    assert cut(Batcher(0, None, max_keys=9, max_bytes=30, max_wire=10**6), e) == [
        [b"k0", b"k1", b"k2"],
        [b"k3"],
        [b"k4"],
    ]
    wire = Batcher(0, None, max_keys=9, max_bytes=10**6, max_wire=450)
    assert cut(wire, e[:3]) == [[b"k0", b"k1"], [b"k2"]]
    with pytest.raises(SourceContractError, match="more than fit"):
        Batcher(0, None, max_keys=9, max_bytes=10**6, max_wire=300).add(e[3])
    # An empty partition is one empty final batch that keeps the resume point.
    empty = Batcher(0, b"k5", max_keys=9, max_bytes=99, max_wire=10**6).finish()
    assert (empty["kvs"], empty["resume_token"], empty["last"]) == ([], b"k5", True)


@pytest.mark.parametrize(
    ("after", "entries", "match"),
    [
        (None, [MigrationEntry(b"b", b""), MigrationEntry(b"a", b"")], "must ascend"),
        (None, [MigrationEntry(b"b", b""), MigrationEntry(b"b", b"")], "must ascend"),
        (b"k", [MigrationEntry(b"k", b"")], "resume point"),
        (None, [MigrationEntry(b"", b"")], "non-empty"),
        (None, [(b"a", b"b")], "not a MigrationEntry"),
        (None, [MigrationEntry(b"a", "text")], "bytes"),  # type: ignore[arg-type]
        (None, [MigrationEntry(b"a", b"", version=-1)], "uint64"),
    ],
)
def test_the_batcher_enforces_the_source_contract(
    after: bytes | None, entries: list[Any], match: str
) -> None:
    batcher = Batcher(0, after, max_keys=10, max_bytes=100, max_wire=10_000)
    with pytest.raises(SourceContractError, match=match):
        for entry in entries:
            batcher.add(entry)


def test_the_puller_refuses_malformed_and_out_of_order_batches() -> None:
    good = {"partition": 1, "kvs": [{"key": b"b", "value": b""}], "resume_token": b"b"}
    assert decode_batch(good, 1, b"a").entries == [MigrationEntry(b"b", b"")]
    for bad in [[], {"partition": 2}, {"partition": 1, "kvs": [{"key": "b"}]}]:
        with pytest.raises(MigrationSourceError) as info:
            decode_batch(bad, 1, None)
        assert info.value.remote_type == "MalformedBatch"
    with pytest.raises(MigrationSourceError) as info:
        decode_batch(good, 1, b"b")  # b is not after the last key applied
    assert info.value.remote_type == "SourceContractError"


def test_a_batch_never_exceeds_the_message_limit_on_the_wire() -> None:
    rng = random.Random(7)
    keys = sorted({rng.randbytes(rng.randint(1, 500)) for _ in range(2000)})
    entries = [
        MigrationEntry(k, rng.randbytes(rng.randint(0, 1500)), 2**64 - 1, rng.randint(0, 2**64 - 1))
        for k in keys
    ]
    batcher = Batcher(0, None, max_keys=10**6, max_bytes=10**9, max_wire=4096)
    out = [batcher.add(e) for e in entries] + [batcher.finish()]
    sent = [b for b in out if b is not None]
    assert [kv["key"] for b in sent for kv in b["kvs"]] == keys
    assert max(len(msgpack.packb(b, use_bin_type=True)) for b in sent) <= 4096
    assert len(sent) < len(keys) / 2  # and batches are not needlessly small


def test_token_bucket_paces_to_its_rate() -> None:
    bucket = TokenBucket(100.0, 10.0, now=0.0)
    assert bucket.take(10, now=0.0) == 0.0  # the burst
    assert bucket.take(50, now=0.0) == pytest.approx(0.5)  # in debt: wait for 50 tokens
    assert bucket.take(10, now=0.5) == pytest.approx(0.1)
    assert bucket.take(5, now=10.0) == 0.0  # refilled, but only up to the burst
    assert bucket.take(10, now=10.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1.0, now=0.0)


# -- two real nodes -----------------------------------------------------------------------


async def test_pull_copies_a_partition_in_batches_and_reports_progress(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with two_nodes(etcd, prefix) as (src, dst):
        data = make_entries(2500)
        source = src.migration.source(ListSource(data))
        sink = Collect()
        reports: list[MigrationProgress] = []
        with trio.fail_after(20):
            progress = await dst.migration.pull(
                3, "src", sink, epoch=5, snapshot_revision=42, on_progress=reports.append
            )
        assert sink.entries == data  # every key once, in order, versions and epochs kept
        assert [len(b) for b in sink.batches] == [1000, 1000, 500]
        assert source.requests == [SourceRequest(3, None, "dst", 42, 5)]
        total = sum(len(e.key) + len(e.value) for e in data)
        assert (progress.keys, progress.bytes, progress.batches) == (2500, total, 3)
        assert (progress.resumes, progress.complete, progress.resume_token) == (
            0,
            True,
            data[-1].key,
        )
        assert progress.snapshot_revision == 42 and progress.elapsed > 0
        assert [(r.keys, r.batches, r.complete) for r in reports] == [
            (1000, 1, False),
            (2000, 2, False),
            (2500, 3, True),
        ]
        assert reports[0].resume_token == data[999].key
        assert all(a.elapsed <= b.elapsed for a, b in itertools.pairwise(reports))
        assert src.migration.statistics()["keys_served"] == 2500
        assert dst.migration.statistics()["keys_pulled"] == 2500

        # An empty partition: no sink call, one (async) progress report, complete.
        src.migration.source(ListSource([]))
        seen: list[MigrationProgress] = []

        async def report(p: MigrationProgress) -> None:
            seen.append(p)

        empty = Collect()
        with trio.fail_after(10):
            done = await dst.migration.pull(4, src.node, empty, on_progress=report)
        assert empty.batches == [] and done.complete and done.keys == 0
        assert [s.complete for s in seen] == [True]


async def test_batches_respect_the_limits_and_a_big_entry_goes_alone(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    sizes = [(i * 37) % 400 for i in range(300)]
    sizes[100] = 5000
    data = [MigrationEntry(b"key%05d" % i, b"x" * size) for i, size in enumerate(sizes)]
    async with two_nodes(etcd, prefix) as (src, dst):
        src.migration.source(ListSource(data))
        sink = Collect()
        with trio.fail_after(20):
            await dst.migration.pull(0, "src", sink, batch_keys=7, batch_bytes=1000)
    assert sink.entries == data

    def size(entries: list[MigrationEntry]) -> int:
        return sum(len(e.key) + len(e.value) for e in entries)

    for i, batch in enumerate(sink.batches):
        assert len(batch) <= 7
        assert size(batch) <= 1000 or len(batch) == 1
        if i + 1 < len(sink.batches):  # full: the next entry did not fit
            following = sink.batches[i + 1][0]
            assert len(batch) == 7 or size(batch) + size([following]) > 1000
    assert [data[100]] in sink.batches


async def test_rate_limits_slow_the_pull(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    async with two_nodes(etcd, prefix) as (src, dst):
        data = [MigrationEntry(b"k%07d" % i, b"v" * 92) for i in range(1000)]  # 100 B each
        src.migration.source(ListSource(data))

        rate_keys = 2000.0
        start = trio.current_time()
        with trio.fail_after(20):
            await dst.migration.pull(0, "src", Collect(), batch_keys=50, rate_keys=rate_keys)
        elapsed = trio.current_time() - start
        assert elapsed >= (1000 - rate_keys * BURST_SECONDS) / rate_keys  # 0.4 s

        rate_bytes = 200_000.0  # 100,000 bytes at 200 kB/s
        start = trio.current_time()
        with trio.fail_after(20):
            progress = await dst.migration.pull(
                0, "src", Collect(), batch_keys=25, rate_bytes=rate_bytes
            )
        elapsed = trio.current_time() - start
        assert progress.bytes == 100_000
        assert elapsed >= (100_000 - rate_bytes * BURST_SECONDS) / rate_bytes  # 0.4 s


async def test_a_dropped_connection_resumes_with_every_key_once(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    # 300 batches, far more than the stream window, so the break happens mid-stream.
    data = make_entries(3000, value_size=10)
    async with two_nodes(etcd, prefix) as (src, dst), open_proxy(src.peers.address) as proxy:
        source = src.migration.source(ListSource(data))
        sink = Collect()

        async def cut_after_two(partition: int, entries: list[MigrationEntry]) -> None:
            await sink(partition, entries)
            if len(sink.batches) == 2:
                proxy.cut()  # drops the connection ...
                proxy.restore()  # ... and lets the resume reconnect

        with trio.fail_after(20):
            progress = await dst.migration.pull(1, proxy.endpoint, cut_after_two, batch_keys=10)
        assert sink.entries == data
        assert progress.resumes == 1 and progress.complete and progress.keys == 3000
        assert proxy.connections == 2
        first, second = source.requests
        assert first.after is None
        assert second.after is not None and second.after >= data[19].key
        assert second.after in {batch[-1].key for batch in sink.batches}

        # A connection that stays down: give up after max_resumes, then continue later.
        sink2 = Collect()

        async def cut_for_good(partition: int, entries: list[MigrationEntry]) -> None:
            await sink2(partition, entries)
            proxy.cut()

        # (stall_timeout also bounds each connect: trio-websocket waits out its connect
        # timeout when a server closes the TCP connection during the opening handshake.)
        with trio.fail_after(20), pytest.raises(MigrationInterrupted) as info:
            await dst.migration.pull(
                2, proxy.endpoint, cut_for_good, max_resumes=2, batch_keys=10, stall_timeout=0.5
            )
        stopped = info.value.progress
        assert stopped.resumes == 2 and not stopped.complete
        assert stopped.keys == len(sink2.entries) > 0
        assert stopped.resume_token == sink2.entries[-1].key
        proxy.restore()
        rest = Collect()
        with trio.fail_after(20):
            await dst.migration.pull(2, proxy.endpoint, rest, after=stopped.resume_token)
        assert sink2.entries + rest.entries == data


async def test_a_stalled_source_is_abandoned_and_resumed(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    data = make_entries(100, value_size=10)
    keys = [e.key for e in data]
    async with two_nodes(etcd, prefix) as (src, dst):
        attempts: list[SourceRequest] = []
        abandoned = trio.Event()
        hang = {1}

        @src.migration.source
        async def stalling(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
            attempts.append(request)
            attempt = len(attempts)
            start = 0 if request.after is None else bisect.bisect_right(keys, request.after)
            try:
                for i in range(start, len(data)):
                    if i == 25 and attempt in hang:
                        await trio.sleep_forever()
                    yield data[i]
            finally:
                if attempt == 1:
                    abandoned.set()

        sink = Collect()
        with trio.fail_after(20):
            progress = await dst.migration.pull(0, "src", sink, batch_keys=10, stall_timeout=0.5)
            await abandoned.wait()  # the puller's abort cancelled the stalled source
        assert sink.entries == data and progress.resumes == 1
        assert attempts[1].after == data[19].key

        # The whole pull is bounded by ``timeout``, resumes included.
        hang.add(3)
        start = trio.current_time()
        with trio.fail_after(20), pytest.raises(MigrationInterrupted, match="within"):
            await dst.migration.pull(0, "src", Collect(), batch_keys=10, timeout=0.5)
        assert trio.current_time() - start >= 0.5


async def test_source_errors_are_typed_and_not_retried(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with two_nodes(etcd, prefix) as (src, dst):
        with trio.fail_after(10), pytest.raises(NoMigrationSource):
            await dst.migration.pull(0, "src", Collect())

        calls = 0

        async def run(source: Any, **kwargs: Any) -> MigrationError:
            nonlocal calls
            calls = 0
            src.migration.source(source)
            with trio.fail_after(10), pytest.raises(MigrationError) as info:
                await dst.migration.pull(0, "src", Collect(), **kwargs)
            return info.value

        async def descending(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
            nonlocal calls
            calls += 1
            yield MigrationEntry(b"b", b"")
            yield MigrationEntry(b"a", b"")

        err = await run(descending)
        assert isinstance(err, MigrationSourceError)
        assert err.remote_type == "SourceContractError" and "must ascend" in err.remote_message
        assert calls == 1

        async def ignores_after(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
            for entry in make_entries(10):
                yield entry

        # A source that ignores ``after`` would repeat keys: refused, not applied.
        err = await run(ignores_after, after=b"k00000005")
        assert isinstance(err, MigrationSourceError) and "resume point" in err.remote_message

        async def failing(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
            nonlocal calls
            calls += 1
            if request.epoch == 1:
                raise KeyError("stale epoch")
            yield MigrationEntry(b"a", b"")

        err = await run(failing, epoch=1)
        assert isinstance(err, MigrationSourceError)
        assert (err.remote_type, calls) == ("KeyError", 1)

        # Bad arguments fail before anything is sent.
        for bad in [{"partition": P}, {"batch_keys": 0}, {"rate_keys": 0}, {"max_resumes": -1}]:
            args: dict[str, Any] = {"partition": 0, **bad}
            with pytest.raises(ValueError):
                await dst.migration.pull(args.pop("partition"), "src", Collect(), **args)
        # An unknown node counts as unreachable.
        with trio.fail_after(10), pytest.raises(MigrationInterrupted):
            await dst.migration.pull(0, "nobody", Collect(), max_resumes=0)


async def test_a_slow_sink_bounds_the_batches_in_flight(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    data = make_entries(2000, value_size=10)  # 200 batches of 10
    async with two_nodes(etcd, prefix) as (src, dst):
        source = src.migration.source(ListSource(data))
        sink = Collect()
        first = trio.Event()
        release = trio.Event()

        async def slow(partition: int, entries: list[MigrationEntry]) -> None:
            await sink(partition, entries)
            first.set()
            await release.wait()  # the first batch waits; later ones pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: dst.migration.pull(5, "src", slow, batch_keys=10))
            with trio.fail_after(20):
                await first.wait()
                await trio.testing.wait_all_tasks_blocked(0.2)
            # The source is stopped by stream credit: a window of batches beyond the one
            # the sink holds, plus the batch being cut (and the entry that cut it).
            assert source.yielded <= (STREAM_WINDOW + 1) * 10 + 1
            assert source.yielded > 20  # it did run ahead of the sink
            release.set()
        assert sink.entries == data
