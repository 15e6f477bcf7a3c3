"""Lease keepalives for every lease of a client over one LeaseKeepAlive stream.

Theory of operation
-------------------
``LeaseKeepAlive`` is a bidirectional stream: each request names a lease, and etcd answers
each request, in order, with the lease's new TTL (0 when the lease no longer exists). The hub
sends a request and parks the caller on a per-lease FIFO of waiters; each answer wakes the
oldest waiter of its lease. The caller learns the granted TTL and the Trio time at which its
request was *sent*, which is what lease-deadline arithmetic needs (``sent_at + ttl`` is a
moment before which etcd cannot have expired the lease).

A caller that gives up (timeout, cancellation) leaves its slot in the FIFO as a tombstone, so
the answer meant for it is discarded instead of being credited to a later request — which
would make the later caller believe its lease lives longer than it does. When the stream
fails every waiter gets the translated error and the next keepalive opens a new stream.

The stream runs on the client's lease bridge (its own loop thread) over a connection of its
own: its requests and answers never wait behind queued KV calls, large range answers or bursts
of Txns, in the bridge or in a shared HTTP/2 connection.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import grpc
import trio

from .._errors import EtcdError, EtcdTimeout, EtcdUnavailable, InvalidAuthToken, LeaseNotFound
from .pb.etcdserverpb import rpc_pb2
from .status import translate
from .stream import BidiStream
from .types import KeepAlive

if TYPE_CHECKING:
    from .channel import Endpoint
    from .client import EtcdClient


class _Waiter:
    __slots__ = ("abandoned", "done", "result", "sent_at")

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.done = trio.Event()
        self.result: KeepAlive | EtcdError | None = None
        self.abandoned = False


class LeaseKeepAliveHub:
    """Multiplexes keepalives of every lease of a client over one gRPC stream."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._stream: BidiStream | None = None
        self._waiters: dict[int, deque[_Waiter]] = {}

    def __repr__(self) -> str:
        pending = sum(len(q) for q in self._waiters.values())
        return f"<LeaseKeepAliveHub pending={pending} stream={'open' if self._stream else 'none'}>"

    def statistics(self) -> dict[str, int]:
        return {
            "pending": sum(len(q) for q in self._waiters.values()),
            "stream_open": int(self._stream is not None),
        }

    def warm(self) -> None:
        """Open the stream now (see EtcdClient.open_streams)."""
        self._ensure_stream()

    async def keepalive(self, lease_id: int, timeout: float) -> KeepAlive:
        await trio.lowlevel.checkpoint_if_cancelled()
        stream = self._ensure_stream()
        waiter = _Waiter(trio.current_time())
        self._waiters.setdefault(lease_id, deque()).append(waiter)
        stream.send(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
        try:
            with trio.fail_after(timeout):
                await waiter.done.wait()
        except trio.TooSlowError:
            waiter.abandoned = True
            raise EtcdTimeout(f"lease {lease_id:x}: keepalive not answered in {timeout}s") from None
        except BaseException:
            waiter.abandoned = True
            raise
        assert waiter.result is not None
        if isinstance(waiter.result, EtcdError):
            raise waiter.result
        return waiter.result

    def _ensure_stream(self) -> BidiStream:
        if self._stream is None or self._stream.closed:
            endpoint = self._client.endpoints.current
            stream: BidiStream

            def on_error(error: BaseException | None) -> None:
                self._stream_failed(stream, endpoint, error)

            stream = BidiStream(
                self._client.lease_bridge,
                endpoint,
                "lease",
                "LeaseKeepAlive",
                lane="lease",
                metadata=self._client.stream_metadata(),
                on_response=self._on_response,
                on_error=on_error,
            )
            self._stream = stream
        return self._stream

    def _on_response(self, resp: Any) -> None:
        if self._stream is not None:
            self._stream.release(1)
        queue = self._waiters.get(resp.ID)
        if not queue:
            return
        waiter = queue.popleft()
        if not queue:
            del self._waiters[resp.ID]
        if waiter.abandoned:
            return
        if resp.TTL <= 0:
            waiter.result = LeaseNotFound(f"lease {resp.ID:x} has expired or was revoked")
        else:
            waiter.result = KeepAlive(resp.ID, resp.TTL, waiter.sent_at)
        waiter.done.set()

    def _stream_failed(
        self, stream: BidiStream, endpoint: Endpoint, error: BaseException | None
    ) -> None:
        if self._stream is stream:
            self._stream = None
        if isinstance(error, grpc.RpcError):
            err = translate(error)
        else:
            err = EtcdUnavailable(f"keepalive stream ended: {error!r}")
        if isinstance(err, EtcdUnavailable) and error is not None:  # None: we closed it
            self._client.endpoints.failed(endpoint)
        if isinstance(err, InvalidAuthToken):
            self._client.stream_auth_failed()
        self._fail_all(err)

    def _fail_all(self, err: EtcdError) -> None:
        waiters, self._waiters = self._waiters, {}
        for queue in waiters.values():
            for waiter in queue:
                waiter.result = err
                waiter.done.set()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
        self._fail_all(EtcdUnavailable("the etcd client was closed"))
