"""The Prometheus endpoint of a node: served on metrics_port, read at scrape time."""

from __future__ import annotations

import json
import socket
import struct

import pytest
import trio
from cluster_helpers import node_config, start_node, wait_converged
from prometheus_client.parser import text_string_to_metric_families
from tcp_proxy import open_proxy

import clusterkit


async def _http_get(address: str, path: str) -> tuple[bytes, bytes]:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def test_metrics_describe_the_node(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        nodes = [
            await start_node(nursery, node_config(n, etcd.endpoints, prefix, metrics_port=0))
            for n in ("a", "b")
        ]
        await wait_converged(nodes)
        a = nodes[0].ck
        assert a.metrics_address is not None
        with trio.fail_after(10):
            head, body = await _http_get(a.metrics_address, "/metrics")
            assert head.startswith(b"HTTP/1.1 200 OK")
            text = body.decode()
            lines = {
                line.split(" ")[0]: float(line.split(" ")[1])
                for line in text.splitlines()
                if line and not line.startswith("#")
            }
            assert lines['clusterkit_nodes{node="a"}'] == 2
            assert lines['clusterkit_healthy{node="a"}'] == 1
            assert lines['clusterkit_partitions_replicated{node="a"}'] == 64  # R=3, N=2
            assert lines['clusterkit_map_version{node="a"}'] >= 1
            assert lines['clusterkit_membership_keepalives_total{node="a"}'] >= 0
            head, _ = await _http_get(a.metrics_address, "/nope")
            assert head.startswith(b"HTTP/1.1 404")
            # a garbage request gets a 400 and the endpoint keeps serving
            host, _, port = a.metrics_address.rpartition(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"\x00\x01garbage\r\n\r\n")
                assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 400")
            # a client that resets mid-request (SO_LINGER 0) does not take the node down
            sock = trio.socket.socket()
            await sock.connect((host, int(port)))
            await sock.send(b"GET /metr")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            head, _ = await _http_get(a.metrics_address, "/metrics")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert a.is_healthy()
        nursery.cancel_scope.cancel()


def test_metrics_port_none_serves_nothing() -> None:
    assert clusterkit.Config(node_id="x", metrics_port=None).metrics_port is None


GO_README_METRICS = {
    "clusterkit_nodes_total": "gauge",
    "clusterkit_partitions_assigned": "gauge",
    "clusterkit_partitions_leader": "gauge",
    "clusterkit_rebalance": "counter",  # exposed as clusterkit_rebalance_total
    "clusterkit_rebalance_duration_seconds": "histogram",
    "clusterkit_partition_migrations": "counter",  # ..._total
    "clusterkit_etcd_operations": "counter",  # ..._total{op}
    "clusterkit_etcd_operation_duration_seconds": "histogram",
}


async def test_the_go_readme_metrics_and_health_endpoints(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = [
            await start_node(nursery, node_config(n, etcd.endpoints, prefix, metrics_port=0))
            for n in ("a", "b")
        ]
        await wait_converged(nodes)
        with trio.fail_after(10):  # every partition led (elections follow the map)
            while sum(n.ck.is_leader(pt) for n in nodes for pt in range(64)) != 64:
                await trio.sleep(0.02)

        async def echo(payload: object) -> object:
            if payload == "boom":
                raise ValueError("boom")
            return payload

        nodes[0].ck.peers.add_handler("test.echo", echo)
        with trio.fail_after(10):
            assert await nodes[1].ck.peers.request("a", "test.echo", 1) == 1
            with pytest.raises(clusterkit.RemoteError):
                await nodes[1].ck.peers.request("a", "test.echo", "boom")
        with trio.fail_after(10):
            families = {}
            for node in nodes:
                assert node.ck.metrics_address is not None
                head, body = await _http_get(node.ck.metrics_address, "/metrics")
                assert head.startswith(b"HTTP/1.1 200 OK")
                families.update(
                    {
                        (node.ck.node_id, f.name): f
                        for f in text_string_to_metric_families(body.decode())
                    }
                )
            for name, kind in GO_README_METRICS.items():
                assert ("a", name) in families, name
                assert families["a", name].type == kind
            assigned = families["a", "clusterkit_partitions_assigned"].samples[0]
            assert assigned.labels == {"node_id": "a"} and assigned.value == 64
            led = sum(
                families[n, "clusterkit_partitions_leader"].samples[0].value for n in ("a", "b")
            )
            assert led == 64
            ops = families["a", "clusterkit_etcd_operations"].samples
            assert {s.labels["op"] for s in ops} >= {"range", "txn", "lease_grant"}
            latency = families["a", "clusterkit_etcd_operation_duration_seconds"].samples
            txn_count = next(
                s.value for s in latency if s.name.endswith("_count") and s.labels["op"] == "txn"
            )
            assert txn_count >= 1
            rebalances = sum(
                families[n, "clusterkit_rebalance"].samples[0].value for n in ("a", "b")
            )
            assert rebalances >= 1  # the coordinator completed at least the first map
            served = {
                (s.name, s.labels["method"]): s.value
                for s in families["a", "clusterkit_peer_requests"].samples
                + families["a", "clusterkit_peer_request_errors"].samples
            }
            assert served["clusterkit_peer_requests_total", "test.echo"] == 2
            assert served["clusterkit_peer_request_errors_total", "test.echo"] == 1
            a = nodes[0].ck
            assert a.metrics_address is not None
            head, body = await _http_get(a.metrics_address, "/health")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert json.loads(body) == {"status": "healthy", "node_id": "a", "partitions": 64}
            head, body = await _http_get(a.metrics_address, "/ready")
            assert head.startswith(b"HTTP/1.1 200 OK"), body
            assert json.loads(body)["partitions_not_ready"] == 0
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_health_turns_503_when_cut_off_from_etcd_and_back(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with open_proxy(etcd.endpoints[0]) as proxy, trio.open_nursery() as nursery:
        node = await start_node(
            nursery,
            node_config("a", [proxy.endpoint], prefix, metrics_port=0, session_ttl=1.0),
        )
        address = node.ck.metrics_address
        assert address is not None
        with trio.fail_after(10):
            while not (await _http_get(address, "/health"))[0].startswith(b"HTTP/1.1 200"):
                await trio.sleep(0.05)
        proxy.freeze()  # etcd stops answering: the session ends within its TTL
        with trio.fail_after(10):
            while not (await _http_get(address, "/health"))[0].startswith(b"HTTP/1.1 503"):
                await trio.sleep(0.05)
            head, body = await _http_get(address, "/ready")
            assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["healthy"] is False
        proxy.thaw()
        with trio.fail_after(20):
            while not (await _http_get(address, "/health"))[0].startswith(b"HTTP/1.1 200"):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_slow_oversized_and_crowding_clients_are_bounded(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config("a", etcd.endpoints, prefix, metrics_port=0))
        address = node.ck.metrics_address
        assert address is not None
        host, _, port = address.rpartition(":")
        held = []
        try:
            with trio.fail_after(10):
                # an oversized request head: refused, not buffered
                stream = await trio.open_tcp_stream(host, int(port))
                held.append(stream)
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
                answer = await stream.receive_some(200)
                assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 400")
                # 100 slowloris connections (a byte, then silence): more than the server
                # serves at once; a real scrape still gets through once they are cut off
                for _ in range(100):
                    s = await trio.open_tcp_stream(host, int(port))
                    held.append(s)
                    await s.send_all(b"G")
            with trio.fail_after(15):  # READ_TIMEOUT (5 s) cuts the slow ones off
                while True:
                    try:
                        head, _ = await _http_get(address, "/health")
                    except (trio.BrokenResourceError, OSError):
                        head = b""
                    if head.startswith(b"HTTP/1.1 200"):
                        break
                    await trio.sleep(0.2)
        finally:
            for s in held:
                await trio.aclose_forcefully(s)
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_ready_waits_for_a_joining_replica_to_pull_and_a_join_counts_a_rebalance(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    gate = trio.Event()
    pulling = trio.Event()

    async def slow_pull(pt: int, previous: clusterkit.Node | None) -> None:
        pulling.set()
        await gate.wait()  # the joining replica is still copying its data

    def scrape(text: str, name: str) -> float:
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name
        )

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix, metrics_port=0))
        await wait_converged([a])
        assert a.ck.metrics_address is not None
        _, body = await _http_get(a.ck.metrics_address, "/metrics")
        before = scrape(body.decode(), "clusterkit_rebalance_total")
        b = await start_node(
            nursery,
            node_config(
                "b", etcd.endpoints, prefix, metrics_port=0, on_partition_assigned=slow_pull
            ),
        )
        assert b.ck.metrics_address is not None
        with trio.fail_after(20):
            await pulling.wait()
            head, body = await _http_get(b.ck.metrics_address, "/ready")
            assert head.startswith(b"HTTP/1.1 503"), head
            assert json.loads(body)["partitions_not_ready"] > 0
            head, _ = await _http_get(b.ck.metrics_address, "/health")
            assert head.startswith(b"HTTP/1.1 200")  # healthy, just not ready
            gate.set()
            await wait_converged([a, b])
            while not (await _http_get(b.ck.metrics_address, "/ready"))[0].startswith(
                b"HTTP/1.1 200"
            ):
                await trio.sleep(0.05)
            total = 0.0
            for node in (a, b):
                assert node.ck.metrics_address is not None
                _, body = await _http_get(node.ck.metrics_address, "/metrics")
                total += scrape(body.decode(), "clusterkit_rebalance_total")
            assert total > before  # the join's moves completed a rebalance
            _, body = await _http_get(b.ck.metrics_address, "/metrics")
            hooks = [
                s
                for f in text_string_to_metric_families(body.decode())
                for s in f.samples
                if s.name == "clusterkit_hook_duration_seconds_count"
            ]
            assigned = [s for s in hooks if s.labels["hook"] == "on_partition_assigned"]
            assert assigned and assigned[0].value >= 1  # the slow pulls were timed
        for node in (b, a):
            await node.stop()
        nursery.cancel_scope.cancel()
