"""clusterkit: the cluster layer of a distributed data system, for Trio applications.

This module re-exports the public API and nothing else; everything else is private.
The etcd client's value types live in :mod:`clusterkit.etcd`.
"""

from ._cluster import ClusterKit, open_cluster
from ._config import Config
from ._core.records import Node
from ._core.view import ClusterView
from ._errors import (
    AuthenticationFailed,
    ClusterKitError,
    ClusterMismatch,
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
    NodeIdConflict,
    NotLeader,
    PeerError,
    PeerProtocolError,
    PermissionDenied,
    PreconditionFailed,
    ResourceExhausted,
    RevisionCompacted,
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

__all__ = [
    "AuthenticationFailed",
    "ClusterEvent",
    "ClusterKit",
    "ClusterKitError",
    "ClusterMismatch",
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
    "InvalidAuthToken",
    "InvalidRequest",
    "LeaderElected",
    "LeaderLost",
    "LeadershipLost",
    "LeaseNotFound",
    "Node",
    "NodeIdConflict",
    "NotLeader",
    "PartitionAssigned",
    "PartitionUnassigned",
    "PeerError",
    "PeerProtocolError",
    "PermissionDenied",
    "PreconditionFailed",
    "ReplicaAdded",
    "ReplicaRemoved",
    "ResourceExhausted",
    "RevisionCompacted",
    "WatchOverflow",
    "open_cluster",
    "open_embedded_etcd",
    "open_etcd_client",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("clusterkit."):
        _obj.__module__ = "clusterkit"
del _name, _obj
