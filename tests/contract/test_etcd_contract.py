"""The etcd contract: one behavioural suite, run against real etcd servers and the memory etcd.

Every test taking ``kv`` runs once per backend (see ``conftest.py``) and asserts concrete
values, so the backends agree on everything asserted here. Revisions are relative to the
test's start (``kv.rel``), keys to its prefix, leases numbered in grant order (``kv.norm``).
The tests at the end are about the memory etcd alone: its fault knobs and virtual time.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

import clusterkit
from clusterkit._etcd.watch import QUEUE_LIMIT
from clusterkit._testing.memory_etcd import MemoryEtcdClient, open_memory_etcd
from clusterkit.etcd import (
    Compare,
    DeleteOp,
    EtcdClient,
    EventType,
    GetOp,
    LeaseInfo,
    Op,
    PutOp,
    WatchBatch,
    prefix_end,
)

from .conftest import KV

Call = Callable[[], Awaitable[object]]


async def take(watch: AsyncIterator[WatchBatch], events: int) -> list[WatchBatch]:
    """Batches from ``watch`` until they hold ``events`` events (10 s at most)."""
    batches: list[WatchBatch] = []
    with trio.fail_after(10):
        while sum(len(b.events) for b in batches) < events:
            batches.append(await watch.__anext__())
    return batches


# -- KV ------------------------------------------------------------------------------------


async def test_put_get_revisions_versions_and_recreate(kv: KV) -> None:
    c, a = kv.client, kv.key("a")
    first = await c.put(a, "1")
    assert (kv.rel(first.revision), first.prev_kv) == (1, None)
    assert kv.norm(await c.get(a)) == ("a", b"1", 1, 1, 1, 0)
    second = await c.put(a, b"2", prev_kv=True)
    assert kv.rel(second.revision) == 2
    assert kv.norm(second.prev_kv) == ("a", b"1", 1, 1, 1, 0)
    assert kv.norm(await c.get(a)) == ("a", b"2", 1, 2, 2, 0)
    gone = await c.delete(a, prev_kv=True)
    assert (kv.rel(gone.revision), gone.deleted) == (3, 1)
    assert [kv.norm(x) for x in gone.prev_kvs] == [("a", b"2", 1, 2, 2, 0)]
    assert await c.get(a) is None
    nothing = await c.delete(a)  # deletes nothing: no new revision
    assert (kv.rel(nothing.revision), nothing.deleted, nothing.prev_kvs) == (3, 0, ())
    again = await c.put(a, "3")
    assert kv.rel(again.revision) == 4
    assert kv.norm(await c.get(a)) == ("a", b"3", 4, 4, 1, 0)  # a new incarnation: version 1
    # History stays readable at every revision.
    assert kv.norm(await c.get(a, revision=first.revision)) == ("a", b"1", 1, 1, 1, 0)
    assert kv.norm(await c.get(a, revision=second.revision)) == ("a", b"2", 1, 2, 2, 0)
    assert await c.get(a, revision=gone.revision) is None
    raw = await c.put(kv.key("bytes").encode(), b"\x00\xff")
    assert kv.norm(await c.get(kv.key("bytes"))) == ("bytes", b"\x00\xff", 5, 5, 1, 0)
    assert kv.rel(raw.revision) == 5


async def test_range_prefix_limit_count_keys_only_and_sort(kv: KV) -> None:
    c, p = kv.client, kv.prefix
    for i, value in enumerate("cabed"):
        await c.put(kv.key(f"k{i}"), value)  # revisions 1..5
    await c.put(kv.key("k0"), "z")  # 6: k0 is at version 2
    await c.put(p[:-1] + "0", "outside")  # 7: the first key after the prefix
    full = await c.range(p, prefix=True)
    assert (kv.rel(full.revision), full.count, full.more) == (7, 5, False)
    assert [kv.norm(x) for x in full.kvs] == [
        ("k0", b"z", 1, 6, 2, 0),
        ("k1", b"a", 2, 2, 1, 0),
        ("k2", b"b", 3, 3, 1, 0),
        ("k3", b"e", 4, 4, 1, 0),
        ("k4", b"d", 5, 5, 1, 0),
    ]

    def names(result: clusterkit.etcd.RangeResult) -> list[str]:
        return [x.key.decode().removeprefix(p) for x in result.kvs]

    limited = await c.range(p, prefix=True, limit=2)
    assert (names(limited), limited.count, limited.more) == (["k0", "k1"], 5, True)
    exact = await c.range(p, prefix=True, limit=5)
    assert (len(exact.kvs), exact.count, exact.more) == (5, 5, False)
    counted = await c.range(p, prefix=True, count_only=True, limit=1)
    assert (counted.kvs, counted.count, counted.more) == ((), 5, False)
    keys = await c.range(p, prefix=True, keys_only=True, limit=1)
    assert [kv.norm(x) for x in keys.kvs] == [("k0", b"", 1, 6, 2, 0)]
    between = await c.range(kv.key("k1"), range_end=kv.key("k3"))
    assert names(between) == ["k1", "k2"]
    assert (await c.range(kv.key("k3"), range_end=kv.key("k1"))).count == 0
    assert (await c.range(kv.key("k3"), range_end=kv.key("k3"))).count == 0
    assert (await c.range(kv.key("nope"))).kvs == ()

    sorts = {
        ("key", "descend"): ["k4", "k3", "k2", "k1", "k0"],
        ("value", "none"): ["k1", "k2", "k4", "k3", "k0"],  # another target: ascending
        ("value", "descend"): ["k0", "k3", "k4", "k2", "k1"],
        ("version", "descend"): ["k0", "k1", "k2", "k3", "k4"],  # ties keep key order
        ("version", "ascend"): ["k1", "k2", "k3", "k4", "k0"],
        ("create", "descend"): ["k4", "k3", "k2", "k1", "k0"],
        ("mod", "ascend"): ["k1", "k2", "k3", "k4", "k0"],
    }
    for (target, order), expected in sorts.items():
        got = await c.range(p, prefix=True, sort_target=target, sort_order=order)
        assert names(got) == expected, (target, order)
        top = await c.range(p, prefix=True, sort_target=target, sort_order=order, limit=2)
        assert (names(top), top.count, top.more) == (expected[:2], 5, True)

    # An old revision: its keys and values; the answer carries the current revision.
    old = await c.range(p, prefix=True, revision=kv.base + 3)
    assert (kv.rel(old.revision), old.count) == (7, 3)
    assert [kv.norm(x) for x in old.kvs] == [
        ("k0", b"c", 1, 1, 1, 0),
        ("k1", b"a", 2, 2, 1, 0),
        ("k2", b"b", 3, 3, 1, 0),
    ]


async def test_get_prefix_reads_every_page_at_one_revision(kv: KV) -> None:
    c = kv.client
    for i in range(10):
        await c.put(kv.key(f"k{i}"), str(i))
    snapshot = await c.get_prefix(kv.prefix, page_size=3)
    assert (kv.rel(snapshot.revision), snapshot.count, snapshot.more) == (10, 10, False)
    assert [x.value for x in snapshot.kvs] == [str(i).encode() for i in range(10)]
    await c.delete(kv.key("k0"))
    await c.put(kv.key("k99"), "late")
    again = await c.get_prefix(kv.prefix, revision=snapshot.revision, page_size=4)
    assert again == snapshot
    now = await c.get_prefix(kv.prefix, page_size=4)
    assert (kv.rel(now.revision), now.count) == (12, 10)
    assert now.kvs[0].key == kv.key("k1").encode() and now.kvs[-1].key == kv.key("k99").encode()


# -- Txn -----------------------------------------------------------------------------------


async def test_txn_compare_each_target_with_each_op(kv: KV) -> None:
    c, k = kv.client, kv.key("k")
    lease = await kv.grant(30)
    await c.put(k, "a", lease=lease.id)  # 1
    await c.put(k, "b", ignore_lease=True)  # 2: version 2, still on the lease
    actual = {
        "value": (b"a", b"b", b"c"),
        "version": (1, 2, 3),
        "create_revision": (kv.base, kv.base + 1, kv.base + 2),
        "mod_revision": (kv.base + 1, kv.base + 2, kv.base + 3),
        "lease": (lease.id - 1, lease.id, lease.id + 1),
    }
    # For operands below, equal to and above the key's own value:
    truth = {
        "=": [False, True, False],
        "!=": [True, False, True],
        "<": [False, False, True],
        ">": [True, False, False],
    }
    for target, operands in actual.items():
        make = getattr(Compare, target)
        for op, expected in truth.items():
            got = [(await c.txn([make(k, op, operand)])).succeeded for operand in operands]
            assert got == expected, (target, op)
    # A missing key: value compares always fail; the others see zeros.
    missing = kv.key("missing")
    cases = [
        (Compare.value(missing, "=", ""), False),
        (Compare.value(missing, "!=", "x"), False),
        (Compare.version(missing, "=", 0), True),
        (Compare.create_revision(missing, "=", 0), True),
        (Compare.mod_revision(missing, "<", 1), True),
        (Compare.lease(missing, "=", 0), True),
        (Compare.version(missing, ">", 0), False),
    ]
    assert [(await c.txn([cmp])).succeeded for cmp, _ in cases] == [want for _, want in cases]
    # Every condition must hold.
    both = [Compare.version(k, "=", 2), Compare.value(k, "=", "a")]
    assert not (await c.txn(both)).succeeded
    # A compare over a range holds only if it holds for every key in it.
    await c.put(kv.key("r/1"), "x")  # 3
    await c.put(kv.key("r/2"), "x")  # 4
    sub = kv.key("r/").encode()
    over_range = dataclasses.replace(Compare.value(sub, "=", "x"), range_end=prefix_end(sub))
    assert (await c.txn([over_range])).succeeded
    await c.put(kv.key("r/2"), "y")  # 5
    assert not (await c.txn([over_range])).succeeded
    # Read-only transactions take no revision.
    assert kv.rel((await c.txn([])).revision) == 5


async def test_txn_branches_responses_and_one_revision_per_txn(kv: KV) -> None:
    c = kv.client
    k1, k2, k3 = kv.key("1"), kv.key("2"), kv.key("3")
    await c.put(k3, "old")  # 1
    created = await c.txn(
        [Compare.create_revision(k1, "=", 0)],
        [
            Op.get(k1),
            Op.put(k1, "v1"),
            Op.get(k1),
            Op.put(k2, "v2", prev_kv=True),
            Op.delete(k3, prev_kv=True),
            Op.delete(kv.key("none")),
            Op.get(kv.prefix, prefix=True),
        ],
        [Op.get(k1)],
    )
    assert created.succeeded and kv.rel(created.revision) == 2
    assert [kv.result(r) for r in created.responses] == [
        ("range", 1, 0, False, []),  # before the first change: the old revision
        ("put", 2, None),
        ("range", 2, 1, False, [("1", b"v1", 2, 2, 1, 0)]),  # sees the put above
        ("put", 2, None),
        ("delete", 2, 1, [("3", b"old", 1, 1, 1, 0)]),
        ("delete", 2, 0, []),
        ("range", 2, 2, False, [("1", b"v1", 2, 2, 1, 0), ("2", b"v2", 2, 2, 1, 0)]),
    ]
    refused = await c.txn(
        [Compare.create_revision(k1, "=", 0)], [Op.put(k1, "again")], [Op.get(k1)]
    )
    assert not refused.succeeded and kv.rel(refused.revision) == 2
    assert [kv.result(r) for r in refused.responses] == [
        ("range", 2, 1, False, [("1", b"v1", 2, 2, 1, 0)])
    ]
    failed_writes = await c.txn(
        [Compare.value(k1, "=", "nope")],
        [Op.get(k1)],
        [Op.put(k1, "v1b", prev_kv=True), Op.delete(k2)],
    )
    assert not failed_writes.succeeded and kv.rel(failed_writes.revision) == 3
    assert [kv.result(r) for r in failed_writes.responses] == [
        ("put", 3, ("1", b"v1", 2, 2, 1, 0)),
        ("delete", 3, 1, []),
    ]
    assert kv.norm(await c.get(k1)) == ("1", b"v1b", 2, 3, 2, 0)
    nothing = await c.txn([Compare.value(k1, "=", "nope")], [Op.put(k1, "x")])
    assert (nothing.succeeded, kv.rel(nothing.revision), nothing.responses) == (False, 3, ())
    # Deletes that find nothing take no revision either.
    empty = await c.txn([], [Op.delete(kv.key("none")), Op.get(k1, limit=1)])
    assert kv.rel(empty.revision) == 3
    assert kv.result(empty.responses[0]) == ("delete", 3, 0, [])


async def test_txn_rejects_duplicate_keys_and_unknown_leases_atomically(kv: KV) -> None:
    c, k = kv.client, kv.key("k")
    await c.put(k, "v")  # 1
    bad: list[list[GetOp | PutOp | DeleteOp]] = [
        [Op.put(k, "1"), Op.put(k, "2")],
        [Op.put(k, "1"), Op.delete(k)],
        [Op.delete(kv.prefix, prefix=True), Op.put(k, "1")],
        [Op.put(k, "1")] * 129,
    ]
    for ops in bad:
        with pytest.raises(clusterkit.InvalidRequest) as info:
            await c.txn([], ops)
        assert info.value.code == "INVALID_ARGUMENT"
    # The same key in both branches, and overlapping deletes, are fine.
    assert (await c.txn([], [Op.put(k, "1")], [Op.put(k, "2")])).succeeded
    await c.put(kv.key("j"), "v")  # 3
    both = await c.txn([], [Op.delete(k), Op.delete(kv.prefix, prefix=True)])
    assert [kv.result(r) for r in both.responses] == [("delete", 4, 1, []), ("delete", 4, 1, [])]
    # An unknown lease fails the whole transaction, but only in the branch that runs.
    with pytest.raises(clusterkit.LeaseNotFound):
        await c.txn([], [Op.put(k, "1"), Op.put(kv.key("x"), "1", lease=0x7FFF_0000_1234)])
    assert await c.get(k) is None
    assert kv.rel((await c.txn([])).revision) == 4
    ok = await c.txn([], [Op.put(k, "1")], [Op.put(k, "1", lease=0x7FFF_0000_1234)])
    assert ok.succeeded and kv.rel(ok.revision) == 5


async def test_delete_prefix_returns_prev_kvs_in_one_revision(kv: KV) -> None:
    c = kv.client
    for name in "bac":
        await c.put(kv.key(name), name.upper())  # 1..3
    async with c.watch(kv.prefix, prefix=True, prev_kv=True) as watch:
        gone = await c.delete(kv.prefix, prefix=True, prev_kv=True)
        batches = await take(watch, 3)
    assert (kv.rel(gone.revision), gone.deleted) == (4, 3)
    assert [kv.norm(x) for x in gone.prev_kvs] == [
        ("a", b"A", 2, 2, 1, 0),
        ("b", b"B", 1, 1, 1, 0),
        ("c", b"C", 3, 3, 1, 0),
    ]
    assert kv.batches(batches) == [
        (
            4,
            [
                ("DELETE", ("a", b"", 0, 4, 0, 0), ("a", b"A", 2, 2, 1, 0)),
                ("DELETE", ("b", b"", 0, 4, 0, 0), ("b", b"B", 1, 1, 1, 0)),
                ("DELETE", ("c", b"", 0, 4, 0, 0), ("c", b"C", 3, 3, 1, 0)),
            ],
        )
    ]
    assert (await c.range(kv.prefix, prefix=True)).count == 0


async def test_compaction_makes_older_revisions_unreadable(kv: KV) -> None:
    c, k = kv.client, kv.key("k")
    first = await c.put(k, "1")
    second = await c.put(k, "2")
    await c.put(k, "3")
    await c.compact(second.revision)
    with pytest.raises(clusterkit.RevisionCompacted) as info:
        await c.get(k, revision=first.revision)
    error = info.value
    assert (error.code, error.details, error.compact_revision) == (
        "OUT_OF_RANGE",
        "etcdserver: mvcc: required revision has been compacted",
        0,  # unary answers do not say which revision
    )
    assert kv.norm(await c.get(k, revision=second.revision)) == ("k", b"2", 1, 2, 2, 0)
    assert kv.norm(await c.get(k)) == ("k", b"3", 1, 3, 3, 0)
    for again in (second.revision, first.revision):
        with pytest.raises(clusterkit.RevisionCompacted):
            await c.compact(again)
    with pytest.raises(clusterkit.InvalidRequest) as future:
        await c.compact(kv.base + 100)
    assert future.value.code == "OUT_OF_RANGE"


# -- Watch ---------------------------------------------------------------------------------


async def test_watch_delivers_one_batch_per_revision_in_order_with_prev_kv(kv: KV) -> None:
    c = kv.client
    a, b, d = kv.key("a"), kv.key("b"), kv.key("d")
    async with c.watch(kv.prefix, prefix=True, prev_kv=True) as watch:
        await c.put(a, "1")  # 1
        await c.put(a, "2")  # 2
        await c.txn([], [Op.put(b, "x"), Op.put(d, "y"), Op.delete(a)])  # 3
        await c.delete(kv.key("nothing"))  # no revision
        await c.put(kv.prefix[:-1] + "0", "outside")  # 4, not watched
        await c.put(b, "x2")  # 5
        batches = await take(watch, 6)
    assert kv.batches(batches) == [
        (1, [("PUT", ("a", b"1", 1, 1, 1, 0), None)]),
        (2, [("PUT", ("a", b"2", 1, 2, 2, 0), ("a", b"1", 1, 1, 1, 0))]),
        (
            3,
            [
                ("PUT", ("b", b"x", 3, 3, 1, 0), None),
                ("PUT", ("d", b"y", 3, 3, 1, 0), None),
                ("DELETE", ("a", b"", 0, 3, 0, 0), ("a", b"2", 1, 2, 2, 0)),
            ],
        ),
        (5, [("PUT", ("b", b"x2", 3, 5, 2, 0), ("b", b"x", 3, 3, 1, 0))]),
    ]
    assert all(not batch.progress for batch in batches)


async def test_a_watch_starts_when_its_async_with_is_entered(kv: KV) -> None:
    c, k = kv.client, kv.key("k")
    watch = c.watch(k)
    await c.put(k, "before")  # 1: the watch is not registered yet
    async with watch:
        await c.put(k, "after")  # 2
        batches = await take(watch, 1)
    assert kv.batches(batches) == [(2, [("PUT", ("k", b"after", 1, 2, 2, 0), None)])]


async def test_watch_filters_drop_events(kv: KV) -> None:
    c, x, y = kv.client, kv.key("x"), kv.key("y")
    async with (
        c.watch(kv.prefix, prefix=True, filters=["noput"]) as no_puts,
        c.watch(kv.prefix, prefix=True, filters=["nodelete"]) as no_deletes,
    ):
        await c.put(x, "1")  # 1
        await c.put(y, "1")  # 2
        await c.delete(x)  # 3
        await c.put(x, "2")  # 4
        await c.delete(y)  # 5
        await c.put(kv.key("z"), "1")  # 6
        deletes = await take(no_puts, 2)
        puts = await take(no_deletes, 4)
    assert kv.batches(deletes) == [
        (3, [("DELETE", ("x", b"", 0, 3, 0, 0), None)]),
        (5, [("DELETE", ("y", b"", 0, 5, 0, 0), None)]),
    ]
    names = [[e.kv.key.decode().removeprefix(kv.prefix) for e in b.events] for b in puts]
    assert [(kv.rel(b.revision), n) for b, n in zip(puts, names, strict=True)] == [
        (1, ["x"]),
        (2, ["y"]),
        (4, ["x"]),
        (6, ["z"]),
    ]
    with pytest.raises(ValueError):
        c.watch(x, filters=["nothing"])


async def test_watch_from_a_start_revision_replays_history(kv: KV) -> None:
    c, a, b = kv.client, kv.key("a"), kv.key("b")
    first = await c.put(a, "1")  # 1
    await c.put(a, "2")  # 2
    deleted = await c.delete(a)  # 3
    await c.put(b, "1")  # 4
    async with c.watch(
        kv.prefix, prefix=True, start_revision=first.revision, prev_kv=True
    ) as watch:
        replay = await take(watch, 4)
        await c.put(kv.key("c"), "1")  # 5
        live = await take(watch, 1)
    # History comes in one batch that carries the revision current at the replay.
    assert kv.batches(replay) == [
        (
            4,
            [
                ("PUT", ("a", b"1", 1, 1, 1, 0), None),
                ("PUT", ("a", b"2", 1, 2, 2, 0), ("a", b"1", 1, 1, 1, 0)),
                ("DELETE", ("a", b"", 0, 3, 0, 0), ("a", b"2", 1, 2, 2, 0)),
                ("PUT", ("b", b"1", 4, 4, 1, 0), None),
            ],
        )
    ]
    assert kv.batches(live) == [(5, [("PUT", ("c", b"1", 5, 5, 1, 0), None)])]
    async with c.watch(a, start_revision=deleted.revision) as watch:
        assert kv.batches(await take(watch, 1)) == [(5, [("DELETE", ("a", b"", 0, 3, 0, 0), None)])]
    # A start revision in the future waits for it.
    async with c.watch(b, start_revision=kv.base + 7) as watch:
        await c.put(b, "2")  # 6, too early
        await c.put(b, "3")  # 7
        assert kv.batches(await take(watch, 1)) == [(7, [("PUT", ("b", b"3", 4, 7, 3, 0), None)])]


async def test_watch_from_a_compacted_revision_raises_with_the_compact_revision(kv: KV) -> None:
    c, k = kv.client, kv.key("k")
    first = await c.put(k, "1")  # 1
    second = await c.put(k, "2")  # 2
    await c.put(k, "3")  # 3
    await c.compact(second.revision)
    with pytest.raises(clusterkit.RevisionCompacted) as info:
        async with c.watch(kv.prefix, prefix=True, start_revision=first.revision) as watch:
            await take(watch, 1)
    assert kv.rel(info.value.compact_revision) == 2
    assert info.value.code is None
    # Starting exactly at the compact revision is allowed: its put is still there.
    async with c.watch(kv.prefix, prefix=True, start_revision=second.revision) as watch:
        assert kv.batches(await take(watch, 2)) == [
            (
                3,
                [
                    ("PUT", ("k", b"2", 1, 2, 2, 0), None),
                    ("PUT", ("k", b"3", 1, 3, 3, 0), None),
                ],
            )
        ]


# -- Leases --------------------------------------------------------------------------------


async def test_lease_grant_keepalive_time_to_live_and_attachment(kv: KV) -> None:
    c, a, b = kv.client, kv.key("a"), kv.key("b")
    lease = await kv.grant(30)
    assert lease.ttl == 30
    info = await c.lease_time_to_live(lease.id, keys=True)
    assert (info.id, info.granted_ttl, info.keys) == (lease.id, 30, ())
    assert 28 <= info.ttl <= 30
    await c.put(a, "1", lease=lease.id)  # 1
    await c.put(b, "1", lease=lease.id)  # 2
    await c.put(kv.key("free"), "1")  # 3
    info = await c.lease_time_to_live(lease.id, keys=True)
    assert sorted(info.keys) == [a.encode(), b.encode()]
    before = trio.current_time()
    ka = await c.lease_keepalive(lease.id)
    assert (ka.id, ka.ttl) == (lease.id, 30)
    assert before <= ka.sent_at <= trio.current_time()
    assert (await kv.grant(0)).ttl == 1  # raised to the minimum TTL (1 s on both)
    # A put without the lease detaches the key; ignore_lease keeps the key's lease.
    await c.put(a, "2")  # 4
    await c.put(b, "2", ignore_lease=True)  # 5
    assert kv.norm(await c.get(a)) == ("a", b"2", 1, 4, 2, 0)
    assert kv.norm(await c.get(b)) == ("b", b"2", 2, 5, 2, 1)
    assert (await c.lease_time_to_live(lease.id, keys=True)).keys == (b.encode(),)
    errors: list[tuple[Call, str]] = [
        (lambda: c.put(kv.key("missing"), "v", ignore_lease=True), "etcdserver: key not found"),
        (lambda: c.put(a, "v", lease=lease.id, ignore_lease=True), "etcdserver: lease is provided"),
    ]
    for call, details in errors:
        with pytest.raises(clusterkit.InvalidRequest) as info_error:
            await call()
        assert (info_error.value.code, info_error.value.details) == ("INVALID_ARGUMENT", details)
    with pytest.raises(clusterkit.PreconditionFailed) as exists:
        await c.lease_grant(30, lease_id=lease.id)
    assert exists.value.details == "etcdserver: lease already exists"
    with pytest.raises(clusterkit.InvalidRequest) as too_long:
        await c.lease_grant(10**10)
    assert (too_long.value.code, too_long.value.details) == (
        "OUT_OF_RANGE",
        "etcdserver: too large lease TTL",
    )
    assert kv.rel((await c.txn([])).revision) == 5


async def test_revoke_deletes_the_keys_in_one_revision(kv: KV) -> None:
    c = kv.client
    lease = await kv.grant(60)
    for name in "bac":
        await c.put(kv.key(name), "v", lease=lease.id)  # 1..3
    await c.put(kv.key("free"), "v")  # 4
    async with c.watch(kv.prefix, prefix=True) as watch:
        await c.lease_revoke(lease.id)
        batches = await take(watch, 3)
    assert kv.batches(batches) == [
        (5, [("DELETE", (name, b"", 0, 5, 0, 0), None) for name in "abc"]),
    ]
    assert (await c.range(kv.prefix, prefix=True)).count == 1
    with pytest.raises(clusterkit.LeaseNotFound) as revoked:
        await c.lease_revoke(lease.id)
    assert (revoked.value.code, revoked.value.details) == (
        "NOT_FOUND",
        "etcdserver: requested lease not found",
    )
    with pytest.raises(clusterkit.LeaseNotFound):
        await c.lease_keepalive(lease.id)
    assert await c.lease_time_to_live(lease.id) == LeaseInfo(lease.id, -1, 0)
    empty = await kv.grant(60)
    await c.lease_revoke(empty.id)  # no keys: no revision
    assert kv.rel((await c.txn([])).revision) == 5


async def test_lease_expiry_deletes_the_keys_and_a_watcher_sees_it(kv: KV) -> None:
    c = kv.client
    granted_at = trio.current_time()
    lease = await kv.grant(1)
    assert lease.ttl == 1
    await c.put(kv.key("b"), "v", lease=lease.id)  # 1
    await c.put(kv.key("a"), "v", lease=lease.id)  # 2
    async with c.watch(kv.prefix, prefix=True, prev_kv=True) as watch:
        batches = await take(watch, 2)  # the real server: TTL + up to 0.5 s
    assert trio.current_time() - granted_at >= lease.ttl
    assert kv.batches(batches) == [
        (
            3,
            [
                ("DELETE", ("a", b"", 0, 3, 0, 0), ("a", b"v", 2, 2, 1, 1)),
                ("DELETE", ("b", b"", 0, 3, 0, 0), ("b", b"v", 1, 1, 1, 1)),
            ],
        )
    ]
    assert await c.get(kv.key("a")) is None
    with pytest.raises(clusterkit.LeaseNotFound):
        await c.lease_keepalive(lease.id)
    assert (await c.lease_time_to_live(lease.id)).ttl == -1


# -- errors and the rest of the API --------------------------------------------------------


async def test_errors_have_the_same_class_code_and_message(kv: KV) -> None:
    c, k = kv.client, kv.key("k")
    empty = (clusterkit.InvalidRequest, "INVALID_ARGUMENT", "etcdserver: key is not provided")
    unknown_lease = 0x7FFF_0000_1234
    cases: list[tuple[Call, tuple[type[clusterkit.EtcdError], str | None, str]]] = [
        (lambda: c.put("", "v"), empty),
        (lambda: c.get(""), empty),
        (lambda: c.range("", prefix=True), empty),
        (lambda: c.delete(b""), empty),
        (lambda: c.txn([Compare.value("", "=", "x")]), empty),
        (lambda: c.txn([], [Op.get("")]), empty),
        (
            lambda: c.get(k, revision=kv.base + 10**9),
            (
                clusterkit.InvalidRequest,
                "OUT_OF_RANGE",
                "etcdserver: mvcc: required revision is a future revision",
            ),
        ),
        (
            lambda: c.put(k, "v", lease=unknown_lease),
            (clusterkit.LeaseNotFound, "NOT_FOUND", "etcdserver: requested lease not found"),
        ),
        (
            lambda: c.lease_revoke(unknown_lease),
            (clusterkit.LeaseNotFound, "NOT_FOUND", "etcdserver: requested lease not found"),
        ),
        (
            lambda: c.lease_keepalive(unknown_lease),
            (clusterkit.LeaseNotFound, None, f"lease {unknown_lease:x} has expired or was revoked"),
        ),
    ]
    for call, (cls, code, details) in cases:
        with pytest.raises(clusterkit.EtcdError) as info:
            await call()
        assert (type(info.value), info.value.code, info.value.details) == (cls, code, details)
    assert await c.lease_time_to_live(unknown_lease) == LeaseInfo(unknown_lease, -1, 0)
    with pytest.raises(ValueError):
        await c.range(k, prefix=True, range_end="z")
    with pytest.raises(ValueError):
        await c.get_prefix(k, page_size=0)
    assert kv.rel((await c.txn([])).revision) == 0  # nothing above wrote anything


async def test_status_members_and_statistics(kv: KV) -> None:
    status = await kv.client.status()
    assert status.version and status.member_id == status.leader != 0
    members = await kv.client.member_list()
    assert len(members) == 1 and members[0].id == status.member_id
    assert members[0].client_urls and not members[0].is_learner
    async with kv.client.watch(kv.key("w")):
        assert kv.client.statistics()["watch_watches"] == 1
    assert kv.client.statistics()["watch_watches"] == 0
    assert kv.client.config.request_timeout > 0


def test_memory_client_has_the_real_clients_signatures() -> None:
    names = [
        "get",
        "range",
        "get_prefix",
        "put",
        "delete",
        "txn",
        "compact",
        "watch",
        "lease_grant",
        "lease_revoke",
        "lease_keepalive",
        "lease_time_to_live",
        "member_list",
        "status",
        "statistics",
        "open_streams",
        "aclose",
    ]
    for name in names:
        real = inspect.signature(getattr(EtcdClient, name))
        memory = inspect.signature(getattr(MemoryEtcdClient, name))
        assert list(memory.parameters.values()) == list(real.parameters.values()), name
        if name != "watch":  # returns a MemoryWatch: the same protocol, another class
            assert memory.return_annotation == real.return_annotation, name
        assert inspect.iscoroutinefunction(getattr(MemoryEtcdClient, name)) == (
            inspect.iscoroutinefunction(getattr(EtcdClient, name))
        ), name


# -- the memory etcd alone: virtual time and fault knobs -----------------------------------


async def test_a_lease_expires_exactly_ttl_after_the_last_keepalive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_etcd() as store:
        c = store.client()
        lease = await c.lease_grant(10)
        await c.put("/k", "v", lease=lease.id)
        await trio.sleep(7)
        ka = await c.lease_keepalive(lease.id)
        assert ka.ttl == 10 and ka.sent_at == trio.current_time()
        await trio.sleep_until(ka.sent_at + 9.5)
        assert await c.get("/k") is not None
        assert (await c.lease_time_to_live(lease.id)).ttl == 0  # 0.5 s left, truncated
        async with c.watch("/k") as watch:
            batch = await watch.__anext__()
        assert trio.current_time() == ka.sent_at + 10
        assert [(e.type, e.kv.key) for e in batch.events] == [(EventType.DELETE, b"/k")]
        assert (await c.lease_time_to_live(lease.id)).ttl == -1
        assert store.statistics()["expired_leases"] == 1


async def test_expiry_comes_before_any_later_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_etcd() as store:
        c = store.client()
        short, long = await c.lease_grant(2), await c.lease_grant(3)
        await c.put("/short", "v", lease=short.id)  # 2
        await c.put("/long", "v", lease=long.id)  # 3
        await trio.sleep(5)  # nobody watches, nobody asks
        assert store.revision == 5  # one revision per lease, oldest deadline first
        later = await c.put("/later", "v")
        assert later.revision == 6
        async with c.watch("/", prefix=True, start_revision=4) as watch:
            batch = await watch.__anext__()
        assert [(e.kv.key, e.kv.mod_revision) for e in batch.events] == [
            (b"/short", 4),
            (b"/long", 5),
            (b"/later", 6),
        ]


async def test_the_minimum_lease_ttl_is_configurable() -> None:
    async with open_memory_etcd(min_lease_ttl=2) as store:
        c = store.client()
        assert [(await c.lease_grant(ttl)).ttl for ttl in (0, 1, 2, 5)] == [2, 2, 2, 5]


async def test_fail_ends_watches_and_fails_every_call_until_heal() -> None:
    async with open_memory_etcd() as store:
        a, b = store.client(), store.client()
        lease = await a.lease_grant(60)
        await a.put("/k", "v")
        async with a.watch("/k") as wa, b.watch("/", prefix=True) as wb:
            store.fail(clusterkit.EtcdUnavailable)
            for watch in (wa, wb):
                with pytest.raises(clusterkit.EtcdUnavailable):
                    await watch.__anext__()
        calls: list[Call] = [
            lambda: a.get("/k"),
            lambda: b.put("/k", "w"),
            lambda: a.txn([]),
            lambda: b.delete("/k"),
            lambda: a.lease_grant(5),
            lambda: b.lease_keepalive(lease.id),
            lambda: a.lease_time_to_live(lease.id),
            lambda: b.status(),
            lambda: a.member_list(),
            lambda: b.compact(1),
        ]
        for call in calls:
            with pytest.raises(clusterkit.EtcdUnavailable) as info:
                await call()
            assert info.value.code == "UNAVAILABLE"
        with pytest.raises(clusterkit.EtcdUnavailable):
            async with a.watch("/k"):
                pass  # pragma: no cover
        store.fail(clusterkit.EtcdTimeout("slow disk"))
        with pytest.raises(clusterkit.EtcdTimeout, match="slow disk"):
            await a.get("/k")
        store.heal()
        kv = await b.get("/k")
        assert kv is not None and kv.value == b"v"
        assert (await a.lease_keepalive(lease.id)).ttl == 60
        async with a.watch("/k") as watch:
            await b.put("/k", "after")
            assert (await watch.__anext__()).events[0].kv.value == b"after"


async def test_a_cut_client_loses_its_lease_while_the_others_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_etcd() as store:
        a, b = store.client(), store.client()
        lease = await a.lease_grant(3)
        await a.put("/session", "a", lease=lease.id)
        ka = await a.lease_keepalive(lease.id)
        async with a.watch("/", prefix=True) as wa, b.watch("/", prefix=True) as wb:
            a.cut()
            assert a.is_cut and a.statistics()["watch_watches"] == 0
            with pytest.raises(clusterkit.EtcdUnavailable):
                await wa.__anext__()
            with pytest.raises(clusterkit.EtcdUnavailable):
                await a.lease_keepalive(lease.id)
            batch = await wb.__anext__()
        assert trio.current_time() == ka.sent_at + 3
        assert [e.type for e in batch.events] == [EventType.DELETE]
        a.restore()
        with pytest.raises(clusterkit.LeaseNotFound):
            await a.lease_keepalive(lease.id)
        assert (await a.put("/session", "again")).revision == batch.revision + 1


async def test_freeze_leases_models_a_quorum_loss(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_etcd() as store:
        c = store.client()
        lease = await c.lease_grant(5)
        await c.put("/k", "v", lease=lease.id)
        store.fail(clusterkit.EtcdUnavailable, freeze_leases=True)
        await trio.sleep(60)
        store.heal()  # a new leader renews every lease by its TTL
        info = await c.lease_time_to_live(lease.id)
        assert (info.ttl, info.granted_ttl) == (5, 5)
        assert await c.get("/k") is not None
        await trio.sleep(5)
        assert await c.get("/k") is None


async def test_store_compact_and_a_watch_below_it() -> None:
    async with open_memory_etcd() as store:
        c = store.client()
        for i in range(5):
            await c.put("/k", str(i))  # revisions 2..6
        store.compact(4)
        assert store.compact_revision == 4
        with pytest.raises(clusterkit.RevisionCompacted) as info:
            async with c.watch("/k", start_revision=3) as watch:
                await watch.__anext__()
        assert info.value.compact_revision == 4
        with pytest.raises(clusterkit.RevisionCompacted):
            store.compact(4)
        with pytest.raises(clusterkit.InvalidRequest):
            store.compact(7)


async def test_latency_delays_requests_and_answers(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_etcd(latency=0.25, request_timeout=1.0) as store:
        c = store.client()
        start = trio.current_time()
        lease = await c.lease_grant(2)
        assert trio.current_time() == start + 0.5
        ka = await c.lease_keepalive(lease.id)
        await c.put("/k", "v", lease=lease.id)
        async with c.watch("/k") as watch:
            await watch.__anext__()
        assert trio.current_time() == ka.sent_at + 0.25 + 2  # renewed when it arrived
        slow = store.client(request_timeout=0.4)
        with pytest.raises(clusterkit.EtcdTimeout):
            await slow.get("/k")


async def test_a_cancelled_anext_loses_no_batch() -> None:
    async with open_memory_etcd() as store:
        c = store.client()
        async with c.watch("/k") as watch:
            await c.put("/k", "v")
            with trio.CancelScope() as scope:
                scope.cancel()
                await watch.__anext__()
            assert scope.cancelled_caught
            assert (await watch.__anext__()).events[0].kv.value == b"v"


async def test_a_consumer_that_falls_behind_gets_watch_overflow() -> None:
    async with open_memory_etcd() as store:
        c = store.client()
        async with c.watch("/k") as watch:
            for i in range(QUEUE_LIMIT + 1):
                await c.put("/k", str(i))
            assert c.statistics()["watch_watches"] == 0
            for i in range(QUEUE_LIMIT):
                assert (await watch.__anext__()).events[0].kv.value == str(i).encode()
            with pytest.raises(clusterkit.WatchOverflow):
                await watch.__anext__()


async def test_closing_the_store_or_a_client_ends_watches_and_calls() -> None:
    async with open_memory_etcd() as store:
        a, b = store.client(), store.client()
        async with a.watch("/k") as watch:
            await a.aclose()
            with pytest.raises(clusterkit.EtcdUnavailable, match="closed"):
                await watch.__anext__()
        with pytest.raises(clusterkit.EtcdUnavailable):
            await a.get("/k")
        with pytest.raises(clusterkit.EtcdUnavailable):
            a.watch("/k")
        late = await b.watch("/k").__aenter__()
    with pytest.raises(clusterkit.EtcdUnavailable):
        await late.__anext__()
    await late.aclose()
    with pytest.raises(clusterkit.EtcdUnavailable):
        await b.get("/k")
    assert "closed" in repr(store)


def test_the_public_testing_module() -> None:
    # In a fresh interpreter: importing clusterkit.testing here would add a "testing"
    # attribute to the clusterkit package for the rest of the session.
    code = (
        "import clusterkit.testing as t, clusterkit._testing.memory_etcd as m;"
        "assert t.__all__ == ['MemoryEtcd', 'MemoryEtcdClient', 'TestCluster', 'TestNode',"
        " 'open_memory_etcd', 'open_test_cluster'];"
        "assert t.MemoryEtcd is m.MemoryEtcd and t.open_memory_etcd is m.open_memory_etcd;"
        "assert 'MockClock' in t.__doc__"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
