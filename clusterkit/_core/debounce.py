"""Debouncing membership changes before a rebalance (pure: time is an argument).

Theory of operation
-------------------
Every rebalance moves data, so the coordinator waits until membership has been quiet for
``delay`` seconds before it writes a new map: a node that restarts, or flaps, inside that
window causes no moves at all (when the member set returns to what the map already covers,
the pending rebalance is dropped). Constant churn must not starve rebalancing either, so a
pending rebalance fires at the latest ``max_delay`` after the first unhandled change.

    deadline = min(last_change + delay, first_change + max_delay)
"""

from __future__ import annotations

from dataclasses import dataclass


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
