"""The Trio HTTP/2 gRPC channel (clusterkit._etcd.http2) against a server built on the ``h2``
library: an independent HTTP/2 implementation that checks our frames, and that lets each test
misbehave in one precise way (errors, resets, GOAWAY, garbage, silence, small windows)."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
import trio
import trustme

from clusterkit._etcd import h2wire, http2
from clusterkit._etcd.pb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from clusterkit._etcd.pb.mvccpb import kv_pb2

Headers = list[tuple[bytes, bytes]]


def message(msg: Any) -> bytes:
    body: bytes = msg.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


class ServerConn:
    """One accepted connection: an h2 server state machine over a Trio stream."""

    def __init__(self, server: FakeServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.bodies: dict[int, bytearray] = {}
        self.headers: dict[int, Headers] = {}
        self.pending: dict[int, bytes] = {}  # response DATA waiting for window
        self.trailers: dict[int, Headers] = {}  # sent once a stream's DATA is out

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    def respond(
        self,
        sid: int,
        body: bytes = b"",
        *,
        status: int = 0,
        details: str = "",
        http_status: int = 200,
        trailers_only: bool = False,
    ) -> None:
        h = self.h2
        trailers = [(b"grpc-status", str(status).encode())]
        if details:
            trailers.append((b"grpc-message", details.encode()))
        response = [(b":status", str(http_status).encode()), (b"content-type", b"application/grpc")]
        if trailers_only:
            h.send_headers(sid, response + trailers, end_stream=True)
            return
        h.send_headers(sid, response)
        self.pending[sid] = body
        self.trailers[sid] = trailers
        self._send_pending()

    def _send_pending(self) -> None:
        for sid in list(self.pending):
            body = self.pending[sid]
            pad = self.server.pad  # padding bytes per DATA frame (they count for the window)
            extra = pad + 1 if pad else 0
            while body:
                n = min(
                    len(body),
                    self.h2.local_flow_control_window(sid) - extra,
                    self.h2.max_outbound_frame_size - extra,
                    self.server.chunk,
                )
                if n <= 0:
                    break
                self.h2.send_data(sid, body[:n], pad_length=pad or None)
                body = body[n:]
            if body:
                self.pending[sid] = body
            else:
                del self.pending[sid]
                self.h2.send_headers(sid, self.trailers.pop(sid), end_stream=True)

    async def serve(self) -> None:
        self.h2.initiate_connection()
        if self.server.settings:
            self.h2.update_settings(self.server.settings)
        await self.flush()
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            self.server.received_bytes += len(data)
            if self.server.silent:
                continue
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:  # e.g. frames after our GOAWAY: hang up
                await self.flush()
                await self.stream.aclose()
                return
            for event in events:
                await self.event(event)
            await self.flush()

    async def event(self, event: h2.events.Event) -> None:
        server = self.server
        if isinstance(event, h2.events.RequestReceived):
            self.headers[event.stream_id] = list(event.headers)
            self.bodies[event.stream_id] = bytearray()
            server.open_streams += 1
            server.max_open = max(server.max_open, server.open_streams)
            server.requests.append(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self.bodies[event.stream_id] += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if server.on_data is not None:
                server.on_data(self, event.stream_id, self.bodies[event.stream_id])
        elif isinstance(event, h2.events.StreamEnded):
            server.open_streams -= 1
            body = bytes(self.bodies[event.stream_id])
            server.handle(self, event.stream_id, body)
        elif isinstance(event, h2.events.StreamReset):
            server.open_streams -= 1
            server.resets.append(event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            self._send_pending()


class FakeServer:
    """An HTTP/2 server on loopback; ``handle(conn, stream_id, body)`` answers requests."""

    def __init__(self) -> None:
        self.port = 0
        self.settings: dict[int, int] = {}
        self.handle: Callable[[ServerConn, int, bytes], None] = self.ok
        self.on_data: Callable[[ServerConn, int, bytearray], None] | None = None
        self.connections = 0
        self.conns: list[ServerConn] = []
        self.requests: list[dict[bytes, bytes]] = []
        self.resets: list[int] = []
        self.open_streams = 0
        self.max_open = 0
        self.silent = False  # read and ignore everything
        self.pad = 0  # padding per response DATA frame
        self.chunk = 1 << 24  # largest response DATA frame payload
        self.received_bytes = 0
        self.ssl_context: ssl.SSLContext | None = None
        self.nursery: trio.Nursery | None = None

    def channel(self, **options: Any) -> http2.Channel:
        """A channel to this server whose connections run in the server's nursery."""
        assert self.nursery is not None
        return http2.Channel(f"127.0.0.1:{self.port}", self.nursery.start_soon, **options)

    @staticmethod
    def ok(conn: ServerConn, sid: int, body: bytes) -> None:
        request = rpc_pb2.RangeRequest.FromString(body[5:])
        kv = kv_pb2.KeyValue(key=request.key, value=b"v" * 10)
        conn.respond(sid, message(rpc_pb2.RangeResponse(kvs=[kv], count=1)))

    async def serve_one(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        wrapped: Any = stream
        if self.ssl_context is not None:
            wrapped = trio.SSLStream(stream, self.ssl_context, server_side=True)
            try:
                await wrapped.do_handshake()
            except trio.BrokenResourceError:
                return
        conn = ServerConn(self, wrapped)
        self.conns.append(conn)
        await conn.serve()


@asynccontextmanager
async def fake_server() -> AsyncIterator[FakeServer]:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, server.serve_one, 0, host="127.0.0.1")
        )
        server.port = listeners[0].socket.getsockname()[1]
        server.nursery = nursery
        yield server
        nursery.cancel_scope.cancel()


