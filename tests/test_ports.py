"""Ports mean what the Go ClusterKit README says: ``http_port`` and ``grpc_port`` are the
application's (advertised, never bound by clusterkit), ``peer_port`` is clusterkit's own."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import trio
from cluster_helpers import node_config, start_node, wait_converged

import clusterkit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _serve_whoami(node_id: str, port: int, task_status: trio.TaskStatus[None]) -> None:
    """The application's own HTTP service on ``http_port`` (what the Go example runs)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            body = node_id.encode()
            head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
            await stream.send_all(head + body)

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handle, listeners)


async def _get(url: str) -> bytes:
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname and parts.port
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(f"GET {parts.path or '/'} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
    return answer.split(b"\r\n\r\n", 1)[1]


async def test_the_app_serves_http_port_and_a_request_reaches_the_leaders_http_addr(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        running = []
        for name in ("n1", "n2"):
            http_port = _free_port()
            # The application binds http_port itself: clusterkit must not hold it.
            await nursery.start(_serve_whoami, name, http_port)
            config = node_config(
                name, etcd.endpoints, prefix, http_port=http_port, partitions=8, replica_factor=2
            )
            running.append(await start_node(nursery, config))
        await wait_converged(running)
        n1 = running[0].ck
        assert n1.node.http_addr().startswith("http://127.0.0.1:")
        assert n1.node.peer_addr() != n1.node.http_addr().removeprefix("http://")
        # grpc_port=0 (the helper's): the gRPC server took a free port and advertises it.
        grpc_port = int(n1.node.grpc_addr().rpartition(":")[2])
        assert grpc_port not in (0, 9000) and n1.grpc_server and n1.grpc_server.port == grpc_port
        with trio.fail_after(10):
            while (leader := n1.get_leader(n1.get_partition("some-key"))) is None:
                await trio.sleep(0.02)
            # The Go example's redirect: send the write to leader.HTTPAddr().
            assert await _get(leader.http_addr() + "/set?key=some-key") == leader.id.encode()
        for r in running:
            await r.stop()
        nursery.cancel_scope.cancel()
