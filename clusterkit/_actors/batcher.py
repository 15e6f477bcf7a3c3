"""The etcd batcher: a node's per-partition etcd writes, coalesced into few transactions.

Theory of operation
-------------------
Every partition a node plays a part in needs a few etcd operations when the cluster
changes: a campaign (create ``P/leaders/<pt>`` if absent), a ready marker, a resign (delete
the leader key if it is still ours), a read-back. Sent one by one, a join at P = 4096 costs
thousands of Txns and as many revisions, enough to starve the node's keepalives. The batcher
is the node's single funnel for them: partition work awaits :meth:`campaign`,
:meth:`mark_ready`, :meth:`resign` or :meth:`get` as if it were one call, and the batcher's
flusher for that kind takes everything queued (after one scheduling round, or a short
linger for ready markers, which are not latency-critical) and sends it in Txns of at most
``max_ops`` operations (etcd's ``--max-txn-ops``, 128 by default). While a Txn is in
flight, new requests queue up for the next one, so the batch size follows the load.

Each kind keeps its per-key meaning inside the batch:

- campaign: compares ``create_revision == 0`` for every key; success puts them all under
  the caller's lease in ONE revision (that shared create_revision is every new leader's
  epoch: still strictly increasing per partition). If any key exists, the failure branch
  reads every key; the keys that exist are lost campaigns (answered None), the rest are
  retried in the next round. After ``MAX_ROUNDS`` rounds the rest go one by one. A key that
  exists *without a lease* was not written by a clusterkit leader (an operator's
  ``etcdctl put``, a restored backup): it would never expire, so it is deleted (guarded by
  its mod_revision) and the campaign goes on.
- resign: compares ``create_revision == epoch`` per key and deletes them all; on failure,
  keys that are no longer at their epoch are done (nothing to delete), the rest retried.
- ready: plain puts under the lease, one Txn per batch.
- get: a read-only Txn of ranges (no revision).

A request whose caller was cancelled before its batch was sent is dropped; one already
sent completes in etcd (like any RPC cut off in flight). An etcd error fails every request
of that Txn with the same exception. Keys are unique per Txn (etcd refuses duplicates): a
second request for a key waits for the next batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
import trio.lowlevel

from .._errors import EtcdError
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, KeyValue, Op, RangeResult

MAX_OPS = 128  # etcd's default --max-txn-ops (3.4 and 3.5)
MAX_ROUNDS = 4  # failed batch rounds before the rest are sent one by one
READY_LINGER = 0.01  # seconds a ready-marker batch waits for more


@dataclass(eq=False)
class _Request:
    key: bytes
    value: bytes = b""
    lease: int = 0
    epoch: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    result: KeyValue | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def finish(self, result: KeyValue | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class _Queue:
    """Requests of one kind, and the flusher that sends them."""

    def __init__(
        self,
        name: str,
        send: Callable[[list[_Request]], Awaitable[None]],
        linger: float,
    ) -> None:
        self.name = name
        self.send = send
        self.linger = linger
        self.waiting: list[_Request] = []
        self.wake = trio.Event()
        self.txns = 0
        self.requests = 0

    async def call(self, request: _Request) -> KeyValue | None:
        self.waiting.append(request)
        self.wake.set()
        try:
            await request.done.wait()
        except BaseException:
            request.abandoned = True
            raise
        if request.error is not None:
            raise request.error
        return request.result

    async def run(self, max_ops: int) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if self.linger > 0:
                await trio.sleep(self.linger)
            else:
                await (
                    trio.lowlevel.checkpoint()
                )  # one scheduling round: let the other callers queue
            batch, keys, later = [], set(), []
            for request in self.waiting:
                if request.abandoned:
                    continue
                if request.key in keys:
                    later.append(request)
                else:
                    keys.add(request.key)
                    batch.append(request)
            self.waiting = later
            if later:
                self.wake.set()
            for start in range(0, len(batch), max_ops):
                chunk = batch[start : start + max_ops]
                self.txns += 1
                self.requests += len(chunk)
                try:
                    await self.send(chunk)
                except EtcdError as exc:
                    for request in chunk:
                        if not request.done.is_set():
                            request.finish(error=exc)
                finally:
                    for request in chunk:
                        if not request.done.is_set():  # cancelled mid-send (shutdown)
                            request.finish(error=EtcdError("the batcher stopped"))


def _first(result: object) -> KeyValue | None:
    if isinstance(result, RangeResult) and result.kvs:
        return result.kvs[0]
    return None


class EtcdBatcher:
    """Coalesces a node's per-partition etcd operations into multi-key Txns."""

    def __init__(self, client: EtcdClient, *, max_ops: int = MAX_OPS) -> None:
        self._client = client
        self._max_ops = max_ops
        self._campaigns = _Queue("campaign", self._send_campaigns, 0)
        self._resigns = _Queue("resign", self._send_resigns, 0)
        self._ready = _Queue("ready", self._send_ready, READY_LINGER)
        self._gets = _Queue("get", self._send_gets, 0)
        self._queues = (self._campaigns, self._resigns, self._ready, self._gets)
        self.foreign_removed = 0  # lease-less keys removed from leader slots

    def __repr__(self) -> str:
        return f"<EtcdBatcher {self.statistics()}>"

    def statistics(self) -> dict[str, int]:
        stats: dict[str, int] = {}
        for q in self._queues:
            stats[f"{q.name}_txns"] = q.txns
            stats[f"{q.name}_requests"] = q.requests
        stats["foreign_leader_keys_removed"] = self.foreign_removed
        return stats

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for queue in self._queues:
                nursery.start_soon(queue.run, self._max_ops)
            task_status.started()

    # -- the calls partition work makes ---------------------------------------------------

    async def campaign(self, key: bytes, value: bytes, lease: int) -> KeyValue | None:
        """Create ``key`` under ``lease`` if it does not exist.

        Returns:
            The created key (its create_revision is the epoch), or None: the key existed.

        Raises:
            EtcdError: etcd could not be asked (whether the key was created is unknown).
        """
        return await self._campaigns.call(_Request(key, value, lease))

    async def resign(self, key: bytes, epoch: int) -> None:
        """Delete ``key`` if its create_revision is still ``epoch``."""
        await self._resigns.call(_Request(key, epoch=epoch))

    async def mark_ready(self, key: bytes, lease: int) -> int:
        """Put a ready marker ``key`` under ``lease``; returns the revision it was written at."""
        kv = await self._ready.call(_Request(key, b"1", lease))
        assert kv is not None
        return kv.mod_revision

    async def get(self, key: bytes) -> KeyValue | None:
        """Read ``key`` (None: absent)."""
        return await self._gets.call(_Request(key))

    # -- the Txns -------------------------------------------------------------------------

    async def _send_campaigns(self, chunk: list[_Request]) -> None:
        rounds = 0
        while chunk and rounds < MAX_ROUNDS:
            rounds += 1
            txn = await self._client.txn(
                [Compare.create_revision(r.key, "=", 0) for r in chunk],
                [Op.put(r.key, r.value, lease=r.lease) for r in chunk],
                [Op.get(r.key) for r in chunk],
            )
            if txn.succeeded:
                rev = txn.revision
                for r in chunk:
                    r.finish(KeyValue(r.key, r.value, rev, rev, 1, r.lease))
                return
            rest = []
            for r, read in zip(chunk, txn.responses, strict=True):
                kv = _first(read)
                if kv is None:
                    rest.append(r)
                elif kv.lease == 0:
                    # Not a leader's key (clusterkit writes them under a session lease): it
                    # would never expire and block the partition forever. Remove exactly
                    # that version, then campaign again.
                    self.foreign_removed += 1
                    await self._client.txn(
                        [Compare.mod_revision(kv.key, "=", kv.mod_revision)], [Op.delete(kv.key)]
                    )
                    rest.append(r)
                else:
                    r.finish(None)  # somebody holds it: lost
            chunk = rest
        for r in chunk:  # contended: one by one
            txn = await self._client.txn(
                [Compare.create_revision(r.key, "=", 0)],
                [Op.put(r.key, r.value, lease=r.lease)],
            )
            rev = txn.revision
            r.finish(KeyValue(r.key, r.value, rev, rev, 1, r.lease) if txn.succeeded else None)

    async def _send_resigns(self, chunk: list[_Request]) -> None:
        rounds = 0
        while chunk and rounds < MAX_ROUNDS:
            rounds += 1
            txn = await self._client.txn(
                [Compare.create_revision(r.key, "=", r.epoch) for r in chunk],
                [Op.delete(r.key) for r in chunk],
                [Op.get(r.key) for r in chunk],
            )
            if txn.succeeded:
                for r in chunk:
                    r.finish()
                return
            rest = []
            for r, read in zip(chunk, txn.responses, strict=True):
                kv = _first(read)
                if kv is None or kv.create_revision != r.epoch:
                    r.finish()  # gone or someone else's term: nothing to delete
                else:
                    rest.append(r)
            chunk = rest
        for r in chunk:
            await self._client.txn(
                [Compare.create_revision(r.key, "=", r.epoch)], [Op.delete(r.key)]
            )
            r.finish()

    async def _send_ready(self, chunk: list[_Request]) -> None:
        txn = await self._client.txn([], [Op.put(r.key, r.value, lease=r.lease) for r in chunk])
        rev = txn.revision
        for r in chunk:
            r.finish(KeyValue(r.key, r.value, 0, rev, 0, r.lease))

    async def _send_gets(self, chunk: list[_Request]) -> None:
        txn = await self._client.txn([], [Op.get(r.key) for r in chunk])
        for r, read in zip(chunk, txn.responses, strict=True):
            r.finish(_first(read))