def kv_stub(server: FakeServer, **options: Any) -> Any:
    return rpc_pb2_grpc.KVStub(server.channel(**options))


async def range_fails(kv: Any, code: grpc.StatusCode, timeout: float = 5) -> http2.RpcError:
    """Call Range, which must fail with ``code``; the error."""
    with pytest.raises(http2.RpcError) as info, trio.fail_after(timeout + 5):
        await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=timeout)
    assert info.value.code() == code
    return info.value


async def range_works(kv: Any) -> None:
    assert (await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)).count == 1


# -- pure parts -----------------------------------------------------------------------------


def test_request_header_blocks_decode_as_sent() -> None:
    long_path = "/etcdserverpb.KV/" + "x" * 300
    block = h2wire.request_block(long_path, "127.0.0.1:2379", tls=False)
    block += h2wire.literal(b"grpc-timeout", h2wire.grpc_timeout(5))
    block += h2wire.literal(b"token", b"t" * 5000)
    assert hpack.Decoder(max_header_list_size=1 << 20).decode(block, raw=True) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", long_path.encode()),
        (b":authority", b"127.0.0.1:2379"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"user-agent", b"clusterkit-http2"),
        (b"grpc-timeout", b"5000000u"),
        (b"token", b"t" * 5000),
    ]
    assert (b":scheme", b"https") in list(
        hpack.Decoder().decode(h2wire.request_block("/a/B", "h:1", tls=True), raw=True)
    )


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(1e-7, b"1u"), (5, b"5000000u"), (99.999999, b"99999999u"), (1000, b"1000000m"),
     (1e6, b"1000000S"), (1e9, b"16666667M"), (1e12, b"99999999H")],
)  # fmt: skip
def test_grpc_timeout_fits_eight_digits(seconds: float, expected: bytes) -> None:
    assert h2wire.grpc_timeout(seconds) == expected


# -- against the h2 server ------------------------------------------------------------------


async def test_a_unary_call_and_what_the_server_saw() -> None:
    async with fake_server() as server:
        kv = kv_stub(server)
        resp = await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5, metadata=[("token", "t")])
        assert resp.kvs[0].key == b"k" and resp.count == 1
        resp = await kv.Range(rpc_pb2.RangeRequest(key=b"k2"), timeout=5)
        assert resp.kvs[0].key == b"k2"
        assert server.connections == 1
        first = server.requests[0]
        assert first[b":path"] == b"/etcdserverpb.KV/Range"
        assert first[b"content-type"] == b"application/grpc"
        assert first[b"te"] == b"trailers"
        assert first[b"token"] == b"t"
        assert first[b"grpc-timeout"].endswith(b"u")


async def test_responses_split_across_frames_with_padding() -> None:
    async with fake_server() as server:

        def split(conn: ServerConn, sid: int, body: bytes) -> None:
            kv = kv_pb2.KeyValue(key=b"k", value=bytes(range(256)) * 40)
            data = message(rpc_pb2.RangeResponse(kvs=[kv]))
            h = conn.h2
            h.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            for i in range(0, len(data), 1000):
                h.send_data(sid, data[i : i + 1000], pad_length=7)
            h.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)

        server.handle = split
        resp = await kv_stub(server).Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
        assert resp.kvs[0].value == bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("answer", "code", "details"),
    [
        (dict(status=5, details="lease%20not%20found", trailers_only=True), "NOT_FOUND",
         "lease not found"),
        (dict(status=9, details="x"), "FAILED_PRECONDITION", "x"),
        (dict(http_status=503, trailers_only=True, status=-1), "UNAVAILABLE", "HTTP status 503"),
    ],
)  # fmt: skip
async def test_error_statuses(answer: dict[str, Any], code: str, details: str) -> None:
    async with fake_server() as server:

        def refuse(conn: ServerConn, sid: int, body: bytes) -> None:
            if answer.get("status") == -1:  # no grpc-status at all
                status = str(answer["http_status"]).encode()
                conn.h2.send_headers(sid, [(b":status", status)], end_stream=True)
            else:
                conn.respond(sid, **answer)

        server.handle = refuse
        with pytest.raises(http2.RpcError) as info:
            await kv_stub(server).Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
        assert info.value.code() == getattr(grpc.StatusCode, code)
        assert details in info.value.details()


