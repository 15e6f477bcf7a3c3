"""Partition assignment: a pure function from (previous map, nodes, P, R) to the next map.

Theory of operation
-------------------
A map gives each of the P partitions an ordered tuple of k = min(R, N) distinct nodes; the
first is the partition's preferred leader. ``assign`` computes the next map from the
previous one in three steps, each of which only does what balance forces it to do.

1. Targets. Only the previous replicas still on active nodes can be kept (rows are also
   deduplicated and cut to k). Call c[n] the kept replicas of node n. The k*P replicas are
   split into per-node targets t[n]: floor or ceiling of the node's quota k*P*w[n]/W (at
   most P, the rest water-filled over the others), the ceilings going first to nodes with
   c[n] > floor, then dealt to the zones in turn. A node can keep at most min(c[n], t[n])
   of its replicas, so every balanced map moves at least ``sum(max(0, t[n] - c[n]))``
   replicas; the choice of ceilings makes this the least over all balanced targets. That
   number is ``minimum_moves``.

2. Replicas. Nodes under target are served one after the other, those that already hold
   the most open partitions (or whose zone does) first, since they have the fewest places
   to go; otherwise in node order (grouped by zone, then by hash rank). Each first fills
   empty slots, taking the partitions that miss the most replicas first: on a cold start
   this deals the replicas out round after round, each round in its own pseudo-random
   partition order, so that a node's co-replicas are many different nodes (a departing
   node's load is then spread over everybody); a node first skips rows that already have
   its zone, so rows get distinct zones whenever the zones' shares allow. Then it takes
   replicas from nodes above target, preferring partitions they do not lead, where their
   zone is crowded, and with the lowest rendezvous score. Every replica added fills a
   slot that had to be filled, so the number of moves is the lower bound. When a node
   finds no slot it may take (the open slots are all in partitions it already holds), a
   breadth-first search re-routes replicas added in this call, or trades a ceiling
   between two nodes, which costs no extra move. Only when no such route exists does a
   forced exchange move one replica more than the bound (see ``minimum_moves`` for why
   the bound is sometimes out of reach; the tests check such results against an exact
   solver).

3. Leaders. The previous first replica stays leader while it is still a replica. Each
   node's leader quota is P*w[n]/W, capped by its replica count (water-filled), and its
   leader count must land on the floor or the ceiling of it. Leaderless partitions go to
   the replica that is most constrained (fewest chances left for what it still needs).
   Nodes below their floor then take leadership from co-replicas above their ceiling,
   nodes above their ceiling hand it to co-replicas below theirs, and the rest is fixed
   along cheapest chains of hand-overs (a hand-over costs a change unless the partition's
   leader changed anyway). A last pass cancels chains of negative cost, which give more
   leaderships back to previous leaders than they take (cycle cancelling, with a work
   cap). Only the order inside rows changes here: no data moves for leader balance.

Ties are broken by rendezvous hashing (``hashing.rendezvous_score``) and node ranks, never
by dict or set iteration order or by ``hash()``, so equal inputs give equal maps in every
process. The work is O(P*k log) for the common cases; the searches run only on what the
greedy passes leave over, and the leader clean-up has a fixed work cap.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from clusterkit._core.hashing import node_rank, rendezvous_score

__all__ = [
    "MapStats",
    "NodeSpec",
    "PartitionMap",
    "assign",
    "balance",
    "count_leader_changes",
    "count_moves",
    "map_stats",
    "minimum_moves",
]

PartitionMap = Mapping[int, Sequence[str]]
"""A partition map: partition number -> ordered replicas, the preferred leader first."""

_ZONE_SCAN = 64  # extra candidates examined when looking for a zone-distinct slot
_PREFER_SCAN = 32  # nodes examined past the first end for a better one
_IMPROVE_BUDGET = 200_000  # partitions examined when looking for cheaper leader hand-overs


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """How a node takes part in the assignment.

    Attributes:
        weight: relative capacity; replica and leader counts are proportional to it.
        zone: failure domain; replicas of a partition go to distinct zones where possible.
    """

    weight: float = 1.0
    zone: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"node weight must be finite and positive, not {self.weight!r}")


def assign(
    previous: PartitionMap | None,
    nodes: Sequence[str] | Mapping[str, NodeSpec],
    partitions: int,
    replica_factor: int,
) -> dict[int, tuple[str, ...]]:
    """Compute the next partition map (see the module docstring for the algorithm).

    For unweighted nodes the result guarantees: every partition has exactly
    ``min(replica_factor, len(nodes))`` distinct replicas, all in ``nodes``; per-node replica
    counts differ by at most one, and so do per-node leader counts (first replicas); the
    number of replicas added is ``minimum_moves(previous, ...)`` whenever that lower bound
    can be reached at all (see there), and a previous leader keeps its partition unless
    leader balance needs the change; the result depends only on the arguments' values, not
    on the order of ``nodes``. Weighted nodes get counts within one of their proportional
    quota. Zones are a best effort that never costs a move or breaks the counts.

    Args:
        previous: the current map, or None (or empty) on a cold start. Entries for nodes
            not in ``nodes`` and partitions outside ``range(partitions)`` are ignored.
        nodes: the active node ids, or a mapping from node id to its :class:`NodeSpec`.
        partitions: P, at least 1.
        replica_factor: R, at least 1.

    Returns:
        A dict with a key for every partition in ``range(partitions)``, mapping it to its
        replicas, preferred leader first (an empty tuple when there are no nodes).

    Raises:
        ValueError: P or R is less than 1, or a node id is given twice.
        TypeError: ``nodes`` is a single string.
    """
    planner = _Planner(previous, nodes, partitions, replica_factor)
    return planner.run()


def minimum_moves(
    previous: PartitionMap | None,
    nodes: Sequence[str] | Mapping[str, NodeSpec],
    partitions: int,
    replica_factor: int,
) -> int:
    """Return the least number of replica moves that reaches a balanced map from ``previous``.

    With c[n] the replicas node n can keep and t[n] its balanced target (step 1 of the
    module docstring), the bound is ``sum(max(0, t[n] - c[n]))``. Since
    ``sum(t) - sum(c)`` is the number of empty slots, this equals the replicas lost with
    departed nodes (and cut from over-long rows) plus the replicas that must leave nodes
    above their target, ``sum(max(0, c[n] - t[n]))``.

    The bound counts replicas per node only, and rows can make it unreachable: when a node
    that must grow already sits in every row that lost a replica, and the rows it is not
    in are full, some other replica has to shift to make room, one move more than the
    bound. This needs few nodes for the replica factor (k close to N) and is rare even
    then (about 3 steps in 10,000 of random joins and leaves with N <= 16); ``assign`` then
    still moves as few replicas as possible (the tests check it with an exact min-cost
    flow on small maps).
    """
    return _Planner(previous, nodes, partitions, replica_factor).lower_bound()


def count_moves(old: PartitionMap | None, new: PartitionMap) -> int:
    """Return the replica moves from ``old`` to ``new``: sum over partitions of |new - old|."""
    old = old or {}
    return sum(len(set(row) - set(old.get(p, ()))) for p, row in new.items())


def count_leader_changes(old: PartitionMap | None, new: PartitionMap) -> int:
    """Return how many partitions of ``new`` have another first replica than in ``old``.

    A partition that had no replicas in ``old`` and has some in ``new`` counts as a change.
    """
    old = old or {}
    changes = 0
    for p, row in new.items():
        before = old.get(p, ())
        if row and (not before or before[0] != row[0]):
            changes += 1
    return changes


@dataclass(frozen=True, slots=True)
class MapStats:
    """Per-node replica and leader counts of a map, for tests and benchmarks."""

    replicas: dict[str, int] = field(default_factory=dict)
    leaders: dict[str, int] = field(default_factory=dict)

    @property
    def replica_spread(self) -> int:
        """Largest minus smallest per-node replica count (0 for no nodes)."""
        return _spread(self.replicas.values())

    @property
    def leader_spread(self) -> int:
        """Largest minus smallest per-node leader count (0 for no nodes)."""
        return _spread(self.leaders.values())


def map_stats(assignment: PartitionMap, nodes: Iterable[str] | None = None) -> MapStats:
    """Count replicas and leaders per node; ``nodes`` adds nodes that hold nothing."""
    replicas: dict[str, int] = dict.fromkeys(nodes or (), 0)
    leaders: dict[str, int] = dict(replicas)
    for row in assignment.values():
        for node in row:
            replicas[node] = replicas.get(node, 0) + 1
            leaders.setdefault(node, 0)
        if row:
            leaders[row[0]] += 1
    return MapStats(replicas=replicas, leaders=leaders)


def balance(assignment: PartitionMap, nodes: Iterable[str] | None = None) -> tuple[int, int]:
    """Return (replica max - min, leader max - min) over the nodes of ``assignment``."""
    stats = map_stats(assignment, nodes)
    return stats.replica_spread, stats.leader_spread


def _mix32(x: int) -> int:
    """A fixed 32-bit integer mixer (a bijection), for cheap pseudo-random orders."""
    x &= 0xFFFF_FFFF
    x = ((x ^ (x >> 16)) * 0x045D_9F3B) & 0xFFFF_FFFF
    x = ((x ^ (x >> 16)) * 0x045D_9F3B) & 0xFFFF_FFFF
    return x ^ (x >> 16)


def _spread(values: Iterable[int]) -> int:
    counts = list(values)
    return max(counts) - min(counts) if counts else 0


def _quotas(total: int, weights: Sequence[Fraction], caps: Sequence[int]) -> list[Fraction]:
    """Split ``total`` in proportion to ``weights``, no share above its cap (water-filling)."""
    result = [Fraction(0)] * len(weights)
    free = list(range(len(weights)))
    remaining = Fraction(total)
    while free:
        wsum = sum(weights[i] for i in free)
        capped = {i for i in free if remaining * weights[i] > caps[i] * wsum}
        if not capped:
            for i in free:
                result[i] = remaining * weights[i] / wsum
            break
        for i in sorted(capped):
            result[i] = Fraction(caps[i])
            remaining -= caps[i]
        free = [i for i in free if i not in capped]
    return result


def _apportion(quotas: Sequence[Fraction], have: Sequence[int], order: Sequence[int]) -> list[int]:
    """Integer shares, each the floor or ceiling of its quota.

    The ceilings go first to shares that already hold more than their floor (fewer
    moves), then to the largest remainders, then by ``order``.
    """
    shares = [math.floor(q) for q in quotas]
    extra = int(sum(quotas)) - sum(shares)
    fractional = [i for i, q in enumerate(quotas) if q != shares[i]]
    fractional.sort(key=lambda i: (have[i] <= shares[i], shares[i] - quotas[i], order[i]))
    for i in fractional[:extra]:
        shares[i] += 1
    return shares


def _normalize_nodes(
    nodes: Sequence[str] | Mapping[str, NodeSpec],
) -> list[tuple[str, NodeSpec]]:
    if isinstance(nodes, str):
        raise TypeError("nodes must be a sequence of node ids or a mapping, not a str")
    if isinstance(nodes, Mapping):
        specs = list(nodes.items())
    else:
        specs = [(node, NodeSpec()) for node in nodes]
        if len({node for node, _ in specs}) != len(specs):
            raise ValueError("node ids must be distinct")
    # Nodes grouped by zone (zoneless first), then in a hash order that ignores spelling.
    specs.sort(
        key=lambda item: (
            item[1].zone is not None,
            item[1].zone or "",
            node_rank(item[0]),
            item[0],
        )
    )
    return specs


class _Planner:
    """The state of one ``assign`` call; nodes are indices into ``ids`` (in node order)."""

    def __init__(
        self,
        previous: PartitionMap | None,
        nodes: Sequence[str] | Mapping[str, NodeSpec],
        partitions: int,
        replica_factor: int,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        if replica_factor < 1:
            raise ValueError(f"replica_factor must be at least 1, not {replica_factor}")
        specs = _normalize_nodes(nodes)
        self.ids = [node for node, _ in specs]
        index = {node: i for i, node in enumerate(self.ids)}
        n = len(self.ids)
        self.P = partitions
        self.k = min(replica_factor, n)
        zone_ids: dict[str, int] = {}
        # A zoneless node is a zone of its own: it never conflicts with anyone.
        self.zone = [
            -1 - i if spec.zone is None else zone_ids.setdefault(spec.zone, len(zone_ids))
            for i, (_, spec) in enumerate(specs)
        ]
        self.zoned = bool(zone_ids)
        self.weights = [Fraction(spec.weight) for _, spec in specs]

        self.members: list[list[int]] = [[] for _ in range(partitions)]
        self.prev_leader = [-1] * partitions
        for p, row in (previous or {}).items():
            if not 0 <= p < partitions:
                continue
            kept = self.members[p]
            for node in row:
                i = index.get(node, -1)
                if i >= 0 and i not in kept and len(kept) < self.k:
                    kept.append(i)
            if row and row[0] in index:
                self.prev_leader[p] = index[row[0]]
        self.count = [0] * n
        for kept in self.members:
            for i in kept:
                self.count[i] += 1
        quotas = _quotas(partitions * self.k, self.weights, [partitions] * n)
        self.lo = [math.floor(q) for q in quotas]
        self.hi = [math.ceil(q) for q in quotas]
        # Ceilings are dealt to the zones in turn, so that no zone gets more than its share:
        # the first node of every zone, then the second of every zone, and so on.
        seen_in_zone: dict[int, int] = {}
        turn = [0] * n
        for i, z in enumerate(self.zone):
            turn[i] = seen_in_zone[z] = seen_in_zone.get(z, -1) + 1
        interleaved = sorted(range(n), key=lambda i: (turn[i], i))
        order = [0] * n
        for position, i in enumerate(interleaved):
            order[i] = position
        self.target = _apportion(quotas, self.count, order)
        self.added: list[tuple[int, int]] = []
        self.buckets: list[deque[int]] = []
        self.donors: deque[int] = deque()
        self.drop_order: dict[int, list[int]] = {}
        self.drop_pos: dict[int, int] = {}
        self.owned: list[list[int]] = []
        self.take_order: dict[int, list[int]] = {}
        self.shuffled: set[int] = set()
        self.budget = 0
        self.lead: list[int] = []
        self.cur: list[int] = []
        self.lead_lo: list[int] = []
        self.lead_hi: list[int] = []
        self.inv: list[float] = []
        self.parts_of: list[list[int]] = []
        self.led: list[list[int]] = []
        self.changed_of: list[list[int]] = []

    def lower_bound(self) -> int:
        return sum(max(0, t - c) for t, c in zip(self.target, self.count, strict=True))

    def run(self) -> dict[int, tuple[str, ...]]:
        if not self.ids:
            return {p: () for p in range(self.P)}
        self._place_replicas()
        lead = self._choose_leaders()
        ids = self.ids
        result: dict[int, tuple[str, ...]] = {}
        for p, kept in enumerate(self.members):
            leader = lead[p]
            result[p] = (ids[leader], *(ids[i] for i in kept if i != leader))
        return result

    # -- step 2: replicas -------------------------------------------------------------------

    def _place_replicas(self) -> None:
        k, count, target, members = self.k, self.count, self.target, self.members
        self.buckets = [deque() for _ in range(k)]
        # Nodes that already hold many of the open partitions go first: they have the
        # fewest places to go. On a cold start nobody holds anything and node order stays.
        blocked = [0] * len(self.ids)
        zone_blocked: dict[int, int] = {}
        for p, kept in enumerate(members):
            if len(kept) < k:
                self.buckets[len(kept)].append(p)
                for i in kept:
                    blocked[i] += 1
                for z in {self.zone[i] for i in kept}:
                    zone_blocked[z] = zone_blocked.get(z, 0) + 1
        self.donors = deque(m for m in range(len(self.ids)) if count[m] > target[m])
        order = sorted(
            range(len(self.ids)),
            key=lambda i: (-zone_blocked.get(self.zone[i], 0), -blocked[i], i),
        )
        for i in order:
            if count[i] >= target[i]:
                continue
            if self.zoned:
                self._take_open(i, strict=True)
            self._take_open(i, strict=False)
            self._steal(i)
        for i in range(len(self.ids)):
            while count[i] < target[i]:
                if not self._augment(i):
                    self._force(i)

    def _add(self, p: int, i: int) -> None:
        self.members[p].append(i)
        self.added.append((p, i))
        self.count[i] += 1

    def _move(self, p: int, old: int, new: int) -> None:
        kept = self.members[p]
        kept.remove(old)
        kept.append(new)
        self.added.append((p, new))
        self.count[old] -= 1
        self.count[new] += 1

    def _zone_clash(self, i: int, kept: list[int], leaving: int = -1) -> bool:
        zone = self.zone
        zi = zone[i]
        return any(zone[j] == zi for j in kept if j != leaving)

    def _take_open(self, i: int, *, strict: bool) -> None:
        """Fill empty slots with node ``i``, partitions missing the most replicas first."""
        members, buckets, added, k = self.members, self.buckets, self.added, self.k
        need = self.target[i] - self.count[i]
        taken = 0
        for size in range(k):
            if taken >= need:
                break
            bucket = buckets[size]
            if size not in self.shuffled and bucket and not any(buckets[:size]):
                self._shuffle(size)
                bucket = buckets[size]
            aside: list[int] = []
            while bucket and taken < need:
                p = bucket.popleft()
                kept = members[p]
                if len(kept) != size:
                    continue  # stale entry: the partition was filled out of band
                if i in kept or (strict and self._zone_clash(i, kept)):
                    aside.append(p)
                    if strict and len(aside) > _ZONE_SCAN + need:
                        break
                    continue
                kept.append(i)
                added.append((p, i))
                taken += 1
                if size + 1 < k:
                    buckets[size + 1].append(p)
            bucket.extendleft(reversed(aside))
            if strict and aside:
                break  # never prefer a zone over filling the emptiest partitions first
        self.count[i] += taken

    def _shuffle(self, size: int) -> None:
        """Put a level of open partitions in a fixed pseudo-random order, once.

        Called when no emptier partition is left, so the level is complete. Each level gets
        its own order: a node's replicas then meet many different co-replicas instead of
        the same few, which spreads the leaderships a departing node leaves behind.
        """
        self.shuffled.add(size)
        salt = size * 0x9E37_79B9
        self.buckets[size] = deque(sorted(self.buckets[size], key=lambda p: (_mix32(p ^ salt), p)))

    def _drop_candidates(self, m: int) -> list[int]:
        """Node ``m``'s partitions, best to give away first (computed once, used lazily)."""
        order = self.drop_order.get(m)
        if order is None:
            node, zone, members = self.ids[m], self.zone, self.members
            zm = zone[m]
            if not self.owned:
                self.owned = self._owned()
            order = [p for p in self.owned[m] if m in members[p]]
            prev_leader = self.prev_leader
            if self.zoned:
                order.sort(
                    key=lambda p: (
                        prev_leader[p] == m,
                        sum(zone[j] == zm for j in members[p]) < 2,
                        rendezvous_score(node, p),
                        p,
                    )
                )
            else:
                # Zoneless nodes are zones of their own: m is alone in its zone in every row
                # (the second key above is always True), so the order is the same without it.
                order.sort(key=lambda p: (prev_leader[p] == m, rendezvous_score(node, p), p))
            self.drop_order[m] = order
            self.drop_pos[m] = 0
        return order

    def _give_up(
        self, m: int, i: int, *, strict: bool = False, cursor: dict[int, int] | None = None
    ) -> int:
        """A partition where node ``m`` may hand its replica to node ``i``, or -1.

        ``cursor`` remembers, per donor, how far the candidates were already rejected for
        this receiver, so that one receiver never rescans them.
        """
        order = self._drop_candidates(m)
        members = self.members
        pos = self.drop_pos[m]
        while pos < len(order) and m not in members[order[pos]]:
            pos += 1
        self.drop_pos[m] = pos
        if cursor is not None:
            pos = max(pos, cursor.get(m, pos))
        stop = min(len(order), pos + _ZONE_SCAN) if strict else len(order)
        j = pos
        while j < stop:
            kept = members[order[j]]
            clash = strict and self._zone_clash(i, kept, leaving=m)
            if m in kept and i not in kept and not clash:
                break
            j += 1
        if cursor is not None:
            cursor[m] = j
        return order[j] if j < stop else -1

    def _steal(self, i: int) -> None:
        """Take replicas from nodes above target, round robin over them."""
        count, target, donors = self.count, self.target, self.donors
        for strict in (True, False) if self.zoned else (False,):
            cursor: dict[int, int] = {}
            misses = 0
            while count[i] < target[i] and donors and misses < len(donors):
                m = donors.popleft()
                if count[m] <= target[m]:
                    continue  # drained by a re-routing
                p = self._give_up(m, i, strict=strict, cursor=cursor)
                if p < 0:
                    donors.append(m)
                    misses += 1
                    continue
                misses = 0
                self._move(p, m, i)
                if count[m] > target[m]:
                    donors.append(m)

    def _augment(self, start: int) -> bool:
        """Give ``start``'s missing replica a place without an extra move, if there is one.

        A breadth-first search carries the missing replica from node to node: ``x`` may
        take the place of a node ``j`` added in this call to a partition ``x`` does not
        hold (then ``j`` needs a place), or hand its ceiling to a node on its floor (then
        that node needs a place). It ends at a node that can fill an open slot, take a
        replica from a node above target, or take one from a node on its ceiling that trades
        the ceiling with a node above target.
        """
        members, count, target, lo, hi = self.members, self.count, self.target, self.lo, self.hi
        nodes = range(len(self.ids))
        open_parts = [p for p, kept in enumerate(members) if len(kept) < self.k]
        donors = [m for m in nodes if count[m] > target[m]]
        flexible = next((m for m in donors if target[m] < hi[m]), -1)
        owned = self._owned() if flexible >= 0 else []
        parent: dict[int, tuple[int, int]] = {}  # y -> (x, p): x takes y's place in p
        queue = deque([start])
        seen = {start}
        while queue:
            x = queue.popleft()
            if self._end_path(x, open_parts, donors, flexible, owned):
                while x in parent:
                    prev, p = parent[x]
                    if p < 0:
                        target[prev] -= 1
                        target[x] += 1
                    else:
                        self._move(p, x, prev)
                    x = prev
                return True
            for p, j in self.added:
                kept = members[p]
                if j not in seen and x not in kept and j in kept:
                    seen.add(j)
                    parent[j] = (x, p)
                    queue.append(j)
            if target[x] > lo[x]:
                for y in nodes:
                    if y not in seen and target[y] < hi[y]:
                        seen.add(y)
                        parent[y] = (x, -1)
                        queue.append(y)
        return False

    def _end_path(
        self,
        x: int,
        open_parts: list[int],
        donors: list[int],
        flexible: int,
        owned: list[list[int]],
    ) -> bool:
        """Let ``x`` take a free slot if there is one (see ``_augment``)."""
        members, count, target = self.members, self.count, self.target
        for p in open_parts:
            if x not in members[p]:
                self._add(p, x)
                return True
        for m in donors:
            p = self._give_up(m, x)
            if p >= 0:
                self._move(p, m, x)
                return True
        if flexible < 0:
            return False
        for m, parts in enumerate(owned):
            if count[m] != target[m] or target[m] <= self.lo[m]:
                continue
            for p in parts:
                kept = members[p]
                if m in kept and x not in kept:
                    self._move(p, m, x)
                    target[m] -= 1
                    target[flexible] += 1
                    return True
        return False

    def _owned(self) -> list[list[int]]:
        owned: list[list[int]] = [[] for _ in self.ids]
        for p, kept in enumerate(self.members):
            for j in kept:
                owned[j].append(p)
        return owned

    def _force(self, i: int) -> None:
        """Last resort: one replica more than the bound moves so that ``i`` gets a slot."""
        members, count, target, k = self.members, self.count, self.target, self.k
        short = next((p for p, kept in enumerate(members) if len(kept) < k), -1)
        donor = -1
        if short < 0:
            donor = next(m for m in range(len(self.ids)) if count[m] > target[m])
            short = next(p for p, kept in enumerate(members) if donor in kept)
        for q, kept in enumerate(members):
            j = next((j for j in kept if j not in members[short]), -1)
            if i in kept or j < 0:
                continue
            self._move(q, j, i)
            if donor >= 0:
                self._move(short, donor, j)
            else:
                self._add(short, j)
            return
        raise AssertionError("no slot for an under-target node")  # pragma: no cover

    # -- step 3: leaders --------------------------------------------------------------------

    def _choose_leaders(self) -> list[int]:
        members, n = self.members, len(self.ids)
        quotas = _quotas(self.P, self.weights, self.count)
        lo = self.lead_lo = [math.floor(q) for q in quotas]
        hi = self.lead_hi = [math.ceil(q) for q in quotas]
        self.inv = [1 / float(q) if q else 0.0 for q in quotas]
        lead = self.lead = [-1] * self.P
        cur = self.cur = [0] * n
        # 1. Previous leaders that are still replicas stay; leaderless partitions get one.
        for p, kept in enumerate(members):
            prev = self.prev_leader[p]
            if prev >= 0 and prev in kept:
                lead[p] = prev
                cur[prev] += 1
        self._assign_leaderless()
        self.parts_of = [[] for _ in range(n)]
        self.led = [[] for _ in range(n)]
        self.changed_of = [[] for _ in range(n)]
        for p, kept in enumerate(members):
            self.led[lead[p]].append(p)
            for i in kept:
                self.parts_of[i].append(p)
                if lead[p] != self.prev_leader[p]:
                    self.changed_of[i].append(p)
        # 2. A node below its floor takes from co-replicas above their ceiling: one change
        #    settles two forced ones.
        under = [x for x in range(n) if cur[x] < lo[x]]
        for x in under:
            self._take_directly(x, hi)
        # 3. Nodes above their ceiling hand over, directly or along a cheapest chain.
        for m in range(n):
            # Partitions whose leader changed anyway go first: handing them on is free.
            for p in sorted(self.led[m], key=lambda p: (self.prev_leader[p] == m, p)):
                if cur[m] <= hi[m]:
                    break
                if lead[p] == m:
                    takers = [x for x in members[p] if cur[x] < hi[x]]
                    if takers:
                        self._hand_over(p, self._least_loaded(p, takers))
            while cur[m] > hi[m] and self._along_path(m, shed=True):
                pass
        # 4. Nodes below their floor take, directly or along a cheapest chain.
        for x in under:
            self._take_directly(x, lo)
            while cur[x] < lo[x] and self._along_path(x, shed=False):
                pass
        # 5. Undo changes that a cheaper arrangement of the same balance does not need.
        self._improve_leaders()
        return lead

    def _assign_leaderless(self) -> None:
        """Give each leaderless partition a leader, most constrained replica first.

        A replica's slack is how many leaderless partitions it still has a chance at minus
        how many leaderships it still needs to reach its floor; the replica with the least
        slack (and below its ceiling) takes the partition. Unlike "least loaded first" this
        stays balanced when partitions that share replicas come in runs (a cold start).
        """
        members, lead, cur = self.members, self.lead, self.cur
        lo, hi, ids = self.lead_lo, self.lead_hi, self.ids
        leaderless = [p for p in range(self.P) if lead[p] < 0]
        chances = [0] * len(ids)
        for p in leaderless:
            for x in members[p]:
                chances[x] += 1
        for p in leaderless:
            kept = members[p]
            best: list[int] = []
            best_key = (2, 2, 0)
            for x in kept:
                key = (int(cur[x] >= hi[x]), int(cur[x] >= lo[x]), chances[x] - lo[x] + cur[x])
                if not best or key < best_key:
                    best, best_key = [x], key
                elif key == best_key:
                    best.append(x)
            x = best[0]
            if len(best) > 1:
                x = max(best, key=lambda x: (rendezvous_score(ids[x], p), x))
            lead[p] = x
            cur[x] += 1
            for y in kept:
                chances[y] -= 1

    def _improve_leaders(self) -> None:
        """Cancel leader changes that a cheaper arrangement avoids (bounded work).

        Looks for chains of hand-overs with a negative cost (they give more leaderships
        back to previous leaders than they take away): from a node above its floor to one
        below its ceiling, or around a cycle. Applies them until none is found; the work
        is capped by ``_IMPROVE_BUDGET`` so that huge maps stay fast.
        """
        lead, members, prev = self.lead, self.members, self.prev_leader
        if not any(x >= 0 and lead[p] != x and x in members[p] for p, x in enumerate(prev)):
            return  # no leadership could be given back: nothing to gain
        self.budget = _IMPROVE_BUDGET
        for cycles in (False, True):
            while self.budget > 0 and self._cancel_one(cycles=cycles):
                pass

    def _cancel_one(self, *, cycles: bool) -> bool:
        lead, members, cur = self.lead, self.members, self.cur
        lo, hi = self.lead_lo, self.lead_hi
        nodes = range(len(self.ids))
        dist = {s: 0 for s in nodes if cycles or cur[s] > lo[s]}
        parent: dict[int, tuple[int, int]] = {}  # x -> (u, p): x takes p from u
        queue = deque(dist)
        queued = set(dist)
        rounds = dict.fromkeys(dist, 1)
        looping = False  # a node queued more than n times sits on a negative cycle
        while queue and self.budget > 0 and not looping:
            u = queue.popleft()
            queued.discard(u)
            for p in self.led[u]:
                if lead[p] != u:
                    continue
                self.budget -= 1
                for x in members[p]:
                    d = dist[u] + self._change_cost(p, u, x)
                    if x != u and d < dist.get(x, d + 1):
                        dist[x] = d
                        parent[x] = (u, p)
                        if x not in queued:
                            queued.add(x)
                            queue.append(x)
                            rounds[x] = rounds.get(x, 0) + 1
                            looping = looping or rounds[x] > len(nodes)
        for end in sorted((x for x, d in dist.items() if d < 0), key=lambda x: (dist[x], x)):
            steps: list[tuple[int, int]] = []  # (partition, taker), walking back from end
            seen = {end: 0}
            y = end
            while y in parent:
                u, p = parent[y]
                steps.append((p, y))
                if u in seen:
                    steps = steps[seen[u] :]  # the walk closed a cycle: keep just the cycle
                    break
                seen[u] = len(steps)
                y = u
            else:
                if cycles or not (cur[y] > lo[y] and cur[end] < hi[end]):
                    continue
            if sum(self._change_cost(p, lead[p], x) for p, x in steps) < 0:
                for p, x in steps:
                    self._hand_over(p, x)
                return True
        return False

    def _least_loaded(self, p: int, candidates: list[int]) -> int:
        """The candidate furthest below its leader quota; ties by rendezvous score."""
        cur, lo, hi, inv = self.cur, self.lead_lo, self.lead_hi, self.inv
        best: list[int] = []
        best_key = (3, math.inf)
        for x in candidates:
            c = cur[x]
            key = ((c >= lo[x]) + (c >= hi[x]), c * inv[x])
            if key < best_key:
                best, best_key = [x], key
            elif key == best_key:
                best.append(x)
        if len(best) == 1:
            return best[0]
        return max(best, key=lambda x: (rendezvous_score(self.ids[x], p), x))

    def _take_directly(self, x: int, limit: list[int]) -> None:
        """Node ``x`` takes leadership from co-replicas led by nodes above ``limit``."""
        lead, cur, lo = self.lead, self.cur, self.lead_lo
        options = self.take_order.get(x)
        if options is None:
            node = self.ids[x]
            options = sorted(self.parts_of[x], key=lambda p: (-rendezvous_score(node, p), p))
            self.take_order[x] = options
        for free in (True, False):
            for p in options:
                if cur[x] >= lo[x]:
                    return
                u = lead[p]
                if u != x and cur[u] > limit[u] and (not free or self._change_cost(p, u, x) <= 0):
                    self._hand_over(p, x)

    def _change_cost(self, p: int, old: int, new: int) -> int:
        """How handing ``p`` from ``old`` to ``new`` changes the count of changed leaders."""
        prev = self.prev_leader[p]
        return (new != prev) - (old != prev)

    def _hand_over(self, p: int, x: int) -> None:
        old = self.lead[p]
        self.cur[old] -= 1
        self.cur[x] += 1
        self.lead[p] = x
        self.led[x].append(p)
        if old == self.prev_leader[p]:
            for i in self.members[p]:
                self.changed_of[i].append(p)

    def _along_path(self, start: int, *, shed: bool) -> bool:
        """Cheapest chain of hand-overs, breadth-first over costs 0 and 1.

        A hand-over of ``p`` costs 1 if it takes leadership from ``p``'s previous leader and
        0 otherwise (giving it back is counted as 0 here; ``_improve_leaders`` collects
        those gains afterwards). Shedding, ``start`` hands a partition to a co-replica,
        which may hand another one on, until a node below its ceiling takes it; gaining is
        the mirror image, ending at a node above its floor. Among the cheapest ends the
        search prefers one that is itself out of balance (looking a few nodes further).
        """
        lead, members, cur = self.lead, self.members, self.cur
        lo, hi, n = self.lead_lo, self.lead_hi, len(self.ids)
        edges = self.led if shed else self.parts_of
        dist = {start: 0}
        per_dist = [1]  # per_dist[d]: how many nodes have dist d
        parent: dict[int, tuple[int, int]] = {}
        done: set[int] = set()
        queue = deque([start])
        end, patience = -1, _PREFER_SCAN
        while queue:
            u = queue.popleft()
            if u in done:
                continue
            if end >= 0:
                patience -= 1
                if dist[u] > dist[end] or patience < 0:
                    break
            done.add(u)
            if u != start and (cur[u] < hi[u] if shed else cur[u] > lo[u]):
                if end < 0 or dist[u] < dist[end]:
                    end = u
                if cur[u] < lo[u] if shed else cur[u] > hi[u]:
                    end = u
                    break
                continue  # an end absorbs the hand-over: nothing flows on from it
            # Free hand-overs first (partitions whose leader changed anyway), then any,
            # stopping as soon as every other node is reached cheaply enough.
            for pass_no, candidates in enumerate((self.changed_of[u], edges[u])):
                bound = dist[u] + pass_no
                remaining = n - sum(per_dist[: bound + 1])
                for p in candidates:
                    if remaining <= 0:
                        break
                    if shed:
                        if lead[p] != u:
                            continue
                        steps = [(x, self._change_cost(p, u, x)) for x in members[p] if x != u]
                    else:
                        w = lead[p]
                        if w == u or w in done:
                            continue
                        steps = [(w, self._change_cost(p, w, u))]
                    for x, cost in steps:
                        if cost > 0 and not pass_no:
                            continue
                        d = dist[u] + (cost > 0)
                        old = dist.get(x, -1)
                        if x in done or 0 <= old <= d:
                            continue
                        if old < 0 or old > bound:
                            remaining -= 1
                        if old >= 0:
                            per_dist[old] -= 1
                        if d == len(per_dist):
                            per_dist.append(0)
                        per_dist[d] += 1
                        dist[x] = d
                        parent[x] = (u, p)
                        if d > dist[u]:
                            queue.append(x)
                        else:
                            queue.appendleft(x)
        if end < 0:
            return False
        steps_taken: list[tuple[int, int]] = []  # (partition, new leader)
        y = end
        while y != start:
            u, p = parent[y]
            steps_taken.append((p, y if shed else u))
            y = u
        for p, taker in steps_taken:
            self._hand_over(p, taker)
        return True
