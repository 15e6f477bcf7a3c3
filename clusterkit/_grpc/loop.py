"""Run a coroutine on a bridge's asyncio loop and wait for it from Trio (cancellation-safe).

The gRPC server and the gRPC channels of ``ck.grpc_channel`` run on one :class:`AioBridge`
loop, like the etcd client (see ``_etcd/bridge.py`` for the two batched queues between the
threads). :func:`run_on_loop` is their one primitive: the Trio task parks; the loop runs the
coroutine as a task whose done-callback posts the outcome back. Cancelling the Trio task
cancels the asyncio task (urgent lane), which cancels the RPC it awaits; the Trio task does not
wait for that, as with the etcd bridge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

from .._errors import PeerUnreachable
from .._etcd.bridge import AioBridge

T = TypeVar("T")


class _Pending:
    __slots__ = ("cancelled", "future", "task", "waiting")

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.future: asyncio.Future[Any] | None = None
        self.cancelled = False  # loop side: do not start / cancel what started
        self.waiting = True  # Trio side: still parked


@trio.lowlevel.enable_ki_protection
async def run_on_loop(bridge: AioBridge, factory: Callable[[], Awaitable[T]]) -> T:
    """``await factory()`` on ``bridge``'s loop; its result or exception, in Trio.

    Raises:
        PeerUnreachable: the bridge is closed.
        trio.Cancelled: the Trio task was cancelled (the loop's task is cancelled too).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    if bridge.closed:
        raise PeerUnreachable("the node's gRPC layer is closed")
    pending = _Pending()

    def wake(result: outcome.Outcome[Any]) -> None:  # Trio thread
        if pending.waiting:
            pending.waiting = False
            trio.lowlevel.reschedule(pending.task, result)

    def done(future: asyncio.Future[Any]) -> None:  # loop thread
        if future.cancelled():
            result: outcome.Outcome[Any] = outcome.Error(
                PeerUnreachable("the node's gRPC layer closed during the call")
            )
        elif future.exception() is not None:
            result = outcome.Error(future.exception())  # type: ignore[arg-type]
        else:
            result = outcome.Value(future.result())
        bridge.post(lambda: wake(result), now=True)

    def start() -> None:  # loop thread
        if pending.cancelled:
            return
        try:
            future = pending.future = asyncio.ensure_future(factory())
        except Exception as exc:
            error: outcome.Outcome[Any] = outcome.Error(exc)
            bridge.post(lambda: wake(error), now=True)
            return
        future.add_done_callback(done)

    def cancel() -> None:  # loop thread
        pending.cancelled = True
        if pending.future is not None:
            pending.future.cancel()

    def abort(_: Any) -> trio.lowlevel.Abort:
        pending.waiting = False
        bridge.submit(cancel, urgent=True)
        return trio.lowlevel.Abort.SUCCEEDED

    bridge.submit(start)
    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result
