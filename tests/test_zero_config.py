"""Zero-config etcd (issue 12, item 4): a node without endpoints starts an embedded etcd, says
once where other nodes find it (log and ``ck.etcd_endpoints``), can serve it on an address of
its choosing, and nodes and clients given ``$CLUSTERKIT_ETCD_ENDPOINTS`` join that cluster."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

import clusterkit
from clusterkit._etcd.embedded import EtcdProcess, free_port

ENV = "CLUSTERKIT_ETCD_ENDPOINTS"


def zero_config(node_id: str, **overrides: Any) -> clusterkit.Config:
    """A config that names no etcd at all (as the Go README's examples do)."""
    settings: dict[str, Any] = {
        "node_id": node_id,
        "http_port": 0,
        "metrics_port": None,
        "grpc_port": 0,
        "partitions": 16,
        "session_ttl": 2.0,
        "rebalance_delay": 0.2,
    }
    settings.update(overrides)
    return clusterkit.Config(**settings)


def embedded_etcd_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "started an embedded etcd" in r.getMessage()]


async def test_a_second_node_given_the_env_endpoint_joins_the_first_nodes_cluster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    caplog.set_level(logging.INFO, logger="clusterkit")
    first_cfg = zero_config("a")
    assert first_cfg.etcd_endpoints == ()
    async with clusterkit.open_cluster(first_cfg) as a:
        (endpoint,) = a.etcd_endpoints
        assert endpoint.startswith("127.0.0.1:")
        lines = embedded_etcd_lines(caplog)
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert f"{ENV}={endpoint}" in lines[0].getMessage()

        monkeypatch.setenv(ENV, endpoint)  # what the log line tells the operator to do
        second_cfg = zero_config("b")
        assert second_cfg.etcd_endpoints == (endpoint,)
        async with clusterkit.open_cluster(second_cfg) as b:
            assert b.etcd_endpoints == (endpoint,)
            with trio.fail_after(20):
                await a.wait_converged({"a", "b"})
                await b.wait_converged({"a", "b"})
            assert {n.id for n in b.get_nodes()} == {"a", "b"}
            # A routing client needs nothing but the same variable.
            async with clusterkit.open_client(clusterkit.ClientConfig()) as client:
                with trio.fail_after(20):
                    await client.refresh()
                assert set(client.view.nodes) == {"a", "b"}
        assert len(embedded_etcd_lines(caplog)) == 1  # only the first node started one


async def test_the_embedded_etcd_is_served_on_the_chosen_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    port = free_port("127.0.0.2")
    async with clusterkit.open_cluster(
        zero_config("a", embedded_etcd_bind=f"127.0.0.2:{port}")
    ) as ck:
        assert ck.etcd_endpoints == (f"127.0.0.2:{port}",)
        async with clusterkit.open_etcd_client(ck.etcd_endpoints) as etcd:
            kv = await etcd.get(b"/clusterkit/nodes/a")
            assert kv is not None
        # Bound to that address only: the same port on 127.0.0.1 is not etcd.
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) != 0


async def test_a_bare_host_bind_picks_a_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    async with clusterkit.open_cluster(zero_config("a", embedded_etcd_bind="127.0.0.3")) as ck:
        (endpoint,) = ck.etcd_endpoints
        host, _, port = endpoint.rpartition(":")
        assert host == "127.0.0.3" and int(port) > 0


def test_a_wildcard_bind_listens_everywhere_and_advertises_the_dialed_address(
    tmp_path: Path,
) -> None:
    """Checked on the command line only: tests bind loopback addresses, never 0.0.0.0."""
    member = EtcdProcess(
        name="m0",
        binary="etcd",
        data_dir=tmp_path,
        log_path=tmp_path / "log",
        host="127.0.0.1",
        client_port=2379,
        peer_port=2380,
        client_host="node-1.example.internal",
        client_listen="0.0.0.0",
    )
    args = member.args(new_cluster=True)
    listen = args[args.index("--listen-client-urls") + 1]
    advertise = args[args.index("--advertise-client-urls") + 1]
    assert listen == "http://0.0.0.0:2379"
    assert advertise == "http://node-1.example.internal:2379"
    assert member.endpoint == "node-1.example.internal:2379"
    assert args[args.index("--listen-peer-urls") + 1] == "http://127.0.0.1:2380"  # raft: local
