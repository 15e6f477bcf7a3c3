"""The node's gRPC server: grpcio's asyncio server on one loop thread, handlers run as Trio code.

Theory of operation
-------------------
grpcio's server needs an asyncio loop (``grpc.aio``) or a thread pool (sync API); Trio has
neither, so :class:`GrpcServer` runs a ``grpc.aio`` server on an :class:`AioBridge` loop (one
thread, the same kind the etcd client uses) and runs every *handler* as a Trio task in the
server's own nursery, inside the node's nursery. A handler can therefore use ``ck``, Trio
locks and channels, and it is cancelled when the node stops or the caller goes away.

Routing. The server has one generic handler. For each call grpcio asks it, on the loop, for
the method; it answers from a table of methods (the app's services, added with
:meth:`GrpcServer.add_service` from the ``add_XServicer_to_server`` function protoc generates,
and the built-in ones). A method name it does not know is ``UNIMPLEMENTED`` (grpcio's answer to
"no handler"). ``*.MigrationService/<method>`` under any proto package is the built-in migration
service, so a client generated from the Go ClusterKit README's proto, whatever package it
names, reaches it.

Authentication. Every method but the health service needs the ``x-clusterkit-auth`` token of
``auth.py`` (the cluster secret). Without a valid one the call is answered ``UNAUTHENTICATED``
by a handler that never reads the request's messages and never reaches Trio.

One call. On the loop, a :class:`_LoopCall` posts the request to Trio (through the bridge's
batched outbox), where :meth:`GrpcServer._spawn` starts the handler task. Messages cross with
credit, :data:`WINDOW` per direction: a server-streaming handler's ``yield`` waits while
``WINDOW`` messages are not yet written to gRPC (so a client that does not read stops the
handler after a window, under HTTP/2 flow control), and the loop reads at most ``WINDOW``
request messages ahead of the handler. The handler's outcome goes back through the inbox: a
value, ``context.abort(code, details)`` (:class:`GrpcAbort`), or an exception, answered
``UNKNOWN`` with only the exception's class name (details stay in the node's log). If the
caller cancels or its deadline passes, grpcio cancels the loop side, which cancels the Trio
task (urgent lane).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import grpc
import grpc.aio
import trio

from .._errors import ConfigError
from .._etcd.bridge import AioBridge
from .._peers.keyring import Keyring, as_keyring
from .auth import HEADER, verify_token
from .loop import run_on_loop

WINDOW = 8  # messages in flight per direction of one call
MIGRATION_SERVICE = "clusterkit.migration.v1.MigrationService"
HEALTH_SERVICE = "grpc.health.v1.Health"
_STOP_GRACE = 1.0


class GrpcAbort(Exception):
    """Raised by :meth:`GrpcContext.abort`: ends the call with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class GrpcContext:
    """What a Trio gRPC handler gets as its second argument (grpcio's ``context``, trimmed).

    Attributes:
        caller: the node or client id that authenticated the call (None for open methods).
        method: the full method name, ``/package.Service/Method``.
    """

    def __init__(
        self, method: str, caller: str | None, peer: str, metadata: tuple[Any, ...], deadline: float
    ) -> None:
        self.method = method
        self.caller = caller
        self._peer = peer
        self._metadata = metadata
        self._deadline = deadline

    def peer(self) -> str:
        """The caller's address, as grpcio reports it (``ipv4:127.0.0.1:41234``)."""
        return self._peer

    def invocation_metadata(self) -> tuple[Any, ...]:
        """The call's metadata: ``(key, value)`` pairs."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline; None: it set none."""
        if self._deadline == float("inf"):
            return None
        return max(0.0, self._deadline - trio.current_time())

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with status ``code`` and ``details`` (raises :class:`GrpcAbort`)."""
        raise GrpcAbort(code, details)


class _Capture:
    """A stand-in server for protoc's ``add_XServicer_to_server``: records its handlers."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:
            table = getattr(handler, "_method_handlers", None)
            if not isinstance(table, Mapping):
                raise TypeError("only handlers made by protoc's add_*Servicer_to_server")
            self.methods.update(table)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler


