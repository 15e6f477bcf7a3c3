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

Keepalive pumps
---------------
A Trio caller of :meth:`LeaseKeepAliveHub.keepalive` needs the Trio loop four times per
keepalive (timer wake, send, answer, waiter wakes); when app tasks starve the loop, each hop
waits a whole scheduling round and a healthy session can be lost. A :class:`KeepAlivePump`
needs none of them: the lease bridge's loop thread sends a keepalive every ``interval`` seconds
by its own timer (``call_later``), over the same stream, and records each answer on the loop
as an immutable :class:`KeepAlive` swapped into one attribute, which Trio reads without
awaiting (:meth:`KeepAlivePump.latest`). ``sent_at`` is the loop's ``perf_counter()`` at the
send plus the offset to the Trio clock captured when the pump started: Trio's default clock
is ``perf_counter() + offset``. Under any other clock (``MockClock``) this conversion is wrong,
so the real client refuses to start a pump there; the memory etcd's client has a pump driven
by a Trio task instead, on the virtual clock.

Answers are matched to requests by a loop-side FIFO per lease (:class:`_LoopRouter`, one per
stream, fed in the order requests are written): each slot is either a pump's (answered on the
loop, never seen by Trio) or an ordinary caller's (posted to Trio, where the waiters' FIFO
above matches it). Pump answers and ordinary answers therefore never cross, however they
interleave on one lease. When the stream breaks, every pump counts a break (Trio callers of
:meth:`KeepAlivePump.wait_newer` see it as ``EtcdUnavailable``), and the next tick asks Trio
to open a new stream (a Trio task of the pump's context does it, re-authenticating first if
etcd refused the token): re-opening is the one step that needs the Trio loop, once per break.
A TTL-0 answer ends the pump with ``LeaseNotFound``.

The zombie guard, and its trade-off: a pump that keeps a lease alive without Trio could keep a
dead or deadlocked program registered forever. So the Trio side checks in
(:meth:`KeepAlivePump.checkin`, also done by :meth:`KeepAlivePump.wait_newer`), and a tick that
finds the last check-in older than ``stall_limit`` stops sending and ends the pump with
:class:`KeepAliveStalled`. Other nodes then see the session expire at most ``stall_limit +
interval + ttl`` after the program's last sign of life. A longer ``stall_limit`` rides out
longer stalls of a live program; a shorter one bounds how long a hung one keeps its partitions
(and their leaderships) from the rest of the cluster. A program that stalls for longer than
``stall_limit`` loses its session on purpose.

What the pump does not fix: the loop thread still needs the GIL. Pure-Python work in Trio
gives it up every ``sys.getswitchinterval()`` (5 ms), so a starved Trio loop costs the pump
milliseconds, not scheduling rounds; a C extension that holds the GIL for a long call stalls
the pump too.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import trio

from .._errors import (
    ConfigError,
    EtcdError,
    EtcdTimeout,
    EtcdUnavailable,
    InvalidAuthToken,
    LeaseNotFound,
)
from .pb.etcdserverpb import rpc_pb2
from .status import translate
from .stream import BidiStream
from .types import KeepAlive

if TYPE_CHECKING:
    from .channel import Endpoint
    from .client import EtcdClient


class KeepAliveStalled(EtcdError):
    """A keepalive pump stopped: its Trio side had not checked in for ``stall_limit`` seconds."""


