"""Peer authentication: an HMAC challenge-response over a shared cluster secret (pure).

The secret never crosses the wire. The server sends a random 32-byte nonce; the client
answers with its node id, its own nonce, and ``HMAC-SHA256(secret, "client" | server_nonce |
client_nonce | node_id)``; the server checks it in constant time and proves itself with
``HMAC-SHA256(secret, "server" | client_nonce | server_nonce | server_id)``. Both sides'
nonces are fresh, so neither answer can be replayed, and the role labels keep one side's
answer from being reflected as the other's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32


def new_nonce() -> bytes:
    """A fresh random nonce."""
    return secrets.token_bytes(NONCE_BYTES)


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes, node_id: str) -> bytes:
    message = label + b"|" + first + second + b"|" + node_id.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def client_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes, node_id: str) -> bytes:
    """What a client sends to prove it knows the secret."""
    return _mac(secret, b"client", server_nonce, client_nonce, node_id)


def server_mac(secret: bytes, client_nonce: bytes, server_nonce: bytes, server_id: str) -> bytes:
    """What the server sends back to prove it knows the secret too."""
    return _mac(secret, b"server", client_nonce, server_nonce, server_id)


def verify(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of two MACs."""
    return hmac.compare_digest(expected, received)
