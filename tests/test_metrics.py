"""The Prometheus endpoint of a node: served on metrics_port, read at scrape time."""

from __future__ import annotations

import socket
import struct

import trio
from cluster_helpers import node_config, start_node, wait_converged

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
