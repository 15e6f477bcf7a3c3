"""clusterkit's gRPC protocol for callers: the built-in services' stubs and the credentials.

``migration_pb2`` / ``migration_pb2_grpc``: ``MigrationService`` (``StreamPartition``,
``ReceivePartition``), as every node serves it on ``node.grpc_addr()``. ``health_pb2`` /
``health_pb2_grpc``: the standard ``grpc.health.v1.Health``. Use them with
``ck.grpc_channel(node)`` (or ``await client.grpc_channel(node)``), which add the credentials
themselves::

    from clusterkit.grpc import migration_pb2, migration_pb2_grpc

    stub = migration_pb2_grpc.MigrationServiceStub(ck.grpc_channel(previous_owner))
    async for kv in stub.StreamPartition(migration_pb2.StreamRequest(partition=pt)):
        db.put(pt, kv.key, kv.value)

A caller that is not clusterkit (another language, plain grpcio) sends the metadata entry
:data:`AUTH_HEADER` with :func:`make_token` ``(secret, method, caller)`` (the format is in the
README, so it can be computed anywhere).
"""

from __future__ import annotations

from ._grpc.auth import HEADER as AUTH_HEADER
from ._grpc.auth import make_token
from ._grpc.pb import health_pb2, health_pb2_grpc
from ._migration.pb import migration_pb2, migration_pb2_grpc

__all__ = [
    "AUTH_HEADER",
    "health_pb2",
    "health_pb2_grpc",
    "make_token",
    "migration_pb2",
    "migration_pb2_grpc",
]