class KeepAlivePump:
    """Keeps one lease alive from a loop thread (or task) that does not need the Trio loop.

    Get one from ``client.keepalive_pump(lease_id, interval, stall_limit=...)`` (an async
    context manager). Read it from Trio at any time: :meth:`latest` never awaits;
    :meth:`wait_newer` wakes when a newer acknowledgement arrived. Call :meth:`checkin` (cheap,
    sync) whenever the Trio side is alive and reading, or let :meth:`wait_newer` do it.

    Attributes:
        lease_id: the lease kept alive.
        interval: seconds between keepalives.
        stall_limit: the pump stops when the last check-in is older than this.
        sends: keepalives sent. acks: keepalives acknowledged. breaks: stream breaks seen.
    """

    def __init__(
        self,
        lease_id: int,
        interval: float,
        stall_limit: float,
        *,
        clock: Callable[[], float],
        offset: float,
        notify_soon: Callable[[Callable[[], None]], None],
    ) -> None:
        if interval <= 0 or stall_limit <= 0:
            raise ConfigError("keepalive_pump", "interval and stall_limit must be > 0 seconds")
        self.lease_id = lease_id
        self.interval = interval
        self.stall_limit = stall_limit
        self._clock = clock  # the sending side's clock (perf_counter, or Trio's when virtual)
        self._offset = offset  # Trio time = clock() + offset
        self._notify_soon = notify_soon  # run a callable in Trio soon (from the sending side)
        # Written by the sending side (and _failure by Trio when it stops the pump); each
        # write is one attribute swap of an immutable value, so no lock is needed.
        self._latest: KeepAlive | None = None
        self._failure: EtcdError | None = None
        self.sends = 0
        self.acks = 0
        # Trio side.
        self._last_checkin = clock()  # read by the sending side
        self.stopped = False  # set by Trio (context exit, client close); read by the sender
        self.breaks = 0
        self.last_break: EtcdError | None = None
        self._changed = trio.Event()
        self._reopen = trio.Event()
        # Loop side (real client only).
        self._handle: asyncio.TimerHandle | None = None
        self._hub: LeaseKeepAliveHub | None = None
        self._request: Any = None
        self._reopen_asked_for: object = None

    def __repr__(self) -> str:
        state = f"failed={self._failure!r}" if self._failure else f"latest={self._latest}"
        return (
            f"<KeepAlivePump lease={self.lease_id:x} every {self.interval}s sends={self.sends} "
            f"acks={self.acks} breaks={self.breaks} {state}>"
        )

    def statistics(self) -> dict[str, int]:
        """Counters: keepalives sent and acknowledged, stream breaks seen, failed (0/1)."""
        return {
            "sends": self.sends,
            "acks": self.acks,
            "breaks": self.breaks,
            "failed": int(self._failure is not None),
        }

    # -- Trio side ------------------------------------------------------------------------

    def latest(self) -> KeepAlive | None:
        """The newest acknowledged keepalive (``sent_at`` on the Trio clock), or None yet.

        The lease is certainly alive until ``latest().sent_at + latest().ttl``. Never awaits.
        """
        return self._latest

    @property
    def failure(self) -> EtcdError | None:
        """Why the pump ended, or None while it runs.

        ``LeaseNotFound`` (etcd answered TTL 0: the lease expired or was revoked),
        :class:`KeepAliveStalled` (the zombie guard), or ``EtcdUnavailable`` (the pump was
        stopped because its client closed or its context exited).
        """
        return self._failure

    def checkin(self) -> None:
        """Tell the pump the Trio side is alive (cheap, sync; see the zombie guard)."""
        self._last_checkin = self._clock()

    async def wait_newer(self, previous: KeepAlive | None) -> KeepAlive:
        """Wait until a keepalive newer than ``previous`` has been acknowledged; check in.

        Args:
            previous: the last acknowledgement the caller has seen (None: any will do).

        Returns:
            The newest acknowledgement (``sent_at`` greater than ``previous.sent_at``).

        Raises:
            LeaseNotFound: the lease is gone; the pump has ended.
            KeepAliveStalled: the zombie guard stopped the pump.
            EtcdUnavailable: the pump was stopped (client closed or context exited).
            EtcdError: the stream broke while this call waited (usually ``EtcdUnavailable``;
                the translated error of the break). Then :attr:`failure` is still None: the
                pump goes on (a new stream is opened) and the caller may wait again. Rule for
                callers: an error with ``pump.failure is None`` is transient.
        """
        self.checkin()
        breaks = self.breaks
        while True:
            if self._failure is not None:
                raise self._failure
            latest = self._latest
            if latest is not None and (previous is None or latest.sent_at > previous.sent_at):
                return latest
            if self.breaks != breaks:
                assert self.last_break is not None
                raise self.last_break
            await self._changed.wait()
            self.checkin()

    def _notify(self) -> None:  # Trio
        self._changed.set()
        self._changed = trio.Event()

    def _stream_broke(self, error: EtcdError) -> None:  # Trio
        self.breaks += 1
        self.last_break = error
        self._notify()

    def _stop(self, error: EtcdError) -> None:  # Trio
        self.stopped = True
        if self._failure is None:
            self._failure = error
        self._notify()

    # -- sending side (the loop thread, or the memory client's Trio task) ------------------

    def _stalled(self) -> bool:
        if self._clock() - self._last_checkin <= self.stall_limit:
            return False
        self._fail(
            KeepAliveStalled(
                f"lease {self.lease_id:x}: no check-in for {self.stall_limit}s; "
                "the pump stopped sending keepalives"
            )
        )
        return True

    def _acked(self, ttl: int, sent: float) -> None:
        if self._failure is not None:
            return
        if ttl <= 0:
            self._fail(LeaseNotFound(f"lease {self.lease_id:x} has expired or was revoked"))
            return
        self.acks += 1
        sent_at = sent + self._offset
        latest = self._latest
        if latest is None or sent_at > latest.sent_at:
            self._latest = KeepAlive(self.lease_id, ttl, sent_at)
            self._notify_soon(self._notify)

    def _fail(self, error: EtcdError) -> None:
        if self._failure is None:
            self._failure = error
            self._notify_soon(self._notify)

    # Loop thread (real client).

    def _loop_start(self) -> None:
        self._request = rpc_pb2.LeaseKeepAliveRequest(ID=self.lease_id)
        self._tick()

    def _tick(self) -> None:
        self._handle = None
        if self.stopped or self._failure is not None or self._stalled():
            return
        hub = self._hub
        assert hub is not None
        stream = hub._stream
        delay = self.interval
        if stream is not None and stream.loop_send(self._request):
            assert isinstance(stream.loop_tap, _LoopRouter)
            stream.loop_tap.pump_sent(self, self._clock())
            self.sends += 1
        else:
            # No open stream: ask Trio for one (once per stream seen) and retry soon.
            if self._reopen_asked_for is not stream or stream is None:
                self._reopen_asked_for = stream
                hub._client.lease_bridge.post(self._reopen.set, urgent=True)
            delay = min(self.interval, _REOPEN_RETRY)
        self._handle = asyncio.get_running_loop().call_later(delay, self._tick)

    def _loop_stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


