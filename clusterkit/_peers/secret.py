"""The cluster secret peers authenticate with: from the config, or shared through etcd.

Theory of operation
-------------------
With no ``cluster_secret`` configured, the first node creates 32 random bytes at
``P/secret`` (a Txn that only creates, so racing first nodes agree on one value) and every
node and routing client reads it from there.

The stored secret is clusterkit's to keep: every running node holds it in memory and a
:class:`SecretKeeper` watches the key. If it is deleted (an operator's ``etcdctl del``, a
restored backup without it), the first node to see that puts its value back (a Txn on absence,
so several keepers agree); if it is overwritten with another value, the keeper puts the value
the cluster authenticates with back (a Txn on the overwrite's mod_revision) and logs an error:
nodes never adopt a secret they did not start with, so a changed key would otherwise split the
cluster into nodes that cannot authenticate each other. A node that joins while the key is
missing but other nodes are registered waits (bounded) for a running node to restore it
instead of generating a new one; only when nobody does within the wait — every registered
node is gone — does it create a fresh secret.

Rotating the secret of a running cluster is not supported yet: stop every node, delete
``P/secret``, start them again (or configure ``cluster_secret`` explicitly everywhere).
"""

from __future__ import annotations

import logging
import secrets

import trio

from .._core.keys import KeyLayout
from .._errors import EtcdError, PeerAuthFailed
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, EventType, KeyValue, Op, RangeResult

RETRY = 1.0  # seconds between attempts while etcd is unreachable
JOIN_WAIT_POLL = 0.1


def configured_secret(value: str | bytes) -> bytes:
    """The secret bytes of a configured ``cluster_secret``."""
    return value.encode() if isinstance(value, str) else bytes(value)


async def shared_secret(
    etcd: EtcdClient, layout: KeyLayout, *, create: bool, wait_for_restore: float = 0.0
) -> bytes:
    """The secret stored at ``P/secret``, created first if ``create`` and missing.

    With ``create`` and ``wait_for_restore`` > 0, a missing secret is not created at once while
    other nodes are registered: they hold the secret and their keepers restore it, so this
    waits up to ``wait_for_restore`` seconds for it to reappear first.

    Raises:
        PeerAuthFailed: there is none and ``create`` is false (no node has started yet).
    """
    if create:
        kv = await etcd.get(layout.secret)
        if kv is None and wait_for_restore > 0:
            others = await etcd.range(layout.nodes_prefix, prefix=True, count_only=True)
            if others.count > 0:
                with trio.move_on_after(wait_for_restore):
                    while kv is None:
                        await trio.sleep(JOIN_WAIT_POLL)
                        kv = await etcd.get(layout.secret)
        if kv is not None and kv.value:
            return kv.value
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


class SecretKeeper:
    """Actor: keeps ``P/secret`` holding the secret this node authenticates with.

    Attributes:
        restored: how many times this keeper put the secret back (deleted or overwritten).
    """

    def __init__(
        self, etcd: EtcdClient, layout: KeyLayout, secret: bytes, log: logging.Logger
    ) -> None:
        self._etcd = etcd
        self._layout = layout
        self._secret = secret
        self._log = log
        self.restored = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the key for the node's life (never raises for etcd trouble: retries)."""
        task_status.started()
        while True:
            try:
                await self._keep()
            except EtcdError as exc:
                self._log.debug("clusterkit: secret keeper: %s; retrying", exc)
                await trio.sleep(RETRY)

    async def _keep(self) -> None:
        result = await self._etcd.range(self._layout.secret)
        await self._ensure(result.kvs[0] if result.kvs else None)
        async with self._etcd.watch(
            self._layout.secret, start_revision=result.revision + 1
        ) as watch:
            async for batch in watch:
                for event in batch.events:
                    await self._ensure(event.kv if event.type is EventType.PUT else None)

    async def _ensure(self, kv: KeyValue | None) -> None:
        key = self._layout.secret
        if kv is None:
            guard = Compare.create_revision(key, "=", 0)
            what = "was deleted"
        elif kv.value != self._secret:
            guard = Compare.mod_revision(key, "=", kv.mod_revision)
            what = "was overwritten with a value the cluster does not use"
        else:
            return
        result = await self._etcd.txn([guard], [Op.put(key, self._secret)])
        if result.succeeded:
            self.restored += 1
            log = self._log.warning if kv is None else self._log.error
            log(
                "clusterkit: the cluster secret at %s %s; restored the secret the running "
                "nodes authenticate with (rotation is not supported: see clusterkit/_peers/"
                "secret.py)",
                key.decode(),
                what,
            )
