"""Connection settings for etcd and the gRPC channels built from them.

Three channels per endpoint, each created lazily and each with a TCP connection of its own:
the unary calls of the "main" lane (KV, maintenance, cluster, auth) on a Trio HTTP/2 channel
(http2.py), and two grpc.aio channels on the loops of the bridges (bridge.py): the watch
stream's, and the "lease" lane's for lease calls and the keepalive stream, so a keepalive
never waits behind bulk traffic in a shared HTTP/2 connection.
Calls go to the *current* endpoint; when it fails
with UNAVAILABLE the client moves on to the next one (round robin), so a cluster with one
member down keeps serving. Channel options are tuned for etcd (the HTTP/2 channel does the
same keepalive by itself):

- keepalive pings every 5 s (etcd's default enforcement minimum; more often earns a GOAWAY
  "too_many_pings") with a short ping timeout, so a silent server — a SIGSTOPped process, a
  dropped network — fails open streams in seconds instead of the ~65 s TCP takes;
- pings only while a call is open (etcd rejects pings without one), but with no limit on pings
  without data, so an idle watch stream is still checked;
- 100 ms reconnect backoff (gRPC's default adds ~1 s after an etcd restart);
- a receive limit far above etcd's 1.5 MiB request limit, for big range answers.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from .._errors import ConfigError
from . import http2
from .pb.etcdserverpb import rpc_pb2_grpc

_KEEPALIVE = 5.0
_KEEPALIVE_TIMEOUT = 2.0
_MAX_RECEIVE = 256 * 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", int(_KEEPALIVE * 1000)),
    ("grpc.keepalive_timeout_ms", int(_KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.http2.ping_timeout_ms", int(_KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", _MAX_RECEIVE),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
)


def _read(value: str | bytes | os.PathLike[str] | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd.

    Args:
        endpoints: ``host:port`` (or ``http(s)://host:port``) of one or more members.
        dial_timeout: seconds to wait for the first answer when connecting.
        request_timeout: the gRPC deadline of each unary call, in seconds.
        ca_cert: PEM CA bundle (a path, or the bytes) to verify the servers; enables TLS.
        cert: PEM client certificate (path or bytes) for mutual TLS.
        key: PEM private key of ``cert`` (path or bytes).
        username: etcd user for password authentication.
        password: that user's password (never shown in ``repr``).
        server_name: TLS server name to check instead of the endpoint's host.
    """

    endpoints: tuple[str, ...]
    dial_timeout: float = 5.0
    request_timeout: float = 5.0
    ca_cert: str | bytes | None = field(default=None, repr=False)
    cert: str | bytes | None = field(default=None, repr=False)
    key: str | bytes | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            object.__setattr__(self, "endpoints", (self.endpoints,))
        else:
            object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if not self.endpoints:
            raise ConfigError("endpoints", "at least one etcd endpoint is required")
        for ep in self.endpoints:
            if not isinstance(ep, str) or not _strip_scheme(ep)[1].rpartition(":")[2].isdigit():
                raise ConfigError("endpoints", f"{ep!r} is not host:port")
        for name in ("dial_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0 seconds")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert", "cert and key must be given together")
        if (self.username is None) != (self.password is None):
            raise ConfigError("username", "username and password must be given together")
        for name in ("ca_cert", "cert", "key"):
            value = getattr(self, name)
            if isinstance(value, str) and not os.path.isfile(value):
                raise ConfigError(name, f"{value!r} is not a readable PEM file")

    @property
    def tls(self) -> bool:
        """True when the channel uses TLS."""
        return (
            self.ca_cert is not None
            or self.cert is not None
            or any(_strip_scheme(ep)[0] == "https" for ep in self.endpoints)
        )


def _strip_scheme(endpoint: str) -> tuple[str, str]:
    scheme, sep, rest = endpoint.partition("://")
    return (scheme, rest) if sep else ("", endpoint)


class Endpoint:
    """One etcd endpoint: where it is and how to open a channel to it.

    TLS material is read here, in the caller's thread, so a bad file fails at once.
    """

    def __init__(self, target: str, config: EtcdConfig) -> None:
        self.target = target
        self.dial_timeout = config.dial_timeout
        self.options: list[tuple[str, Any]] = [
            *CHANNEL_OPTIONS,
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.credentials: grpc.ChannelCredentials | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.server_name = config.server_name
        if config.tls:
            self.ssl_context = _ssl_context(
                _read(config.ca_cert), _read(config.cert), _read(config.key)
            )
            if config.server_name:
                self.options.append(("grpc.ssl_target_name_override", config.server_name))
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(config.ca_cert),
                private_key=_read(config.key),
                certificate_chain=_read(config.cert),
            )

    def open_aio_channel(self) -> grpc.aio.Channel:
        """A new grpc.aio channel to this endpoint (call it on the loop that will use it)."""
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.aio.insecure_channel(self.target, options=self.options)

    def open_http2_channel(self, spawn: Callable[..., object]) -> http2.Channel:
        """A new Trio HTTP/2 channel to this endpoint whose connections run in the nursery
        of ``spawn`` (its ``start_soon``); see http2.py."""
        return http2.Channel(
            self.target,
            spawn,
            context=self.ssl_context,
            server_name=self.server_name,
            keepalive=_KEEPALIVE,
            keepalive_timeout=_KEEPALIVE_TIMEOUT,
            connect_timeout=self.dial_timeout,
            max_receive=_MAX_RECEIVE,
        )

    def __repr__(self) -> str:
        return f"<Endpoint {self.target}>"


def _ssl_context(ca: bytes | None, cert: bytes | None, key: bytes | None) -> ssl.SSLContext:
    """The TLS settings of ``grpc.ssl_channel_credentials`` for an ``ssl`` socket: verify the
    server against ``ca`` (or the system's roots), present ``cert`` when given, ALPN h2."""
    context = ssl.create_default_context(cadata=ca.decode() if ca else None)
    context.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        # ``load_cert_chain`` reads files only: a private directory that lives for the call.
        with tempfile.TemporaryDirectory(prefix="clusterkit-tls-") as tmp:
            cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            context.load_cert_chain(cert_path, key_path)
    return context


class Stubs:
    """Our generated stubs on one channel (grpc.aio's, or http2's for unary methods)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.kv = rpc_pb2_grpc.KVStub(channel)
        self.watch = rpc_pb2_grpc.WatchStub(channel)
        self.lease = rpc_pb2_grpc.LeaseStub(channel)
        self.cluster = rpc_pb2_grpc.ClusterStub(channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(channel)
        self.auth = rpc_pb2_grpc.AuthStub(channel)


class Endpoints:
    """The endpoints of one client, with the one currently in use."""

    def __init__(self, config: EtcdConfig) -> None:
        self._config = config
        self._targets = [_strip_scheme(ep)[1] for ep in config.endpoints]
        self._open: dict[int, Endpoint] = {}
        self._current = 0

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def current(self) -> Endpoint:
        """The endpoint calls go to now."""
        ep = self._open.get(self._current)
        if ep is None:
            ep = self._open[self._current] = Endpoint(self._targets[self._current], self._config)
        return ep

    def failed(self, endpoint: Endpoint) -> None:
        """Move on to the next endpoint if ``endpoint`` is still the current one."""
        if len(self._targets) > 1 and self._open.get(self._current) is endpoint:
            self._current = (self._current + 1) % len(self._targets)
