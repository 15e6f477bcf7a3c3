"""Config validation: every bad value is refused with the field named, before any I/O."""

from __future__ import annotations

from typing import Any

import pytest

import clusterkit


def test_defaults_follow_the_go_clusterkit() -> None:
    cfg = clusterkit.Config(node_id="n1")
    assert (cfg.http_port, cfg.grpc_port, cfg.partitions, cfg.replica_factor) == (
        8080,
        9000,
        256,
        3,
    )
    assert (cfg.etcd_prefix, cfg.session_ttl, cfg.rebalance_delay) == ("/clusterkit", 10.0, 5.0)
    assert cfg.heartbeat_interval == pytest.approx(10 / 3)
    assert cfg.rebalance_max_delay == 20.0
    assert cfg.metrics_port == 2112 and cfg.etcd_endpoints == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", ""),
        ("node_id", "has/slash"),
        ("node_id", "trailing-newline\n"),
        ("advertise_addr", ""),
        ("http_port", 70000),
        ("http_port", -1),
        ("peer_port", 65536),
        ("peer_port", 8080),  # the application's http_port (the default)
        ("grpc_port", "9000"),
        ("partitions", 0),
        ("partitions", True),
        ("replica_factor", 0),
        ("etcd_endpoints", "127.0.0.1:2379"),
        ("etcd_endpoints", ["no-port"]),
        ("etcd_prefix", "no-slash"),
        ("etcd_prefix", "/"),
        ("session_ttl", 0.5),
        ("session_ttl", float("nan")),
        ("heartbeat_interval", 9.0),
        ("heartbeat_interval", 0),
        ("rebalance_delay", -1),
        ("rebalance_delay", float("nan")),
        ("rebalance_delay", float("inf")),
        ("rebalance_delay", True),
        ("rebalance_max_delay", "soon"),
        ("rebalance_max_delay", float("nan")),
        ("hook_concurrency", 0),
        ("rebalance_max_delay", 1.0),
        ("on_leader_elected", "not callable"),
        ("metadata", {"k": 1}),
        ("metrics_port", 1 << 20),
        ("etcd_dial_timeout", 0),
    ],
)
def test_invalid_values_name_the_field(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"node_id": "n1", field: value}
    with pytest.raises(clusterkit.ConfigError) as info:
        clusterkit.Config(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_etcd_settings_are_checked_in_pairs_and_secrets_hidden() -> None:
    with pytest.raises(clusterkit.ConfigError) as info:
        clusterkit.Config(node_id="n", etcd_endpoints=["127.0.0.1:1"], etcd_username="u")
    assert info.value.field == "etcd_username"
    cfg = clusterkit.Config(
        node_id="n", etcd_endpoints=["127.0.0.1:1"], etcd_username="u", etcd_password="hunter2"
    )
    assert "hunter2" not in repr(cfg) and "hunter2" not in repr(cfg.etcd_config())


def test_missing_tls_files_are_refused_up_front() -> None:
    with pytest.raises(clusterkit.ConfigError) as info:
        clusterkit.Config(
            node_id="n", etcd_endpoints=["127.0.0.1:1"], etcd_ca_cert="/nonexistent/ca.pem"
        )
    assert info.value.field == "etcd_ca_cert"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        clusterkit.Config(node_id="n", partitions=-3)


# Issue 12, item 6: values that used to pass Config and fail later (or unclearly). Each row:
# field, bad value, and a piece of text the error must carry (the path, the bound, ...).
ISSUE_12_ITEM_6 = [
    ("heartbeat_interval", 1e-9, ">= 0.05"),  # the node never finished starting
    ("partitions", 2**20, "request limit"),  # a 4+ MB map, refused by etcd forever
    ("partitions", 70_000, "request limit"),
    ("logger", "x", "logging.Logger"),  # AttributeError at the first log line
    ("peer_tls_ca", "/nonexistent/ca.pem", "/nonexistent/ca.pem"),  # FileNotFoundError
    ("peer_tls_cert", "/nonexistent/cert.pem", "/nonexistent/cert.pem"),
    ("embedded_etcd_binary", 123, "etcd binary"),  # TypeError
    ("embedded_etcd_binary", "/nonexistent/etcd", "/nonexistent/etcd"),
    ("embedded_etcd_dir", 3.5, "directory"),
    ("advertise_addr", "not an address!", "host name or IP"),  # socket.gaierror
    ("advertise_addr", "127.0.0.1:8080", "no port"),
    ("bind_addr", "not an address!", "host name or IP"),
    ("metadata", {"blob": "x" * (2 << 20)}, "65,536"),  # gRPC ResourceExhausted
    ("metadata", {"": "empty key"}, "non-empty"),
    ("session_ttl", 1e12, "<= 3600"),
    ("etcd_endpoints", ["h:99999"], "'h:99999'"),
    ("etcd_endpoints", ["h:0"], "port 1-65535"),
    ("etcd_endpoints", ["not a host:2379"], "host name or IP"),
    ("etcd_endpoints", ["ftp://h:2379"], "host:port"),
    ("etcd_endpoints", [2379], "host:port"),
    ("etcd_endpoints", ["::1:2379"], "host:port"),
    ("etcd_prefix", "/cluster\nkit", "newlines"),
    ("etcd_prefix", "/my cluster", "spaces"),
    ("embedded_etcd_bind", "not an address!", "host:port"),
    ("embedded_etcd_bind", "127.0.0.1:70000", "host:port"),
]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    ISSUE_12_ITEM_6,
    ids=[f"{f}={str(v)[:20]!r}" for f, v, _ in ISSUE_12_ITEM_6],
)
def test_values_that_used_to_fail_later_are_refused_up_front(
    field: str, value: Any, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLUSTERKIT_ETCD_ENDPOINTS", raising=False)
    kwargs: dict[str, Any] = {"node_id": "n1", field: value}
    with pytest.raises(clusterkit.ConfigError) as info:
        clusterkit.Config(**kwargs)  # Config() itself: nothing has touched etcd yet
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid config: {field}: ")
    assert says in info.value.rule


def test_the_bounds_themselves_are_accepted(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked beyond existing")
    cfg = clusterkit.Config(
        node_id="n1",
        session_ttl=3600,
        heartbeat_interval=0.05,
        partitions=68_782,
        metadata={"k": "x" * 60_000},
        advertise_addr="node-1.example.internal",
        bind_addr="0.0.0.0",
        peer_tls_ca=str(ca),
        etcd_endpoints=["[::1]:2379", "https://etcd-0.svc:2379", "10.0.0.1:1"],
        etcd_prefix="/apps/kv-store_v2",
        embedded_etcd_bind="0.0.0.0:2379",
    )
    assert cfg.partitions == 68_782
    with pytest.raises(clusterkit.ConfigError):
        clusterkit.Config(node_id="n1", partitions=68_783)


def test_endpoints_come_from_the_environment_when_the_config_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLUSTERKIT_ETCD_ENDPOINTS", " 127.0.0.1:2379, 127.0.0.2:2379 ,")
    assert clusterkit.Config(node_id="n").etcd_endpoints == ("127.0.0.1:2379", "127.0.0.2:2379")
    given = clusterkit.Config(node_id="n", etcd_endpoints=["127.0.0.9:1"])
    assert given.etcd_endpoints == ("127.0.0.9:1",)  # the config wins
    assert clusterkit.ClientConfig().etcd_endpoints == ("127.0.0.1:2379", "127.0.0.2:2379")
    monkeypatch.setenv("CLUSTERKIT_ETCD_ENDPOINTS", "127.0.0.1:99999")
    with pytest.raises(clusterkit.ConfigError, match="CLUSTERKIT_ETCD_ENDPOINTS") as info:
        clusterkit.Config(node_id="n")
    assert info.value.field == "etcd_endpoints"
    monkeypatch.delenv("CLUSTERKIT_ETCD_ENDPOINTS")
    assert clusterkit.Config(node_id="n").etcd_endpoints == ()  # embedded etcd
    with pytest.raises(clusterkit.ConfigError, match="CLUSTERKIT_ETCD_ENDPOINTS"):
        clusterkit.ClientConfig()


def test_the_secret_comes_from_the_config_a_file_or_the_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    path = tmp_path / "secret"
    path.write_bytes(b"from-a-file-0123456789\n")
    cfg = clusterkit.Config(node_id="n1", cluster_secret_file=str(path))
    assert cfg.resolved_secret == b"from-a-file-0123456789"  # the trailing newline dropped
    assert "0123456789" not in repr(cfg)
    assert dataclasses.replace(cfg, node_id="n2").resolved_secret == cfg.resolved_secret
    client = clusterkit.ClientConfig(etcd_endpoints=["127.0.0.1:2379"], cluster_secret_file=path)
    assert client.resolved_secret == b"from-a-file-0123456789"

    monkeypatch.setenv("CLUSTERKIT_CLUSTER_SECRET", "from-the-environment-0123")
    assert clusterkit.Config(node_id="n1").resolved_secret == "from-the-environment-0123"
    explicit = clusterkit.Config(node_id="n1", cluster_secret="explicit-secret-0123456")
    assert explicit.resolved_secret == "explicit-secret-0123456"  # the config wins
    monkeypatch.setenv("CLUSTERKIT_CLUSTER_SECRET", "short")
    with pytest.raises(clusterkit.ConfigError, match="CLUSTERKIT_CLUSTER_SECRET"):
        clusterkit.Config(node_id="n1")
    monkeypatch.delenv("CLUSTERKIT_CLUSTER_SECRET")
    assert clusterkit.Config(node_id="n1").resolved_secret is None  # the one stored in etcd

    with pytest.raises(clusterkit.ConfigError, match=r"cluster_secret_file.*not both"):
        clusterkit.Config(node_id="n1", cluster_secret="x" * 16, cluster_secret_file=str(path))
    with pytest.raises(clusterkit.ConfigError, match=r"cluster_secret_file.*cannot read"):
        clusterkit.Config(node_id="n1", cluster_secret_file=str(tmp_path / "missing"))
    path.write_bytes(b"tiny\n")
    with pytest.raises(clusterkit.ConfigError, match="cluster_secret_file"):
        clusterkit.Config(node_id="n1", cluster_secret_file=str(path))