class _Method:
    """One servable method: the app's (Trio) behaviour and its loop-side handlers."""

    def __init__(self, server: GrpcServer, path: str, handler: Any, *, open_: bool) -> None:
        self.path = path
        self.open = open_
        self.request_streaming = bool(handler.request_streaming)
        self.response_streaming = bool(handler.response_streaming)
        behaviour = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if not callable(behaviour):
            raise TypeError(f"{path}: no behaviour")
        self.behaviour = behaviour
        arity = (self.request_streaming, self.response_streaming)

        async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _LoopCall(server, self, context).run(request)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            server.denied += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid x-clusterkit-auth")

        self.handler = _MAKERS[arity](
            serve,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        # Never parse an unauthenticated caller's messages: raw bytes, unread.
        self.denied = _MAKERS[arity](deny)


_MAKERS: dict[tuple[bool, bool], Callable[..., Any]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

_END = object()


class _LoopCall:
    """One call, loop side: hands it to Trio, writes what the handler yields, reads ahead."""

    def __init__(self, server: GrpcServer, method: _Method, context: Any) -> None:
        self.server = server
        self.method = method
        self.context = context
        self.done: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.read_credit = asyncio.Semaphore(WINDOW)
        self.trio: _TrioCall | None = None  # set in Trio, used only by callables run in Trio
        self.cancelled = False  # Trio side: set by an urgent cancel that beat the spawn

    async def run(self, request: Any) -> Any:
        server, method, context = self.server, self.method, self.context
        bridge = server.bridge
        remaining = context.time_remaining()
        metadata = tuple(context.invocation_metadata() or ())
        bridge.post(
            functools.partial(
                server._spawn,
                self,
                None if method.request_streaming else request,
                remaining,
                context.peer(),
                metadata,
            )
        )
        reader = (
            asyncio.get_running_loop().create_task(self._read(request))
            if method.request_streaming
            else None
        )
        try:
            if method.response_streaming:
                while (item := await self.out.get()) is not _END:
                    try:
                        await context.write(item)
                    except Exception:  # the call has ended (the caller went away)
                        bridge.post(self._cancel, urgent=True)
                        return None
                    bridge.post(self._written)
            result = await self.done
        except BaseException:  # cancelled by grpcio, or a write to a call that has ended
            bridge.post(self._cancel, urgent=True)
            raise
        finally:
            if reader is not None:
                reader.cancel()
        if result[0] == "abort":
            await context.abort(result[1], result[2])
        return result[1]

    async def _read(self, requests: Any) -> None:
        bridge = self.server.bridge
        iterator = aiter(requests)
        try:
            while True:
                await self.read_credit.acquire()
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    bridge.post(self._deliver_end)
                    return
                bridge.post(functools.partial(self._deliver, message))
        except asyncio.CancelledError:
            raise
        except Exception:  # a broken request stream: the call itself ends with its status
            bridge.post(self._deliver_end)

    # Loop thread, called through the inbox.
    def put(self, message: Any) -> None:
        self.out.put_nowait(message)

    def finish(self, result: tuple[Any, ...]) -> None:
        self.out.put_nowait(_END)
        if not self.done.done():
            self.done.set_result(result)

    # Trio thread, called through the outbox.
    def _written(self) -> None:
        if self.trio is not None:
            self.trio.write_credit.release()

    def _deliver(self, message: Any) -> None:
        if self.trio is not None:
            self.trio.requests_in.send_nowait(message)

    def _deliver_end(self) -> None:
        if self.trio is not None:
            self.trio.requests_in.close()

    def _cancel(self) -> None:
        self.cancelled = True
        if self.trio is not None:
            self.trio.scope.cancel()


class _TrioCall:
    """One call, Trio side: its cancel scope and the two credit counts."""

    def __init__(self, loop_call: _LoopCall) -> None:
        self.scope = trio.CancelScope()
        self.write_credit = trio.Semaphore(WINDOW)
        self.requests_in, requests_out = trio.open_memory_channel[Any](WINDOW + 1)
        self.requests = RequestStream(requests_out, loop_call)


class RequestStream:
    """The request messages of a call, as the caller sends them: ``async for m in requests``
    (each message taken frees one credit for the loop to read the next)."""

    def __init__(self, messages: trio.MemoryReceiveChannel[Any], loop_call: _LoopCall) -> None:
        self._messages = messages
        self._loop_call = loop_call

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        try:
            message = await self._messages.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._loop_call.server.bridge.submit(self._loop_call.read_credit.release)
        return message


class GrpcServer:
    """The node's gRPC server (see the module docstring). One per node; an actor.

    Args:
        node_id: this node's id (in logs).
        host, port: where to listen; port 0 picks a free one (``run`` reports it).
        secret: the cluster secret or keyring (read at each call: rotations apply at once).
        credentials: grpcio server credentials for TLS; None: plaintext.
        max_message: the largest message, each way, in bytes.
        max_calls: calls at once; beyond it grpcio answers ``RESOURCE_EXHAUSTED``.
    """

    def __init__(
        self,
        *,
        node_id: str,
        host: str,
        port: int,
        secret: bytes | Keyring,
        credentials: grpc.ServerCredentials | None = None,
        max_message: int = 4 * 1024 * 1024,
        max_calls: int = 256,
        log: logging.Logger | None = None,
        bridge: AioBridge | None = None,
    ) -> None:
        self.node_id = node_id
        self._host = host
        self._port = port
        self._secret = secret
        self._credentials = credentials
        self._max_message = max_message
        self._max_calls = max_calls
        self._log = log or logging.getLogger("clusterkit")
        self.bridge = bridge or AioBridge("grpc")
        self._methods: dict[str, _Method] = {}
        self._nursery: trio.Nursery | None = None
        self._server: Any = None
        self.pools: list[Any] = []  # GrpcPools on this server's loop: closed before it stops
        self.port = 0
        # Counters (Trio thread, but ``denied``: loop thread only).
        self.calls = 0
        self.active = 0
        self.failed = 0
        self.denied = 0

    def __repr__(self) -> str:
        return f"<GrpcServer {self.node_id} port={self.port} active={self.active}>"

    def statistics(self) -> dict[str, int]:
        """Counters: calls served, in progress, failed in their handler, refused unauthenticated."""
        return {
            "calls": self.calls,
            "active": self.active,
            "failed": self.failed,
            "unauthenticated": self.denied,
        }

    def services(self) -> list[str]:
        """The full names of the services served, sorted."""
        return sorted({path.split("/")[1] for path in self._methods})

    def add_service(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> list[str]:
        """Serve ``servicer`` (methods: Trio ``async def``); returns the method names added.

        Args:
            add_to_server: the ``add_XServicer_to_server`` function protoc generated.
            servicer: an object with the service's methods. A unary-response method is
                ``async def M(self, request_or_iterator, context) -> response``; a
                streaming-response one is an async generator that yields the responses. A
                streaming request arrives as a Trio async iterator.
        """
        return self._add(add_to_server, servicer, open_=False)

    def _add(
        self, add_to_server: Callable[[Any, Any], None], servicer: Any, *, open_: bool
    ) -> list[str]:
        capture = _Capture()
        add_to_server(servicer, capture)
        if not capture.methods:
            raise ValueError(f"{add_to_server!r} registered no methods")
        added = {path: _Method(self, path, h, open_=open_) for path, h in capture.methods.items()}
        clash = sorted(set(added) & set(self._methods))
        if clash:
            raise ValueError(f"already served: {', '.join(clash)}")
        self._methods = {**self._methods, **added}  # the loop reads it: replace, never mutate
        return sorted(added)

    # -- loop thread ------------------------------------------------------------------------

    def _route(self, details: Any) -> Any:
        path = details.method
        if isinstance(path, bytes):
            path = path.decode("utf-8", "replace")
        method = self._methods.get(path)
        if method is None:
            service, _, name = path.lstrip("/").partition("/")
            if service.rsplit(".", 1)[-1] == "MigrationService":
                method = self._methods.get(f"/{MIGRATION_SERVICE}/{name}")
            if method is None:
                return None
        if method.open:
            return method.handler
        token = None
        for key, value in details.invocation_metadata or ():
            if key == HEADER:
                token = value
        if verify_token(token, path, as_keyring(self._secret).accepted()) is None:
            return method.denied
        return method.handler

    async def _start(self) -> int:
        router = self

        class _Router(grpc.GenericRpcHandler):  # type: ignore[misc]
            def service(self, details: Any) -> Any:
                return router._route(details)

        server = grpc.aio.server(
            handlers=[_Router()],
            options=[
                ("grpc.max_receive_message_length", self._max_message),
                ("grpc.max_send_message_length", self._max_message),
                ("grpc.max_concurrent_streams", 128),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self._max_calls,
        )
        address = (
            f"{self._host}:{self._port}"
            if ":" not in self._host
            else f"[{self._host}]:{self._port}"
        )
        if self._credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self._credentials)
        await server.start()
        self._server = server
        return int(port)

    # -- Trio thread ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve until cancelled, then stop (in-flight calls are cancelled)."""
        async with trio.open_nursery() as nursery:
            try:
                self.port = await run_on_loop(self.bridge, self._start)
            except Exception as exc:
                with trio.CancelScope(shield=True):
                    await self.bridge.aclose()
                raise ConfigError(
                    "grpc_port",
                    f"cannot serve gRPC on {self._host}:{self._port}: {exc} (in use? grpc_port=0 "
                    "picks a free port; grpc_server=False only advertises the port)",
                ) from None
            self._nursery = nursery
            task_status.started(self.port)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(_STOP_GRACE + 2):
                    for pool in self.pools:
                        await pool.aclose()
                    server = self._server
                    if server is not None:
                        with contextlib.suppress(Exception):
                            await run_on_loop(self.bridge, lambda: server.stop(_STOP_GRACE))
                    await self.bridge.aclose()

    def _spawn(
        self,
        loop_call: _LoopCall,
        request: Any,
        remaining: float | None,
        peer: str,
        metadata: tuple[Any, ...],
    ) -> None:
        call = loop_call.trio = _TrioCall(loop_call)
        nursery = self._nursery
        if nursery is None or loop_call.cancelled:
            reason = "call cancelled" if loop_call.cancelled else "the node is stopping"
            self.bridge.submit(
                functools.partial(loop_call.finish, ("abort", grpc.StatusCode.UNAVAILABLE, reason))
            )
            return
        deadline = trio.current_time() + remaining if remaining is not None else float("inf")
        caller = None
        if not loop_call.method.open:  # verified by _route: the last token is the one checked
            for key, value in metadata:
                if key == HEADER and isinstance(value, str) and value.count(":") >= 2:
                    caller = value.split(":", 2)[1]
        context = GrpcContext(loop_call.method.path, caller, peer, metadata, deadline)
        nursery.start_soon(self._serve_call, loop_call, call, request, context)

    async def _serve_call(
        self, loop_call: _LoopCall, call: _TrioCall, request: Any, context: GrpcContext
    ) -> None:
        method = loop_call.method
        self.calls += 1
        self.active += 1
        result: tuple[Any, ...] | None = None
        try:
            with call.scope:
                argument = call.requests if method.request_streaming else request
                if method.response_streaming:
                    stream = method.behaviour(argument, context)
                    if not inspect.isasyncgen(stream):
                        raise TypeError(
                            f"{method.path}: a streaming response needs an async generator"
                        )
                    async with contextlib.aclosing(stream):
                        async for message in stream:
                            await call.write_credit.acquire()
                            self.bridge.submit(functools.partial(loop_call.put, message))
                    result = ("ok", None)
                else:
                    result = ("ok", await method.behaviour(argument, context))
            if result is None:
                result = ("abort", grpc.StatusCode.CANCELLED, "call cancelled")
        except GrpcAbort as exc:
            result = ("abort", exc.code, exc.details)
        except Exception as exc:
            self.failed += 1
            self._log.warning(
                "clusterkit %s: gRPC handler %s failed: %r", self.node_id, method.path, exc
            )
            result = ("abort", grpc.StatusCode.UNKNOWN, f"handler failed: {type(exc).__name__}")
        finally:
            self.active -= 1
            if result is None:
                result = ("abort", grpc.StatusCode.UNAVAILABLE, "the node is stopping")
            self.bridge.submit(functools.partial(loop_call.finish, result))