async def test_a_refused_stream_is_unavailable_and_the_connection_goes_on() -> None:
    async with fake_server() as server:
        refuse = [True]

        def maybe_reset(conn: ServerConn, sid: int, body: bytes) -> None:
            if refuse.pop() if refuse else False:
                conn.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                FakeServer.ok(conn, sid, body)

        server.handle = maybe_reset
        kv = kv_stub(server)
        await range_fails(kv, grpc.StatusCode.UNAVAILABLE)
        await range_works(kv)
        assert server.connections == 1


async def test_goaway_fails_what_the_server_did_not_take_and_a_new_connection_serves() -> None:
    async with fake_server() as server:
        held: list[tuple[ServerConn, int]] = []

        def hold(conn: ServerConn, sid: int, body: bytes) -> None:
            held.append((conn, sid))
            if len(held) == 3:  # answer stream 1, refuse 3 and 5 with GOAWAY(last=1)
                FakeServer.ok(conn, 1, body)
                conn.h2.close_connection(last_stream_id=1)

        server.handle = hold
        kv = kv_stub(server)
        outcomes: list[str] = []

        async def call() -> None:
            try:
                await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
                outcomes.append("ok")
            except http2.RpcError as exc:
                outcomes.append(exc.code().name)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(call)
        assert sorted(outcomes) == ["UNAVAILABLE", "UNAVAILABLE", "ok"]
        server.handle = FakeServer.ok
        await range_works(kv)
        assert server.connections == 2


async def test_garbage_from_the_server_fails_the_connection_not_the_channel() -> None:
    async with fake_server() as server:
        sent_garbage = [False]

        def garbage(conn: ServerConn, sid: int, body: bytes) -> None:
            if not sent_garbage[0]:
                sent_garbage[0] = True
                # A DATA frame for stream 0 with a length longer than what follows, then junk.
                conn.h2._data_to_send += b"\x00\x00\x05\x01\x04\x00\x00\x00\x01\xff\xff\xff\xff\xff"
            else:
                FakeServer.ok(conn, sid, body)

        server.handle = garbage
        kv = kv_stub(server)
        await range_fails(kv, grpc.StatusCode.UNAVAILABLE)
        await range_works(kv)
        assert server.connections == 2


async def test_a_deadline_resets_the_stream_and_the_connection_stays() -> None:
    async with fake_server() as server:
        server.handle = lambda conn, sid, body: None  # never answers
        channel = server.channel()
        kv = rpc_pb2_grpc.KVStub(channel)
        await range_fails(kv, grpc.StatusCode.DEADLINE_EXCEEDED, timeout=0.2)
        with trio.fail_after(5):
            while not server.resets:
                await trio.sleep(0.01)
        assert server.resets == [h2.errors.ErrorCodes.CANCEL]
        assert channel.cancelled == 1
        server.handle = FakeServer.ok
        await range_works(kv)
        assert server.connections == 1


async def test_a_cancelled_caller_resets_its_stream() -> None:
    async with fake_server() as server:
        server.handle = lambda conn, sid, body: None
        channel = server.channel()
        kv = rpc_pb2_grpc.KVStub(channel)
        with trio.move_on_after(0.2):
            await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=30)
        with trio.fail_after(5):
            while not server.resets:
                await trio.sleep(0.01)
        assert channel.cancelled == 1
        assert channel.started == channel.finished == 1


async def test_max_concurrent_streams_queues_calls() -> None:
    async with fake_server() as server:
        server.settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
        kv = kv_stub(server)
        await kv.Range(rpc_pb2.RangeRequest(key=b"warm"), timeout=5)  # settings are known
        got: list[bytes] = []

        async def call(i: int) -> None:
            resp = await kv.Range(rpc_pb2.RangeRequest(key=b"%d" % i), timeout=5)
            got.append(resp.kvs[0].key)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(call, i)
        assert sorted(got) == sorted(b"%d" % i for i in range(30))
        assert server.max_open <= 2


