"""The etcd batcher keeps each key's meaning inside multi-key Txns, on real etcd and in memory.

Run on every backend of the contract suite (real etcd 3.4 / 3.5, the in-memory etcd): the
batcher's Txns (many compares, failure-branch reads, up to 128 ops) are exactly the kind of
request where an in-memory stand-in could drift from the server.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

import clusterkit
from clusterkit._actors.batcher import MAX_OPS, EtcdBatcher
from clusterkit._etcd.types import KeyValue

from .conftest import KV


async def _with_batcher(kv: KV, work: Any) -> Any:
    batcher = EtcdBatcher(kv.client)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with trio.fail_after(30):
            result = await work(batcher)
        nursery.cancel_scope.cancel()
    return result, batcher.statistics()


async def test_concurrent_campaigns_share_few_txns_and_one_epoch_per_txn(kv: KV) -> None:
    lease = await kv.grant(30)
    keys = [kv.key(f"leaders/{i}").encode() for i in range(300)]
    other = await kv.grant(30)
    await kv.client.put(keys[7], "someone", lease=other.id)  # already led: that campaign loses
    won: dict[bytes, KeyValue | None] = {}

    async def work(batcher: EtcdBatcher) -> None:
        async def one(key: bytes) -> None:
            won[key] = await batcher.campaign(key, b"me", lease.id)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)

    _, stats = await _with_batcher(kv, work)
    assert won[keys[7]] is None
    winners = {k: v for k, v in won.items() if v is not None}
    assert len(winners) == 299
    epochs = {v.create_revision for v in winners.values()}
    assert len(epochs) <= 5  # a handful of Txns, not 299 (the lost key cost one retry)
    assert stats["campaign_requests"] >= 300 and stats["campaign_txns"] <= 5
    for key, created in winners.items():  # what etcd holds is what the batcher answered
        stored = await kv.client.get(key)
        assert stored is not None and created is not None
        assert (stored.create_revision, stored.value, stored.lease) == (
            created.create_revision,
            b"me",
            lease.id,
        )


async def test_resigns_delete_only_keys_still_at_their_epoch(kv: KV) -> None:
    lease = await kv.grant(30)
    keys = [kv.key(f"leaders/{i}").encode() for i in range(2 * MAX_OPS + 3)]
    epochs = {}
    for key in keys:
        epochs[key] = (await kv.client.put(key, "me", lease=lease.id)).revision
    moved = keys[5]
    await kv.client.delete(moved)
    await kv.client.put(moved, "other")  # a new term: not ours to delete

    async def work(batcher: EtcdBatcher) -> None:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(batcher.resign, key, epochs[key])

    _, stats = await _with_batcher(kv, work)
    assert stats["resign_txns"] <= 6
    remaining = await kv.client.range(kv.key("leaders/"), prefix=True)
    assert [(x.key, x.value) for x in remaining.kvs] == [(moved, b"other")]


async def test_ready_markers_and_reads_are_batched(kv: KV) -> None:
    lease = await kv.grant(30)
    keys = [kv.key(f"ready/{i}/n1").encode() for i in range(200)]

    async def work(batcher: EtcdBatcher) -> tuple[list[int], list[KeyValue | None]]:
        revisions: list[int] = []
        reads: list[KeyValue | None] = []

        async def mark(key: bytes) -> None:
            revisions.append(await batcher.mark_ready(key, lease.id))

        async def read(key: bytes) -> None:
            reads.append(await batcher.get(key))

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(mark, key)
        async with trio.open_nursery() as nursery:
            for key in [*keys[:50], kv.key("absent").encode()]:
                nursery.start_soon(read, key)
        return revisions, reads

    (revisions, reads), stats = await _with_batcher(kv, work)
    assert len(set(revisions)) == stats["ready_txns"] <= 3
    assert sum(r is None for r in reads) == 1 and len(reads) == 51
    stored = await kv.client.range(kv.key("ready/"), prefix=True)
    assert len(stored.kvs) == 200 and {x.lease for x in stored.kvs} == {lease.id}


async def test_an_etcd_error_fails_every_request_of_its_txn(kv: KV) -> None:
    lease = await kv.grant(30)
    await kv.client.lease_revoke(lease.id)
    keys = [kv.key(f"ready/{i}/n1").encode() for i in range(10)]

    async def work(batcher: EtcdBatcher) -> list[BaseException]:
        errors: list[BaseException] = []

        async def mark(key: bytes) -> None:
            try:
                await batcher.mark_ready(key, lease.id)
            except clusterkit.EtcdError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(mark, key)
        return errors

    errors, _ = await _with_batcher(kv, work)
    assert len(errors) == 10 and all(isinstance(e, clusterkit.LeaseNotFound) for e in errors)


async def test_a_request_cancelled_before_its_batch_is_not_sent(kv: KV) -> None:
    lease = await kv.grant(30)
    key = kv.key("leaders/1").encode()

    async def work(batcher: EtcdBatcher) -> None:
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before the flusher ever runs
            await batcher.campaign(key, b"me", lease.id)
        await batcher.get(key)  # one more round trip: the flusher had its chance

    await _with_batcher(kv, work)
    assert await kv.client.get(key) is None


@pytest.mark.parametrize("count", [MAX_OPS, MAX_OPS + 1])
async def test_txns_over_max_txn_ops_are_refused_alike(kv: KV, count: int) -> None:
    """What the batcher's chunking relies on: etcd's --max-txn-ops (128) limit."""
    from clusterkit._etcd.types import Op

    ops = [Op.put(kv.key(f"x/{i}"), "v") for i in range(count)]
    if count <= MAX_OPS:
        assert (await kv.client.txn([], ops)).succeeded
    else:
        with pytest.raises(clusterkit.EtcdError, match="too many operations"):
            await kv.client.txn([], ops)


async def test_a_lease_less_key_in_a_leader_slot_is_removed_and_the_campaign_wins(kv: KV) -> None:
    lease = await kv.grant(30)
    blocked = kv.key("leaders/3").encode()
    free = kv.key("leaders/4").encode()
    await kv.client.put(blocked, "somebody")  # no lease: never expires, blocks the partition
    won: dict[bytes, KeyValue | None] = {}

    async def work(batcher: EtcdBatcher) -> None:
        async def one(key: bytes) -> None:
            won[key] = await batcher.campaign(key, b"me", lease.id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, blocked)
            nursery.start_soon(one, free)

    _, stats = await _with_batcher(kv, work)
    assert won[blocked] is not None and won[free] is not None
    assert stats["foreign_leader_keys_removed"] == 1
    stored = await kv.client.get(blocked)
    assert stored is not None and stored.lease == lease.id and stored.value == b"me"
