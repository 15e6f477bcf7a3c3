"""The committed protobuf/gRPC modules are current, import cleanly, and speak etcd's wire names."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATE_SCRIPT = REPO_ROOT / "protos" / "generate.py"

GENERATED_MODULES = (
    "clusterkit._etcd.pb.mvccpb.kv_pb2",
    "clusterkit._etcd.pb.mvccpb.kv_pb2_grpc",
    "clusterkit._etcd.pb.authpb.auth_pb2",
    "clusterkit._etcd.pb.authpb.auth_pb2_grpc",
    "clusterkit._etcd.pb.etcdserverpb.rpc_pb2",
    "clusterkit._etcd.pb.etcdserverpb.rpc_pb2_grpc",
    "clusterkit._migration.pb.migration_pb2",
    "clusterkit._migration.pb.migration_pb2_grpc",
    "clusterkit._grpc.pb.health_pb2",
    "clusterkit._grpc.pb.health_pb2_grpc",
)


def _load_generate_script() -> ModuleType:
    """Import protos/generate.py (a script, not a package module) by path."""
    name = "_clusterkit_protos_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GENERATE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _grpc_generated_version(files: dict[str, bytes]) -> set[str]:
    found: set[bytes] = set()
    for name, content in files.items():
        if name.endswith("_pb2_grpc.py"):
            found.update(re.findall(rb"GRPC_GENERATED_VERSION = '([^']+)'", content))
    return {v.decode() for v in found}


def test_committed_stubs_match_protos(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("grpc_tools")
    gen = _load_generate_script()
    expected: dict[str, bytes] = gen.generate(tmp_path)
    committed: dict[str, bytes] = gen.committed_files(REPO_ROOT)

    assert expected, "generate() produced nothing"
    for name, content in expected.items():
        assert (tmp_path / name).read_bytes() == content

    diff = gen.compare(expected, committed)
    if diff:
        made_with = _grpc_generated_version(committed)
        running = _grpc_generated_version(expected)
        hint = (
            f" (committed code was generated with grpcio-tools {sorted(made_with)}, "
            f"this run used {sorted(running)}: regenerate with the same version)"
            if made_with != running
            else ""
        )
        pytest.fail(
            f"generated modules are out of date{hint}; run `python protos/generate.py`.\n"
            f"stale: {diff.stale}\nmissing: {diff.missing}\nextra: {diff.extra}"
        )


def test_generation_is_deterministic(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("grpc_tools")
    gen = _load_generate_script()
    first: dict[str, bytes] = gen.generate(tmp_path / "a")
    second: dict[str, bytes] = gen.generate(tmp_path / "b")
    assert first == second


def test_generated_modules_import_without_warnings() -> None:
    # A fresh interpreter, so that modules already imported by other tests cannot hide a
    # warning (e.g. protobuf's gencode/runtime version check) raised at import time.
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, *GENERATED_MODULES],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


class _RecordingChannel:
    """Stands in for a grpc.Channel: records the method paths a stub registers."""

    def __init__(self) -> None:
        self.methods: dict[str, str] = {}

    def _record(self, kind: str) -> Any:
        def register(method: str, *args: Any, **kwargs: Any) -> object:
            self.methods[method] = kind
            return object()

        return register

    def __getattr__(self, kind: str) -> Any:
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


def test_etcd_stub_method_paths() -> None:
    grpc = pytest.importorskip("grpc")
    from clusterkit._etcd.pb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = rpc_pb2_grpc.KVStub(channel)
        assert callable(stub.Range)

    assert rpc_pb2.DESCRIPTOR.package == "etcdserverpb"
    assert rpc_pb2.DESCRIPTOR.services_by_name["KV"].full_name == "etcdserverpb.KV"

    recorder = _RecordingChannel()
    for service in ("KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth"):
        getattr(rpc_pb2_grpc, f"{service}Stub")(recorder)
    expected = {
        "/etcdserverpb.KV/Range": "unary_unary",
        "/etcdserverpb.KV/Put": "unary_unary",
        "/etcdserverpb.KV/DeleteRange": "unary_unary",
        "/etcdserverpb.KV/Txn": "unary_unary",
        "/etcdserverpb.KV/Compact": "unary_unary",
        "/etcdserverpb.Watch/Watch": "stream_stream",
        "/etcdserverpb.Lease/LeaseGrant": "unary_unary",
        "/etcdserverpb.Lease/LeaseRevoke": "unary_unary",
        "/etcdserverpb.Lease/LeaseKeepAlive": "stream_stream",
        "/etcdserverpb.Lease/LeaseTimeToLive": "unary_unary",
        "/etcdserverpb.Lease/LeaseLeases": "unary_unary",
        "/etcdserverpb.Cluster/MemberList": "unary_unary",
        "/etcdserverpb.Maintenance/Status": "unary_unary",
        "/etcdserverpb.Auth/AuthEnable": "unary_unary",
        "/etcdserverpb.Auth/AuthDisable": "unary_unary",
        "/etcdserverpb.Auth/Authenticate": "unary_unary",
        "/etcdserverpb.Auth/UserAdd": "unary_unary",
        "/etcdserverpb.Auth/UserGrantRole": "unary_unary",
        "/etcdserverpb.Auth/RoleAdd": "unary_unary",
        "/etcdserverpb.Auth/RoleGrantPermission": "unary_unary",
    }
    assert recorder.methods == expected


def test_etcd_message_fields() -> None:
    from clusterkit._etcd.pb.etcdserverpb import rpc_pb2
    from clusterkit._etcd.pb.mvccpb import kv_pb2

    compare = rpc_pb2.Compare.DESCRIPTOR
    assert compare.fields_by_name["lease"].number == 8
    assert compare.fields_by_name["lease"].containing_oneof.name == "target_union"
    assert compare.fields_by_name["range_end"].number == 64
    assert rpc_pb2.Compare.LEASE == 4

    create = rpc_pb2.WatchCreateRequest.DESCRIPTOR.fields_by_name
    assert {name: create[name].number for name in ("watch_id", "fragment", "prev_kv")} == {
        "watch_id": 7,
        "fragment": 8,
        "prev_kv": 6,
    }
    response = rpc_pb2.WatchResponse.DESCRIPTOR.fields_by_name
    assert response["compact_revision"].number == 5
    assert response["cancel_reason"].number == 6
    assert response["events"].number == 11
    assert kv_pb2.KeyValue.DESCRIPTOR.full_name == "mvccpb.KeyValue"

    # Round trip through the wire format, across the imported kv.proto.
    txn = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=b"k", target=rpc_pb2.Compare.LEASE, lease=7)],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"k", value=b"v"))],
    )
    assert rpc_pb2.TxnRequest.FromString(txn.SerializeToString()) == txn


def test_migration_service() -> None:
    from clusterkit._migration.pb import migration_pb2, migration_pb2_grpc

    assert migration_pb2.DESCRIPTOR.package == "clusterkit.migration.v1"
    recorder = _RecordingChannel()
    migration_pb2_grpc.MigrationServiceStub(recorder)
    assert recorder.methods == {
        "/clusterkit.migration.v1.MigrationService/StreamPartition": "unary_stream",
        "/clusterkit.migration.v1.MigrationService/ReceivePartition": "stream_unary",
    }
    batch = migration_pb2.PartitionBatch(
        partition=3,
        kvs=[migration_pb2.KeyValue(key=b"a", value=b"1", epoch=2)],
        resume_token=b"a",
        last=True,
    )
    decoded = migration_pb2.PartitionBatch.FromString(batch.SerializeToString())
    assert decoded == batch
    assert decoded.kvs[0].HasField("epoch")
    assert not decoded.kvs[0].HasField("version")
