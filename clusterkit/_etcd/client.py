"""The typed async etcd v3 client that the rest of clusterkit (and apps) use.

Unary calls and the watch stream run in the Trio thread on an HTTP/2 channel of our own
(http2.py: real cancellation, a gRPC deadline on every call, no thread); lease calls and the
keepalive stream run on the lease :class:`AioBridge` (grpc.aio on a loop thread, a connection
of its own). Failures are translated by table into clusterkit errors. Failover:
when the current endpoint is UNAVAILABLE the client moves to the next one; calls that are safe
to repeat (reads, lease grant/keepalive/time-to-live, status, member list) are retried at once
on the next endpoint, writes are not — the caller decides, because a write that timed out may
have been applied. With a user name, the client authenticates on first use and once more
when etcd rejects the token as invalid or expired.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import grpc
import trio

from .._boundary import reraise
from .._core.histogram import OperationStats
from .._errors import EtcdError, EtcdUnavailable, InvalidAuthToken
from . import http2
from .bridge import AioBridge
from .channel import Endpoint, Endpoints, EtcdConfig, Stubs
from .lease import KeepAlivePump, LeaseKeepAliveHub
from .pb.authpb import auth_pb2
from .pb.etcdserverpb import rpc_pb2
from .status import translate
from .types import (
    COMPARE_OPS,
    Compare,
    DeleteOp,
    DeleteResult,
    GetOp,
    KeepAlive,
    Key,
    KeyValue,
    Lease,
    LeaseInfo,
    Member,
    PutOp,
    PutResult,
    RangeResult,
    Status,
    TxnOp,
    TxnResult,
    prefix_end,
    to_bytes,
)
from .watch import Watch, WatchHub

_log = logging.getLogger("clusterkit")
_SORT_ORDER = {"none": 0, "ascend": 1, "descend": 2}
_SORT_TARGET = {"key": 0, "version": 1, "create": 2, "mod": 3, "value": 4}


def _range_end(key: bytes, prefix: bool, range_end: Key | None) -> bytes:
    if prefix and range_end is not None:
        raise ValueError("give prefix=True or range_end, not both")
    if prefix:
        return prefix_end(key)
    return to_bytes(range_end) if range_end is not None else b""


def _compare_pb(c: Compare) -> Any:
    pb = rpc_pb2.Compare(
        key=c.key,
        target=c.target,
        result=COMPARE_OPS[c.op],
        range_end=c.range_end,
    )
    if c.target == 3:
        pb.value = c.operand
    else:
        field = {0: "version", 1: "create_revision", 2: "mod_revision", 4: "lease"}[c.target]
        setattr(pb, field, c.operand)
    return pb


def _op_pb(op: TxnOp) -> Any:
    match op:
        case GetOp():
            req = rpc_pb2.RangeRequest(
                key=op.key,
                range_end=op.range_end,
                limit=op.limit,
                keys_only=op.keys_only,
                count_only=op.count_only,
            )
            return rpc_pb2.RequestOp(request_range=req)
        case PutOp():
            put = rpc_pb2.PutRequest(
                key=op.key,
                value=op.value,
                lease=op.lease,
                prev_kv=op.prev_kv,
                ignore_lease=op.ignore_lease,
            )
            return rpc_pb2.RequestOp(request_put=put)
        case DeleteOp():
            delete = rpc_pb2.DeleteRangeRequest(
                key=op.key, range_end=op.range_end, prev_kv=op.prev_kv
            )
            return rpc_pb2.RequestOp(request_delete_range=delete)
    raise TypeError(f"not a transaction op: {op!r}")


def _range_result(resp: Any) -> RangeResult:
    kvs = tuple(KeyValue.from_pb(kv) for kv in resp.kvs)
    return RangeResult(kvs, resp.header.revision, resp.count, resp.more)


def _put_result(resp: Any) -> PutResult:
    prev = KeyValue.from_pb(resp.prev_kv) if resp.HasField("prev_kv") else None
    return PutResult(resp.header.revision, prev)


def _delete_result(resp: Any) -> DeleteResult:
    prev = tuple(KeyValue.from_pb(kv) for kv in resp.prev_kvs)
    return DeleteResult(resp.header.revision, resp.deleted, prev)


class _RangeCall(Protocol):
    async def __call__(
        self, key: Key, *, range_end: Key | None, revision: int, limit: int
    ) -> RangeResult: ...


async def read_all_pages(
    range_call: _RangeCall, prefix: Key, revision: int, page_size: int
) -> RangeResult:
    """Every key under ``prefix`` at one revision, read in pages (shared by both clients).

    The first page fixes the revision unless one is given; later pages are read at it.
    """
    if page_size <= 0:
        raise ValueError("page_size must be > 0")
    start = to_bytes(prefix)
    end = prefix_end(start)
    kvs: list[KeyValue] = []
    while True:
        page = await range_call(start, range_end=end, revision=revision, limit=page_size)
        revision = revision or page.revision
        kvs.extend(page.kvs)
        if not page.more or not page.kvs:
            return RangeResult(tuple(kvs), revision, len(kvs), False)
        start = page.kvs[-1].key + b"\x00"


_OP_NAMES = {
    "Range": "range",
    "Put": "put",
    "DeleteRange": "delete_range",
    "Txn": "txn",
    "Compact": "compact",
    "LeaseGrant": "lease_grant",
    "LeaseRevoke": "lease_revoke",
    "LeaseTimeToLive": "lease_time_to_live",
    "MemberList": "member_list",
    "Status": "status",
    "Authenticate": "authenticate",
}


class EtcdClient:
    """An async etcd v3 client for Trio. Open it with :func:`open_etcd_client`.

    Keys and values are ``str`` (UTF-8) or ``bytes``; results carry ``bytes``.
    """

    def __init__(self, config: EtcdConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self._nursery = nursery  # the HTTP/2 connections' tasks run here
        self.endpoints = Endpoints(config)
        self.lease_bridge = AioBridge("etcd-lease")
        self._http2: dict[str, Stubs] = {}  # endpoint target -> stubs on its HTTP/2 channel
        self._token: str | None = None
        self._stale_stream_token: str | None = None
        self._auth_lock = trio.Lock()
        self._watches = WatchHub(self)
        self._keepalives = LeaseKeepAliveHub(self)
        self.reauthentications = 0
        self.operations = OperationStats()
        """Calls, failures and latency per etcd operation (``range``, ``txn``, ...)."""
        self._closed = False

    def __repr__(self) -> str:
        user = f" user={self.config.username!r}" if self.config.username else ""
        return f"<EtcdClient {self.endpoints.current.target}{user} {self._watches!r}>"

    def statistics(self) -> dict[str, int]:
        """Counters for debugging and metrics."""
        return {
            **{f"watch_{k}": v for k, v in self._watches.statistics().items()},
            **{f"keepalive_{k}": v for k, v in self._keepalives.statistics().items()},
            **self._unary_statistics(),
            **{f"lease_{k}": v for k, v in self.lease_bridge.statistics().items()},
            "reauthentications": self.reauthentications,
        }

    def _unary_statistics(self) -> dict[str, int]:
        stats = {"rpc_started": 0, "rpc_in_flight": 0, "rpc_cancelled": 0}
        for stubs in self._http2.values():
            channel = stubs.channel
            stats["rpc_started"] += channel.started
            stats["rpc_in_flight"] += channel.started - channel.finished
            stats["rpc_cancelled"] += channel.cancelled
        return stats

    # -- plumbing -----------------------------------------------------------------------

    def _stubs(self, endpoint: Endpoint) -> Stubs:
        """The stubs on ``endpoint``'s HTTP/2 channel (unary methods only)."""
        stubs = self._http2.get(endpoint.target)
        if stubs is None:
            channel = endpoint.open_http2_channel(self._nursery.start_soon)
            stubs = self._http2[endpoint.target] = Stubs(channel)
        return stubs

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    def stream_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for long-lived streams: ``hasleader`` plus the auth token."""
        return (("hasleader", "true"), *(self._metadata() or ()))

    def stream_auth_failed(self) -> None:
        """A stream was refused for its token: the next stream re-authenticates first."""
        self._stale_stream_token = self._token

    async def ensure_stream_auth(self) -> None:
        """Authenticate before opening a stream if there is no token or it was refused."""
        if not self.config.username:
            return
        if self._token is None or self._token == self._stale_stream_token:
            self.reauthentications += self._token is not None
            await self._authenticate(self._token)
            self._stale_stream_token = None

    async def _authenticate(self, stale: str | None) -> None:
        async with self._auth_lock:
            if self._token != stale:
                return  # somebody else refreshed it meanwhile
            request = rpc_pb2.AuthenticateRequest(
                name=self.config.username, password=self.config.password
            )
            resp = await self._call("auth", "Authenticate", request, retry=True, auth=False)
            self._token = resp.token

    async def _call(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        retry: bool,
        auth: bool = True,
        timeout: float | None = None,
    ) -> Any:
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        if auth and self.config.username and self._token is None:
            await self._authenticate(None)
        timeout = timeout or self.config.request_timeout
        attempts = len(self.endpoints) if retry else 1
        reauthenticated = False
        attempt = 0
        started = time.perf_counter()
        try:
            while True:
                endpoint: Endpoint = self.endpoints.current
                token = self._token
                metadata = self._metadata() if auth else None
                try:
                    if service == "lease":
                        result = await self.lease_bridge.unary(
                            endpoint,
                            service,
                            method,
                            request,
                            timeout=timeout,
                            metadata=metadata,
                            lane="lease",
                        )
                    else:
                        call = getattr(getattr(self._stubs(endpoint), service), method)
                        result = await call(request, timeout=timeout, metadata=metadata)
                except grpc.RpcError as exc:
                    error = translate(exc)
                else:
                    self.operations.succeeded(
                        _OP_NAMES.get(method, method), time.perf_counter() - started
                    )
                    return result
                if isinstance(error, InvalidAuthToken) and auth and self.config.username:
                    if reauthenticated:
                        raise error
                    reauthenticated = True
                    self.reauthentications += 1
                    await self._authenticate(token)
                    continue
                if isinstance(error, EtcdUnavailable):
                    self.endpoints.failed(endpoint)
                    attempt += 1
                    if attempt < attempts:
                        continue
                raise error
        except Exception:  # (a cancelled call is not counted: it did not fail)
            self.operations.failed(_OP_NAMES.get(method, method), time.perf_counter() - started)
            raise

    def open_stream(
        self,
        endpoint: Endpoint,
        service: str,
        method: str,
        *,
        metadata: tuple[tuple[str, str], ...],
        on_response: Callable[[Any], None],
        on_error: Callable[[BaseException | None], None],
    ) -> http2.BidiStream:
        """Open a bidirectional stream on ``endpoint``'s HTTP/2 channel (see http2.py)."""
        opener = getattr(getattr(self._stubs(endpoint), service), method)
        stream: http2.BidiStream = opener.open(
            metadata=metadata, on_response=on_response, on_error=on_error
        )
        return stream

    # -- KV -----------------------------------------------------------------------------

    async def get(
        self, key: Key, *, revision: int = 0, serializable: bool = False
    ) -> KeyValue | None:
        """Read one key.

        Returns:
            The key, or ``None`` when it does not exist (at ``revision``, if given).

        Raises:
            RevisionCompacted: ``revision`` was compacted.
            EtcdError: the call failed.
        """
        result = await self.range(key, revision=revision, serializable=serializable)
        return result.kvs[0] if result.kvs else None

    async def range(
        self,
        key: Key,
        *,
        prefix: bool = False,
        range_end: Key | None = None,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
        sort_order: str = "none",
        sort_target: str = "key",
    ) -> RangeResult:
        """Read a key, a prefix (``prefix=True``) or ``[key, range_end)``, as one call.

        Args:
            revision: read the store as of this revision (0: the latest).
            limit: at most this many keys (``RangeResult.more`` tells if more exist).
            serializable: read from the member's local state (faster, possibly stale).

        Raises:
            RevisionCompacted: ``revision`` was compacted.
            EtcdError: the call failed.
        """
        k = to_bytes(key)
        request = rpc_pb2.RangeRequest(
            key=k,
            range_end=_range_end(k, prefix, range_end),
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            serializable=serializable,
            sort_order=_SORT_ORDER[sort_order],
            sort_target=_SORT_TARGET[sort_target],
        )
        return _range_result(await self._call("kv", "Range", request, retry=True))

    async def get_prefix(
        self, prefix: Key, *, revision: int = 0, page_size: int = 1000
    ) -> RangeResult:
        """Read every key under ``prefix`` at ONE revision, in pages of ``page_size`` keys.

        The first page fixes the revision (the latest, unless ``revision`` is given); every
        further page is read at that same revision, so the result is a consistent snapshot
        however many keys there are, and no single answer exceeds gRPC's message limits.
        """
        return await read_all_pages(self.range, prefix, revision, page_size)

    async def put(
        self,
        key: Key,
        value: Key,
        *,
        lease: int = 0,
        prev_kv: bool = False,
        ignore_lease: bool = False,
    ) -> PutResult:
        """Write ``value`` to ``key``, optionally attached to ``lease``.

        Raises:
            LeaseNotFound: the lease does not exist.
            EtcdError: the call failed (a timed-out put may still have been applied).
        """
        request = rpc_pb2.PutRequest(
            key=to_bytes(key),
            value=to_bytes(value),
            lease=lease,
            prev_kv=prev_kv,
            ignore_lease=ignore_lease,
        )
        return _put_result(await self._call("kv", "Put", request, retry=False))

    async def delete(
        self, key: Key, *, prefix: bool = False, range_end: Key | None = None, prev_kv: bool = False
    ) -> DeleteResult:
        """Delete a key, a prefix, or ``[key, range_end)``."""
        k = to_bytes(key)
        request = rpc_pb2.DeleteRangeRequest(
            key=k, range_end=_range_end(k, prefix, range_end), prev_kv=prev_kv
        )
        return _delete_result(await self._call("kv", "DeleteRange", request, retry=False))

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[TxnOp] = (),
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        """Run ``success`` if every ``compare`` holds, else ``failure``, atomically.

        Returns:
            ``TxnResult.succeeded`` tells which branch ran; ``responses`` holds one result per
            op of that branch (``RangeResult``, ``PutResult`` or ``DeleteResult``).
        """
        request = rpc_pb2.TxnRequest(
            compare=[_compare_pb(c) for c in compare],
            success=[_op_pb(op) for op in success],
            failure=[_op_pb(op) for op in failure],
        )
        resp = await self._call("kv", "Txn", request, retry=False)
        results: list[RangeResult | PutResult | DeleteResult] = []
        for r in resp.responses:
            kind = r.WhichOneof("response")
            if kind == "response_range":
                results.append(_range_result(r.response_range))
            elif kind == "response_put":
                results.append(_put_result(r.response_put))
            elif kind == "response_delete_range":
                results.append(_delete_result(r.response_delete_range))
        return TxnResult(resp.succeeded, resp.header.revision, tuple(results))

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Discard history before ``revision``. Watches from older revisions then fail."""
        request = rpc_pb2.CompactionRequest(revision=revision, physical=physical)
        await self._call("kv", "Compact", request, retry=False)

    # -- Watch ---------------------------------------------------------------------------

    def watch(
        self,
        key: Key,
        *,
        prefix: bool = False,
        range_end: Key | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = False,
        filters: Sequence[str] = (),
    ) -> Watch:
        """Watch a key, a prefix or a range; use as ``async with client.watch(...) as w:``.

        Entering waits until etcd confirmed the watch, so no change made after that is
        missed. Iterating yields :class:`WatchBatch` objects in revision order.

        Args:
            start_revision: deliver changes from this revision on (0: from now).
            prev_kv: attach each key's previous value to its event.
            progress_notify: ask etcd for periodic empty batches carrying the revision.
            filters: ``"noput"`` and/or ``"nodelete"`` drop those events at the server.

        Raises (from iteration):
            RevisionCompacted: ``start_revision`` was compacted; re-read and resume.
            EtcdUnavailable: the connection to etcd broke.
        """
        k = to_bytes(key)
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        return self._watches.watch(
            k,
            _range_end(k, prefix, range_end),
            start_revision=start_revision,
            prev_kv=prev_kv,
            progress_notify=progress_notify,
            filters=tuple(filters),
        )

    # -- Leases --------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, lease_id: int = 0) -> Lease:
        """Create a lease. The returned ``ttl`` is what etcd granted (it raises small TTLs)."""
        request = rpc_pb2.LeaseGrantRequest(TTL=ttl, ID=lease_id)
        resp = await self._call("lease", "LeaseGrant", request, retry=True)
        if resp.error:
            raise EtcdError(resp.error)
        return Lease(resp.ID, resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting every key attached to it.

        Raises:
            LeaseNotFound: the lease had already expired or been revoked.
        """
        request = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        await self._call("lease", "LeaseRevoke", request, retry=False)

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> KeepAlive:
        """Refresh a lease once, over the client's shared keepalive stream.

        Returns:
            The TTL etcd restored and the Trio time the request was sent.

        Raises:
            LeaseNotFound: etcd answered TTL 0 — the lease is gone.
            EtcdTimeout: no answer within ``timeout`` (default: request_timeout).
            EtcdUnavailable: the stream broke.
        """
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        await self.ensure_stream_auth()
        return await self._keepalives.keepalive(lease_id, timeout or self.config.request_timeout)

    @asynccontextmanager
    async def keepalive_pump(
        self, lease_id: int, interval: float, *, stall_limit: float
    ) -> AsyncIterator[KeepAlivePump]:
        """Keep a lease alive from the lease bridge's loop thread for the ``async with`` block.

        The loop thread sends a keepalive every ``interval`` seconds by its own timer, over
        the client's keepalive stream, and records each answer there, so neither sending nor
        recording needs the Trio loop to be responsive (see clusterkit/_etcd/lease.py). Read
        the pump with ``pump.latest()`` (never awaits) and ``await pump.wait_newer(prev)``;
        call ``pump.checkin()`` whenever the Trio side is alive, or the pump stops after
        ``stall_limit`` seconds without one (the zombie guard). Ordinary
        :meth:`lease_keepalive` calls for the same lease may run meanwhile.

        The pump stops when the block exits or the client closes. Only under Trio's default
        clock: ``sent_at`` is converted from the loop's ``perf_counter()``.

        Args:
            lease_id: the lease to keep alive.
            interval: seconds between keepalives (e.g. TTL / 3).
            stall_limit: stop sending when the last check-in is older than this (e.g. 3 x TTL).

        Raises:
            ConfigError: a non-default Trio clock (MockClock), or ``interval``/``stall_limit``
                not positive.
            EtcdUnavailable: the client is closed.
        """
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        await self.ensure_stream_auth()
        pump = self._keepalives.start_pump(lease_id, interval, stall_limit)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalives.serve_pump, pump)
                try:
                    yield pump
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._keepalives.stop_pump(pump, EtcdUnavailable("the keepalive pump was stopped"))

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo:
        """The lease's remaining TTL and granted TTL (``ttl == -1`` when it has expired)."""
        request = rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=keys)
        resp = await self._call("lease", "LeaseTimeToLive", request, retry=True)
        return LeaseInfo(resp.ID, resp.TTL, resp.grantedTTL, tuple(resp.keys))

    # -- Cluster and maintenance ---------------------------------------------------------

    async def member_list(self) -> list[Member]:
        """The members of the etcd cluster."""
        resp = await self._call("cluster", "MemberList", rpc_pb2.MemberListRequest(), retry=True)
        return [
            Member(m.ID, m.name, tuple(m.peerURLs), tuple(m.clientURLs), m.isLearner)
            for m in resp.members
        ]

    async def status(self) -> Status:
        """The status of the current endpoint's member, including the server version."""
        resp = await self._call("maintenance", "Status", rpc_pb2.StatusRequest(), retry=True)
        return Status(
            resp.version,
            resp.dbSize,
            resp.leader,
            resp.header.member_id,
            resp.raftIndex,
            resp.raftTerm,
            tuple(resp.errors),
        )

    # -- Auth administration -----------------------------------------------------------

    async def user_add(self, name: str, password: str) -> None:
        """Create an etcd user."""
        await self._call(
            "auth", "UserAdd", rpc_pb2.AuthUserAddRequest(name=name, password=password), retry=False
        )

    async def role_add(self, name: str) -> None:
        """Create an etcd role."""
        await self._call("auth", "RoleAdd", rpc_pb2.AuthRoleAddRequest(name=name), retry=False)

    async def role_grant_prefix(
        self, role: str, prefix: Key, permission: str = "readwrite"
    ) -> None:
        """Let ``role`` ``"read"``, ``"write"`` or ``"readwrite"`` every key under ``prefix``."""
        kinds = {"read": 0, "write": 1, "readwrite": 2}
        if permission not in kinds:
            raise ValueError(f"permission must be one of {sorted(kinds)}")
        key = to_bytes(prefix)
        perm = auth_pb2.Permission(permType=kinds[permission], key=key, range_end=prefix_end(key))
        request = rpc_pb2.AuthRoleGrantPermissionRequest(name=role, perm=perm)
        await self._call("auth", "RoleGrantPermission", request, retry=False)

    async def user_grant_role(self, user: str, role: str) -> None:
        """Give ``user`` the permissions of ``role``."""
        request = rpc_pb2.AuthUserGrantRoleRequest(user=user, role=role)
        await self._call("auth", "UserGrantRole", request, retry=False)

    async def auth_enable(self) -> None:
        """Turn authentication on (a ``root`` user with the ``root`` role must exist)."""
        await self._call("auth", "AuthEnable", rpc_pb2.AuthEnableRequest(), retry=False)

    def open_streams(self) -> None:
        """Open the Watch and LeaseKeepAlive streams now and keep them for the client's life.

        The first watch and the first keepalive then need no stream set-up, and a broken
        connection shows up at once. Streams add no thread (the watch stream runs in the Trio
        thread, keepalives are tasks on the lease bridge's loop), so the client's threads are
        fixed from here on: the lease bridge's loop (plus
        gRPC's one poller thread per process). ``open_etcd_client`` calls this once connected.
        """
        if not self._closed:
            self._watches.warm()
            self._keepalives.warm()

    # -- lifetime ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close streams and channels and stop the lease bridge's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._watches.aclose()
            await self._keepalives.aclose()
            for stubs in self._http2.values():
                stubs.channel.close()
            await self.lease_bridge.aclose()


