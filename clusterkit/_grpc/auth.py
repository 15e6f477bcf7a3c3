"""gRPC call credentials from the cluster secret (pure).

A gRPC call to a node carries the metadata entry ``x-clusterkit-auth``:
``v1:<caller id>:<unix time ms>:<nonce hex>:<HMAC-SHA256 hex>``, the HMAC keyed with the cluster
secret over ``"grpc" | method | caller | time | nonce``. The secret never crosses the wire. The
node accepts a token made with any secret it accepts (both during a rotation) whose time is
within :data:`MAX_SKEW` of its own clock, and whose method is the one called.

Unlike the peer handshake this is not a challenge-response (a gRPC call has no round trip
before its request), so a token seen on the wire could be replayed for the same method within
the skew window: run gRPC over TLS (``peer_tls_*``) where the network is not trusted, as for
the data itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable

HEADER = "x-clusterkit-auth"
MAX_SKEW = 300.0  # seconds a token's time may differ from the receiver's clock
_MAX_TOKEN = 512


def _mac(secret: bytes, method: str, caller: str, stamp: str, nonce: str) -> str:
    message = "|".join(("grpc", method, caller, stamp, nonce)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def make_token(secret: bytes, method: str, caller: str, now: float | None = None) -> str:
    """The token a caller sends with a call of ``method`` (``/package.Service/Method``)."""
    stamp = str(int((time.time() if now is None else now) * 1000))
    nonce = secrets.token_hex(8)
    return f"v1:{caller}:{stamp}:{nonce}:{_mac(secret, method, caller, stamp, nonce)}"


def verify_token(
    token: str | bytes | None, method: str, accepted: Iterable[bytes], now: float | None = None
) -> str | None:
    """The caller's id if ``token`` is valid for ``method`` under one of ``accepted``, else None."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        return None
    parts = token.split(":")
    if len(parts) != 5 or parts[0] != "v1" or not parts[1]:
        return None
    _, caller, stamp, nonce, mac = parts
    if not stamp.isdigit() or len(stamp) > 16:
        return None
    current = time.time() if now is None else now
    if abs(int(stamp) / 1000 - current) > MAX_SKEW:
        return None
    for secret in accepted:
        if hmac.compare_digest(_mac(secret, method, caller, stamp, nonce), mac):
            return caller
    return None
