"""The node's gRPC server: the Go README's MigrationService, health, app services with Trio
handlers, ck.grpc_channel, push migration, credentials and bad input (real etcd)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pathlib
import sys
from collections.abc import AsyncIterator, Sequence
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest
import trio
import trio.lowlevel
import trustme
from cluster_helpers import node_config, start_node
from grpc_tools import protoc
from tcp_proxy import open_proxy

import clusterkit
import clusterkit.grpc as cgrpc
from clusterkit import MigrationEntry, SourceRequest
from clusterkit._grpc.pb import health_pb2, health_pb2_grpc
from clusterkit._migration.pb import migration_pb2, migration_pb2_grpc

HERE = pathlib.Path(__file__).parent
SECRET = "0123456789abcdef-grpc-test"


def _config(
    node_id: str, endpoints: Sequence[str], prefix: str, **overrides: Any
) -> clusterkit.Config:
    settings: dict[str, Any] = {
        "partitions": 8,
        "replica_factor": 2,
        "cluster_secret": SECRET,
    }
    settings.update(overrides)
    return node_config(node_id, endpoints, prefix, **settings)


def _data(partition: int, n: int) -> dict[bytes, bytes]:
    return {b"p%d-%05d" % (partition, i): b"v%d" % i * 3 for i in range(n)}


def _serve_source(ck: clusterkit.ClusterKit, data: dict[bytes, bytes]) -> None:
    @ck.migration.source
    async def source(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
        for key in sorted(data):
            if request.after is None or key > request.after:
                yield MigrationEntry(key, data[key])


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """The test app's stubs, compiled from fixtures/echo_service.proto."""
    out = tmp_path_factory.mktemp("echo")
    status = protoc.main(
        [
            "protoc",
            f"-I{HERE / 'fixtures'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "echo_service.proto",
        ]
    )
    assert status == 0
    sys.path.insert(0, str(out))
    try:
        return (
            importlib.import_module("echo_service_pb2"),
            importlib.import_module("echo_service_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


class EchoServicer:
    """Trio handlers of every arity, plus ones that block, fail and abort."""

    def __init__(self, pb: ModuleType) -> None:
        self.pb = pb
        self.calls = 0
        self.started = trio.Event()
        self.cancelled = trio.Event()

    async def Say(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if request.text == "block":
            self.started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled.set()
                raise
        if request.text == "fail":
            raise RuntimeError("secret detail")
        if request.text == "abort":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not here")
        await trio.lowlevel.checkpoint()  # Trio code runs here
        return self.pb.Msg(text=f"{context.caller}:{request.text}", n=request.n + 1)

    async def Count(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for i in range(request.n):
            yield self.pb.Msg(n=i)

    async def Sum(self, requests: AsyncIterator[Any], context: Any) -> Any:
        total = 0
        async for message in requests:
            total += message.n
        return self.pb.Msg(n=total)

    async def Chat(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for message in requests:
            yield self.pb.Msg(text=message.text.upper())


async def test_app_service_every_arity_with_trio_handlers(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, echo: tuple[ModuleType, ModuleType]
) -> None:
    pb, pb_grpc = echo
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        servicer = EchoServicer(pb)
        added = a.ck.add_grpc_service(pb_grpc.add_EchoServicer_to_server, servicer)
        assert added == [f"/clusterkit.test.echo.Echo/{m}" for m in ("Chat", "Count", "Say", "Sum")]
        with pytest.raises(ValueError, match="already served"):
            a.ck.add_grpc_service(pb_grpc.add_EchoServicer_to_server, servicer)
        stub = pb_grpc.EchoStub(b.ck.grpc_channel("a"))
        with trio.fail_after(20):
            reply = await stub.Say(pb.Msg(text="hi", n=41), timeout=5)
            assert (reply.text, reply.n) == ("b:hi", 42)  # the caller is authenticated as b
            assert [m.n async for m in stub.Count(pb.Msg(n=5))] == [0, 1, 2, 3, 4]

            async def numbers() -> AsyncIterator[Any]:
                for i in range(100):
                    yield pb.Msg(n=i)

            assert (await stub.Sum(numbers())).n == sum(range(100))
            chat = stub.Chat()
            async with chat:
                for word in ("x", "y"):
                    await chat.write(pb.Msg(text=word))
                await chat.done_writing()
                assert [m.text async for m in chat] == ["X", "Y"]

            # Errors: the handler's exception is UNKNOWN with its class name only; abort keeps
            # its code; a method nobody serves is UNIMPLEMENTED.
            with pytest.raises(grpc.RpcError) as failed:
                await stub.Say(pb.Msg(text="fail"))
            assert failed.value.code() == grpc.StatusCode.UNKNOWN
            assert "RuntimeError" in failed.value.details()
            assert "secret detail" not in failed.value.details()
            with pytest.raises(grpc.RpcError) as aborted:
                await stub.Say(pb.Msg(text="abort"))
            assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert aborted.value.details() == "not here"
            with pytest.raises(grpc.RpcError) as missing:
                await pb_grpc.EchoStub(a.ck.grpc_channel("b")).Say(pb.Msg(text="hi"))
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED

            # Cancelling the caller cancels the Trio handler.
            with trio.move_on_after(0.5):
                await stub.Say(pb.Msg(text="block"))
            assert servicer.started.is_set()
            await servicer.cancelled.wait()
            assert a.ck.grpc_server is not None
            while a.ck.grpc_server.statistics()["active"]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_stopping_the_node_cancels_handlers_in_flight(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, echo: tuple[ModuleType, ModuleType]
) -> None:
    pb, pb_grpc = echo
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        servicer = EchoServicer(pb)
        a.ck.add_grpc_service(pb_grpc.add_EchoServicer_to_server, servicer)
        stub = pb_grpc.EchoStub(b.ck.grpc_channel("a"))
        outcome: list[grpc.StatusCode] = []

        async def call() -> None:
            try:
                await stub.Say(pb.Msg(text="block"), timeout=30)
            except grpc.RpcError as exc:
                outcome.append(exc.code())

        with trio.fail_after(20):
            nursery.start_soon(call)
            await servicer.started.wait()
            await a.stop()
            assert servicer.cancelled.is_set()
            while not outcome:
                await trio.sleep(0.01)
        assert outcome[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        nursery.cancel_scope.cancel()


async def test_go_readme_client_streams_and_pushes_from_another_process(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tmp_path: pathlib.Path
) -> None:
    data = _data(3, 300)
    received: list[tuple[int, bytes, bytes]] = []
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        _serve_source(a.ck, data)

        @b.ck.migration.sink
        async def sink(partition: int, entries: list[MigrationEntry]) -> None:
            received.extend((partition, e.key, e.value) for e in entries)

        with trio.fail_after(60):
            result = await trio.run_process(
                [
                    sys.executable,
                    str(HERE / "grpc_interop_client.py"),
                    str(tmp_path),
                    a.ck.node.grpc_addr(),
                    b.ck.node.grpc_addr(),
                    "3",
                    SECRET.encode().hex(),
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        out = json.loads(result.stdout)
        assert out["health"] == "0801"  # SERVING
        assert out["no_credentials"] == "UNAUTHENTICATED"
        streamed = [(bytes.fromhex(k), bytes.fromhex(v)) for k, v in out["streamed"]]
        assert streamed == sorted(data.items())
        assert out["pushed"] == {"keys": 300, "success": True}
        # A plain client's keys go to the sink under each key's own partition.
        assert sorted((k, v) for _, k, v in received) == sorted(data.items())
        assert {p for p, _, _ in received} == {b.ck.get_partition(k) for k in data}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["peer", "grpc"])
async def test_push_resumes_and_is_fenced_by_epoch(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, transport: str
) -> None:
    data = _data(1, 2000)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        _serve_source(a.ck, data)
        applied: dict[bytes, bytes] = {}
        stalls = [1]  # the sink stalls once, mid-transfer, longer than the pusher waits

        @b.ck.migration.sink
        async def sink(partition: int, entries: list[MigrationEntry]) -> None:
            assert partition == 1
            if len(applied) >= 700 and stalls:
                stalls.pop()
                await trio.sleep(30)
            for e in entries:
                assert e.key not in applied  # every key exactly once, across the resume
                applied[e.key] = e.value

        with trio.fail_after(30):
            progress = await a.ck.migration.push(
                1, "b", batch_keys=100, stall_timeout=1.0, transport=transport
            )
        assert progress.complete and progress.resumes >= 1
        assert applied == data

        with trio.fail_after(10), pytest.raises(clusterkit.MigrationRefused) as failed:
            await a.ck.migration.push(1, "b", source=_failing_sink_source, transport=transport)
        assert failed.value.remote_type == "AssertionError"  # the sink's own exception

        epochs = {p: b.ck.leader_epoch(p) for p in range(8)}
        partition, epoch = next((p, e) for p, e in epochs.items() if e)
        with trio.fail_after(10), pytest.raises(clusterkit.MigrationRefused) as stale:
            await a.ck.migration.push(
                partition, "b", source=_empty, epoch=epoch - 1, transport=transport
            )
        assert stale.value.remote_type == "StaleEpoch"
        with trio.fail_after(10), pytest.raises(clusterkit.NoMigrationSink):
            await b.ck.migration.push(1, "a", transport=transport, source=_empty)
        nursery.cancel_scope.cancel()


async def _failing_sink_source(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
    yield MigrationEntry(b"p1-00000", b"again")  # already applied: the test sink asserts


async def _empty(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
    return
    yield


@pytest.mark.parametrize("transport", ["peer", "grpc"])
async def test_pull_over_either_transport_resumes_after_a_break(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, transport: str
) -> None:
    data = _data(2, 3000)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        served = [0]

        @a.ck.migration.source
        async def source(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
            served[0] += 1
            for i, key in enumerate(
                sorted(k for k in data if request.after is None or k > request.after)
            ):
                if served[0] == 1 and i == 1500:
                    raise ConnectionResetError  # only a break of the first stream
                yield MigrationEntry(key, data[key])

        got: list[bytes] = []

        async def sink(partition: int, entries: list[MigrationEntry]) -> None:
            got.extend(e.key for e in entries)

        with trio.fail_after(30):
            with pytest.raises(clusterkit.MigrationSourceError):
                await b.ck.migration.pull(2, "a", sink, batch_keys=100, transport=transport)
            progress = await b.ck.migration.pull(
                2, "a", sink, batch_keys=100, transport=transport, after=got[-1]
            )
        assert progress.complete and got == sorted(data)
        nursery.cancel_scope.cancel()


async def test_health_serving_then_not_serving_when_cut_off_from_etcd(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with open_proxy(etcd.endpoints[0]) as proxy, trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", [proxy.endpoint], prefix, session_ttl=1.0))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        health = health_pb2_grpc.HealthStub(b.ck.grpc_channel(a.ck.node.grpc_addr()))
        request = health_pb2.HealthCheckRequest()
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        with trio.fail_after(20):
            while (await health.Check(request, timeout=2)).status != serving:
                await trio.sleep(0.05)
            watch = health.Watch(request)
            assert (await watch.read()).status == serving
            proxy.freeze()
            assert (await watch.read()).status == not_serving
            assert (await health.Check(request, timeout=2)).status == not_serving
            proxy.thaw()
            assert (await watch.read()).status == serving
            watch.cancel()
            with pytest.raises(grpc.RpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        nursery.cancel_scope.cancel()


async def test_hostile_callers_get_status_codes_and_the_node_lives(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    data = _data(4, 20_000)
    async with trio.open_nursery() as nursery:
        a = await start_node(
            nursery, _config("a", etcd.endpoints, prefix, grpc_max_calls=64, grpc_max_message=65536)
        )
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix))
        _serve_source(a.ck, data)
        address = a.ck.node.grpc_addr()
        server = a.ck.grpc_server
        assert server is not None

        # Garbage on the port: not HTTP/2 at all.
        for junk in (
            b"\x00" * 64,
            b"GET / HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 100,
        ):
            host, _, port = address.rpartition(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(junk)
                with trio.move_on_after(2):
                    while await stream.receive_some(4096):
                        pass

        stub = migration_pb2_grpc.MigrationServiceStub(b.ck.grpc_channel("a"))
        with trio.fail_after(30):
            # A forged token, and garbage bytes as a request: no handler runs.
            forged = (("x-clusterkit-auth", "v1:b:1:00:" + "0" * 64),)
            with pytest.raises(grpc.RpcError) as denied:
                await stub.StreamPartition(
                    migration_pb2.StreamRequest(partition=4), metadata=forged
                ).read()
            # (our channel adds its own valid token first; grpc keeps both, the node reads the last)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            calls_before = server.statistics()["calls"]

            def raw_calls() -> tuple[grpc.StatusCode, grpc.StatusCode]:
                # A plain grpcio client without credentials, in a thread.
                with grpc.insecure_channel(address) as raw:
                    garbage = raw.unary_unary(
                        "/clusterkit.migration.v1.MigrationService/StreamPartition"
                    )
                    unknown = raw.unary_unary("/no.Such/Method")
                    codes = []
                    for call in (garbage, unknown):
                        try:
                            call(b"\xff\xfe garbage", timeout=5)
                        except grpc.RpcError as exc:
                            codes.append(exc.code())
                    return codes[0], codes[1]

            raw_codes = await trio.to_thread.run_sync(raw_calls)
            assert raw_codes == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)
            assert server.statistics()["calls"] == calls_before
            # Authenticated but malformed: a partition out of range, an oversized message.
            with pytest.raises(grpc.RpcError) as bad:
                await stub.StreamPartition(migration_pb2.StreamRequest(partition=99)).read()
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            big = migration_pb2.KeyValue(key=b"k", value=b"x" * 100_000)

            async def one_big() -> AsyncIterator[Any]:
                yield big

            with pytest.raises(grpc.RpcError) as oversized:
                await stub.ReceivePartition(one_big())
            assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # 1,000 streams that never read: the node bounds the calls it runs at once.
            calls = [
                stub.StreamPartition(migration_pb2.StreamRequest(partition=4)) for _ in range(1000)
            ]
            codes: dict[str, int] = {}

            async def start(call: Any) -> None:
                try:
                    await call.read()  # one message, then never read again
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1

            async with trio.open_nursery() as starting:
                for call in calls:
                    starting.start_soon(start, call)
            # At most grpc_max_calls run; the rest are refused (RESOURCE_EXHAUSTED by the
            # node, UNAVAILABLE when HTTP/2 refuses streams beyond its per-connection limit).
            assert codes.get("OK", 0) <= 64 and sum(codes.values()) == 1000, codes
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, codes
            assert server.statistics()["active"] <= 64
            for call in calls:
                call.cancel()
            while server.statistics()["active"]:
                await trio.sleep(0.02)
            # The node still serves: a full pull over gRPC.
            got: list[bytes] = []

            async def sink(partition: int, entries: list[MigrationEntry]) -> None:
                got.extend(e.key for e in entries)

            await b.ck.migration.pull(4, "a", sink, transport="grpc")
            assert got == sorted(data)
            assert a.ck.is_healthy()
        nursery.cancel_scope.cancel()


def test_grpc_config_is_checked() -> None:
    with pytest.raises(clusterkit.ConfigError, match="grpc_port"):
        clusterkit.Config(node_id="x", http_port=9000, grpc_port=9000)
    with pytest.raises(clusterkit.ConfigError, match="grpc_server"):
        clusterkit.Config(node_id="x", grpc_server=1)  # type: ignore[arg-type]
    with pytest.raises(clusterkit.ConfigError, match="grpc_max_calls"):
        clusterkit.Config(node_id="x", grpc_max_calls=0)
    assert clusterkit.Config(node_id="x", grpc_server=False, grpc_port=9000, http_port=9000)
    assert not math.isnan(clusterkit.Config(node_id="x").grpc_max_message)


async def test_port_in_use_is_a_config_error(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(20), pytest.raises(clusterkit.ConfigError, match="grpc_port"):
            async with clusterkit.open_cluster(
                _config("a", etcd.endpoints, prefix, grpc_port=port)
            ):
                pass


async def test_grpc_server_false_advertises_only(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        a = await start_node(
            nursery, _config("a", etcd.endpoints, prefix, grpc_server=False, grpc_port=9555)
        )
        assert a.ck.node.grpc_addr() == "127.0.0.1:9555"
        assert a.ck.grpc_server is None
        with pytest.raises(clusterkit.ClusterKitError):
            a.ck.grpc_channel("a")
        with pytest.raises(ValueError, match="grpc_server"):
            await a.ck.migration.pull(0, "a", _no_sink, transport="grpc")
        nursery.cancel_scope.cancel()


async def _no_sink(partition: int, entries: list[MigrationEntry]) -> None:
    raise AssertionError


async def test_grpc_over_tls_and_from_a_routing_client(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tmp_path: pathlib.Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    tls = {
        "peer_tls_cert": str(cert_file),
        "peer_tls_key": str(key_file),
        "peer_tls_ca": str(ca_file),
    }
    data = _data(5, 500)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, _config("a", etcd.endpoints, prefix, **tls))
        b = await start_node(nursery, _config("b", etcd.endpoints, prefix, **tls))
        _serve_source(a.ck, data)
        got: list[bytes] = []

        async def sink(partition: int, entries: list[MigrationEntry]) -> None:
            got.extend(e.key for e in entries)

        with trio.fail_after(20):
            await b.ck.migration.pull(5, "a", sink, transport="grpc")
        assert got == sorted(data)

        def plaintext() -> grpc.StatusCode:
            with grpc.insecure_channel(a.ck.node.grpc_addr()) as channel:
                check = channel.unary_unary("/grpc.health.v1.Health/Check")
                try:
                    check(b"", timeout=3)
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        assert await trio.to_thread.run_sync(plaintext) == grpc.StatusCode.UNAVAILABLE

        # A routing client (the Go README's client step: dial the leader's gRPC address).
        client_config = clusterkit.ClientConfig(
            etcd_endpoints=etcd.endpoints,
            etcd_prefix=prefix.rstrip("/"),
            cluster_secret=SECRET,
        )
        async with clusterkit.open_client(client_config) as client:
            health = health_pb2_grpc.HealthStub(await client.grpc_channel("a"))
            with trio.fail_after(10), pytest.raises(grpc.RpcError) as no_tls:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert no_tls.value.code() == grpc.StatusCode.UNAVAILABLE  # it has no CA set
        tls_client = dataclasses.replace(client_config, peer_tls_ca=str(ca_file))
        async with clusterkit.open_client(tls_client) as client:
            stub = migration_pb2_grpc.MigrationServiceStub(await client.grpc_channel("a"))
            with trio.fail_after(10):
                keys = [
                    kv.key
                    async for kv in stub.StreamPartition(migration_pb2.StreamRequest(partition=5))
                ]
        assert keys == sorted(data)
        nursery.cancel_scope.cancel()


async def test_the_go_readme_migration_example_ported(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    """The Go README's "Complete Migration Example", as a Python user writes it: the
    assigned hook pulls from the previous owner with the MigrationService stub."""
    dbs: dict[str, dict[int, dict[bytes, bytes]]] = {"a": {}, "b": {}}
    handles: dict[str, clusterkit.ClusterKit] = {}
    pulled: list[tuple[str, int, int]] = []

    def hooks(me: str) -> dict[str, Any]:
        async def on_partition_assigned(pt: int, prev: clusterkit.Node | None) -> None:
            dbs[me].setdefault(pt, {})
            if prev is None or prev.id == me:
                return
            ck = handles[me]
            stub = cgrpc.migration_pb2_grpc.MigrationServiceStub(ck.grpc_channel(prev))
            n = 0
            async for kv in stub.StreamPartition(cgrpc.migration_pb2.StreamRequest(partition=pt)):
                dbs[me][pt][kv.key] = kv.value
                n += 1
            pulled.append((me, pt, n))

        async def on_partition_unassigned(pt: int, new_owner: clusterkit.Node | None) -> None:
            dbs[me].pop(pt, None)

        return {
            "on_partition_assigned": on_partition_assigned,
            "on_partition_unassigned": on_partition_unassigned,
        }

    def source_for(me: str) -> Any:
        async def source(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
            data = dbs[me].get(request.partition, {})
            for key in sorted(data):
                if request.after is None or key > request.after:
                    yield MigrationEntry(key, data[key])

        return source

    async with trio.open_nursery() as nursery:
        a = await start_node(
            nursery, _config("a", etcd.endpoints, prefix, replica_factor=1, **hooks("a"))
        )
        handles["a"] = a.ck
        a.ck.migration.source(source_for("a"))
        with trio.fail_after(20):
            await a.ck.wait_converged()
            for i in range(400):
                key = b"key-%d" % i
                dbs["a"].setdefault(a.ck.get_partition(key), {})[key] = b"value-%d" % i
            b = await start_node(
                nursery, _config("b", etcd.endpoints, prefix, replica_factor=1, **hooks("b"))
            )
            handles["b"] = b.ck
            b.ck.migration.source(source_for("b"))
            await b.ck.wait_converged(["a", "b"])
            await a.ck.wait_converged(["a", "b"])
            while set(dbs["a"]) & set(dbs["b"]):  # a drops what moved once b has it
                await trio.sleep(0.02)
        moved = {pt for who, pt, _ in pulled if who == "b"}
        assert moved and moved == set(dbs["b"]) == {
            pt for pt in range(8) if b.ck.get_replicas(pt)[0].id == "b"
        }
        merged = {
            k: v
            for parts in (dbs["a"], dbs["b"])
            for data in parts.values()
            for k, v in data.items()
        }
        assert len(merged) == 400  # every key in exactly one place, none lost in the move
        nursery.cancel_scope.cancel()
