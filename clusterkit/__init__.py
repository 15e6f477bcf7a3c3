"""clusterkit: the cluster layer of a distributed data system, for Trio applications.

This module re-exports the public API and nothing else; everything else is private.
The etcd client's value types live in :mod:`clusterkit.etcd`.
"""

from ._client import RoutingClient, open_client, rotate_cluster_secret
from ._cluster import ClusterKit, open_cluster
from ._config import ClientConfig, Config
from ._core.records import Node
from ._core.view import ClusterView
from ._errors import (
    AuthenticationFailed,
    ClusterKitError,
    ClusterMismatch,
    ClusterNotReady,
    ConfigError,
    EmbeddedEtcdError,
    EtcdAuthError,
    EtcdError,
    EtcdTimeout,
    EtcdUnavailable,
    EventStreamOverflow,
    InvalidAuthToken,
    InvalidRequest,
    LeadershipLost,
    LeaseNotFound,
    MigrationError,
    MigrationInterrupted,
    MigrationRefused,
    MigrationSourceError,
    NodeIdConflict,
    NoMigrationSink,
    NoMigrationSource,
    NotLeader,
    PeerAuthFailed,
    PeerError,
    PeerProtocolError,
    PeerUnreachable,
    PermissionDenied,
    PreconditionFailed,
    RemoteError,
    ResourceExhausted,
    RevisionCompacted,
    SecretRotationError,
    WatchOverflow,
)
from ._etcd.channel import EtcdConfig
from ._etcd.client import EtcdClient, open_etcd_client
from ._etcd.embedded import EmbeddedEtcd, open_embedded_etcd
from ._events import (
    ClusterEvent,
    LeaderElected,
    LeaderLost,
    PartitionAssigned,
    PartitionUnassigned,
    ReplicaAdded,
    ReplicaRemoved,
)
from ._grpc.channel import GrpcPool, TrioChannel
from ._grpc.server import GrpcContext, GrpcServer
from ._migration.service import Migration
from ._migration.wire import MigrationEntry, MigrationProgress, SourceRequest
from ._peers.service import Peers
from ._peers.session import PeerStream

__all__ = [
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
    "LeaderElected",
    "LeaderLost",
    "LeadershipLost",
    "LeaseNotFound",
    "Migration",
    "MigrationEntry",
    "MigrationError",
    "MigrationInterrupted",
    "MigrationProgress",
    "MigrationRefused",
    "MigrationSourceError",
    "NoMigrationSink",
    "NoMigrationSource",
    "Node",
    "NodeIdConflict",
    "NotLeader",
    "PartitionAssigned",
    "PartitionUnassigned",
    "PeerAuthFailed",
    "PeerError",
    "PeerProtocolError",
    "PeerStream",
    "PeerUnreachable",
    "Peers",
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
    "TrioChannel",
    "WatchOverflow",
    "open_client",
    "open_cluster",
    "open_embedded_etcd",
    "open_etcd_client",
    "rotate_cluster_secret",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("clusterkit."):
        _obj.__module__ = "clusterkit"
del _name, _obj
