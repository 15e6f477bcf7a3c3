"""Who can read what, with etcd authentication on: a monitoring user granted read on the
prefix sees the cluster but not the secret, which lives beside the prefix (README, "Who can
read what")."""

from __future__ import annotations

import sys

import pytest
import trio
from cluster_helpers import node_config, start_node

import clusterkit
from clusterkit._core.keys import KeyLayout

PREFIX = "/guarded"


async def _users(endpoints: tuple[str, ...]) -> None:
    layout = KeyLayout(PREFIX)
    async with clusterkit.open_etcd_client(endpoints) as admin:
        await admin.user_add("root", "rootpw")
        await admin.role_add("root")
        await admin.user_grant_role("root", "root")
        await admin.user_add("node", "nodepw")
        await admin.role_add("node")
        await admin.role_grant_prefix("node", layout.root)
        await admin.role_grant_prefix("node", layout.secret)
        await admin.user_grant_role("node", "node")
        await admin.user_add("monitor", "monitorpw")
        await admin.role_add("monitor")
        await admin.role_grant_prefix("monitor", layout.root, "read")
        await admin.user_grant_role("monitor", "monitor")
        await admin.auth_enable()


async def _cli(endpoints: tuple[str, ...], *args: str) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "clusterkit", "--endpoints", ",".join(endpoints)]
    argv += ["--prefix", PREFIX, "--user", "monitor", "--password", "monitorpw", *args]
    with trio.fail_after(60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_read_on_the_prefix_shows_the_cluster_and_not_the_secret(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        await _users(server.endpoints)
        config = node_config(
            "n1",
            server.endpoints,
            PREFIX,
            partitions=8,
            replica_factor=1,
            etcd_username="node",
            etcd_password="nodepw",
        )
        async with trio.open_nursery() as nursery:
            n1 = await start_node(nursery, config)  # a node needs P/ and P.secret, nothing else
            code, out, err = await _cli(server.endpoints, "status")
            assert code == 0 and "coordinator    n1" in out, (out, err)
            code, _, err = await _cli(server.endpoints, "secret", "status")
            assert code == 2 and "PermissionDenied" in err
            monitor = clusterkit.EtcdConfig(
                server.endpoints, username="monitor", password="monitorpw"
            )
            async with clusterkit.open_etcd_client(monitor) as etcd:
                assert await etcd.get(KeyLayout(PREFIX).map) is not None
                with pytest.raises(clusterkit.PermissionDenied):
                    await etcd.get(KeyLayout(PREFIX).secret)
            await n1.stop()
            nursery.cancel_scope.cancel()