async def test_flow_control_both_ways_with_small_server_windows() -> None:
    async with fake_server() as server:
        server.settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000}
        big = bytes(range(256)) * 4000  # ~1 MB: many windows' worth each way

        def echo(conn: ServerConn, sid: int, body: bytes) -> None:
            request = rpc_pb2.PutRequest.FromString(body[5:])
            kv = kv_pb2.KeyValue(key=request.key, value=request.value * 20)
            conn.respond(sid, message(rpc_pb2.RangeResponse(kvs=[kv])))

        server.handle = echo
        channel = server.channel()
        method = channel.unary_unary(
            "/etcdserverpb.KV/Range",
            request_serializer=rpc_pb2.PutRequest.SerializeToString,
            response_deserializer=rpc_pb2.RangeResponse.FromString,
        )
        with trio.fail_after(20):
            resp = await method(rpc_pb2.PutRequest(key=b"k", value=big), timeout=20)
        assert resp.kvs[0].value == big * 20  # 20 MB: past our 16 MiB stream window


async def test_a_response_over_max_receive_is_refused() -> None:
    async with fake_server() as server:

        def large(conn: ServerConn, sid: int, body: bytes) -> None:
            kv = kv_pb2.KeyValue(key=b"k", value=b"x" * 5000)
            conn.respond(sid, message(rpc_pb2.RangeResponse(kvs=[kv])))

        server.handle = large
        channel = server.channel(max_receive=1000)
        kv = rpc_pb2_grpc.KVStub(channel)
        await range_fails(kv, grpc.StatusCode.RESOURCE_EXHAUSTED)
        server.handle = FakeServer.ok
        await range_works(kv)


async def test_a_silent_server_fails_the_connection_by_keepalive() -> None:
    async with fake_server() as server:
        channel = server.channel(keepalive=0.2, keepalive_timeout=0.2)
        kv = rpc_pb2_grpc.KVStub(channel)
        await range_works(kv)
        server.silent = True  # reads everything, answers nothing (not even PING)
        started = trio.current_time()
        error = await range_fails(kv, grpc.StatusCode.UNAVAILABLE, timeout=30)
        assert "keepalive" in error.details()
        assert trio.current_time() - started < 5


async def test_connection_refused_is_unavailable() -> None:
    async with fake_server() as server:
        port = server.port
    async with trio.open_nursery() as nursery:
        kv = rpc_pb2_grpc.KVStub(http2.Channel(f"127.0.0.1:{port}", nursery.start_soon))
        await range_fails(kv, grpc.StatusCode.UNAVAILABLE)


async def test_a_closed_channel_ends_calls_in_flight() -> None:
    async with fake_server() as server:
        server.handle = lambda conn, sid, body: None
        channel = server.channel()
        kv = rpc_pb2_grpc.KVStub(channel)
        errors: list[grpc.StatusCode] = []

        async def call() -> None:
            try:
                await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=30)
            except http2.RpcError as exc:
                errors.append(exc.code())

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                while not server.requests:
                    await trio.sleep(0.01)
                channel.close()
        assert errors == [grpc.StatusCode.CANCELLED]
        with pytest.raises(http2.RpcError):
            await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)


async def test_a_bidi_stream_sends_receives_and_closes() -> None:
    async with fake_server() as server:

        def echo_each(conn: ServerConn, sid: int, buffer: bytearray) -> None:
            if sid not in conn.trailers:
                conn.h2.send_headers(
                    sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                conn.trailers[sid] = []
            while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[1:5], "big"):
                n = 5 + int.from_bytes(buffer[1:5], "big")
                request = rpc_pb2.WatchRequest.FromString(bytes(buffer[5:n]))
                del buffer[:n]
                wid = request.create_request.watch_id
                conn.h2.send_data(sid, message(rpc_pb2.WatchResponse(watch_id=wid, created=True)))

        server.on_data = echo_each
        channel = server.channel()
        watch = rpc_pb2_grpc.WatchStub(channel)
        got: list[int] = []
        ended: list[BaseException | None] = []
        stream = watch.Watch.open(
            metadata=[("hasleader", "true")],
            on_response=lambda r: got.append(r.watch_id),
            on_error=ended.append,
        )
        for i in range(1, 4):
            create = rpc_pb2.WatchCreateRequest(key=b"k", watch_id=i)
            stream.send(rpc_pb2.WatchRequest(create_request=create))
        with trio.fail_after(5):
            while len(got) < 3:
                await trio.sleep(0.01)
        assert got == [1, 2, 3]
        assert server.requests[0][b"hasleader"] == b"true"
        assert b"grpc-timeout" not in server.requests[0]
        stream.release(3)
        await stream.aclose()
        assert ended == [None] and stream.closed
        with trio.fail_after(5):
            while not server.resets:
                await trio.sleep(0.01)
        stream.send(rpc_pb2.WatchRequest())  # ignored after the end


