"""The liveness probe: how long this node's Trio run loop goes without looking at its timers.

Theory of operation
-------------------
A node keeps its session only if its keepalives go out on time, and they go out from the same
Trio run loop as everything else (hooks, the app's own tasks, view building). Trio runs ready
tasks in batches and looks at timers and I/O between batches; the longest batch is the lag any
timer of the node — the keepalive's included — can suffer. The probe is a Trio instrument
(``after_io_wait`` marks the start of a batch, ``before_io_wait`` its end), so it measures
every batch without waking anything: it costs two calls per loop iteration and no task
wakeups, whatever the node holds. ``statistics()`` reports the longest batch ever seen and the
longest in the last ``WINDOW`` seconds, so a benchmark or an operator can tell a CPU-starved
node from a slow etcd. Several nodes in one process each see the same (shared) loop.
"""

from __future__ import annotations

import time

import trio

WINDOW = 10.0  # seconds covered by the recent maximum


class LivenessProbe(trio.abc.Instrument):
    """Measures the Trio run loop's longest batches (see the module docstring)."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.batches = 0
        self._started = 0.0
        self._window_start = time.perf_counter()
        self._window_max = 0.0
        self._previous_max = 0.0

    def __repr__(self) -> str:
        return f"<LivenessProbe max_lag={self.max_lag * 1000:.1f}ms>"

    def recent_max(self) -> float:
        """The longest batch in the current and the previous window (seconds)."""
        return max(self._window_max, self._previous_max)

    def statistics(self) -> dict[str, int]:
        return {
            "max_loop_lag_ms": round(self.max_lag * 1000),
            "recent_loop_lag_ms": round(self.recent_max() * 1000),
        }

    def after_io_wait(self, timeout: float) -> None:
        self._started = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        if not self._started:
            return
        now = time.perf_counter()
        self.record(now - self._started, now)

    def record(self, lag: float, now: float) -> None:
        self.batches += 1
        if now - self._window_start >= WINDOW:
            self._previous_max, self._window_max = self._window_max, 0.0
            self._window_start = now
        if lag > self._window_max:
            self._window_max = lag
            self.max_lag = max(self.max_lag, lag)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        trio.lowlevel.add_instrument(self)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            trio.lowlevel.remove_instrument(self)