@asynccontextmanager
async def open_etcd_client(
    config: EtcdConfig | Sequence[str], *, connect: bool = True
) -> AsyncIterator[EtcdClient]:
    """Open an etcd client for the duration of the ``async with`` block.

    Args:
        config: an :class:`EtcdConfig`, or just a list of endpoints.
        connect: check that etcd answers (within ``dial_timeout``) before yielding.

    Raises:
        EtcdUnavailable: ``connect`` is set and no endpoint answered within dial_timeout.
        ConfigError: the config is invalid.
    """
    if not isinstance(config, EtcdConfig):
        config = EtcdConfig(endpoints=tuple(config))
    user_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            client = EtcdClient(config, nursery)
            try:
                if connect:
                    await _wait_until_reachable(client)
                    client.open_streams()
                try:
                    yield client
                except BaseException as exc:
                    user_error = exc
                    raise
            finally:
                await client.aclose()  # (ends the connections' tasks in the nursery)
    except BaseException as group:
        reraise(group, user_error, _log_extra)


def _log_extra(error: BaseException) -> None:
    _log.warning("clusterkit: closing the etcd client: %r", error)


async def _wait_until_reachable(client: EtcdClient) -> None:
    last: EtcdError | None = None
    with trio.move_on_after(client.config.dial_timeout):
        while True:
            try:
                await client._call(
                    "maintenance",
                    "Status",
                    rpc_pb2.StatusRequest(),
                    retry=True,
                    timeout=client.config.dial_timeout,
                )
                return
            except EtcdUnavailable as exc:
                last = exc
            await trio.sleep(0.05)
    raise EtcdUnavailable(
        f"no etcd endpoint of {list(client.config.endpoints)} answered within "
        f"{client.config.dial_timeout}s: {last or 'no answer'}"
    )
