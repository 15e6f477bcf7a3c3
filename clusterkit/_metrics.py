"""Prometheus metrics of one node, served at ``http://<bind>:<metrics_port>/metrics``.

Each node has its own :class:`prometheus_client.CollectorRegistry` (several nodes in one
process never clash) holding one collector that reads the node's state *at scrape time*:
nothing is updated on hot paths. The endpoint is a tiny HTTP/1.1 server on Trio in the
node's nursery (prometheus-client's own server would start a thread per node).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._actors.rebalancer import RebalancerActor
from ._core.histogram import Histogram, OperationStats
from ._core.view import ClusterView

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
        held = _assigned(view, me)
        yield _gauge(
            "clusterkit_partitions_replicated", "partitions this node replicates", me, held
        )
        led = sum(1 for pt in ck._leadership.epochs if ck.is_leader(pt))
        yield _gauge("clusterkit_partitions_led", "partitions this node leads", me, led)
        pending = len(view.map.pending) if view.map is not None else 0
        yield _gauge(
            "clusterkit_partitions_moving", "partitions with a move in flight", me, pending
        )
        under, leaderless = _coverage(view)
        yield _gauge(
            "clusterkit_partitions_under_replicated",
            "partitions with fewer registered replicas than min(R, active nodes)",
            me,
            under,
        )
        yield _gauge(
            "clusterkit_partitions_leaderless", "partitions without a leader key", me, leaderless
        )
        supervisor = ck._supervisor
        yield _gauge(
            "clusterkit_partitions_not_ready",
            "partitions of this node whose on_partition_assigned has not completed this session",
            me,
            supervisor.unready() if supervisor is not None else 0,
        )
        yield from _go_readme_families(ck, held, led)
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


def _assigned(view: ClusterView, me: str) -> int:
    """Partitions whose committed replicas include ``me``."""
    return sum(1 for row in view.replica_nodes if any(n.id == me for n in row))


def _coverage(view: ClusterView) -> tuple[int, int]:
    """(under-replicated, leaderless) partitions of ``view``: O(partitions), at scrape time."""
    if view.map is None:
        return 0, 0
    live = view.nodes.keys()
    want = min(view.map.replica_factor, len(view.active_node_ids()))
    under = sum(1 for row in view.map.replicas if sum(1 for n in row if n in live) < want)
    leaderless = view.map.partitions - len(view.leaders)
    return under, leaderless


def _go_readme_families(ck: ClusterKit, assigned: int, led: int) -> Iterator[Metric]:
    """The eight metrics the Go ClusterKit README documents, under its names and labels."""
    me = ck.node_id
    nodes = GaugeMetricFamily("clusterkit_nodes_total", "nodes in the cluster (this node's view)")
    nodes.add_metric([], len(ck.view.nodes))
    yield nodes
    family = GaugeMetricFamily(
        "clusterkit_partitions_assigned", "partitions this node is a replica of", labels=["node_id"]
    )
    family.add_metric([me], assigned)
    yield family
    family = GaugeMetricFamily(
        "clusterkit_partitions_leader", "partitions this node leads", labels=["node_id"]
    )
    family.add_metric([me], led)
    yield family
    rebalancer = next((a for a in ck._actors if isinstance(a, RebalancerActor)), None)
    if rebalancer is not None:
        yield CounterMetricFamily(
            "clusterkit_rebalance",
            "rebalances completed while this node was the coordinator (a plan with moves up "
            "to the map committing the last of them)",
            value=rebalancer.rebalances,
        )
        yield _histogram(
            "clusterkit_rebalance_duration_seconds",
            "duration of the rebalances this node completed as coordinator",
            rebalancer.rebalance_seconds,
        )
    supervisor = ck._supervisor
    if supervisor is not None:
        hooks = HistogramMetricFamily(
            "clusterkit_hook_duration_seconds",
            "how long the app's partition hooks ran, by hook",
            labels=["node_id", "hook"],
        )
        for hook, histogram in sorted(supervisor.hook_seconds().items()):
            hooks.add_metric([me, hook], histogram.cumulative(), histogram.sum)
        yield hooks
    peers = getattr(ck, "peers", None)
    if peers is not None:
        calls = CounterMetricFamily(
            "clusterkit_peer_requests",
            "peer requests and streams this node served, by method",
            labels=["node_id", "method"],
        )
        errors = CounterMetricFamily(
            "clusterkit_peer_request_errors",
            "peer requests and streams whose handler raised, by method",
            labels=["node_id", "method"],
        )
        for method, (n, failed) in sorted(peers.served.items()):
            calls.add_metric([me, method], n)
            errors.add_metric([me, method], failed)
        yield calls
        yield errors
    migration = ck.migration.statistics()
    yield CounterMetricFamily(
        "clusterkit_partition_migrations",
        "partition migrations this node completed (pulls of a partition's data)",
        value=migration.get("pulls_complete", 0),
    )
    operations: OperationStats | None = getattr(ck.etcd, "operations", None)
    if operations is not None:
        calls = CounterMetricFamily(
            "clusterkit_etcd_operations", "etcd calls by operation", labels=["op"]
        )
        errors = CounterMetricFamily(
            "clusterkit_etcd_operation_errors",
            "etcd calls that failed, by operation",
            labels=["op"],
        )
        latency = HistogramMetricFamily(
            "clusterkit_etcd_operation_duration_seconds",
            "etcd call latency by operation (retries included)",
            labels=["op"],
        )
        for op, histogram in sorted(operations.latency.items()):
            calls.add_metric([op], histogram.count)
            errors.add_metric([op], operations.errors.get(op, 0))
            latency.add_metric([op], histogram.cumulative(), histogram.sum)
        yield calls
        yield errors
        yield latency


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], histogram.cumulative(), histogram.sum)
    return family


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


MAX_CONNECTIONS = 64  # requests served at once; more are closed at once (bounded memory)


@dataclass(frozen=True)
class Answer:
    """One HTTP response of the node's HTTP endpoint."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Answer]


