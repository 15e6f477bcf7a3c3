"""A plain grpcio program (no clusterkit import) that talks to clusterkit nodes over gRPC.

Run as ``python grpc_interop_client.py WORKDIR SOURCE_ADDR TARGET_ADDR PARTITION SECRET_HEX``.
It compiles ``fixtures/go_readme_migration.proto`` (the Go README's MigrationService) into
WORKDIR, then:

1. asks SOURCE's standard health service, without credentials;
2. calls StreamPartition on SOURCE without credentials (must be UNAUTHENTICATED);
3. streams PARTITION from SOURCE with the call credentials clusterkit documents;
4. pushes those key-values into TARGET with ReceivePartition, one KeyValue per key.

It prints one JSON object with what it saw.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import pathlib
import secrets
import sys
import time

import grpc
from grpc_tools import protoc


def token(secret: bytes, method: str, caller: str) -> str:
    """clusterkit's x-clusterkit-auth token, as its README documents it."""
    stamp = str(int(time.time() * 1000))
    nonce = secrets.token_hex(8)
    message = "|".join(("grpc", method, caller, stamp, nonce)).encode()
    mac = hmac.new(secret, message, hashlib.sha256).hexdigest()
    return f"v1:{caller}:{stamp}:{nonce}:{mac}"


def main() -> None:
    workdir, source, target, partition, secret_hex = sys.argv[1:6]
    secret = bytes.fromhex(secret_hex)
    fixtures = pathlib.Path(__file__).parent / "fixtures"
    status = protoc.main(
        [
            "protoc",
            f"-I{fixtures}",
            f"--python_out={workdir}",
            f"--grpc_python_out={workdir}",
            "go_readme_migration.proto",
        ]
    )
    assert status == 0, status
    sys.path.insert(0, workdir)
    pb = importlib.import_module("go_readme_migration_pb2")
    pb_grpc = importlib.import_module("go_readme_migration_pb2_grpc")
    out: dict[str, object] = {}

    with grpc.insecure_channel(source) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda _: b"",
            response_deserializer=lambda data: data,
        )
        answer = check(None, timeout=5)
        out["health"] = answer.hex()  # field 1 (status) = 1: SERVING is b"\x08\x01"

        stub = pb_grpc.MigrationServiceStub(channel)
        try:
            list(stub.StreamPartition(pb.StreamRequest(partition=int(partition)), timeout=5))
            out["no_credentials"] = "OK"
        except grpc.RpcError as exc:
            out["no_credentials"] = exc.code().name

        method = "/clusterkit.MigrationService/StreamPartition"
        metadata = (("x-clusterkit-auth", token(secret, method, "interop")),)
        kvs = [
            (kv.key.hex(), kv.value.hex())
            for kv in stub.StreamPartition(
                pb.StreamRequest(partition=int(partition)), timeout=10, metadata=metadata
            )
        ]
        out["streamed"] = kvs

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MigrationServiceStub(channel)
        method = "/clusterkit.MigrationService/ReceivePartition"
        metadata = (("x-clusterkit-auth", token(secret, method, "interop")),)
        requests = iter([pb.KeyValue(key=bytes.fromhex(k), value=bytes.fromhex(v)) for k, v in kvs])
        response = stub.ReceivePartition(requests, timeout=10, metadata=metadata)
        out["pushed"] = {"keys": response.keys, "success": response.success}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
