"""When the coordinator acts: debouncing membership changes, pacing commits (pure: time is
an argument).

Theory of operation
-------------------
Every rebalance moves data, so the coordinator waits until membership has been quiet for
``delay`` seconds before it writes a new map: a node that restarts, or flaps, inside that
window causes no moves at all (when the member set returns to what the map already covers,
the pending rebalance is dropped). Constant churn must not starve rebalancing either, so a
pending rebalance fires at the latest ``max_delay`` after the first unhandled change.

    deadline = min(last_change + delay, first_change + max_delay)

Once a map with moves in flight is stored, joining replicas report ready in bursts as their
hooks finish. Every map the coordinator writes is decoded by every node and costs a
revision, so commits are paced (:class:`CommitPacer`): when every announced replica is
ready the rows commit at once (the common end of a join: one map); otherwise the first
newly ready marker opens a window and everything ready when it closes commits in one map.
The first window is ``commit_interval(P)`` (0.25 s up to P = 16384, then in proportion, so
that the nodes' CPU spent decoding and applying commit maps stays bounded) and it doubles
after each partial commit of the same plan, up to 2 s. A join therefore costs the plan's
map, a few partial commits while replicas trickle in (about log2 of the trickle's length in
windows) and the last one, whatever P is.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_COMMIT_INTERVAL = 0.25  # seconds between partial commits, up to P = 16384
_COMMIT_INTERVAL_P = 16384


def commit_interval(partitions: int) -> float:
    """Seconds between two partial commits of a map with ``partitions`` partitions."""
    return MIN_COMMIT_INTERVAL * max(1.0, partitions / _COMMIT_INTERVAL_P)


@dataclass
class Debouncer:
    """Tracks when a change of the desired state should be acted on."""

    delay: float
    max_delay: float
    first_change: float | None = None
    last_change: float | None = None
    target: object = None

    def observe(self, target: object, satisfied: bool, now: float) -> float | None:
        """Record the desired state ``target`` seen at ``now``.

        Args:
            target: the desired state (e.g. the frozenset of active node ids).
            satisfied: True when the current map already matches ``target``.
            now: the current time.

        Returns:
            The deadline at which to act, or None when nothing is pending.
        """
        if satisfied:
            self.first_change = self.last_change = None
            self.target = target
            return None
        if target != self.target or self.first_change is None:
            if self.first_change is None:
                self.first_change = now
            self.last_change = now
            self.target = target
        return self.deadline()

    def deadline(self) -> float | None:
        """When the pending change should be acted on (None: nothing pending)."""
        if self.first_change is None or self.last_change is None:
            return None
        return min(self.last_change + self.delay, self.first_change + self.max_delay)

    def done(self) -> None:
        """The pending change was acted on."""
        self.first_change = self.last_change = None


@dataclass
class CommitPacer:
    """When to commit the ready rows of a map with moves in flight.

    The window doubles after every partial commit of the same plan, up to ``max_interval``:
    a join whose markers trickle in for T seconds costs about log2(T / interval) + T /
    max_interval partial commits, and the final one comes as soon as everything is ready.

    Attributes:
        interval: the first window between a newly ready marker and the commit.
        max_interval: the longest window.
        opened: when the current window opened (None: no window).
        partials: partial commits since the last plan.
    """

    interval: float
    max_interval: float = 2.0
    opened: float | None = None
    partials: int = 0

    def window(self) -> float:
        """The current window: ``interval`` doubled per partial commit, capped."""
        return min(
            self.interval * (1 << min(self.partials, 16)), max(self.max_interval, self.interval)
        )

    def observe(self, progressed: bool, complete: bool, now: float) -> float | None:
        """Record what a view says about readiness.

        Args:
            progressed: markers changed since the last look (something may be ready).
            complete: every announced joining replica is ready.
            now: the current time.

        Returns:
            When to commit (``<= now``: commit now), or None when nothing is to commit.
        """
        if complete:
            return now
        if progressed and self.opened is None:
            self.opened = now
        return None if self.opened is None else self.opened + self.window()

    def done(self, committed: bool) -> None:
        """A commit was attempted; ``committed``: a map was written."""
        self.opened = None
        if committed:
            self.partials += 1

    def restart(self) -> None:
        """A new plan was written: its first window is ``interval`` again."""
        self.opened = None
        self.partials = 0
