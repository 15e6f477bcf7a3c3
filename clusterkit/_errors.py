"""The one exception tree of clusterkit.

Everything clusterkit raises on purpose derives from :class:`ClusterKitError`, so an app can
catch the whole library with one ``except``. The tree::

    ClusterKitError
    ├── ConfigError                 invalid configuration (also a ValueError)
    ├── EmbeddedEtcdError           the embedded etcd could not be found or started
    ├── NodeIdConflict              another live node already uses this node id
    ├── ClusterMismatch             the stored cluster has another P or R than this node
    ├── EventStreamOverflow         an events() subscriber fell too far behind
    ├── ClusterNotReady             no partition map yet: no node has formed the cluster
    ├── PeerError                   talking to another node failed
    │   └── PeerProtocolError       a peer sent something that is not our protocol
    ├── NotLeader                   this node does not lead the partition
    │   └── LeadershipLost          leadership ended inside ``async with ck.leadership(pt)``
    └── EtcdError                   a call to etcd failed
        ├── EtcdUnavailable         no etcd endpoint answered (connection refused, no leader, ...)
        ├── EtcdTimeout             the call's deadline passed
        ├── RevisionCompacted       the requested revision was compacted away
        ├── WatchOverflow           a watch's consumer fell too far behind
        ├── PreconditionFailed      etcd refused the request in the state it is in
        ├── LeaseNotFound           the lease expired or was revoked
        ├── InvalidRequest          etcd rejected the request as malformed or too large
        ├── ResourceExhausted       etcd is rate limiting or out of space
        └── EtcdAuthError           authentication / authorisation
            ├── AuthenticationFailed    wrong user name or password
            ├── InvalidAuthToken        the auth token expired or is unknown
            └── PermissionDenied        the user may not touch that key range
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._migration.wire import MigrationProgress


class ClusterKitError(Exception):
    """Root of every error clusterkit raises on purpose."""


class ConfigError(ClusterKitError, ValueError):
    """A configuration value is invalid.

    Attributes:
        field: the name of the offending field.
        rule: what the field must satisfy.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"invalid config: {field}: {rule}")
        self.field = field
        self.rule = rule


class EmbeddedEtcdError(ClusterKitError):
    """The embedded etcd server could not be found, started, or reached."""


class NodeIdConflict(ClusterKitError):
    """Another live node has already registered this node id."""


class ClusterMismatch(ClusterKitError):
    """The cluster stored in etcd has other fixed parameters (P, R) than this node's config."""


class EventStreamOverflow(ClusterKitError):
    """An ``events()`` subscriber fell too far behind and was dropped."""


class PeerError(ClusterKitError):
    """Talking to another node failed."""


class PeerProtocolError(PeerError):
    """A peer sent bytes or messages outside the protocol; its connection is closed."""


class PeerUnreachable(PeerError):
    """The peer could not be reached, or the connection broke before the answer came."""


class PeerAuthFailed(PeerError):
    """The peer did not prove it knows the cluster secret (or refused ours)."""


class SecretRotationError(PeerError):
    """A rotation of the stored cluster secret cannot be done now (the message says why)."""


class RemoteError(PeerError):
    """The remote handler raised.

    Attributes:
        remote_type: the exception class name on the remote node.
        remote_message: its message.
        data: extra data the remote attached (``NotLeader`` sends ``{"leader": id}``).
    """

    def __init__(self, remote_type: str, remote_message: str, data: object = None) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.data = data


