"""KV, Txn and compaction against a real etcd server (every version found)."""

from __future__ import annotations

import pytest

import clusterkit
from clusterkit.etcd import Compare, EtcdClient, Op, PutResult, RangeResult


async def test_put_get_delete(client: EtcdClient, prefix: str) -> None:
    put = await client.put(prefix + "a", "1")
    kv = await client.get(prefix + "a")
    assert kv is not None
    assert (kv.key, kv.value, kv.version) == ((prefix + "a").encode(), b"1", 1)
    assert kv.create_revision == kv.mod_revision == put.revision
    again = await client.put(prefix + "a", b"2", prev_kv=True)
    assert again.prev_kv is not None and again.prev_kv.value == b"1"
    assert again.revision > put.revision
    deleted = await client.delete(prefix + "a", prev_kv=True)
    assert deleted.deleted == 1 and deleted.prev_kvs[0].value == b"2"
    assert await client.get(prefix + "a") is None


async def test_range_prefix_limit_and_pages(client: EtcdClient, prefix: str) -> None:
    for i in range(25):
        await client.put(f"{prefix}k{i:03d}", str(i))
    await client.put(prefix[:-1] + "0/outside", "x")  # next key after the prefix range
    full = await client.range(prefix, prefix=True)
    assert full.count == 25 and [kv.value for kv in full.kvs] == [
        str(i).encode() for i in range(25)
    ]
    limited = await client.range(prefix, prefix=True, limit=10)
    assert len(limited.kvs) == 10 and limited.more and limited.count == 25
    paged = await client.get_prefix(prefix, page_size=7)
    assert [kv.key for kv in paged.kvs] == [kv.key for kv in full.kvs]
    # Pages are read at one revision: a write after the first page is not seen.
    old = await client.get_prefix(prefix, revision=full.revision, page_size=4)
    await client.put(prefix + "k999", "late")
    assert len((await client.get_prefix(prefix, revision=full.revision, page_size=4)).kvs) == 25
    assert old.revision == full.revision
    count = await client.range(prefix, prefix=True, count_only=True)
    assert count.count == 26 and count.kvs == ()


async def test_txn_compare_and_swap(client: EtcdClient, prefix: str) -> None:
    key = prefix + "cas"
    create = await client.txn(
        [Compare.create_revision(key, "=", 0)], [Op.put(key, "v1")], [Op.get(key)]
    )
    assert create.succeeded
    second = await client.txn(
        [Compare.create_revision(key, "=", 0)], [Op.put(key, "v2")], [Op.get(key)]
    )
    assert not second.succeeded
    got = second.responses[0]
    assert isinstance(got, RangeResult) and got.kvs[0].value == b"v1"
    mod = got.kvs[0].mod_revision
    swap = await client.txn(
        [Compare.mod_revision(key, "=", mod)], [Op.put(key, "v3", prev_kv=True)]
    )
    assert swap.succeeded
    put = swap.responses[0]
    assert isinstance(put, PutResult) and put.prev_kv is not None and put.prev_kv.value == b"v1"
    stale = await client.txn([Compare.mod_revision(key, "=", mod)], [Op.put(key, "v4")])
    assert not stale.succeeded
    assert (await client.txn([Compare.value(key, "=", "v3")], [Op.delete(key)])).succeeded
    assert await client.get(key) is None


async def test_txn_compare_version_and_lease(client: EtcdClient, prefix: str) -> None:
    key = prefix + "leased"
    lease = await client.lease_grant(30)
    await client.put(key, "x", lease=lease.id)
    await client.put(key, "y", ignore_lease=True)
    kv = await client.get(key)
    assert kv is not None and kv.lease == lease.id and kv.version == 2
    assert (await client.txn([Compare.lease(key, "=", lease.id)])).succeeded
    assert not (await client.txn([Compare.lease(key, "=", 0)])).succeeded
    assert (await client.txn([Compare.version(key, ">", 1)])).succeeded
    assert not (await client.txn([Compare.version(key, "!=", 2)])).succeeded
    await client.lease_revoke(lease.id)
    assert await client.get(key) is None


async def test_compaction_makes_old_revisions_unreadable(client: EtcdClient, prefix: str) -> None:
    first = await client.put(prefix + "c", "1")
    second = await client.put(prefix + "c", "2")
    assert (await client.get(prefix + "c", revision=first.revision)) is not None
    await client.compact(second.revision)
    with pytest.raises(clusterkit.RevisionCompacted):
        await client.get(prefix + "c", revision=first.revision)
    kv = await client.get(prefix + "c", revision=second.revision)
    assert kv is not None and kv.value == b"2"


async def test_errors_are_typed(client: EtcdClient, prefix: str) -> None:
    with pytest.raises(clusterkit.LeaseNotFound):
        await client.put(prefix + "k", "v", lease=0x7FFF_0000_1234)
    with pytest.raises(clusterkit.InvalidRequest):
        await client.put("", "empty key")
    with pytest.raises(clusterkit.InvalidRequest):
        await client.get(prefix + "future", revision=10**12)
    with pytest.raises(ValueError):
        Compare.value("k", "==", "v")  # type: ignore[arg-type]


async def test_status_and_members(client: EtcdClient, etcd: clusterkit.EmbeddedEtcd) -> None:
    status = await client.status()
    assert status.version == etcd.version
    members = await client.member_list()
    assert len(members) == 1
    assert members[0].client_urls == (f"http://{etcd.endpoints[0]}",)


async def test_large_values_and_an_answer_past_the_stream_window(
    client: EtcdClient, prefix: str
) -> None:
    """1 MiB puts cross etcd's HTTP/2 windows (64 KiB) in our DATA; a 20 MiB range answer
    crosses ours (16 MiB per stream: the channel returns window as the answer arrives)."""
    value = bytes(range(256)) * 4096  # 1 MiB
    for i in range(20):
        await client.put(f"{prefix}big{i:02d}", value[i:] + value[:i])
    everything = await client.range(prefix, prefix=True)
    assert len(everything.kvs) == 20
    for i, kv in enumerate(everything.kvs):
        assert kv.value == value[i:] + value[:i]
    # The connection is still in order afterwards: small calls and a watch work.
    async with client.watch(prefix + "after") as watch:
        await client.put(prefix + "after", "x")
        async for batch in watch:
            assert [e.kv.value for e in batch.events] == [b"x"]
            break
