"""A 3-member local etcd cluster: endpoint failover when a member dies.

Member kills use etcd 3.4.23 only: etcd 3.5.0-3.5.2 can lose committed writes when a member
is killed under load.
"""

from __future__ import annotations

import pytest
import trio

import clusterkit


@pytest.fixture
def kill_safe_binary(etcd_binary: str, etcd: clusterkit.EmbeddedEtcd) -> str:
    if etcd.version.startswith(("3.5.0", "3.5.1", "3.5.2")):
        pytest.skip(f"member-kill tests do not run on etcd {etcd.version}")
    return etcd_binary


@pytest.mark.slow
async def test_three_members_and_failover(kill_safe_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=kill_safe_binary, size=3) as cluster:
        assert len(cluster.endpoints) == 3
        cfg = clusterkit.EtcdConfig(cluster.endpoints, request_timeout=2.0)
        async with clusterkit.open_etcd_client(cfg) as client:
            assert len(await client.member_list()) == 3
            await client.put("/f/k", "before")
            first = client.endpoints.current.target
            victim = next(m for m in cluster.members if m.endpoint == first)
            await victim.kill()
            # Reads are retried on the next endpoint at once.
            with trio.fail_after(10):
                kv = await client.get("/f/k")
            assert kv is not None and kv.value == b"before"
            assert client.endpoints.current.target != first
            # Writes work on the surviving majority.
            with trio.fail_after(10):
                while True:
                    try:
                        await client.put("/f/k", "after")
                        break
                    except clusterkit.EtcdUnavailable:
                        await trio.sleep(0.1)  # a new raft leader is being elected
            kv = await client.get("/f/k")
            assert kv is not None and kv.value == b"after"
            # The killed member comes back with its data and catches up.
            await victim.restart()
            async with clusterkit.open_etcd_client([victim.endpoint]) as direct:
                with trio.fail_after(10):
                    while (kv := await direct.get("/f/k")) is None or kv.value != b"after":
                        await trio.sleep(0.05)
