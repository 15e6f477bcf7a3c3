"""Prometheus metrics of one node, served at ``http://<bind>:<metrics_port>/metrics``.

Each node has its own :class:`prometheus_client.CollectorRegistry` (several nodes in one
process never clash) holding one collector that reads the node's state *at scrape time*:
nothing is updated on hot paths. The endpoint is a tiny HTTP/1.1 server on Trio in the
node's nursery (prometheus-client's own server would start a thread per node).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._cluster import ClusterKit

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192
READ_TIMEOUT = 5.0

# statistics that go up and down; every other statistic only ever grows (a counter)
_GAUGES = {
    "revision",
    "coordinator",
    "partitions",
    "serving",
    "running",
    "max_loop_lag_ms",
    "recent_loop_lag_ms",
    "max_keepalive_delay_ms",
    "max_keepalive_rtt_ms",
}


class NodeCollector(Collector):
    """Reads a :class:`ClusterKit` when scraped."""

    def __init__(self, ck: ClusterKit) -> None:
        self._ck = ck

    def collect(self) -> Iterator[Metric]:
        ck = self._ck
        view = ck.view
        me = ck.node_id
        labels = ["node"]
        yield _gauge("clusterkit_healthy", "1 while the node is healthy", me, int(ck.is_healthy()))
        yield _gauge(
            "clusterkit_nodes", "registered nodes in this node's view", me, len(view.nodes)
        )
        yield _gauge(
            "clusterkit_map_version",
            "version of the partition map in this node's view",
            me,
            view.map.version if view.map is not None else 0,
        )
        held = sum(1 for row in view.replica_nodes if any(n.id == me for n in row))
        yield _gauge(
            "clusterkit_partitions_replicated", "partitions this node replicates", me, held
        )
        led = sum(1 for pt in ck._leadership.epochs if ck.is_leader(pt))
        yield _gauge("clusterkit_partitions_led", "partitions this node leads", me, led)
        pending = len(view.map.pending) if view.map is not None else 0
        yield _gauge(
            "clusterkit_partitions_moving", "partitions with a move in flight", me, pending
        )
        sources = dict(ck.statistics())
        sources["Migration"] = ck.migration.statistics()
        for actor, stats in sources.items():
            for name, value in stats.items():
                metric_name = f"clusterkit_{_snake(actor)}_{name}"
                family: GaugeMetricFamily | CounterMetricFamily
                if name in _GAUGES:
                    family = GaugeMetricFamily(metric_name, f"{actor} {name}", labels=labels)
                else:
                    family = CounterMetricFamily(metric_name, f"{actor} {name}", labels=labels)
                family.add_metric([me], value)
                yield family


def _gauge(name: str, doc: str, node: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["node"])
    family.add_metric([node], value)
    return family


def _snake(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out.removesuffix("_actor")


def registry_for(ck: ClusterKit) -> CollectorRegistry:
    """A registry holding ``ck``'s collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(ck))
    return registry


async def serve_metrics(
    render: Callable[[], bytes],
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (``render()``'s bytes) on ``host:port``; reports the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        await _answer(stream, render)

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.abc.Stream, render: Callable[[], bytes]) -> None:
    """Answer one request. Nothing a client does here (reset, garbage, silence) and no error
    while rendering may escape: this runs in the node's nursery."""
    try:
        async with stream:
            await _respond(stream, render)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the scraper went away


async def _respond(stream: trio.abc.Stream, render: Callable[[], bytes]) -> None:
    data = b""
    with trio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\r\n", 1)[0].split()
    if len(line) != 3 or line[0] not in (b"GET", b"HEAD"):
        status, body, ctype = b"400 Bad Request", b"bad request\n", b"text/plain"
    elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
        status, body, ctype = b"404 Not Found", b"try /metrics\n", b"text/plain"
    else:
        try:
            status, body, ctype = b"200 OK", render(), CONTENT_TYPE.encode()
        except Exception as exc:  # a bug in a collector must not take the node down
            logging.getLogger("clusterkit").exception("clusterkit: rendering metrics failed")
            status, body, ctype = b"500 Internal Server Error", repr(exc).encode(), b"text/plain"
    head = (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(READ_TIMEOUT):
        await stream.send_all(head + (body if line[:1] != [b"HEAD"] else b""))


def render_for(ck: ClusterKit) -> Callable[[], bytes]:
    """The ``render`` callable for ``ck``'s metrics."""
    registry = registry_for(ck)
    return lambda: generate_latest(registry)
