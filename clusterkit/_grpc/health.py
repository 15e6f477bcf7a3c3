"""The standard gRPC health service (``grpc.health.v1.Health``) of a node, in Trio.

``Check`` answers SERVING exactly while ``is_healthy()`` is true (``ck.is_healthy()``: the
node has its session and a current view of etcd), NOT_SERVING otherwise; ``Watch`` streams
the status at once and again whenever it changes (sampled every :data:`WATCH_INTERVAL`).
Service names: ``""`` (the node) and every service the node serves; others are NOT_FOUND
(``Check``) or SERVICE_UNKNOWN (``Watch``), as the protocol says. Open to callers without the
cluster secret, so that load balancers and orchestrators can probe it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import trio

from .pb import health_pb2 as pb
from .pb import health_pb2_grpc as pb_grpc
from .server import GrpcContext, GrpcServer

WATCH_INTERVAL = 0.25


class HealthServicer:
    """``Check`` and ``Watch`` on ``is_healthy`` (see the module docstring)."""

    def __init__(self, is_healthy: Callable[[], bool], services: Callable[[], list[str]]) -> None:
        self._is_healthy = is_healthy
        self._services = services

    def _status(self, service: str) -> Any:
        if service and service not in self._services():
            return pb.HealthCheckResponse.SERVICE_UNKNOWN
        if self._is_healthy():
            return pb.HealthCheckResponse.SERVING
        return pb.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: GrpcContext) -> Any:
        status = self._status(request.service)
        if status == pb.HealthCheckResponse.SERVICE_UNKNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return pb.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: GrpcContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                last = status
                yield pb.HealthCheckResponse(status=status)
            await trio.sleep(WATCH_INTERVAL)


def add_health_service(server: GrpcServer, is_healthy: Callable[[], bool]) -> None:
    """Serve the health service on ``server``, open to every caller."""
    server._add(
        pb_grpc.add_HealthServicer_to_server,
        HealthServicer(is_healthy, server.services),
        open_=True,
    )