async def serve_metrics(
    routes: Mapping[str, Route],
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET``/``HEAD`` of ``routes`` (path -> answer) on ``host:port`` over HTTP/1.1
    (h11); reports the port. Each connection gets one request, answered within
    ``READ_TIMEOUT`` of its first byte (slow or silent clients are cut off), with request heads
    of at most ``MAX_REQUEST`` bytes and at most ``MAX_CONNECTIONS`` at once."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _answer(stream, routes)
        finally:
            active -= 1

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.abc.Stream, routes: Mapping[str, Route]) -> None:
    """Answer one request. Nothing a client does here (reset, garbage, silence) and no error
    while rendering may escape: this runs in the node's nursery."""
    try:
        async with stream:
            await _respond(stream, routes)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away


async def _respond(stream: trio.abc.Stream, routes: Mapping[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    request: h11.Request | None = None
    answer: Answer
    with trio.move_on_after(READ_TIMEOUT) as reading:
        try:
            while request is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(4096)))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except h11.RemoteProtocolError as exc:
            answer = Answer(exc.error_status_hint, f"bad request: {exc}\n".encode())
    if reading.cancelled_caught:
        return  # silent or slow: no answer owed
    if request is not None:
        method = request.method
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        route = routes.get(path)
        if method not in (b"GET", b"HEAD"):
            answer = Answer(405, b"GET or HEAD only\n")
        elif route is None:
            answer = Answer(404, ("try " + ", ".join(sorted(routes)) + "\n").encode())
        else:
            try:
                answer = route()
            except Exception as exc:  # a bug in a collector must not take the node down
                logging.getLogger("clusterkit").exception("clusterkit: %s failed", path)
                answer = Answer(500, repr(exc).encode())
    else:
        method = b"GET"
    if conn.our_state is not h11.SEND_RESPONSE:  # a protocol error: answer by hand
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.next_event()
    headers = [
        ("Content-Type", answer.content_type),
        ("Content-Length", str(len(answer.body))),
        ("Connection", "close"),
    ]
    reason = HTTPStatus(answer.status).phrase.encode()
    out = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))
    if method != b"HEAD":
        out += conn.send(h11.Data(data=answer.body))
    out += conn.send(h11.EndOfMessage())
    with trio.move_on_after(READ_TIMEOUT):
        await stream.send_all(out)


def health_routes(ck: ClusterKit, render: Callable[[], bytes]) -> dict[str, Route]:
    """``/metrics`` (and ``/``), ``/health`` and ``/ready`` of ``ck``.

    ``/health``: the Go ClusterKit README's JSON (``status``, ``node_id``, ``partitions``),
    200 while ``ck.is_healthy()``, else 503. ``/ready``: 200 only while healthy *and* every
    partition the map gives this node has completed ``on_partition_assigned`` under the
    current session (a load balancer's readiness probe), else 503; the JSON says how many are
    not ready yet.
    """

    def metrics() -> Answer:
        return Answer(200, render(), CONTENT_TYPE)

    def health() -> Answer:
        healthy = ck.is_healthy()
        body = {
            "status": "healthy" if healthy else "unhealthy",
            "node_id": ck.node_id,
            "partitions": _assigned(ck.view, ck.node_id),
        }
        return Answer(200 if healthy else 503, _json(body), "application/json")

    def ready() -> Answer:
        healthy = ck.is_healthy()
        supervisor = ck._supervisor
        unready = supervisor.unready() if supervisor is not None else 0
        ok = healthy and unready == 0
        body = {
            "status": "ready" if ok else "not ready",
            "node_id": ck.node_id,
            "healthy": healthy,
            "partitions": _assigned(ck.view, ck.node_id),
            "partitions_not_ready": unready,
        }
        return Answer(200 if ok else 503, _json(body), "application/json")

    return {"/metrics": metrics, "/": metrics, "/health": health, "/ready": ready}


def _json(value: object) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


def render_for(ck: ClusterKit) -> Callable[[], bytes]:
    """The ``render`` callable for ``ck``'s metrics."""
    registry = registry_for(ck)
    return lambda: generate_latest(registry)
