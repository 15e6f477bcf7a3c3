"""The contract suite's backends: every test that takes ``kv`` runs against each of them.

- ``real-etcd<version>``: the shared session server of that version (the ``etcd`` fixture of
  ``tests/conftest.py``, every version found), through ``clusterkit.open_etcd_client``, under a
  key prefix of the test's own;
- ``memory``: ``clusterkit.testing``'s in-memory etcd under Trio's default (wall) clock.

Tests assert concrete values (revisions relative to :attr:`KV.base`, versions, counts, error
classes, codes and messages), so every backend that passes gives the same observable results.
Each test's leases are revoked afterwards, so none expires later into another test's revisions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

import clusterkit
from clusterkit._testing.memory_etcd import MemoryEtcd, MemoryEtcdClient, open_memory_etcd
from clusterkit.etcd import (
    DeleteResult,
    EtcdClient,
    Event,
    KeyValue,
    Lease,
    PutResult,
    RangeResult,
    WatchBatch,
)

Client = EtcdClient | MemoryEtcdClient
NormKV = tuple[str, bytes, int, int, int, int]
NormEvent = tuple[str, NormKV | None, NormKV | None]


def _etcd_versions(config: pytest.Config) -> list[str]:
    """The versions the session ``etcd`` fixture runs (tests/conftest.py's ETCD_BINARIES)."""
    for plugin in config.pluginmanager.get_plugins():
        binaries = getattr(plugin, "ETCD_BINARIES", None)
        if isinstance(binaries, dict):
            return list(binaries) or ["missing"]
    raise RuntimeError("tests/conftest.py (ETCD_BINARIES) is not loaded")


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # One parametrization of (backend, etcd), so the memory backend runs once rather than
    # once per server version. As a mark it takes precedence over the etcd fixture's own
    # params; session scope groups the tests by server, which then starts once per version.
    if "backend" not in metafunc.fixturenames:
        return
    versions = _etcd_versions(metafunc.config)
    params = [pytest.param("real", v, id=f"real-etcd{v}") for v in versions]
    params.append(pytest.param("memory", versions[-1], id="memory"))  # shares a server
    metafunc.definition.add_marker(
        pytest.mark.parametrize(("backend", "etcd"), params, indirect=True, scope="session")
    )


@dataclass
class KV:
    """One backend, as a test sees it."""

    backend: str
    client: Client
    prefix: str
    base: int  # the store revision before the test's first write
    store: MemoryEtcd | None = None
    leases: list[int] = field(default_factory=list)

    def key(self, name: str) -> str:
        return self.prefix + name

    def rel(self, revision: int) -> int:
        """A revision relative to the test's start (0 stays 0: "none")."""
        return revision - self.base if revision else 0

    async def grant(self, ttl: int) -> Lease:
        """Grant a lease that the fixture revokes after the test."""
        lease = await self.client.lease_grant(ttl)
        self.leases.append(lease.id)
        return lease

    def lease_no(self, lease_id: int) -> int:
        """1 for the test's first lease, 2 for the second...; 0 for none."""
        return self.leases.index(lease_id) + 1 if lease_id else 0

    def norm(self, kv: KeyValue | None) -> NormKV | None:
        """A key-value with the prefix stripped and revisions and leases made relative."""
        if kv is None:
            return None
        name = kv.key.decode()
        name = name.removeprefix(self.prefix)
        return (
            name,
            kv.value,
            self.rel(kv.create_revision),
            self.rel(kv.mod_revision),
            kv.version,
            self.lease_no(kv.lease),
        )

    def event(self, ev: Event) -> NormEvent:
        return (ev.type.name, self.norm(ev.kv), self.norm(ev.prev_kv))

    def batches(self, batches: list[WatchBatch]) -> list[tuple[int, list[NormEvent]]]:
        return [(self.rel(b.revision), [self.event(e) for e in b.events]) for b in batches]

    def result(self, r: RangeResult | PutResult | DeleteResult) -> tuple[object, ...]:
        match r:
            case RangeResult():
                return (
                    "range",
                    self.rel(r.revision),
                    r.count,
                    r.more,
                    [self.norm(x) for x in r.kvs],
                )
            case PutResult():
                return ("put", self.rel(r.revision), self.norm(r.prev_kv))
            case DeleteResult():
                return (
                    "delete",
                    self.rel(r.revision),
                    r.deleted,
                    [self.norm(x) for x in r.prev_kvs],
                )


async def _cleanup(kv: KV) -> None:
    with contextlib.suppress(clusterkit.EtcdError):
        for lease_id in kv.leases:
            with contextlib.suppress(clusterkit.LeaseNotFound):
                await kv.client.lease_revoke(lease_id)
        await kv.client.delete(kv.prefix, prefix=True)


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """``"real"`` or ``"memory"``, from the parametrization above."""
    return str(request.param)


@pytest.fixture
async def kv(backend: str, etcd: clusterkit.EmbeddedEtcd, prefix: str) -> AsyncIterator[KV]:
    """The backend named by the parametrization (see the module docstring)."""
    client: Client
    if backend == "real":
        async with clusterkit.open_etcd_client(etcd.endpoints) as client:
            base = (await client.range(prefix, prefix=True, count_only=True)).revision
            handle = KV("real", client, prefix, base)
            try:
                yield handle
            finally:
                await _cleanup(handle)
    else:
        async with open_memory_etcd() as store:
            client = store.client()
            handle = KV("memory", client, prefix, store.revision, store)
            try:
                yield handle
            finally:
                await _cleanup(handle)
