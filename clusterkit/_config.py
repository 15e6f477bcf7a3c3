"""Configuration of a clusterkit node (:class:`Config`) and of a routing client.

Field names follow the Go ClusterKit config in snake_case; durations are float seconds.
Every value is checked when the object is built, so a bad config raises
:class:`ConfigError` naming the field and the rule before anything touches etcd.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ._core.keys import valid_node_id
from ._core.records import max_map_bytes
from ._errors import ConfigError
from ._etcd.channel import EtcdConfig

MAP_REQUEST_LIMIT = 1_572_864 - 16_384
"""Bytes a stored partition map may take: etcd's default ``--max-request-bytes`` (1.5 MiB)
less room for the rest of the map's Txn (up to 127 marker deletions)."""

ENV_ETCD_ENDPOINTS = "CLUSTERKIT_ETCD_ENDPOINTS"
ENV_CLUSTER_SECRET = "CLUSTERKIT_CLUSTER_SECRET"
"""Environment variable read when a config gives no ``etcd_endpoints``: comma-separated
``host:port`` of the etcd members (say, the endpoint another node's embedded etcd logged)."""

MIN_HEARTBEAT = 0.05
MAX_SESSION_TTL = 3600.0
MAX_METADATA_BYTES = 64 * 1024

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

Hook = Callable[..., Awaitable[None] | None]
"""A hook: an async function (a plain function is accepted too)."""

HOOK_NAMES = (
    "on_partition_assigned",
    "on_partition_unassigned",
    "on_leader_elected",
    "on_leader_lost",
    "on_replica_added",
    "on_replica_removed",
)


