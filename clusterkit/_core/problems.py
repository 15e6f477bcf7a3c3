"""Rate-limited reporting of keys under the prefix that clusterkit ignores.

Theory of operation
-------------------
Garbage under the cluster prefix (an operator's stray key, a restored backup, a buggy tool) is
ignored by the view, and every watch reload reads it all again: logging each key each time
would bury a node's log (20,000 junk keys gave 20,000 lines per reload). So a
:class:`ProblemLog` logs the *first* problem of each key kind (node, leader, map, ...,
``unknown`` for keys of no kind) with its text, counts every problem per kind, and logs one
summary line with the counts of the last interval when a problem arrives after
``interval`` seconds have passed since the previous line. The counts per kind are also
statistics (``garbage_<kind>``) and so metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

SUMMARY_INTERVAL = 60.0


class ProblemLog:
    """Counts ignored keys per kind; logs the first of each kind, then periodic summaries."""

    def __init__(
        self,
        log: logging.Logger,
        who: str,
        *,
        interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._who = who
        self._interval = interval
        self._clock = clock
        self.total: Counter[str] = Counter()
        self._since_summary: Counter[str] = Counter()
        self._last_line = -float("inf")

    def report(self, kind: str, problem: str) -> None:
        """Count one ignored key of ``kind``; maybe log."""
        first = kind not in self.total
        self.total[kind] += 1
        now = self._clock()
        if first:
            self._log.warning(
                "%s: ignoring %s (further %s keys that are ignored are counted, and "
                "summarised at most every %.0f s)",
                self._who,
                problem,
                kind,
                self._interval,
            )
            self._last_line = now
            return
        self._since_summary[kind] += 1
        if now - self._last_line >= self._interval:
            counts = ", ".join(f"{k}={n}" for k, n in sorted(self._since_summary.items()))
            self._log.warning(
                "%s: ignored more bad keys under the prefix in the last %.0f s: %s (totals: %s)",
                self._who,
                now - self._last_line,
                counts,
                ", ".join(f"{k}={n}" for k, n in sorted(self.total.items())),
            )
            self._since_summary.clear()
            self._last_line = now

    def statistics(self) -> dict[str, int]:
        """``garbage_<kind>``: keys of that kind ignored so far."""
        return {f"garbage_{kind}": n for kind, n in self.total.items()}
