"""A scripted stand-in for EtcdClient, for actor tests under MockClock.

Only the calls the actors make are implemented. Each behaviour is a knob the test turns;
every call is recorded with the Trio time it happened at.
"""

from __future__ import annotations

import itertools
from typing import Any

import trio

from clusterkit import EtcdClient, EtcdUnavailable, LeaseNotFound
from clusterkit.etcd import KeepAlive, Lease, PutOp, RangeResult, TxnResult


class FakeEtcd:
    def __init__(self, ttl: int = 3) -> None:
        self.ttl = ttl
        self.keepalive_mode = "ok"  # "ok" | "hang" | "expired"
        self.grant_fails = 0
        self.txn_succeeds = True
        self.revision = itertools.count(10)
        self.leases = itertools.count(100)
        self.calls: list[tuple[float, str, Any]] = []
        self.puts: list[tuple[float, PutOp]] = []
        self.answered: list[float] = []  # send times of keepalives that were answered
        self.revoke_delay = 0.0

    def _record(self, name: str, arg: Any = None) -> None:
        self.calls.append((trio.current_time(), name, arg))

    async def get(self, key: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._record("get", key)

    async def lease_grant(self, ttl: int) -> Lease:
        await trio.sleep(0.001)
        self._record("lease_grant", ttl)
        if self.grant_fails:
            self.grant_fails -= 1
            raise EtcdUnavailable("scripted outage")
        return Lease(next(self.leases), self.ttl)

    async def txn(self, compare: Any, success: Any = (), failure: Any = ()) -> TxnResult:
        await trio.sleep(0.001)
        self._record("txn", success)
        if self.txn_succeeds:
            for op in success:
                if isinstance(op, PutOp):
                    self.puts.append((trio.current_time(), op))
            return TxnResult(True, next(self.revision))
        return TxnResult(False, next(self.revision), (RangeResult((), 0, 0),))

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> KeepAlive:
        sent = trio.current_time()
        self._record("keepalive", lease_id)
        if self.keepalive_mode == "hang":
            await trio.sleep_forever()
        await trio.sleep(0.01)
        if self.keepalive_mode == "expired":
            raise LeaseNotFound("scripted expiry")
        self.answered.append(sent)
        return KeepAlive(lease_id, self.ttl, sent)

    async def lease_revoke(self, lease_id: int) -> None:
        await trio.sleep(self.revoke_delay)
        self._record("revoke", lease_id)

    def as_client(self) -> EtcdClient:
        return self  # type: ignore[return-value]
