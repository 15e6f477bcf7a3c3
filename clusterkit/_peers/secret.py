"""The cluster secret peers authenticate with: from the config, or shared through etcd.

Theory of operation
-------------------
With no secret configured (``cluster_secret``, its file, or the environment), the first node
creates 64 random hex characters at ``P.secret`` -- beside the prefix, so read access to the
prefix is not peer access (keys.py) -- with a Txn that only creates, so racing first nodes
agree on one value, and every node and routing client reads it from there. A secret an
earlier version stored at ``P/secret`` is copied over first.

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

A change is adopted only when it is a rotation of the secret this node holds: a keyring
(keyring.py) whose ``previous`` is this node's current secret (or whose ``current`` it already
is). :func:`rotate_secret` writes one (``clusterkit secret rotate``); every keeper adopts it
from its watch, and once the window has passed the first keeper to notice rewrites the key
without the old secret. Anything else written there is put back, as above.

A node that missed a whole rotation (cut off from etcd for the window) still follows it: the
settled keyring names the secret it replaced by a fingerprint. A keeper restores the key at
most ``MAX_RESTORES`` times a minute: two keepers holding unrelated secrets (a node from before
two rotations) would otherwise rewrite it against each other for ever; after that it logs an
error and leaves the key alone.

A configured ``cluster_secret`` is never stored in etcd; rotating it is the operator's (a
rolling restart with the new value; there is no window).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque

import trio

from .._config import positive_seconds
from .._core.keys import KeyLayout
from .._errors import EtcdError, PeerAuthFailed, SecretRotationError
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, EventType, KeyValue, Op, RangeResult
from .keyring import Keyring

RETRY = 1.0  # seconds between attempts while etcd is unreachable
JOIN_WAIT_POLL = 0.1
DEFAULT_ROTATION_WINDOW = 300.0
MAX_RESTORES = 5  # restores of the key per RESTORE_PERIOD before a keeper stops fighting
RESTORE_PERIOD = 60.0


def _stored(kv: KeyValue | None) -> Keyring | None:
    """The keyring ``kv`` holds, or None when it is missing or not a keyring."""
    if kv is None or not kv.value:
        return None
    try:
        return Keyring.decode(kv.value)
    except ValueError:
        return None


def configured_secret(value: str | bytes) -> bytes:
    """The secret bytes of a configured ``cluster_secret``."""
    return value.encode() if isinstance(value, str) else bytes(value)


async def shared_secret(
    etcd: EtcdClient, layout: KeyLayout, *, create: bool, wait_for_restore: float = 0.0
) -> Keyring:
    """The keyring stored at ``P.secret``, created first if ``create`` and missing.

    With ``create`` and ``wait_for_restore`` > 0, a missing (or unreadable) secret is not
    replaced at once while other nodes are registered: they hold the secret and their keepers
    restore it, so this waits up to ``wait_for_restore`` seconds for it to reappear first.

    Raises:
        PeerAuthFailed: there is none and ``create`` is false (no node has started yet).
    """
    kv = await etcd.get(layout.secret)
    if kv is None:
        kv = await _from_legacy_key(etcd, layout, copy=create)
    keys = _stored(kv)
    if create and keys is None and wait_for_restore > 0:
        others = await etcd.range(layout.nodes_prefix, prefix=True, count_only=True)
        if others.count > 0:
            with trio.move_on_after(wait_for_restore):
                while keys is None:
                    await trio.sleep(JOIN_WAIT_POLL)
                    kv = await etcd.get(layout.secret)
                    keys = _stored(kv)
    if keys is not None:
        return keys
    if not create:
        raise PeerAuthFailed(
            f"no cluster secret at {layout.secret.decode()}: no node has started (or set "
            "cluster_secret in the config)"
        )
    fresh = Keyring(secrets.token_hex(32).encode())
    # Create it, or replace what is there if it is still the unreadable value we saw.
    guard = (
        Compare.create_revision(layout.secret, "=", 0)
        if kv is None
        else Compare.mod_revision(layout.secret, "=", kv.mod_revision)
    )
    keys = _stored(await _put_if(etcd, guard, layout.secret, fresh.encode()))
    if keys is None:
        raise PeerAuthFailed(f"the cluster secret at {layout.secret.decode()} is not readable")
    return keys


async def _put_if(etcd: EtcdClient, guard: Compare, key: bytes, value: bytes) -> KeyValue | None:
    """Put ``value`` at ``key`` if ``guard`` holds; the key as it is afterwards, either way."""
    result = await etcd.txn([guard], [Op.put(key, value), Op.get(key)], [Op.get(key)])
    found = result.responses[-1]
    assert isinstance(found, RangeResult)
    return found.kvs[0] if found.kvs else None


async def _from_legacy_key(etcd: EtcdClient, layout: KeyLayout, *, copy: bool) -> KeyValue | None:
    """The secret an earlier version stored under the prefix (``P/secret``), copied to
    ``P.secret`` first if ``copy`` (a node; routing clients only read)."""
    legacy = await etcd.get(layout.legacy_secret)
    if legacy is None or _stored(legacy) is None:
        return None
    if not copy:
        return legacy
    created = Compare.create_revision(layout.secret, "=", 0)
    return await _put_if(etcd, created, layout.secret, legacy.value)


async def rotate_secret(
    etcd: EtcdClient, layout: KeyLayout, *, window: float = DEFAULT_ROTATION_WINDOW
) -> Keyring:
    """Replace the stored secret with a new one; the old one stays accepted for ``window`` s.

    Returns:
        The keyring written.

    Raises:
        SecretRotationError: no secret is stored (no node has started, or the cluster uses a
            configured ``cluster_secret``), a previous rotation's window is still open, the
            stored value is not a keyring, or another writer changed it meanwhile.
        ConfigError: ``window`` is not a positive, finite number of seconds.
    """
    positive_seconds("window", window)
    kv = await etcd.get(layout.secret)
    if kv is None:
        raise SecretRotationError(
            f"no secret stored at {layout.secret.decode()}: no node has started, or the "
            "cluster is configured with cluster_secret (rotate that with a rolling restart)"
        )
    keys = _stored(kv)
    if keys is None:
        raise SecretRotationError(
            f"the value at {layout.secret.decode()} is not a cluster secret; running nodes "
            "restore theirs within a moment: try again"
        )
    if keys.rotating():
        raise SecretRotationError(
            f"a rotation is in progress for another {keys.ends_in():.0f} s; rotate again after it"
        )
    new = Keyring(
        secrets.token_hex(32).encode(), keys.current, rotated_at=time.time(), window=window
    )
    result = await etcd.txn(
        [Compare.mod_revision(layout.secret, "=", kv.mod_revision)],
        [Op.put(layout.secret, new.encode())],
    )
    if not result.succeeded:
        raise SecretRotationError("the stored secret changed during the rotation; try again")
    return new


class SecretKeeper:
    """Actor: keeps ``P.secret`` holding the keyring this node authenticates with.

    It adopts rotations of that keyring (keyring.py), drops the previous secret from the key
    once a rotation's window has passed, and puts back anything else. With ``writes=False``
    (routing clients) it only follows rotations.

    Attributes:
        restored: how many times this keeper put the secret back (deleted or overwritten).
        rotations: how many rotations this keeper adopted.
    """

    def __init__(
        self,
        etcd: EtcdClient,
        layout: KeyLayout,
        keys: Keyring,
        log: logging.Logger,
        *,
        writes: bool = True,
    ) -> None:
        self._writes = writes  # False: follow rotations only (a routing client)
        self._etcd = etcd
        self._layout = layout
        self._keys = keys
        self._log = log
        self.restored = 0
        self.rotations = 0
        self._restore_times: deque[float] = deque()
        self._quiet_until = -math.inf

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
            # While a rotation's window is open, wake when it closes to drop the old secret.
            with trio.move_on_at(self._window_closes()) as scope:
                async for batch in watch:
                    for event in batch.events:
                        await self._ensure(event.kv if event.type is EventType.PUT else None)
                    scope.deadline = self._window_closes()
        # The watch ended, or the window closed: read the key again (and settle it).

    def _window_closes(self) -> float:
        """Trio time just after the open rotation's window closes (never, with none open)."""
        if self._keys.previous is None:
            return math.inf
        return trio.current_time() + self._keys.ends_in() + 0.5

    async def _ensure(self, kv: KeyValue | None) -> None:
        keys = self._keys
        stored = _stored(kv)
        if stored is not None and stored != keys and stored.follows(keys):
            keys.adopt(stored)
            self.rotations += 1
            if keys.previous is not None:
                self._log.info(
                    "clusterkit: the cluster secret was rotated; the previous one is accepted "
                    "for another %.0f s",
                    keys.ends_in(),
                )
        if kv is not None and stored == keys:
            await self._settle(kv)
        elif self._writes and self._may_restore():
            await self._restore(kv)

    async def _settle(self, kv: KeyValue) -> None:
        """Once a rotation's window has passed, drop the old secret (from the key, too)."""
        keys = self._keys
        if keys.previous is None or keys.rotating():
            return
        settled = keys.settled()
        if self._writes:
            result = await self._etcd.txn(
                [Compare.mod_revision(kv.key, "=", kv.mod_revision)],
                [Op.put(kv.key, settled.encode())],
            )
            if result.succeeded:
                self._log.info("clusterkit: the previous cluster secret is no longer accepted")
        keys.adopt(settled)

    def _may_restore(self) -> bool:
        """At most MAX_RESTORES restores per RESTORE_PERIOD: another writer that keeps changing
        the key back (a node holding a secret from before two rotations, or a tool) is not
        fought for ever; an operator must look."""
        now = trio.current_time()
        while self._restore_times and self._restore_times[0] < now - RESTORE_PERIOD:
            self._restore_times.popleft()
        if len(self._restore_times) < MAX_RESTORES:
            self._restore_times.append(now)
            return True
        if now >= self._quiet_until:
            self._quiet_until = now + RESTORE_PERIOD
            self._log.error(
                "clusterkit: the cluster secret at %s keeps being replaced by a value this "
                "node cannot follow (%d restores in %.0f s); not restoring it again for now",
                self._layout.secret.decode(),
                MAX_RESTORES,
                RESTORE_PERIOD,
            )
        return False

    async def _restore(self, kv: KeyValue | None) -> None:
        """Put back the keyring this node holds over a deletion or an overwrite."""
        key = self._layout.secret
        if kv is None:
            guard = Compare.create_revision(key, "=", 0)
            what = "was deleted"
        else:
            guard = Compare.mod_revision(key, "=", kv.mod_revision)
            what = "was overwritten with a value that is not a rotation of the cluster's secret"
        result = await self._etcd.txn([guard], [Op.put(key, self._keys.encode())])
        if result.succeeded:
            self.restored += 1
            log = self._log.warning if kv is None else self._log.error
            log(
                "clusterkit: the cluster secret at %s %s; restored the secret the running "
                "nodes authenticate with (rotate it with 'clusterkit secret rotate')",
                key.decode(),
                what,
            )
