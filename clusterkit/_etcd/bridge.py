"""The Trio <-> gRPC bridge.

Theory of operation
-------------------
grpcio's synchronous API is the only one that needs no asyncio loop, so clusterkit drives it
from Trio in two ways:

*Unary calls* start with the stub's ``.future(...)``: gRPC's own completion machinery runs the
RPC, and its done-callback wakes the waiting Trio task through the Trio token
(``run_sync_soon``). No thread per call, so 100 concurrent calls cost 100 futures, not 100
threads. When the Trio task is cancelled, the abort function cancels the gRPC future, so the
RPC really stops (a ``trio.to_thread`` bridge cannot do that: the abandoned call runs on to its
deadline). Every call also carries a gRPC deadline, so nothing waits forever.

*Streams* (Watch, LeaseKeepAlive) are bidirectional. Requests go in through a
``queue.SimpleQueue`` that a generator hands to gRPC; responses are read by ONE reader thread
per stream, which forwards each one into Trio with ``run_sync_soon`` (cheaper than
``from_thread.run``). Flow control is a credit semaphore: the reader takes a credit before
forwarding and the Trio side gives it back once the response is consumed, so a slow consumer
slows the stream (and etcd) down instead of growing memory without bound. A callback that
runs inside ``run_sync_soon`` must never raise (it would kill the Trio run), so the handler is
wrapped. Closing cancels the call, ends the request generator, and waits — from Trio, without
blocking it — for the reader thread to say it has finished before joining it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import trio

_CREDITS = 16384  # responses in flight per stream (QUEUE_LIMIT per watch is lower)
_STOP = object()


async def call_unary(
    method: Any,
    request: Any,
    *,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> Any:
    """Run one unary RPC without blocking Trio and without a thread.

    Args:
        method: a unary-unary multicallable of a generated stub (``stub.Range``).
        request: the request message.
        timeout: the gRPC deadline in seconds.
        metadata: gRPC metadata to send.

    Returns:
        The response message.

    Raises:
        grpc.RpcError: the call failed (the caller translates it).
        trio.Cancelled: the Trio task was cancelled; the RPC has been cancelled too, unless
            it had already completed (a write may then have been applied: as with any
            timeout, the outcome of a cancelled write is unknown).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    future = method.future(request, timeout=timeout, metadata=metadata)
    waiting = True

    def wake() -> None:
        nonlocal waiting
        if waiting:
            waiting = False
            trio.lowlevel.reschedule(task)

    def on_done(_: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(wake)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        future.cancel()
        return trio.lowlevel.Abort.SUCCEEDED

    future.add_done_callback(on_done)
    await trio.lowlevel.wait_task_rescheduled(abort)
    return future.result()


class BidiStream:
    """One bidirectional gRPC stream, fed from Trio and read by one thread.

    ``on_response(message)`` and ``on_error(exc)`` run in the Trio thread (through
    ``run_sync_soon``) and must not raise; exceptions they raise are swallowed after being
    handed to ``on_error``. ``on_error`` is called at most once, with the ``grpc.RpcError``
    (or other exception) that ended the stream, or ``None`` when the stream was closed by us.
    The consumer calls :meth:`release` once for every response it has finished with.
    """

    def __init__(
        self,
        method: Any,
        *,
        name: str,
        metadata: tuple[tuple[str, str], ...],
        on_response: Callable[[Any], None],
        on_error: Callable[[BaseException | None], None],
        credits: int = _CREDITS,
    ) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_response = on_response
        self._on_error = on_error
        self._credits = threading.Semaphore(credits)
        self._closing = False
        self._error_reported = False
        self._token = trio.lowlevel.current_trio_token()
        self._finished = trio.Event()
        self._call = method(self._request_iterator(), metadata=metadata)
        self._thread = threading.Thread(
            target=self._read, name=f"clusterkit-{name}-reader", daemon=True
        )
        self._thread.start()

    @property
    def closed(self) -> bool:
        """True once the stream has ended, by error or by :meth:`aclose`."""
        return self._closing or self._error_reported

    def send(self, request: Any) -> None:
        """Queue a request for the stream (never blocks)."""
        self._requests.put(request)

    def release(self, n: int = 1) -> None:
        """Give back ``n`` credits after consuming ``n`` responses."""
        self._credits.release(n)

    def _request_iterator(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is _STOP:
                return
            yield item

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for response in self._call:
                while not self._credits.acquire(timeout=0.5):
                    if self._closing:
                        break
                if self._closing:
                    break
                self._post(self._deliver, response)
        except grpc.RpcError as exc:
            error = exc
        except BaseException as exc:
            error = exc
        finally:
            self._post(self._end, error)

    def _post(self, fn: Callable[[Any], None], arg: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, arg)

    def _deliver(self, response: Any) -> None:
        if self._closing or self._error_reported:
            return
        try:
            self._on_response(response)
        except BaseException as exc:
            self._report(exc)
            self._requests.put(_STOP)
            self._call.cancel()

    def _end(self, error: BaseException | None) -> None:
        self._requests.put(_STOP)  # lets gRPC's request-consumer thread finish too
        if self._closing:
            self._report(None)
        else:
            self._report(error if error is not None else EOFError("stream ended"))
        self._finished.set()

    def _report(self, error: BaseException | None) -> None:
        if self._error_reported:
            return
        self._error_reported = True
        with contextlib.suppress(BaseException):
            self._on_error(error)

    async def aclose(self) -> None:
        """Cancel the call and wait until the reader thread has exited."""
        if not self._closing:
            self._closing = True
            self._requests.put(_STOP)
            self._call.cancel()
            self._credits.release(1)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await self._finished.wait()
            self._thread.join(timeout=1.0)