_REOPEN_RETRY = 0.1  # seconds between a pump's sends while it has no open stream


class _LoopRouter:
    """Loop thread only: whose request, per lease, the next answer of one stream belongs to.

    A slot is ``None`` for an ordinary (Trio) request, whose answer goes on to Trio, or a
    pump and its send time, whose answer is handled here.
    """

    __slots__ = ("fifo", "ordinary_sent")

    def __init__(self) -> None:
        self.fifo: dict[int, deque[tuple[KeepAlivePump, float] | None]] = {}
        self.ordinary_sent = 0

    def sent(self, request: Any) -> None:
        self.ordinary_sent += 1
        self.fifo.setdefault(request.ID, deque()).append(None)

    def pump_sent(self, pump: KeepAlivePump, sent: float) -> None:
        self.fifo.setdefault(pump.lease_id, deque()).append((pump, sent))

    def received(self, response: Any) -> bool:
        queue = self.fifo.get(response.ID)
        if not queue:
            return False
        slot = queue.popleft()
        if not queue:
            del self.fifo[response.ID]
        if slot is None:
            return False
        pump, sent = slot
        pump._acked(response.TTL, sent)
        return True


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
        self._pumps: set[KeepAlivePump] = set()

    def __repr__(self) -> str:
        pending = sum(len(q) for q in self._waiters.values())
        return f"<LeaseKeepAliveHub pending={pending} stream={'open' if self._stream else 'none'}>"

    def statistics(self) -> dict[str, int]:
        return {
            "pending": sum(len(q) for q in self._waiters.values()),
            "stream_open": int(self._stream is not None),
            "pumps": len(self._pumps),
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
                loop_tap=_LoopRouter(),
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
        if error is not None:
            for pump in self._pumps:
                pump._stream_broke(err)

    # -- pumps (Trio side) ----------------------------------------------------------------

    def start_pump(self, lease_id: int, interval: float, stall_limit: float) -> KeepAlivePump:
        """Start a pump on the lease bridge's loop (see :meth:`EtcdClient.keepalive_pump`)."""
        clock = trio.lowlevel.current_clock()
        if type(clock).__name__ != "SystemClock" or not type(clock).__module__.startswith("trio"):
            raise ConfigError(
                "keepalive_pump", f"needs Trio's default (perf_counter) clock, not {clock!r}"
            )
        bridge = self._client.lease_bridge
        pump = KeepAlivePump(
            lease_id,
            interval,
            stall_limit,
            clock=time.perf_counter,
            offset=trio.current_time() - time.perf_counter(),
            notify_soon=lambda fn: bridge.post(fn, urgent=True),
        )
        pump._hub = self
        self._ensure_stream()
        self._pumps.add(pump)
        bridge.submit(pump._loop_start, urgent=True)
        return pump

    def stop_pump(self, pump: KeepAlivePump, error: EtcdError) -> None:
        """Stop a pump: no keepalive is sent after this (its timer is cancelled on the loop)."""
        self._pumps.discard(pump)
        pump._stop(error)
        self._client.lease_bridge.submit(pump._loop_stop, urgent=True)

    async def serve_pump(self, pump: KeepAlivePump) -> None:
        """Open a new stream whenever the pump asks for one (runs until cancelled)."""
        while True:
            await pump._reopen.wait()
            pump._reopen = trio.Event()
            if pump.stopped:
                continue
            try:
                await self._client.ensure_stream_auth()
            except EtcdError as exc:
                pump._stream_broke(exc)  # the pump asks again at its next tick
                continue
            if pump in self._pumps:
                self._ensure_stream()

    def _fail_all(self, err: EtcdError) -> None:
        waiters, self._waiters = self._waiters, {}
        for queue in waiters.values():
            for waiter in queue:
                waiter.result = err
                waiter.done.set()

    async def aclose(self) -> None:
        for pump in list(self._pumps):
            self.stop_pump(pump, EtcdUnavailable("the etcd client was closed"))
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
        self._fail_all(EtcdUnavailable("the etcd client was closed"))
