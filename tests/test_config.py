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
