"""Trio-callable gRPC channels to the nodes (the Go README's ``GRPCPool``): ``ck.grpc_channel``.

Theory of operation
-------------------
:class:`TrioChannel` quacks like a grpcio channel for the ``XStub`` classes protoc generates
(``unary_unary``, ``unary_stream``, ``stream_unary``, ``stream_stream``), so
``XStub(ck.grpc_channel(node))`` gives stubs whose methods are Trio ``async`` calls. Behind it
is a ``grpc.aio`` channel on the node's gRPC loop (the :class:`AioBridge` the server uses);
every step of a call is one :func:`run_on_loop` round trip, so cancelling the Trio task cancels
the RPC (as the etcd calls do). Each call carries the ``x-clusterkit-auth`` token of
``auth.py``, made with the secret the node dials with (rotations apply at once).

:class:`GrpcPool` keeps one channel per target (``host:port``) for the node's life: gRPC
channels reconnect by themselves, so a node that comes back at the same address is reached
again without a new channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterable, Callable
from typing import Any

import grpc
import grpc.aio
import trio

from .._core.records import Node
from .._errors import PeerUnreachable
from .._etcd.bridge import AioBridge
from .._peers.keyring import Keyring, as_keyring
from .auth import HEADER, make_token
from .loop import run_on_loop

READ_AHEAD = 8  # responses a stream reads before the Trio side takes them

Metadata = tuple[tuple[str, str | bytes], ...]


class TrioChannel:
    """A gRPC channel to one node whose stubs' methods are Trio ``async`` calls.

    Use it where grpcio takes a channel: ``stub = my_pb2_grpc.MyStub(channel)``; then
    ``await stub.Get(request, timeout=5)``, ``async for reply in stub.Watch(request)``,
    ``await stub.Upload(async_iterable_of_requests)``; a bidirectional method returns a
    :class:`BidiCall` (``write``, ``done_writing``, ``async for``). Errors are grpcio's
    ``grpc.RpcError`` (``.code()``, ``.details()``).
    """

    def __init__(
        self,
        bridge: AioBridge,
        target: str,
        *,
        caller: str,
        secret: bytes | Keyring | None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message: int = 4 * 1024 * 1024,
        default_timeout: float | None = None,
    ) -> None:
        self.target = target
        self._bridge = bridge
        self._caller = caller
        self._secret = secret
        self._credentials = credentials
        self._max_message = max_message
        self._default_timeout = default_timeout
        self._channel: Any = None  # created on the loop at first use

    def __repr__(self) -> str:
        return f"<TrioChannel {self.target}>"

    def _aio(self) -> Any:  # loop thread
        if self._channel is None:
            options = [
                ("grpc.max_receive_message_length", self._max_message),
                ("grpc.max_send_message_length", self._max_message),
            ]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=options
                )
        return self._channel

    def _metadata(self, method: str, metadata: Metadata | None) -> Metadata:
        extra: Metadata = tuple(metadata or ())
        if self._secret is None:
            return extra
        token = make_token(as_keyring(self._secret).dialing(), method, self._caller)
        return ((HEADER, token), *extra)

    def _timeout(self, timeout: float | None) -> float | None:
        return self._default_timeout if timeout is None else timeout

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Callable[..., Any]:
        async def call(
            request: Any, *, timeout: float | None = None, metadata: Metadata | None = None
        ) -> Any:
            md = self._metadata(method, metadata)
            return await run_on_loop(
                self._bridge,
                lambda: self._aio().unary_unary(
                    method,
                    request_serializer=request_serializer,
                    response_deserializer=response_deserializer,
                )(request, timeout=self._timeout(timeout), metadata=md),
            )

        return call

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Callable[..., Any]:
        def call(
            request: Any, *, timeout: float | None = None, metadata: Metadata | None = None
        ) -> ResponseStream:
            md = self._metadata(method, metadata)

            def start() -> Any:
                return self._aio().unary_stream(
                    method,
                    request_serializer=request_serializer,
                    response_deserializer=response_deserializer,
                )(request, timeout=self._timeout(timeout), metadata=md)

            return ResponseStream(self._bridge, start)

        return call

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Callable[..., Any]:
        async def call(
            requests: AsyncIterable[Any],
            *,
            timeout: float | None = None,
            metadata: Metadata | None = None,
        ) -> Any:
            bidi = self.open_stream_unary(
                method,
                request_serializer=request_serializer,
                response_deserializer=response_deserializer,
                timeout=timeout,
                metadata=metadata,
            )
            async with bidi:
                async for request in requests:
                    await bidi.write(request)
                await bidi.done_writing()
                return await bidi.response()

        return call

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Callable[..., Any]:
        def call(
            requests: None = None, *, timeout: float | None = None, metadata: Metadata | None = None
        ) -> BidiCall:
            if requests is not None:
                raise TypeError("a bidirectional call takes no iterator: use call.write(...)")
            md = self._metadata(method, metadata)
            return BidiCall(
                self._bridge,
                lambda: self._aio().stream_stream(
                    method,
                    request_serializer=request_serializer,
                    response_deserializer=response_deserializer,
                )(timeout=self._timeout(timeout), metadata=md),
            )

        return call

    def open_stream_unary(
        self,
        method: str,
        *,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> BidiCall:
        """A client-streaming call to write to step by step (``write``, ``done_writing``,
        ``response``), where a stub's method would take the whole request iterator."""
        md = self._metadata(method, metadata)
        return BidiCall(
            self._bridge,
            lambda: self._aio().stream_unary(
                method,
                request_serializer=request_serializer,
                response_deserializer=response_deserializer,
            )(timeout=self._timeout(timeout), metadata=md),
        )

    async def aclose(self) -> None:
        """Close the channel (calls on it end with ``CANCELLED``)."""
        channel, self._channel = self._channel, None
        if channel is not None and not self._bridge.closed:
            with contextlib.suppress(Exception):
                await run_on_loop(self._bridge, lambda: channel.close())


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Call:
    """A streaming call, started lazily on the loop; cancelled if a step is cancelled.

    Responses are read ahead: a task on the loop reads up to :data:`READ_AHEAD` of them before
    the Trio side takes them (credit returned as each is taken), so a stream costs one Trio
    wakeup per batch of responses, not a round trip per response.
    """

    def __init__(self, bridge: AioBridge, start: Callable[[], Any]) -> None:
        self._bridge = bridge
        self._start = start
        self._call: Any = None
        self._responses: trio.MemoryReceiveChannel[Any] | None = None
        self._final: Any = None  # EOF or a _Failure, once seen
        self._credit: asyncio.Semaphore | None = None  # loop thread

    async def _loop_call(self) -> Any:
        if self._call is None:
            self._call = await run_on_loop(self._bridge, self._started)
        return self._call

    async def _started(self) -> Any:
        return self._start()

    async def _step(self, step: Callable[[Any], Any]) -> Any:
        call = await self._loop_call()
        try:
            return await run_on_loop(self._bridge, lambda: step(call))
        except trio.Cancelled:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the RPC (no-op once it ended)."""
        call = self._call
        if call is not None and not self._bridge.closed:
            self._bridge.submit(call.cancel, urgent=True)

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    async def read(self) -> Any:
        """The next response; ``grpc.aio.EOF`` after the last.

        Raises:
            grpc.RpcError: the call ended with an error status.
        """
        if self._final is not None:
            return self._raise_or_eof(self._final)
        if self._responses is None:
            call = await self._loop_call()
            send, self._responses = trio.open_memory_channel[Any](math.inf)
            self._bridge.submit(functools.partial(self._start_reading, call, send))
        try:
            item = await self._responses.receive()
        except trio.Cancelled:
            self.cancel()
            raise
        if item is grpc.aio.EOF or isinstance(item, _Failure):
            self._final = item
            return self._raise_or_eof(item)
        self._bridge.submit(self._release)
        return item

    @staticmethod
    def _raise_or_eof(final: Any) -> Any:
        if isinstance(final, _Failure):
            raise final.error
        return final

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> Any:
        message = await self.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    # Loop thread.
    def _start_reading(self, call: Any, send: trio.MemorySendChannel[Any]) -> None:
        self._credit = asyncio.Semaphore(READ_AHEAD)
        asyncio.get_running_loop().create_task(self._read_ahead(call, send))

    def _release(self) -> None:
        if self._credit is not None:
            self._credit.release()

    async def _read_ahead(self, call: Any, send: trio.MemorySendChannel[Any]) -> None:
        assert self._credit is not None
        deliver = send.send_nowait
        item: Any
        try:
            while True:
                await self._credit.acquire()
                item = await call.read()
                self._bridge.post(functools.partial(deliver, item))
                if item is grpc.aio.EOF:
                    return
        except asyncio.CancelledError:
            item = _Failure(PeerUnreachable("the node's gRPC layer closed during the call"))
            self._bridge.post(functools.partial(deliver, item))
            raise
        except Exception as exc:
            self._bridge.post(functools.partial(deliver, _Failure(exc)))


class ResponseStream(_Call):
    """A server-streaming call: ``async for reply in stub.Method(request)``."""


class BidiCall(_Call):
    """A call with a request stream: ``await call.write(m)``, ``await call.done_writing()``,
    then ``async for reply in call`` (or ``await call.response()`` for a single response)."""

    async def write(self, message: Any) -> None:
        """Send one request message (waits under gRPC flow control).

        Raises:
            grpc.RpcError: the call has ended (with its status: the server may have
                answered before reading every request).
        """
        try:
            await self._step(lambda call: call.write(message))
        except grpc.RpcError:
            raise
        except Exception:
            # grpc.aio reports a write to a call that already ended as its own internal
            # error; the call's status says why it ended.
            with trio.move_on_after(5):
                await self._step(_await_call)
            raise

    async def done_writing(self) -> None:
        """Half-close: no more requests."""
        await self._step(lambda call: call.done_writing())

    async def response(self) -> Any:
        """The single response of a client-streaming call."""
        return await self._step(_await_call)


async def _await_call(call: Any) -> Any:
    return await call


class GrpcPool:
    """One :class:`TrioChannel` per node address, for the node's (or client's) life."""

    def __init__(
        self,
        bridge: AioBridge,
        *,
        caller: str,
        secret: Callable[[], bytes | Keyring | None],
        resolve: Callable[[Node | str], Node | None],
        credentials: grpc.ChannelCredentials | None = None,
        max_message: int = 4 * 1024 * 1024,
    ) -> None:
        self.bridge = bridge
        self._caller = caller
        self._secret = secret
        self._resolve = resolve
        self._credentials = credentials
        self._max_message = max_message
        self._channels: dict[str, TrioChannel] = {}

    def get(self, node: Node | str) -> TrioChannel:
        """The channel to ``node`` (a :class:`Node`, a node id, or ``"host:port"``).

        Raises:
            PeerUnreachable: the node is not known or advertises no gRPC address.
        """
        target = node.grpc_addr() if isinstance(node, Node) else None
        if target is None:
            assert isinstance(node, str)
            known = self._resolve(node)
            if known is not None:
                target = known.grpc_addr()
            elif ":" in node:
                target = node
            else:
                raise PeerUnreachable(f"no node {node!r} in the cluster view")
        if not target:
            raise PeerUnreachable(f"node {node!r} advertises no gRPC address")
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = TrioChannel(
                self.bridge,
                target,
                caller=self._caller,
                secret=self._secret(),
                credentials=self._credentials,
                max_message=self._max_message,
            )
        return channel

    async def aclose(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.aclose()
