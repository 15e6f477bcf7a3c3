"""Watches against a real etcd server: order, no gaps, compaction, filters, prev_kv."""

from __future__ import annotations

import pytest
import trio

import clusterkit
from clusterkit.etcd import EtcdClient, Event, EventType


async def test_burst_of_5000_puts_arrives_in_order_without_gaps(
    client: EtcdClient, prefix: str
) -> None:
    n = 5000
    async with client.watch(prefix, prefix=True) as watch, trio.open_nursery() as nursery:

        async def writer() -> None:
            # 20 concurrent writers; every put is its own revision.
            async def put_range(start: int) -> None:
                for i in range(start, n, 20):
                    await client.put(f"{prefix}{i}", str(i))

            async with trio.open_nursery() as inner:
                for s in range(20):
                    inner.start_soon(put_range, s)

        nursery.start_soon(writer)
        revisions: list[int] = []
        keys: set[bytes] = set()
        with trio.fail_after(60):
            async for batch in watch:
                for ev in batch.events:
                    assert ev.type is EventType.PUT
                    assert ev.kv.mod_revision <= batch.revision
                    revisions.append(ev.kv.mod_revision)
                    keys.add(ev.kv.key)
                if len(revisions) >= n:
                    break
    assert len(revisions) == n
    assert revisions == sorted(revisions)
    # No gaps: nothing else writes under this prefix, so the revisions are consecutive.
    assert revisions[-1] - revisions[0] == n - 1
    assert len(keys) == n


async def test_watch_from_revision_replays_history_with_prev_kv(
    client: EtcdClient, prefix: str
) -> None:
    first = await client.put(prefix + "a", "1")
    await client.put(prefix + "a", "2")
    await client.delete(prefix + "a")
    async with client.watch(
        prefix, prefix=True, start_revision=first.revision, prev_kv=True
    ) as watch:
        seen: list[Event] = []
        with trio.fail_after(10):
            async for batch in watch:
                seen.extend(batch.events)
                if len(seen) >= 3:
                    break
    assert [e.type for e in seen] == [EventType.PUT, EventType.PUT, EventType.DELETE]
    assert [e.kv.value for e in seen[:2]] == [b"1", b"2"]
    assert seen[0].prev_kv is None
    assert seen[1].prev_kv is not None and seen[1].prev_kv.value == b"1"
    assert seen[2].prev_kv is not None and seen[2].prev_kv.value == b"2"


async def test_filters_drop_events_at_the_server(client: EtcdClient, prefix: str) -> None:
    async with client.watch(prefix, prefix=True, filters=["noput"]) as watch:
        await client.put(prefix + "x", "1")
        await client.delete(prefix + "x")
        with trio.fail_after(10):
            batch = await watch.__anext__()
    assert [e.type for e in batch.events] == [EventType.DELETE]


async def test_watch_from_compacted_revision_raises_with_the_revision(
    client: EtcdClient, prefix: str
) -> None:
    first = await client.put(prefix + "c", "1")
    last = await client.put(prefix + "c", "2")
    await client.compact(last.revision)
    with pytest.raises(clusterkit.RevisionCompacted) as info:
        async with client.watch(prefix, prefix=True, start_revision=first.revision) as watch:
            with trio.fail_after(10):
                async for _ in watch:
                    pass
    assert info.value.compact_revision == last.revision


async def test_many_watches_share_one_stream_and_each_sees_its_keys(
    client: EtcdClient, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        results: dict[int, bytes] = {}

        async def one(i: int, task_status: trio.TaskStatus[None]) -> None:
            async with client.watch(f"{prefix}{i}/key") as watch:
                task_status.started()
                async for batch in watch:
                    results[i] = batch.events[0].kv.value
                    return

        for i in range(30):
            await nursery.start(one, i)
        assert client.statistics()["watch_watches"] == 30
        for i in range(30):
            await client.put(f"{prefix}{i}/key", f"v{i}")
    assert results == {i: f"v{i}".encode() for i in range(30)}
    assert client.statistics()["watch_watches"] == 0


async def test_leaving_a_watch_cancels_it_and_others_keep_going(
    client: EtcdClient, prefix: str
) -> None:
    async with client.watch(prefix + "keep") as keep:
        async with client.watch(prefix + "drop"):
            pass
        await client.put(prefix + "drop", "ignored")
        await client.put(prefix + "keep", "seen")
        with trio.fail_after(10):
            batch = await keep.__anext__()
        assert batch.events[0].kv.value == b"seen"


async def test_progress_notifications_carry_the_revision(etcd_binary: str) -> None:
    flags = ["--experimental-watch-progress-notify-interval", "200ms"]
    async with clusterkit.open_embedded_etcd(binary=etcd_binary, extra_args=flags) as server:
        async with clusterkit.open_etcd_client(server.endpoints) as client:
            put = await client.put("/other/key", "v")
            async with client.watch("/quiet/", prefix=True, progress_notify=True) as watch:
                with trio.fail_after(10):
                    batch = await watch.__anext__()
    assert batch.progress and batch.events == ()
    assert batch.revision >= put.revision


@pytest.mark.slow
async def test_a_slow_watch_fails_alone_and_never_stalls_the_others(
    client: EtcdClient, prefix: str
) -> None:
    from clusterkit._etcd.watch import QUEUE_LIMIT

    async with client.watch(prefix + "slow/", prefix=True) as slow:
        async with client.watch(prefix + "fast") as fast:
            for i in range(QUEUE_LIMIT + 50):  # nobody reads `slow`
                await client.put(f"{prefix}slow/{i}", "x")
            await client.put(prefix + "fast", "still flowing")
            with trio.fail_after(10):
                batch = await fast.__anext__()
            assert batch.events[0].kv.value == b"still flowing"
        received = 0
        with pytest.raises(clusterkit.WatchOverflow):
            async for b in slow:
                received += len(b.events)
        assert received >= QUEUE_LIMIT  # everything queued before the overflow is delivered
