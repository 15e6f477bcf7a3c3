"""The ``clusterkit`` command, run as a subprocess against a real 3-node cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import trio
from cluster_helpers import node_config, start_node, wait_converged

import clusterkit
from clusterkit._core.keys import KeyLayout

P = 16


async def cli(etcd: clusterkit.EmbeddedEtcd, prefix: str, *args: str) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "clusterkit", "--endpoints", ",".join(etcd.endpoints)]
    argv += ["--prefix", prefix.rstrip("/"), *args]
    with trio.fail_after(60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def cli_json(etcd: clusterkit.EmbeddedEtcd, prefix: str, *args: str) -> Any:
    code, out, err = await cli(etcd, prefix, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
async def test_status_tables_json_and_check(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    async with trio.open_nursery() as nursery:
        running = [
            await start_node(nursery, node_config(n, etcd.endpoints, prefix, partitions=P))
            for n in ("n1", "n2", "n3")
        ]
        await wait_converged(running)
        with trio.fail_after(10):
            while sum(r.ck.is_leader(pt) for r in running for pt in range(P)) != P:
                await trio.sleep(0.02)

        status = await cli_json(etcd, prefix, "status")
        assert status["nodes"] == 3 and status["partitions"] == P
        assert status["under_replicated"] == [] and status["leaderless"] == []
        assert status["coordinator"] in {"n1", "n2", "n3"}
        code, out, _ = await cli(etcd, prefix, "status")
        assert code == 0 and "coordinator" in out and f"{P} partitions" in out

        rows = await cli_json(etcd, prefix, "nodes")
        assert [r["id"] for r in rows] == ["n1", "n2", "n3"]
        assert all(r["replicas"] == P for r in rows) and sum(r["leading"] for r in rows) == P
        code, out, _ = await cli(etcd, prefix, "nodes")
        assert out.splitlines()[0].split() == ["ID", "PEER", "HTTP", "STATE", "REPLICAS", "LEADING"]
        assert all(r["peer"].startswith("127.0.0.1:") and r["http"] == "" for r in rows)
        assert len(out.splitlines()) == 4

        parts = await cli_json(etcd, prefix, "partitions", "--node", "n2")
        assert len(parts) == P and all("n2" in r["replicas"] for r in parts)
        leaders = await cli_json(etcd, prefix, "leaders")
        assert {r["partition"] for r in leaders} == set(range(P))
        assert all(r["leader"] in {"n1", "n2", "n3"} and r["epoch"] > 0 for r in leaders)

        assert (await cli_json(etcd, prefix, "check")) == {"ok": True, "findings": []}
        # Broken on purpose: a ready marker of a node that is not registered.
        await client.put(KeyLayout(prefix).ready(3, "ghost"), b"1")
        code, out, _ = await cli(etcd, prefix, "check")
        assert code == 1 and "ghost" in out
        for r in running:
            await r.stop()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_drain_through_etcd_moves_everything_off_and_watch_sees_it(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    async with trio.open_nursery() as nursery:
        running = {
            n: await start_node(
                nursery, node_config(n, etcd.endpoints, prefix, partitions=P, replica_factor=2)
            )
            for n in ("n1", "n2", "n3")
        }
        await wait_converged(list(running.values()))
        argv = [sys.executable, "-m", "clusterkit", "--endpoints", ",".join(etcd.endpoints)]
        argv += ["--prefix", prefix.rstrip("/"), "watch", "--json", "--seconds", "60"]
        watcher = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert watcher.stdout is not None
        lines = _Lines(watcher.stdout)
        try:
            with trio.fail_after(30):
                assert json.loads(await lines.next())["event"] == "watching"
            code, out, err = await cli(
                etcd, prefix, "drain", "n3", "--reason", "test", "--timeout", "60"
            )
            assert code == 0, err
            assert "drained and left" in out
            n1 = running["n1"].ck
            with trio.fail_after(10):
                await n1._views.wait_for(
                    lambda v: (
                        "n3" not in v.nodes
                        and v.map is not None
                        and "n3" not in v.map.node_ids()
                        and len(v.leaders) == P
                    )
                )
            assert not running["n3"].ck.is_healthy()
            assert await client.get(KeyLayout(prefix).drain("n3")) is not None  # a cordon...
            code, _, err = await cli(etcd, prefix, "undrain", "n3")  # ... until withdrawn
            assert code == 0, err
            assert await client.get(KeyLayout(prefix).drain("n3")) is None
            events: list[dict[str, Any]] = []
            with trio.fail_after(20):
                while not any(e.get("event") == "left" and e.get("node") == "n3" for e in events):
                    events.append(json.loads(await lines.next()))
        finally:
            watcher.kill()
            with trio.CancelScope(shield=True):
                await watcher.wait()
        assert any(e.get("event") == "map" for e in events)
        for name in ("n1", "n2", "n3"):
            await running[name].stop()
        nursery.cancel_scope.cancel()


class _Lines:
    """Lines of a subprocess's output, as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise EOFError("the command ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


def test_the_command_says_what_is_missing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clusterkit", "--endpoints", "", "status"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and b"--endpoints" in done.stderr


async def test_secret_status_and_rotate_never_print_the_secret(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    assert await cli_json(etcd, prefix, "secret", "status") == {"stored": False, "rotating": False}
    code, _, err = await cli(etcd, prefix, "secret", "rotate")
    assert code == 2 and "SecretRotationError" in err and "no secret stored" in err
    key = KeyLayout(prefix).secret
    secret = b"s" * 64
    await client.put(key, secret)
    status = await cli_json(etcd, prefix, "secret", "status")
    assert status == {"stored": True, "rotating": False, "ends_in": 0.0}
    code, out, err = await cli(etcd, prefix, "secret", "rotate", "--window", "120")
    assert code == 0 and "accepted until" in out, err
    stored = await client.get(key)
    assert stored is not None and secret.decode() in stored.value.decode()  # kept as previous
    status = await cli_json(etcd, prefix, "secret", "status")
    assert status["rotating"] and 100 < status["ends_in"] <= 120
    code, out, err = await cli(etcd, prefix, "secret", "rotate")
    assert code == 2 and "in progress" in err
    for text in (out, err):
        assert "sss" not in text
    await client.put(key, b"{broken")
    code, out, _ = await cli(etcd, prefix, "secret", "status")
    assert code == 1 and "unusable" in out
    await client.put(KeyLayout(prefix).legacy_secret, b"b" * 64)  # an earlier version's key
    code, out, _ = await cli(etcd, prefix, "check")
    assert code == 1 and "earlier versions" in out and "bbbb" not in out
