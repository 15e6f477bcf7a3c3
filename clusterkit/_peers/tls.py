"""TLS contexts for the peer endpoint (optional; the secret handshake runs either way)."""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key``; with ``ca``, clients must present a
    certificate signed by it (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate chain against ``ca``.

    Host names are not checked: nodes are dialed by the address they advertise (often an
    IP), and the cluster secret handshake authenticates the node itself.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.check_hostname = False
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context
