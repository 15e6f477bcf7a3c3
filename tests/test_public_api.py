"""Pins the public surface: adding or removing a name must be a deliberate change here."""

from __future__ import annotations

import clusterkit
import clusterkit.etcd

TOP_LEVEL = {
    "AuthenticationFailed",
    "ClientConfig",
    "ClusterEvent",
    "ClusterKit",
    "ClusterKitError",
    "ClusterMismatch",
    "ClusterNotReady",
    "ClusterView",
    "Config",
    "ConfigError",
    "EmbeddedEtcd",
    "EmbeddedEtcdError",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdConfig",
    "EtcdError",
    "EtcdTimeout",
    "EtcdUnavailable",
    "EventStreamOverflow",
    "GrpcContext",
    "GrpcPool",
    "GrpcServer",
    "InvalidAuthToken",
    "InvalidRequest",
    "MigrationRefused",
    "NoMigrationSink",
    "TrioChannel",
    "LeaderElected",
    "LeaderLost",
    "LeadershipLost",
    "LeaseNotFound",
    "Migration",
    "MigrationEntry",
    "MigrationError",
    "MigrationInterrupted",
    "MigrationProgress",
    "MigrationSourceError",
    "Node",
    "NodeIdConflict",
    "NoMigrationSource",
    "NotLeader",
    "PeerAuthFailed",
    "PeerError",
    "PeerProtocolError",
    "PeerStream",
    "PeerUnreachable",
    "Peers",
    "PartitionAssigned",
    "PartitionUnassigned",
    "PermissionDenied",
    "PreconditionFailed",
    "RemoteError",
    "ReplicaAdded",
    "ReplicaRemoved",
    "ResourceExhausted",
    "RevisionCompacted",
    "RoutingClient",
    "SecretRotationError",
    "SourceRequest",
    "WatchOverflow",
    "open_client",
    "open_cluster",
    "open_embedded_etcd",
    "open_etcd_client",
    "rotate_cluster_secret",
}

ETCD_MODULE = {
    "Compare",
    "DeleteOp",
    "DeleteResult",
    "EtcdClient",
    "EtcdProcess",
    "Event",
    "EventType",
    "GetOp",
    "KeepAlive",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "Member",
    "Op",
    "PutOp",
    "PutResult",
    "RangeResult",
    "ServerTLS",
    "Status",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "find_etcd_binary",
    "open_etcd_client",
    "prefix_end",
}


def test_top_level_exports_exactly_the_public_api() -> None:
    assert set(clusterkit.__all__) == TOP_LEVEL
    public = {n for n in vars(clusterkit) if not n.startswith("_")}
    assert public - {"etcd", "grpc", "testing"} == TOP_LEVEL  # submodules, once imported


def test_etcd_module_exports() -> None:
    assert set(clusterkit.etcd.__all__) == ETCD_MODULE
    for name in ETCD_MODULE:
        assert getattr(clusterkit.etcd, name) is not None


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(clusterkit, n) for n in TOP_LEVEL if n.endswith(("Error", "Failed"))]
    errors += [clusterkit.EtcdUnavailable, clusterkit.EtcdTimeout, clusterkit.RevisionCompacted]
    errors += [clusterkit.NodeIdConflict, clusterkit.LeaseNotFound, clusterkit.InvalidAuthToken]
    errors += [clusterkit.ClusterNotReady, clusterkit.PeerUnreachable]
    errors += [clusterkit.MigrationRefused, clusterkit.NoMigrationSink]
    for err in errors:
        assert issubclass(err, clusterkit.ClusterKitError), err
        assert err.__module__ == "clusterkit"
    assert issubclass(clusterkit.ConfigError, ValueError)


def test_public_objects_have_docstrings() -> None:
    for name in TOP_LEVEL:
        assert getattr(clusterkit, name).__doc__, name
