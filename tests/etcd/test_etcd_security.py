"""Authentication, authorisation and TLS against real etcd servers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trustme

import clusterkit
from clusterkit.etcd import ServerTLS


async def _enable_auth(endpoints: tuple[str, ...]) -> None:
    async with clusterkit.open_etcd_client(endpoints) as admin:
        await admin.user_add("root", "rootpw")
        await admin.role_add("root")
        await admin.user_grant_role("root", "root")
        await admin.user_add("alice", "alicepw")
        await admin.role_add("alice-rw")
        await admin.role_grant_prefix("alice-rw", "/alice/")
        await admin.user_grant_role("alice", "alice-rw")
        await admin.auth_enable()


async def test_user_limited_to_a_prefix(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        await _enable_auth(server.endpoints)
        cfg = clusterkit.EtcdConfig(server.endpoints, username="alice", password="alicepw")
        assert "alicepw" not in repr(cfg)
        async with clusterkit.open_etcd_client(cfg) as alice:
            assert "alicepw" not in repr(alice)
            await alice.put("/alice/x", "1")
            assert (await alice.get("/alice/x")) is not None
            with pytest.raises(clusterkit.PermissionDenied):
                await alice.put("/bob/x", "1")
            with pytest.raises(clusterkit.PermissionDenied):
                await alice.get("/bob/x")
            with pytest.raises(clusterkit.PermissionDenied):
                async with alice.watch("/bob/", prefix=True):
                    pass  # pragma: no cover
        wrong = clusterkit.EtcdConfig(server.endpoints, username="alice", password="nope")
        with pytest.raises(clusterkit.AuthenticationFailed):
            async with clusterkit.open_etcd_client(wrong):
                pass  # pragma: no cover
        async with clusterkit.open_etcd_client(server.endpoints) as anonymous:
            with pytest.raises(clusterkit.EtcdAuthError):
                await anonymous.put("/alice/y", "1")


@pytest.mark.slow
async def test_expired_token_is_renewed_transparently(etcd_binary: str) -> None:
    # Simple tokens expire after --auth-token-ttl seconds without use.
    async with clusterkit.open_embedded_etcd(
        binary=etcd_binary, extra_args=["--auth-token-ttl", "1"]
    ) as server:
        await _enable_auth(server.endpoints)
        cfg = clusterkit.EtcdConfig(server.endpoints, username="alice", password="alicepw")
        async with clusterkit.open_etcd_client(cfg) as alice:
            await alice.put("/alice/k", "0")
            with trio.fail_after(20):
                i = 0
                while alice.reauthentications == 0:
                    await trio.sleep(1.5)  # idle past the token TTL, then use it
                    i += 1
                    await alice.put("/alice/k", str(i))
            kv = await alice.get("/alice/k")
            assert kv is not None and kv.value == str(i).encode()
            assert alice.reauthentications == 1


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("clusterkit-client")
    d = tmp_path_factory.mktemp("tls")
    files = {
        "ca": d / "ca.pem",
        "server_cert": d / "server.pem",
        "server_key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


@pytest.mark.slow
async def test_mutual_tls(etcd_binary: str, tls_files: dict[str, Path]) -> None:
    f = {k: str(v) for k, v in tls_files.items()}
    tls = ServerTLS(f["ca"], f["server_cert"], f["server_key"], f["client_cert"], f["client_key"])
    async with clusterkit.open_embedded_etcd(binary=etcd_binary, tls=tls) as server:
        cfg = clusterkit.EtcdConfig(
            server.endpoints, ca_cert=f["ca"], cert=f["client_cert"], key=f["client_key"]
        )
        async with clusterkit.open_etcd_client(cfg) as client:
            await client.put("/tls/k", "v")
            async with client.watch("/tls/k") as watch:
                await client.put("/tls/k", "w")
                with trio.fail_after(5):
                    assert (await watch.__anext__()).events[0].kv.value == b"w"
        # Without a client certificate the server refuses us.
        no_cert = clusterkit.EtcdConfig(server.endpoints, ca_cert=f["ca"], dial_timeout=1.0)
        with pytest.raises(clusterkit.EtcdUnavailable):
            async with clusterkit.open_etcd_client(no_cert):
                pass  # pragma: no cover
        # Plain text against a TLS port fails clearly too.
        plain = clusterkit.EtcdConfig(server.endpoints, dial_timeout=1.0)
        with pytest.raises(clusterkit.EtcdUnavailable):
            async with clusterkit.open_etcd_client(plain):
                pass  # pragma: no cover