def _port(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(name, "must be a port number 0-65535 (0 picks a free port)")


def positive_seconds(name: str, value: object) -> None:
    """Raise ``ConfigError(name, ...)`` unless ``value`` is a positive, finite number."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(name, "must be a positive number of seconds")


def _check_secret(value: object, field: str = "cluster_secret") -> None:
    if value is None:
        return
    if not isinstance(value, str | bytes) or len(value) < 16:
        raise ConfigError(field, "must be None or a str/bytes of at least 16")


def _resolve_secret(config: Config | ClientConfig) -> None:
    """``cluster_secret``, or else the contents of ``cluster_secret_file``, or else
    ``$CLUSTERKIT_CLUSTER_SECRET`` (None: the secret stored in etcd)."""
    _check_secret(config.cluster_secret)
    path = config.cluster_secret_file
    if path is not None:
        if config.cluster_secret is not None:
            raise ConfigError("cluster_secret_file", "give cluster_secret or this, not both")
        if not isinstance(path, str | os.PathLike):
            raise ConfigError("cluster_secret_file", "must be a path, or None")
        try:
            with open(path, "rb") as fh:
                data = fh.read(4096 + 1)
        except OSError as exc:
            raise ConfigError("cluster_secret_file", f"cannot read {path!s}: {exc}") from None
        if len(data) > 4096:
            raise ConfigError("cluster_secret_file", "must hold at most 4096 bytes")
        secret: str | bytes | None = data.rstrip(b"\r\n")
        _check_secret(secret, "cluster_secret_file")
    elif config.cluster_secret is None and os.environ.get(ENV_CLUSTER_SECRET):
        secret = os.environ[ENV_CLUSTER_SECRET]
        _check_secret(secret, f"${ENV_CLUSTER_SECRET}")
    else:
        secret = config.cluster_secret
    object.__setattr__(config, "resolved_secret", secret)


def valid_host(host: str) -> bool:
    """An IP address (IPv6 possibly in brackets) or a DNS host name (labels of letters,
    digits, ``-`` and ``_``); checked by syntax only, nothing is resolved."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(x) for x in name.split("."))


def parse_host_port(text: str, *, allow_zero: bool = False) -> tuple[str, int] | None:
    """``host:port`` (IPv6 in brackets) -> (host, port), or None when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not valid_host(host):
        return None
    if ":" in host and not host.startswith("["):
        return None  # "::1:2379" is ambiguous: IPv6 goes in brackets
    number = int(port)
    if not (0 if allow_zero else 1) <= number <= 65535:
        return None
    return host.strip("[]"), number


def _check_endpoint(field: str, endpoint: object, source: str = "") -> None:
    if not isinstance(endpoint, str):
        raise ConfigError(field, f"{source}must be host:port strings, got {endpoint!r}")
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    if scheme not in ("", "http", "https") or parse_host_port(rest) is None:
        raise ConfigError(
            field,
            f"{source}{endpoint!r} is not [http(s)://]host:port (a host name or IP address, "
            "port 1-65535)",
        )


def env_etcd_endpoints() -> tuple[str, ...]:
    """The endpoints in ``$CLUSTERKIT_ETCD_ENDPOINTS`` (empty when unset or blank)."""
    raw = os.environ.get(ENV_ETCD_ENDPOINTS, "")
    return tuple(ep.strip() for ep in raw.split(",") if ep.strip())


def _check_etcd_location(config: Config | ClientConfig) -> None:
    """``etcd_endpoints`` (made a tuple; from ``$CLUSTERKIT_ETCD_ENDPOINTS`` when empty) and
    ``etcd_prefix``, shared by both configs."""
    if isinstance(config.etcd_endpoints, str):
        raise ConfigError("etcd_endpoints", "must be a list of host:port strings, not a str")
    try:
        endpoints = tuple(config.etcd_endpoints)
    except TypeError:
        raise ConfigError("etcd_endpoints", "must be a list of host:port strings") from None
    source = ""
    if not endpoints:
        endpoints = env_etcd_endpoints()
        source = f"${ENV_ETCD_ENDPOINTS}: "
    for endpoint in endpoints:
        _check_endpoint("etcd_endpoints", endpoint, source)
    object.__setattr__(config, "etcd_endpoints", endpoints)
    prefix = config.etcd_prefix
    if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.rstrip("/") == "":
        raise ConfigError("etcd_prefix", "must start with '/' and name a non-root prefix")
    if not prefix.isprintable() or any(c.isspace() for c in prefix) or len(prefix) > 256:
        raise ConfigError(
            "etcd_prefix", "must be at most 256 printable characters, without spaces or newlines"
        )


def _check_logger(value: object) -> None:
    if value is not None and not isinstance(value, logging.Logger):
        raise ConfigError("logger", "must be a logging.Logger (logging.getLogger(...)) or None")


def _check_pem_file(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "must be a path to a PEM file, or None")
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ConfigError(name, f"{value!r} is not a readable file")


def _etcd_config(
    config: Config | ClientConfig,
    endpoints: Sequence[str],
    dial_timeout: float,
    request_timeout: float,
) -> EtcdConfig:
    """The etcd client settings (TLS and auth fields are named alike in both configs)."""
    try:
        return EtcdConfig(
            endpoints=tuple(endpoints),
            dial_timeout=dial_timeout,
            request_timeout=request_timeout,
            ca_cert=config.etcd_ca_cert,
            cert=config.etcd_cert,
            key=config.etcd_key,
            username=config.etcd_username,
            password=config.etcd_password,
        )
    except ConfigError as exc:
        raise ConfigError(f"etcd_{exc.field}", exc.rule) from None


def _check_max_message(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 4096 <= value <= 1 << 30:
        raise ConfigError("peer_max_message", "must be an integer from 4096 to 2**30")


def _check_peer_tls(cert: object, key: object, ca: object) -> None:
    for name, value in (("peer_tls_cert", cert), ("peer_tls_key", key), ("peer_tls_ca", ca)):
        _check_pem_file(name, value)
    if (cert is None) != (key is None):
        raise ConfigError("peer_tls_cert", "peer_tls_cert and peer_tls_key go together")


def _check_embedded(config: Config) -> None:
    binary = config.embedded_etcd_binary
    if binary is not None:
        if not isinstance(binary, str | os.PathLike) or not os.fspath(binary):
            raise ConfigError("embedded_etcd_binary", "must be a path to an etcd binary, or None")
        if shutil.which(os.fspath(binary)) is None:
            raise ConfigError(
                "embedded_etcd_binary", f"{os.fspath(binary)!r} is not an executable file"
            )
    data_dir = config.embedded_etcd_dir
    if data_dir is not None:
        if not isinstance(data_dir, str | os.PathLike) or not os.fspath(data_dir):
            raise ConfigError("embedded_etcd_dir", "must be a directory path, or None")
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise ConfigError("embedded_etcd_dir", f"{os.fspath(data_dir)!r} is not a directory")
    bind = config.embedded_etcd_bind
    parsed = None
    if isinstance(bind, str):
        parsed = (
            (bind.strip("[]"), 0) if valid_host(bind) else parse_host_port(bind, allow_zero=True)
        )
    if parsed is None:
        raise ConfigError(
            "embedded_etcd_bind",
            "must be a host or host:port to serve the embedded etcd on (port 0: a free port)",
        )


def _check_metadata(value: object) -> None:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError("metadata", "must map non-empty strings to strings")
    size = len(json.dumps(dict(value), separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ConfigError(
            "metadata",
            f"encodes to {size:,} bytes; at most {MAX_METADATA_BYTES:,} (it is in the node's "
            "etcd record, which every node and client reads)",
        )


@dataclass(frozen=True, kw_only=True)
class Config:
    """Configuration of one clusterkit node.

    Attributes:
        node_id: unique id of this node (1-128 of ``A-Z a-z 0-9 . _ : -``).
        advertise_addr: the address other nodes and clients use to reach this node.
        http_port: port of the node's own HTTP service, which the application serves
            (clusterkit only advertises it: ``node.http_addr()`` is ``http://host:port``, the
            address a request is redirected to); 0 advertises none. Default 8080.
        grpc_port: port of the node's gRPC server, advertised as ``node.grpc_addr()``. The
            server (``grpc_server``) serves the built-in ``MigrationService``, the standard
            health service and the app's services (``ck.add_grpc_service``). 0: a free port.
            Default 9000 (the Go README's; run several nodes on one host with 0 or distinct
            ports).
        grpc_server: serve gRPC on ``grpc_port``. False: do not; ``grpc_port`` (if not 0) is
            only advertised, for an app that runs its own gRPC server there. Default True.
        grpc_max_message: the largest gRPC message each way, in bytes. Default 4 MiB.
        grpc_max_calls: gRPC calls served at once; beyond, ``RESOURCE_EXHAUSTED``.
            Default 256.
        peer_port: port clusterkit's peer endpoint (websocket: ``ck.peers``, migrations,
            routing clients) listens on, advertised as ``node.peer_addr()``. Default 0: a free
            port, found by peers and clients through etcd; set one for firewalls.
        partitions: P, the number of partitions; fixed for the cluster's life. Default 256.
            Bounded so the partition map (one etcd value) stays under etcd's 1.5 MiB request
            limit: up to 68,782 with R=3 (151,322 with R=1, 44,506 with R=5).
        replica_factor: R, replicas per partition; fixed for the cluster's life. Default 3.
        etcd_endpoints: etcd members to use (``host:port``). Empty: the comma-separated
            ``$CLUSTERKIT_ETCD_ENDPOINTS`` if set, else an embedded etcd for this node (which
            logs the endpoint other nodes must use, also ``ck.etcd_endpoints``).
        etcd_prefix: the key prefix of this cluster in etcd. Default ``"/clusterkit"``.
        session_ttl: seconds after which a silent node is considered dead, 1 to 3600.
            Default 10.
        heartbeat_interval: seconds between lease keepalives, 0.05 to session_ttl / 2.
            Default session_ttl / 3.
        rebalance_delay: seconds membership must be quiet before partitions move. Default 5.
        rebalance_max_delay: upper bound on that wait under constant churn.
            Default 4 x rebalance_delay.
        on_partition_assigned, on_partition_unassigned, on_leader_elected, on_leader_lost,
        on_replica_added, on_replica_removed: the six hooks (see the README).
        metadata: free-form strings published in this node's record (at most 64 KiB as JSON).
        logger: a :class:`logging.Logger`. Default ``logging.getLogger("clusterkit")``.
        metrics_port: port of the Prometheus endpoint; 0 picks a free port, None disables it.
            Default 2112.
        etcd_ca_cert, etcd_cert, etcd_key: TLS to etcd (PEM paths or bytes).
        etcd_username, etcd_password: etcd password authentication.
        etcd_dial_timeout: seconds to wait for etcd at start. Default 5.
        etcd_request_timeout: deadline of each etcd call. Default 5.
        embedded_etcd_binary: etcd binary for the embedded etcd (default: see README).
        embedded_etcd_dir: data directory for the embedded etcd (default: temporary).
        embedded_etcd_bind: ``host`` or ``host:port`` the embedded etcd serves clients on, so
            other nodes can use it (``0.0.0.0``: every interface, advertised as
            advertise_addr). Default ``127.0.0.1`` (this machine only), on a free port.
        hook_concurrency: hooks of different partitions that may run at once. Default 16.
        cluster_secret: the secret peers (and routing clients) prove they know when they
            connect (at least 16 bytes). Default None: ``cluster_secret_file``, else
            ``$CLUSTERKIT_CLUSTER_SECRET``, else the first node stores a random one at
            ``P.secret`` (beside the prefix) and everyone reads it from etcd, so read access
            to that key is peer access (``clusterkit secret rotate`` replaces it).
        cluster_secret_file: a file holding the secret (a trailing newline is dropped),
            read when the config is made. Default None.
        bind_addr: the address the peer endpoint listens on. Default: advertise_addr.
        peer_timeout: default deadline of a peer request, in seconds. Default 5.
        peer_tls_cert, peer_tls_key: PEM files: serve the peer endpoint over TLS (wss).
        peer_tls_ca: PEM file: verify peers' TLS certificates (turns TLS on for calls).
        peer_max_message: largest websocket message accepted from an authenticated peer, in
            bytes. Default 16 MiB. Before the handshake has authenticated a connection, its
            messages may be at most 1 KiB.
        peer_max_pending_handshakes: connections accepted but not yet authenticated that may
            exist at once; further ones are refused at once (HTTP 503). Default 128.
    """

    node_id: str
    advertise_addr: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 9000
    peer_port: int = 0
    partitions: int = 256
    replica_factor: int = 3
    etcd_endpoints: Sequence[str] = ()
    etcd_prefix: str = "/clusterkit"
    session_ttl: float = 10.0
    heartbeat_interval: float | None = None
    rebalance_delay: float = 5.0
    rebalance_max_delay: float | None = None
    on_partition_assigned: Hook | None = None
    on_partition_unassigned: Hook | None = None
    on_leader_elected: Hook | None = None
    on_leader_lost: Hook | None = None
    on_replica_added: Hook | None = None
    on_replica_removed: Hook | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    logger: logging.Logger | None = None
    metrics_port: int | None = 2112
    etcd_ca_cert: str | bytes | None = field(default=None, repr=False)
    etcd_cert: str | bytes | None = field(default=None, repr=False)
    etcd_key: str | bytes | None = field(default=None, repr=False)
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    etcd_dial_timeout: float = 5.0
    etcd_request_timeout: float = 5.0
    embedded_etcd_binary: str | None = None
    embedded_etcd_dir: str | None = None
    embedded_etcd_bind: str = "127.0.0.1"
    hook_concurrency: int = 16
    cluster_secret: str | bytes | None = field(default=None, repr=False)
    cluster_secret_file: str | os.PathLike[str] | None = None
    resolved_secret: str | bytes | None = field(default=None, init=False, repr=False, compare=False)
    """The secret in use: ``cluster_secret``, the file's, the environment's, or None (the
    one stored in etcd). Set when the config is made."""
    bind_addr: str | None = None
    peer_timeout: float = 5.0
    peer_tls_cert: str | None = None
    peer_tls_key: str | None = None
    peer_tls_ca: str | None = None
    peer_max_message: int = 16 * 1024 * 1024
    peer_max_pending_handshakes: int = 128
    grpc_server: bool = True
    grpc_max_message: int = 4 * 1024 * 1024
    grpc_max_calls: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not valid_node_id(self.node_id):
            raise ConfigError(
                "node_id", "1-128 characters of A-Z a-z 0-9 . _ : - (no leading symbol)"
            )
        if not isinstance(self.advertise_addr, str) or not valid_host(self.advertise_addr):
            raise ConfigError(
                "advertise_addr", "must be a host name or IP address (no port, no spaces)"
            )
        _port("http_port", self.http_port)
        _port("grpc_port", self.grpc_port)
        _port("peer_port", self.peer_port)
        if self.peer_port and self.peer_port in (self.http_port, self.grpc_port):
            raise ConfigError(
                "peer_port",
                "must differ from http_port and grpc_port: clusterkit's peer endpoint listens "
                "on peer_port, the application serves http_port (earlier versions served the "
                "peer endpoint on http_port)",
            )
        if type(self.grpc_server) is not bool:
            raise ConfigError("grpc_server", "must be True or False")
        if self.grpc_server and self.grpc_port and self.grpc_port == self.http_port:
            raise ConfigError(
                "grpc_port", "must differ from http_port: clusterkit serves gRPC on grpc_port"
            )
        if type(self.grpc_max_message) is not int or not 1024 <= self.grpc_max_message <= 2**30:
            raise ConfigError("grpc_max_message", "must be an integer from 1024 to 2**30")
        if type(self.grpc_max_calls) is not int or not 1 <= self.grpc_max_calls <= 65536:
            raise ConfigError("grpc_max_calls", "must be an integer from 1 to 65536")
        _port("metrics_port", self.metrics_port, allow_none=True)
        for name in ("partitions", "replica_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, "must be an integer >= 1")
        if self.partitions > 1 << 20:
            raise ConfigError("partitions", "must be <= 1048576")
        if max_map_bytes(self.partitions, self.replica_factor) > MAP_REQUEST_LIMIT:
            raise ConfigError(
                "partitions",
                f"with replica_factor={self.replica_factor} the partition map could reach "
                f"{max_map_bytes(self.partitions, self.replica_factor):,} bytes (every "
                "partition moving, up to 1,000 nodes), over etcd's 1.5 MiB request limit (the "
                "map is one etcd value, never split): use fewer partitions or replicas",
            )
        _check_etcd_location(self)
        positive_seconds("session_ttl", self.session_ttl)
        if self.session_ttl < 1:
            raise ConfigError("session_ttl", "must be >= 1 second (etcd leases are whole seconds)")
        if self.session_ttl > MAX_SESSION_TTL:
            raise ConfigError(
                "session_ttl",
                f"must be <= {MAX_SESSION_TTL:.0f} s (a crashed node keeps its partitions and "
                "leaderships this long)",
            )
        if self.heartbeat_interval is None:
            object.__setattr__(self, "heartbeat_interval", self.session_ttl / 3)
        positive_seconds("heartbeat_interval", self.heartbeat_interval)
        assert self.heartbeat_interval is not None
        if self.heartbeat_interval < MIN_HEARTBEAT:
            raise ConfigError(
                "heartbeat_interval", f"must be >= {MIN_HEARTBEAT} s (one keepalive per beat)"
            )
        if self.heartbeat_interval > self.session_ttl / 2:
            raise ConfigError(
                "heartbeat_interval", "must be <= session_ttl / 2 (one lost keepalive is normal)"
            )
        if (
            not isinstance(self.rebalance_delay, int | float)
            or isinstance(self.rebalance_delay, bool)
            or not math.isfinite(self.rebalance_delay)
            or self.rebalance_delay < 0
        ):
            raise ConfigError("rebalance_delay", "must be a finite number of seconds >= 0")
        if self.rebalance_max_delay is None:
            object.__setattr__(self, "rebalance_max_delay", 4 * self.rebalance_delay)
        assert self.rebalance_max_delay is not None
        if (
            not isinstance(self.rebalance_max_delay, int | float)
            or isinstance(self.rebalance_max_delay, bool)
            or not math.isfinite(self.rebalance_max_delay)
            or self.rebalance_max_delay < self.rebalance_delay
        ):
            raise ConfigError("rebalance_max_delay", "must be finite seconds >= rebalance_delay")
        for name in HOOK_NAMES:
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ConfigError(name, "must be a function (async or plain) or None")
        _check_metadata(self.metadata)
        _check_logger(self.logger)
        if (
            not isinstance(self.hook_concurrency, int)
            or isinstance(self.hook_concurrency, bool)
            or self.hook_concurrency < 1
        ):
            raise ConfigError("hook_concurrency", "must be an integer >= 1")
        positive_seconds("etcd_dial_timeout", self.etcd_dial_timeout)
        positive_seconds("etcd_request_timeout", self.etcd_request_timeout)
        if self.etcd_endpoints:
            self.etcd_config()  # validates endpoints, TLS and auth pairs
        _resolve_secret(self)
        if self.bind_addr is not None and (
            not isinstance(self.bind_addr, str) or not valid_host(self.bind_addr)
        ):
            raise ConfigError("bind_addr", "must be a host name or IP address (no port), or None")
        _check_embedded(self)
        positive_seconds("peer_timeout", self.peer_timeout)
        _check_peer_tls(self.peer_tls_cert, self.peer_tls_key, self.peer_tls_ca)
        _check_max_message(self.peer_max_message)
        pending = self.peer_max_pending_handshakes
        if not isinstance(pending, int) or isinstance(pending, bool) or not 1 <= pending <= 65536:
            raise ConfigError("peer_max_pending_handshakes", "must be an integer from 1 to 65536")

    @property
    def log(self) -> logging.Logger:
        """The logger in use."""
        return self.logger or logging.getLogger("clusterkit")

    def etcd_config(self, endpoints: Sequence[str] | None = None) -> EtcdConfig:
        """The etcd client settings of this config (``endpoints`` overrides the list)."""
        chosen = endpoints if endpoints is not None else self.etcd_endpoints
        return _etcd_config(self, chosen, self.etcd_dial_timeout, self.etcd_request_timeout)

    def embedded_etcd_address(self) -> tuple[str, int]:
        """``embedded_etcd_bind`` as (host without brackets, port; 0: a free port)."""
        bind = self.embedded_etcd_bind
        if valid_host(bind):
            return bind.strip("[]"), 0
        parsed = parse_host_port(bind, allow_zero=True)
        assert parsed is not None  # checked in __post_init__
        return parsed

    def hooks(self) -> dict[str, Hook]:
        """The hooks that are set, by name."""
        return {n: h for n in HOOK_NAMES if (h := getattr(self, n)) is not None}


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Configuration of a routing client (:func:`clusterkit.open_client`).

    Attributes:
        etcd_endpoints: etcd members to read the cluster from. Empty: the comma-separated
            ``$CLUSTERKIT_ETCD_ENDPOINTS``; one of the two is required.
        etcd_prefix: the cluster's key prefix. Default ``"/clusterkit"``.
        cache_enabled: keep a watch-updated view of the cluster (default True). False: read
            the cluster from etcd before every routing call that waits (``request``,
            ``refresh``); the plain getters answer from the last read.
        cache_ttl: with the cache on, how old the view may get while its watch is broken
            before ``request`` re-reads it from etcd first. Default 30 s.
        dial_timeout: seconds to wait for etcd at start. Default 5.
        request_timeout: the whole budget of one ``request``, retries included. Default 5.
        cluster_secret: the peers' shared secret. Default None: ``cluster_secret_file``,
            else ``$CLUSTERKIT_CLUSTER_SECRET``, else the one the nodes store at ``P.secret``.
        cluster_secret_file: a file holding the secret (a trailing newline is dropped).
        client_id: the id this client presents to nodes. Default ``client-<random>``.
        peer_tls_ca: PEM file: call nodes over TLS and verify their certificates.
        peer_max_message: largest answer accepted, in bytes; use the nodes' value. Default
            16 MiB.
        etcd_ca_cert, etcd_cert, etcd_key, etcd_username, etcd_password: etcd TLS/auth.
        logger: the logger to use. Default ``logging.getLogger("clusterkit.client")``.
    """

    etcd_endpoints: Sequence[str] = ()
    etcd_prefix: str = "/clusterkit"
    cache_enabled: bool = True
    cache_ttl: float = 30.0
    dial_timeout: float = 5.0
    request_timeout: float = 5.0
    cluster_secret: str | bytes | None = field(default=None, repr=False)
    cluster_secret_file: str | os.PathLike[str] | None = None
    resolved_secret: str | bytes | None = field(default=None, init=False, repr=False, compare=False)
    """The secret in use: ``cluster_secret``, the file's, the environment's, or None (the
    one stored in etcd). Set when the config is made."""
    client_id: str | None = None
    peer_tls_ca: str | None = None
    peer_max_message: int = 16 * 1024 * 1024
    etcd_ca_cert: str | bytes | None = field(default=None, repr=False)
    etcd_cert: str | bytes | None = field(default=None, repr=False)
    etcd_key: str | bytes | None = field(default=None, repr=False)
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    logger: logging.Logger | None = None

    def __post_init__(self) -> None:
        _check_etcd_location(self)
        if not self.etcd_endpoints:
            raise ConfigError(
                "etcd_endpoints",
                f"a client needs at least one etcd endpoint (or ${ENV_ETCD_ENDPOINTS})",
            )
        if not isinstance(self.cache_enabled, bool):
            raise ConfigError("cache_enabled", "must be True or False")
        for name in ("cache_ttl", "dial_timeout", "request_timeout"):
            positive_seconds(name, getattr(self, name))
        _resolve_secret(self)
        if self.client_id is not None and (
            not isinstance(self.client_id, str) or not 0 < len(self.client_id) <= 128
        ):
            raise ConfigError("client_id", "must be 1-128 characters, or None")
        _check_peer_tls(None, None, self.peer_tls_ca)
        _check_max_message(self.peer_max_message)
        _check_logger(self.logger)
        self.etcd_config()

    @property
    def log(self) -> logging.Logger:
        """The logger in use."""
        return self.logger or logging.getLogger("clusterkit.client")

    def etcd_config(self) -> EtcdConfig:
        """The etcd client settings of this config."""
        return _etcd_config(self, self.etcd_endpoints, self.dial_timeout, self.request_timeout)