async def test_a_bidi_stream_reports_the_end_the_server_gives() -> None:
    async with fake_server() as server:

        def end(conn: ServerConn, sid: int, buffer: bytearray) -> None:
            conn.respond(sid, status=7, details="permission denied", trailers_only=True)

        server.on_data = end
        channel = server.channel()
        ended: list[BaseException | None] = []
        stream = rpc_pb2_grpc.WatchStub(channel).Watch.open(
            metadata=None, on_response=lambda r: None, on_error=ended.append
        )
        stream.send(rpc_pb2.WatchRequest())
        with trio.fail_after(5):
            while not ended:
                await trio.sleep(0.01)
        assert isinstance(ended[0], http2.RpcError)
        assert ended[0].code() == grpc.StatusCode.PERMISSION_DENIED
        assert stream.closed


async def test_tls_with_alpn_h2_and_without() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    for alpn, works in ((["h2"], True), (["http/1.1"], False)):
        async with fake_server() as server:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(context)
            context.set_alpn_protocols(alpn)
            server.ssl_context = context
            client_context = ssl.create_default_context()
            ca.configure_trust(client_context)
            client_context.set_alpn_protocols(["h2"])
            channel = server.channel(context=client_context, server_name="localhost")
            kv = rpc_pb2_grpc.KVStub(channel)
            with trio.fail_after(5):
                if works:
                    resp = await kv.Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
                    assert resp.count == 1
                    assert server.requests[0][b":scheme"] == b"https"
                else:
                    error = await range_fails(kv, grpc.StatusCode.UNAVAILABLE)
                    assert "h2" in error.details()
            channel.close()


async def test_a_bidi_stream_holds_the_server_back_until_messages_are_released() -> None:
    async with fake_server() as server:
        size = 1024 * 1024
        payload = message(rpc_pb2.WatchResponse(watch_id=1, cancel_reason="x" * size))

        def flood(conn: ServerConn, sid: int, buffer: bytearray) -> None:
            if sid in conn.trailers:
                return
            conn.h2.send_headers(
                sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
            )
            conn.pending[sid] = payload * 24
            conn.trailers[sid] = [(b"grpc-status", b"0")]
            conn._send_pending()

        server.on_data = flood
        channel = server.channel()
        got: list[Any] = []
        ended: list[BaseException | None] = []
        stream = rpc_pb2_grpc.WatchStub(channel).Watch.open(
            metadata=None, on_response=got.append, on_error=ended.append
        )
        stream.send(rpc_pb2.WatchRequest())
        with trio.fail_after(10):
            while len(got) < 15:  # what fits in our 16 MiB stream window
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        held = len(got)
        assert held == 15 and not ended  # the server waits for window...
        assert server.conns[0].h2.local_flow_control_window(1) == 0
        assert server.conns[0].pending  # ... with the rest of its messages
        stream.release(held)
        with trio.fail_after(10):
            while not ended:
                if len(got) > held:
                    stream.release(len(got) - held)
                    held = len(got)
                await trio.sleep(0.01)
        assert len(got) == 24
        assert isinstance(ended[0], EOFError)


async def test_a_request_over_max_send_is_refused_before_it_is_sent() -> None:
    async with fake_server() as server:
        kv = kv_stub(server, max_send=1000)
        with pytest.raises(http2.RpcError) as info:
            await kv.Range(rpc_pb2.RangeRequest(key=b"k" * 2000), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await range_works(kv)
        assert [r[b":path"] for r in server.requests] == [b"/etcdserverpb.KV/Range"]


async def test_padding_counts_for_flow_control(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded DATA uses window like data: what we return must include it, or a long padded
    answer stalls once the padding adds up to our window."""
    monkeypatch.setattr(http2, "_STREAM_WINDOW", 65_536)
    async with fake_server() as server:
        server.pad, server.chunk = 255, 1000
        value = bytes(range(256)) * 4000  # 1 MB, with 26% padding: 4x the window in padding

        def large(conn: ServerConn, sid: int, body: bytes) -> None:
            conn.respond(sid, message(rpc_pb2.RangeResponse(kvs=[kv_pb2.KeyValue(value=value)])))

        server.handle = large
        with trio.fail_after(10):
            resp = await kv_stub(server).Range(rpc_pb2.RangeRequest(key=b"k"), timeout=10)
        assert resp.kvs[0].value == value
