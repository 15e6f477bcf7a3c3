"""The migration service over gRPC: ``MigrationService`` on the node's gRPC port, and the
gRPC side of ``ck.migration.pull`` / ``push`` (``transport="grpc"``).

The protobuf messages map one to one onto the msgpack maps the peer transport carries (the
field names are the map keys, ``protos/migration/README.md``), so both transports share the
batcher, the checks and the resume logic of ``service.py``; this module only converts and
maps errors. Errors cross as gRPC statuses whose details start with the error's type name
(``"NoMigrationSource: ..."``, ``"StaleEpoch: ..."``), which the caller turns back into
clusterkit's exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import trio

from .._errors import (
    MigrationSourceError,
    NoMigrationSource,
    PeerAuthFailed,
    PeerUnreachable,
    RemoteError,
)
from .._grpc.server import GrpcAbort, GrpcContext
from .pb import migration_pb2 as pb
from .pb import migration_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from .._grpc.channel import BidiCall, ResponseStream, TrioChannel
    from .service import Migration

_KV_OPTIONAL = ("version", "epoch")
_STATUS = {
    "NoMigrationSource": grpc.StatusCode.FAILED_PRECONDITION,
    "NoMigrationSink": grpc.StatusCode.FAILED_PRECONDITION,
    "StaleEpoch": grpc.StatusCode.FAILED_PRECONDITION,
    "MalformedBatch": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidRequest": grpc.StatusCode.INVALID_ARGUMENT,
}

STREAM_PARTITION = f"/{pb.DESCRIPTOR.package}.MigrationService/StreamPartition"
RECEIVE_PARTITION = f"/{pb.DESCRIPTOR.package}.MigrationService/ReceivePartition"


# -- conversions ----------------------------------------------------------------------------


def batch_to_pb(batch: dict[str, Any]) -> Any:
    """A ``PartitionBatch`` map as the protobuf message."""
    return _fill(pb.PartitionBatch(), batch)


def carrier(batch: dict[str, Any]) -> Any:
    """A ``KeyValue`` carrying the batch (built in place: no copy of the batch's bytes)."""
    message = pb.KeyValue()
    _fill(message.batch, batch)
    return message


def _fill(message: Any, batch: dict[str, Any]) -> Any:
    for name, value in batch.items():
        if name != "kvs":
            setattr(message, name, value)
    add = message.kvs.add
    for kv in batch.get("kvs", ()):
        if len(kv) == 2:  # the common case: no version, no epoch
            add(key=kv["key"], value=kv["value"])
        else:
            add(**kv)
    return message


def _fields(message: Any) -> dict[str, Any]:
    return {field.name: value for field, value in message.ListFields()}


def pb_to_batch(message: Any) -> dict[str, Any]:
    """A ``PartitionBatch`` message as the map the peer transport carries."""
    batch = _fields(message)
    kvs = []
    for kv in message.kvs:
        entry = {"key": kv.key, "value": kv.value}
        for name in _KV_OPTIONAL:
            if kv.HasField(name):
                entry[name] = getattr(kv, name)
        kvs.append(entry)
    batch["kvs"] = kvs
    return batch


def request_to_pb(payload: dict[str, Any]) -> Any:
    """A ``StreamRequest`` map as the message, asking for batches."""
    return pb.StreamRequest(batched=True, **payload)


def response_to_dict(message: Any) -> dict[str, Any]:
    """A ``MigrationResponse`` as a map (every field, zeros included)."""
    return {
        "partition": message.partition,
        "keys": message.keys,
        "bytes": message.bytes,
        "elapsed_seconds": message.elapsed_seconds,
        "last_resume_token": message.last_resume_token,
        "complete": message.complete,
        "success": message.success,
    }


def abort_for(error_type: str, message: str) -> GrpcAbort:
    """The gRPC status that carries a migration error to the caller."""
    code = _STATUS.get(error_type, grpc.StatusCode.ABORTED)
    return GrpcAbort(code, f"{error_type}: {message}"[:2000])


def translate(exc: grpc.RpcError, node: str) -> Exception:
    """A failed call's status as the peer transport's exception (see ``service._receive``)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return PeerAuthFailed(f"{node} refused our gRPC credentials: {details}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RemoteError("UnknownMethod", f"{node} serves no MigrationService: {details}")
    if code in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
    ):
        kind, sep, rest = details.partition(": ")
        if sep and kind.isidentifier():
            return RemoteError(kind, rest)
        return RemoteError(code.name, details)
    return PeerUnreachable(f"gRPC {code.name} from {node}: {details}")


# -- the caller's side ----------------------------------------------------------------------


class GrpcPullStream:
    """The puller's end of a batched ``StreamPartition`` call, shaped like a ``PeerStream``."""

    def __init__(self, call: ResponseStream, node: str) -> None:
        self._call = call
        self._node = node

    async def receive(self) -> dict[str, Any]:
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise translate(exc, self._node) from None
        if message is grpc.aio.EOF:
            raise trio.EndOfChannel
        if not message.HasField("batch"):
            raise MigrationSourceError("MalformedBatch", "a KeyValue without a batch")
        return pb_to_batch(message.batch)

    async def end(self) -> None:
        self._call.cancel()


@contextlib.asynccontextmanager
async def open_pull(
    channel: TrioChannel, payload: dict[str, Any], node: str, timeout: float
) -> AsyncIterator[GrpcPullStream]:
    """A batched ``StreamPartition`` call for the request map ``payload``."""
    stub = pb_grpc.MigrationServiceStub(channel)
    call = stub.StreamPartition(request_to_pb(payload))
    try:
        yield GrpcPullStream(call, node)
    finally:
        call.cancel()


class GrpcPush:
    """The pusher's end of ``ReceivePartition``: probe, then stream batches, then the summary."""

    def __init__(self, channel: TrioChannel, node: str) -> None:
        self._channel = channel
        self._node = node
        self._call: BidiCall | None = None

    async def probe(self, partition: int, transfer: str, timeout: float) -> dict[str, Any]:
        """The receiver's position in ``transfer`` (``last_resume_token``, ``complete``)."""
        call = self._open(timeout=timeout)
        probe = {"partition": partition, "transfer_id": transfer, "probe": True}
        try:
            async with call:
                await call.write(carrier(probe))
                await call.done_writing()
                return response_to_dict(await call.response())
        except grpc.RpcError as exc:
            raise translate(exc, self._node) from None

    def _open(self, timeout: float | None = None) -> BidiCall:
        return self._channel.open_stream_unary(
            RECEIVE_PARTITION,
            request_serializer=pb.KeyValue.SerializeToString,
            response_deserializer=pb.MigrationResponse.FromString,
            timeout=timeout,
        )

    async def send(self, batch: dict[str, Any]) -> None:
        if self._call is None:
            self._call = self._open()
        try:
            await self._call.write(carrier(batch))
        except grpc.RpcError as exc:
            raise translate(exc, self._node) from None
        except (trio.Cancelled, Exception):
            self._call.cancel()
            raise

    async def finish(self) -> dict[str, Any]:
        call, self._call = self._call, None
        assert call is not None
        async with call:
            try:
                await call.done_writing()
                return response_to_dict(await call.response())
            except grpc.RpcError as exc:
                raise translate(exc, self._node) from None

    def abort(self) -> None:
        if self._call is not None:
            self._call.cancel()


# -- the server's side ----------------------------------------------------------------------


class MigrationServicer:
    """``MigrationService`` served by a node, on its :class:`~clusterkit.Migration`."""

    def __init__(self, migration: Migration) -> None:
        self._migration = migration

    async def StreamPartition(self, request: Any, context: GrpcContext) -> AsyncIterator[Any]:
        migration = self._migration
        payload = _fields(request)
        batched = bool(payload.pop("batched", False))
        try:
            batches = migration._open_batches(payload, context.caller or context.peer(), "grpc")
        except ValueError as exc:
            raise abort_for("InvalidRequest", str(exc)) from None
        except NoMigrationSource as exc:
            raise abort_for("NoMigrationSource", str(exc)) from None
        try:
            async with contextlib.aclosing(batches) as stream:
                async for batch, nbytes in stream:
                    if batched:
                        yield carrier(batch)
                    else:
                        for kv in batch["kvs"]:
                            yield pb.KeyValue(**kv)
                    migration._count_served(batch, nbytes)
        except GrpcAbort:
            raise
        except Exception as exc:
            kind, message = migration._source_failed(exc, request.partition, context.caller)
            raise abort_for(kind, message) from None

    async def ReceivePartition(self, requests: AsyncIterator[Any], context: GrpcContext) -> Any:
        migration = self._migration
        try:
            summary = await migration._receive_grpc(requests, context.caller or context.peer())
        except RemoteError as exc:
            raise abort_for(exc.remote_type, exc.remote_message) from None
        return pb.MigrationResponse(**summary)


def add_migration_service(add: Any, migration: Migration) -> None:
    """Serve ``migration`` as ``MigrationService`` (``add`` is the server's ``_add``)."""
    add(pb_grpc.add_MigrationServiceServicer_to_server, MigrationServicer(migration), open_=False)


def first_batch(message: Any) -> dict[str, Any] | None:
    """The batch a ``ReceivePartition`` message carries, or None (a plain per-key message)."""
    return pb_to_batch(message.batch) if message.HasField("batch") else None


def entry_fields(message: Any) -> dict[str, Any]:
    """A plain ``KeyValue``'s fields."""
    return _fields(message)
