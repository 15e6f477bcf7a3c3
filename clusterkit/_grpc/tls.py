"""gRPC TLS credentials from the peer endpoint's PEM files (``peer_tls_cert/key/ca``)."""

from __future__ import annotations

import pathlib

import grpc


def _read(path: str) -> bytes:
    return pathlib.Path(path).read_bytes()


def server_tls_credentials(cert: str, key: str, ca: str | None) -> grpc.ServerCredentials:
    """Serve with ``cert``/``key``; with ``ca``, callers must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(ca) if ca is not None else None,
        require_client_auth=ca is not None,
    )


def channel_tls_credentials(ca: str, cert: str | None, key: str | None) -> grpc.ChannelCredentials:
    """Verify servers against ``ca`` (their certificates must name the address dialed);
    present ``cert``/``key`` when given (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca),
        private_key=_read(key) if key is not None else None,
        certificate_chain=_read(cert) if cert is not None else None,
    )