class NotLeader(ClusterKitError):
    """This node does not lead the partition (or no longer does).

    Attributes:
        leader: a hint: the node id this node believes leads the partition, or None. A peer
            handler that raises ``NotLeader(..., leader=...)`` sends the hint to the caller,
            and the routing client tries that node next.
    """

    def __init__(self, message: str = "", *, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class LeadershipLost(NotLeader):
    """Leadership ended while the ``async with ck.leadership(pt)`` block was running; the
    block was cancelled."""


class EtcdError(ClusterKitError):
    """A call to etcd failed.

    Attributes:
        code: the gRPC status code name (e.g. ``"UNAVAILABLE"``), or ``None`` when the error
            was raised by clusterkit itself.
        details: etcd's error message.
    """

    def __init__(self, details: str, *, code: str | None = None) -> None:
        super().__init__(f"{details} [{code}]" if code else details)
        self.code = code
        self.details = details


class EtcdUnavailable(EtcdError):
    """No etcd endpoint could serve the call (down, unreachable, no raft leader)."""


class EtcdTimeout(EtcdError):
    """The call did not complete before its deadline."""


class RevisionCompacted(EtcdError):
    """The requested revision has been compacted.

    Attributes:
        compact_revision: the oldest revision still available, when etcd reported it (a watch
            does); ``0`` when unknown. Re-read the data at a current revision and resume from
            there — resuming from ``compact_revision`` would skip events.
    """

    def __init__(self, details: str, *, compact_revision: int = 0, code: str | None = None):
        super().__init__(details, code=code)
        self.compact_revision = compact_revision


class WatchOverflow(EtcdError):
    """A watch's consumer fell too far behind; the watch was ended to protect the other
    watches sharing its stream. Re-watch from the last event's revision + 1."""


class PreconditionFailed(EtcdError):
    """etcd refused the request because of the state it is in (gRPC FAILED_PRECONDITION)."""


class LeaseNotFound(EtcdError):
    """The lease does not exist any more: it expired or was revoked."""


class InvalidRequest(EtcdError):
    """etcd rejected the request as malformed, out of range, or too large."""


class ResourceExhausted(EtcdError):
    """etcd is rate limiting requests or its storage quota is exhausted."""


class EtcdAuthError(EtcdError):
    """Authentication or authorisation against etcd failed."""


class AuthenticationFailed(EtcdAuthError):
    """The user name or password was rejected."""


class InvalidAuthToken(EtcdAuthError):
    """The auth token is expired or unknown (the client re-authenticates once by itself)."""


class PermissionDenied(EtcdAuthError):
    """The authenticated user may not perform this operation on this key range."""


class ClusterNotReady(ClusterKitError):
    """The cluster has no partition map yet (no node has formed it under this prefix), so
    a routing client cannot tell which partition, or which node, a key belongs to."""


class MigrationError(ClusterKitError):
    """A partition migration (``ck.migration.pull`` or ``push``) failed."""


class NoMigrationSource(MigrationError):
    """The source node has no partition source registered (``ck.migration.source``)."""


class MigrationSourceError(MigrationError):
    """The source node's partition source raised, or broke the stream contract (keys not
    ascending, a malformed batch); not retried.

    Attributes:
        remote_type: the exception class name on the source node (``SourceContractError``
            and ``MalformedBatch`` for contract violations).
        remote_message: its message.
    """

    def __init__(self, remote_type: str, remote_message: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message


class NoMigrationSink(MigrationError):
    """The receiving node of a push has no partition sink registered (``ck.migration.sink``)."""


class MigrationRefused(MigrationError):
    """The receiving node of a push refused it or failed to apply it; not retried.

    Attributes:
        remote_type: ``StaleEpoch`` (the push's epoch is older than the partition's current
            leader epoch there), ``MalformedBatch``, or the class name of the exception the
            receiver's sink raised.
        remote_message: its message.
    """

    def __init__(self, remote_type: str, remote_message: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message


class MigrationInterrupted(MigrationError):
    """The transfer broke more often than ``max_resumes``, or did not finish in ``timeout``.

    Attributes:
        progress: how far it got (a ``MigrationProgress``); ``progress.resume_token``
            continues the transfer: ``ck.migration.pull(..., after=token)``.
    """

    def __init__(self, message: str, *, progress: MigrationProgress) -> None:
        super().__init__(message)
        self.progress = progress
