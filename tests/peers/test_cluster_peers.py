"""``ck.peers`` between real nodes on a real etcd: calls by node id, the shared secret, TLS."""

from __future__ import annotations

import gc
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_helpers import RunningNode, node_config, start_node, wait_converged

import clusterkit
from clusterkit._peers.session import PeerStream
from clusterkit._peers.transport import PeerPool

# A socket left to the garbage collector is a leak: collect inside each test, so a
# ResourceWarning fails the test that caused it (filterwarnings = error).


@pytest.fixture(autouse=True)
def _collect_sockets_inside_the_test() -> Iterator[None]:
    yield
    gc.collect()


class Seen:
    """What one node's handlers were called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.noted = trio.Event()


def serve_basics(node: RunningNode, seen: Seen) -> None:
    """``whoami``, ``note`` (one-way), ``refuse`` (NotLeader) and the stream ``sum``."""
    ck = node.ck
    log = seen.calls

    async def whoami(payload: Any) -> Any:
        log.append(("whoami", payload))
        return [ck.node_id, payload]

    async def note(payload: Any) -> None:
        log.append(("note", payload))
        seen.noted.set()

    async def refuse(payload: Any) -> Any:
        raise clusterkit.NotLeader("x", leader="b")

    async def total(stream: PeerStream, start: Any) -> None:
        acc = start
        async for item in stream:
            acc += item
            await stream.send(acc)

    ck.peers.add_handler("whoami", whoami)
    ck.peers.handler("note")(note)
    ck.peers.add_handler("refuse", refuse)
    ck.peers.stream_handler("sum")(total)


async def test_nodes_call_each_other_by_node_id(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    seen = {"a": Seen(), "b": Seen()}
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, node_config("b", etcd.endpoints, prefix))
        for node in (a, b):
            serve_basics(node, seen[node.ck.node_id])
        await wait_converged([a, b])

        with trio.fail_after(10):
            assert await a.ck.peers.request("b", "whoami", 1) == ["b", 1]
            assert await b.ck.peers.request("a", "whoami", 2) == ["a", 2]
            # A Node works as well as its id.
            (node_b,) = [n for n in a.ck.get_nodes() if n.id == "b"]
            assert await a.ck.peers.request(node_b, "whoami", 3) == ["b", 3]

            # One-way: nothing comes back, but it arrives.
            await a.ck.peers.send("b", "note", {"k": "v"})
            await seen["b"].noted.wait()
            assert seen["b"].calls[-1] == ("note", {"k": "v"})

            # A stream, with more items than one credit window.
            async with a.ck.peers.stream("b", "sum", 100) as stream:
                sums = []
                for i in range(1, 201):
                    await stream.send(i)
                    sums.append(await stream.receive())
                await stream.end()
                with pytest.raises(trio.EndOfChannel):
                    await stream.receive()
            assert sums[-1] == 100 + 200 * 201 // 2

        # A handler's NotLeader reaches the caller with its hint.
        with pytest.raises(clusterkit.RemoteError) as info:
            await a.ck.peers.request("b", "refuse", None)
        assert info.value.remote_type == "NotLeader"
        assert info.value.remote_message == "x"
        assert info.value.data == {"leader": "b"}

        # An unknown node and an unknown method.
        with pytest.raises(clusterkit.PeerUnreachable, match="ghost"):
            await a.ck.peers.request("ghost", "whoami", None)
        with pytest.raises(clusterkit.PeerUnreachable):
            await a.ck.peers.send("ghost", "note", None)
        with pytest.raises(clusterkit.RemoteError) as unknown:
            await a.ck.peers.request("b", "nope", None)
        assert unknown.value.remote_type == "UnknownMethod"
        nursery.cancel_scope.cancel()


async def test_the_secret_is_shared_through_etcd(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    seen = {"a": Seen(), "b": Seen(), "odd": Seen()}
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, node_config("b", etcd.endpoints, prefix))
        odd = await start_node(
            nursery,
            node_config("odd", etcd.endpoints, prefix, cluster_secret="another-secret-entirely"),
        )
        for node in (a, b, odd):
            serve_basics(node, seen[node.ck.node_id])
        await wait_converged([a, b, odd])

        stored = await client.get(f"{prefix.rstrip('/')}.secret")  # beside the prefix
        assert stored is not None and len(stored.value) == 64  # hex of 32 random bytes
        assert await client.get(f"{prefix.rstrip('/')}/secret") is None  # not inside it
        with trio.fail_after(10):
            assert await a.ck.peers.request("b", "whoami", None) == ["b", None]
            # Anyone holding the stored secret is a peer; the configured odd one is not.
            tool = PeerPool(nursery, "tool", stored.value)
            assert await tool.request(a.ck.peers.address, "whoami", "t") == ["a", "t"]
            await tool.aclose()
            with pytest.raises(clusterkit.PeerAuthFailed):
                await odd.ck.peers.request("a", "whoami", "from odd")
            with pytest.raises(clusterkit.PeerAuthFailed):
                await a.ck.peers.request("odd", "whoami", "to odd")
            with pytest.raises(clusterkit.PeerAuthFailed):
                async with odd.ck.peers.stream("b", "sum", 0):
                    pass  # pragma: no cover
        assert seen["a"].calls == [("whoami", "t")]
        assert seen["b"].calls == [("whoami", None)]
        assert seen["odd"].calls == []
        nursery.cancel_scope.cancel()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate (also its own CA) and its key, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=clusterkit-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return str(cert), str(key)


async def test_peers_over_tls(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tls_files: tuple[str, str]
) -> None:
    cert, key = tls_files
    tls = {"peer_tls_cert": cert, "peer_tls_key": key, "peer_tls_ca": cert}
    seen = {"a": Seen(), "b": Seen()}
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix, **tls))
        b = await start_node(nursery, node_config("b", etcd.endpoints, prefix, **tls))
        for node in (a, b):
            serve_basics(node, seen[node.ck.node_id])
        await wait_converged([a, b])
        with trio.fail_after(10):
            assert await a.ck.peers.request("b", "whoami", 1) == ["b", 1]
            assert await b.ck.peers.request("a", "whoami", 2) == ["a", 2]
            async with b.ck.peers.stream("a", "sum", 0) as stream:
                await stream.send(5)
                assert await stream.receive() == 5
                await stream.end()
        # The endpoint really speaks TLS: a plain websocket client with the right secret
        # does not get through.
        secret = a.ck.peers._pool._secret
        plain = PeerPool(nursery, "plain", secret)
        with trio.fail_after(10), pytest.raises(clusterkit.PeerUnreachable):
            await plain.request(a.ck.peers.address, "whoami", "plain", timeout=1)
        await plain.aclose()
        assert ("whoami", "plain") not in seen["a"].calls
        nursery.cancel_scope.cancel()
