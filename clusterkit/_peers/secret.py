"""The cluster secret peers authenticate with: from the config, or shared through etcd.

With no ``cluster_secret`` configured, the first node creates 32 random bytes at
``P/secret`` (a Txn that only creates, so racing first nodes agree on one value) and every
node and routing client reads it from there.
"""

from __future__ import annotations

import secrets

from .._core.keys import KeyLayout
from .._errors import PeerAuthFailed
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, Op, RangeResult


def configured_secret(value: str | bytes) -> bytes:
    """The secret bytes of a configured ``cluster_secret``."""
    return value.encode() if isinstance(value, str) else bytes(value)


async def shared_secret(etcd: EtcdClient, layout: KeyLayout, *, create: bool) -> bytes:
    """The secret stored at ``P/secret``, created first if ``create`` and missing.

    Raises:
        PeerAuthFailed: there is none and ``create`` is false (no node has started yet).
    """
    if create:
        fresh = secrets.token_hex(32).encode()
        result = await etcd.txn(
            [Compare.create_revision(layout.secret, "=", 0)],
            [Op.put(layout.secret, fresh)],
            [Op.get(layout.secret)],
        )
        if result.succeeded:
            return fresh
        found = result.responses[0]
        assert isinstance(found, RangeResult)
        kv = found.kvs[0] if found.kvs else None
    else:
        kv = await etcd.get(layout.secret)
    if kv is None or not kv.value:
        raise PeerAuthFailed(
            f"no cluster secret at {layout.secret.decode()}: no node has started (or set "
            "cluster_secret in the config)"
        )
    return kv.value
