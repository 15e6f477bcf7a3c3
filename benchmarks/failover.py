"""Leader failover: graceful leave, SIGKILL, drain and cut-off, with an overlap checker.

Run: ``python benchmarks/failover.py [--quick]``. Everything runs on one embedded etcd on
loopback; every phase has its own key prefix and a bounded number of rounds and seconds.

1. Graceful leave (4 in-process nodes, P=64, R=3): a node calls ``ck.leave()`` and is re-added
   once the others' map no longer has it, round after round (each node in turn). Measured:
   from the ``leave()`` call until, for every partition the leaver led, another node's
   ``is_leader(pt)`` is true (goal: p99 <= 100 ms).
2. SIGKILL (3 in-process nodes plus one node in a fresh ``python`` process, P=64): once the
   child leads its preferred partitions it is SIGKILLed (at a random phase of its keepalive
   period); measured: from the kill until an in-process node leads every partition the
   child led (the max over them), for session_ttl 2 and 5 s (goal: <= session_ttl + 0.6 s).
3. Drain (5 nodes, P=256, R=3): the duration of ``await ck.leave(drain=True)`` and the replica
   moves between the converged maps before and after, against ``minimum_moves``.
4. Overlaps: a sampler calls ``is_leader(pt)`` for every partition on every in-process node
   about every millisecond (all nodes share one process and clock) and counts the instants
   at which two nodes claim one partition, during phases 1, 3 and a cut-off phase (4 nodes,
   each reaching etcd through its own TCP proxy, session_ttl=2: a cut node must step down
   before anyone else leads; its failover time is measured too). Goal: 0.

Elsewhere than measured, rebalance_delay is 0.2 s. The sampler quantizes times to its
interval (shown in the last table).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import trio

import clusterkit
from clusterkit._actors.partitions import STAGGER
from clusterkit._core.assignment import count_moves, minimum_moves

R = 3
DELAY = 0.2  # rebalance_delay where it is not what is measured
LEAVE_P = 64
DRAIN_P = 256
LEAVE_GOAL = 0.100
KILL_SLACK = 0.6
MAX_CHUNKS = 10_000_000  # per proxied connection
NODE_SCRIPT = Path(__file__).with_name("_failover_node.py")
REPO = Path(__file__).resolve().parent.parent


class Stuck(Exception):
    """A condition the benchmark waits for did not come in time."""


# -- in-process nodes ----------------------------------------------------------------------


@dataclass
class Running:
    """An in-process node; ``stop()`` leaves the ``open_cluster`` block."""

    ck: clusterkit.ClusterKit
    scope: trio.CancelScope
    done: trio.Event

    @property
    def id(self) -> str:
        return self.ck.node_id

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(15):
            await self.done.wait()


def node_config(
    node_id: str, endpoint: str, prefix: str, partitions: int, **overrides: Any
) -> clusterkit.Config:
    settings: dict[str, Any] = {
        "node_id": node_id,
        "etcd_endpoints": [endpoint],
        "etcd_prefix": prefix,
        "http_port": 0,
        "partitions": partitions,
        "replica_factor": R,
        "session_ttl": 10.0,
        "rebalance_delay": DELAY,
        "metrics_port": None,
        "grpc_port": 0,
    }
    settings.update(overrides)
    return clusterkit.Config(**settings)


async def start_node(nursery: trio.Nursery, config: clusterkit.Config) -> Running:
    """Start a node in ``nursery``; returns once it is registered and has a view."""

    async def run(task_status: trio.TaskStatus[Running]) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with clusterkit.open_cluster(config) as ck:
                    task_status.started(Running(ck, scope, done))
                    await trio.sleep_forever()
        finally:
            done.set()

    with trio.fail_after(30):
        node: Running = await nursery.start(run)
    return node


async def poll_until(pred: Callable[[], bool], timeout: float, what: Callable[[], str]) -> float:
    """Poll ``pred`` every 5 ms; return the seconds it took, or raise :class:`Stuck`."""
    start = trio.current_time()
    for _ in range(int(timeout / 0.005) + 2):
        if pred():
            return trio.current_time() - start
        if trio.current_time() - start > timeout:
            break
        await trio.sleep(0.005)
    raise Stuck(f"after {timeout:.0f} s: {what()}")


def describe(nodes: Sequence[Running]) -> str:
    parts = []
    for n in nodes:
        v = n.ck.view
        led = sum(n.ck.is_leader(pt) for pt in range(n.ck.config.partitions))
        parts.append(
            f"{n.id}: map v{v.map.version if v.map else None} pending="
            f"{len(v.map.pending) if v.map else None} active={sorted(v.active_node_ids())} "
            f"leaders={len(v.leaders)} leads={led} healthy={n.ck.is_healthy()}"
        )
    return "; ".join(parts)


def converged(nodes: Sequence[Running], want: frozenset[str]) -> bool:
    """Every node sees the same converged map, covering exactly ``want``."""
    versions = set()
    for n in nodes:
        v = n.ck.view
        if v.map is None or not v.converged(R) or v.active_node_ids() != want:
            return False
        versions.add(v.map.version)
    return len(versions) == 1


def settled(nodes: Sequence[Running], extra: Iterable[str] = ()) -> bool:
    """Converged, every partition led by its preferred replica and nobody else, and every
    node's view showing exactly those leader keys.

    ``extra`` are members in other processes: they lead what their leader keys say.
    """
    others = frozenset(extra)
    if not converged(nodes, frozenset(n.id for n in nodes) | others):
        return False
    record = nodes[0].ck.view.map
    assert record is not None
    by_id = {n.id: n for n in nodes}
    for pt, row in enumerate(record.replicas):
        preferred = row[0]
        for n in nodes:
            if n.ck.is_leader(pt) != (n.id == preferred):
                return False
            owner = n.ck.view.leaders.get(pt)  # every view has caught up with the leader keys
            if owner is None or owner.node_id != preferred:
                return False
        if preferred not in by_id and preferred not in others:
            return False
    return True


async def wait_settled(
    nodes: Sequence[Running], timeout: float, extra: Iterable[str] = ()
) -> float:
    extra = tuple(extra)
    return await poll_until(lambda: settled(nodes, extra), timeout, lambda: describe(nodes))


async def wait_converged(nodes: Sequence[Running], timeout: float) -> float:
    want = frozenset(n.id for n in nodes)
    return await poll_until(lambda: converged(nodes, want), timeout, lambda: describe(nodes))


# -- the sampler (overlap checker) ----------------------------------------------------------


@dataclass
class Tracker:
    """Watches the partitions ``old`` led until another node leads each of them."""

    partitions: frozenset[int]
    old: str
    start: float
    first: dict[int, float] = field(default_factory=dict)  # first claim by another node
    last_old: dict[int, float] = field(default_factory=dict)  # last claim by ``old``
    gone_at: float | None = None  # when every sampled node's view had ``old`` gone
    done: trio.Event = field(default_factory=trio.Event)

    def per_partition(self) -> list[float]:
        return [t - self.start for t in self.first.values()]

    def latency(self) -> float:
        return max(self.per_partition(), default=0.0)

    def gone(self) -> float | None:
        return None if self.gone_at is None else self.gone_at - self.start

    def fence_lead(self) -> float | None:
        """Least time between ``old``'s last claim and the successor's first, over partitions."""
        leads = [self.first[pt] - t for pt, t in self.last_old.items() if pt in self.first]
        return min(leads, default=None)


class Sampler:
    """Samples ``is_leader`` of every partition on every node in ``nodes``."""

    def __init__(self, partitions: int, interval: float, *, external: bool = False) -> None:
        self.partitions = partitions
        self.interval = interval
        self.external = external  # some members are not sampled: gaps and changes mean little
        self.nodes: list[Running] = []
        self.trackers: list[Tracker] = []
        self.samples = 0
        self.first_at = self.last_at = 0.0
        self.max_interval = 0.0  # longest time between two samples while timing something
        self.timing = False  # set while timing something no tracker covers (a drain)
        self.overlaps = 0  # (instant, partition) pairs claimed by more than one node
        self.overlap_examples: list[str] = []
        self.changes = 0  # a partition's leader is another node than the last one seen
        self.epoch_regressions = 0
        self.max_gap = 0.0  # longest time a partition that had a leader had none
        self._owner: list[str | None] = [None] * partitions
        self._epoch: list[int] = [0] * partitions
        self._unled_since: list[float | None] = [None] * partitions

    def track(self, partitions: Iterable[int], old: str) -> Tracker:
        tracker = Tracker(frozenset(partitions), old, trio.current_time())
        if not tracker.partitions:
            tracker.done.set()
        else:
            self.trackers.append(tracker)
        return tracker

    async def run(self, budget: float) -> None:
        with trio.move_on_after(budget):
            for _ in range(int(budget / self.interval) + 1):
                self.sample()
                await trio.sleep(self.interval)

    def sample(self) -> None:
        now = trio.current_time()
        if self.samples and (self.trackers or self.timing):
            self.max_interval = max(self.max_interval, now - self.last_at)
        elif not self.samples:
            self.first_at = now
        self.samples += 1
        self.last_at = now
        claims: dict[int, list[str]] = {}
        for node in self.nodes:
            ck = node.ck
            nid = ck.node_id
            for pt in range(self.partitions):
                if ck.is_leader(pt):
                    claims.setdefault(pt, []).append(nid)
                    # The fencing epoch this node acts with (what tests/test_leaders.py checks).
                    epoch = ck._leadership.epochs.get(pt, 0)
                    if epoch < self._epoch[pt]:
                        self.epoch_regressions += 1
                    self._epoch[pt] = max(self._epoch[pt], epoch)
        for pt in range(self.partitions):
            who = claims.get(pt)
            if who is None:
                if self._owner[pt] is not None and self._unled_since[pt] is None:
                    self._unled_since[pt] = now
                continue
            if len(who) > 1:
                self.overlaps += 1
                if len(self.overlap_examples) < 5:
                    self.overlap_examples.append(f"t={now:.3f} pt={pt} {who}")
            since = self._unled_since[pt]
            if since is not None:
                if not self.external:
                    self.max_gap = max(self.max_gap, now - since)
                self._unled_since[pt] = None
            if self._owner[pt] is not None and self._owner[pt] != who[0]:
                self.changes += 1
            self._owner[pt] = who[0]
        for tracker in self.trackers:
            if tracker.gone_at is None and all(
                tracker.old not in n.ck.view.nodes for n in self.nodes if n.id != tracker.old
            ):
                tracker.gone_at = now
            for pt in tracker.partitions - tracker.first.keys():
                who = claims.get(pt, [])
                if tracker.old in who:
                    tracker.last_old[pt] = now
                if any(n != tracker.old for n in who):
                    tracker.first[pt] = now
            if len(tracker.first) == len(tracker.partitions) and tracker.gone_at is not None:
                tracker.done.set()
        self.trackers = [t for t in self.trackers if not t.done.is_set()]

    def forget(self, node: Running) -> None:
        if node in self.nodes:
            self.nodes.remove(node)


# -- a loopback TCP proxy with a switch (from tests/tcp_proxy.py) ---------------------------


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``target``; :meth:`cut` drops and refuses connections."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = 0
        self.open = True
        self._scopes: set[trio.CancelScope] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`restore`."""
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.open = True

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                async with upstream, trio.open_nursery() as nursery:

                    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                        try:
                            for _ in range(MAX_CHUNKS):  # and the phase's nursery bounds time
                                data = await src.receive_some(65536)
                                if not data:
                                    break
                                await dst.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(pump, client, upstream)
                    nursery.start_soon(pump, upstream, client)
            self._scopes.discard(scope)


@asynccontextmanager
async def open_proxy(target: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(target)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()


# -- a node in another process ---------------------------------------------------------------


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")  # a local file: not worth a thread


@asynccontextmanager
async def child_node(
    node_id: str, endpoint: str, prefix: str, partitions: int, ttl: float, logdir: Path
) -> AsyncIterator[trio.Process]:
    """Run ``_failover_node.py`` in a fresh interpreter; yields once it has joined."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = logdir / f"{prefix.strip('/').replace('/', '_')}-{node_id}.log"
    args = [
        sys.executable,
        str(NODE_SCRIPT),
        f"--endpoint={endpoint}",
        f"--prefix={prefix}",
        f"--node-id={node_id}",
        f"--partitions={partitions}",
        f"--replica-factor={R}",
        f"--session-ttl={ttl}",
        f"--rebalance-delay={DELAY}",
        "--max-seconds=120",
    ]
    with _open_log(log_path) as log:
        proc = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env
        )
    try:
        assert proc.stdout is not None
        seen = b""
        with trio.move_on_after(30):
            for _ in range(10_000):
                chunk = await proc.stdout.receive_some(4096)
                seen += chunk
                if not chunk or b"ready" in seen:
                    break
        if b"ready" not in seen:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise Stuck(f"child {node_id} did not join: {seen!r}\n{tail}")
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(5):
                await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()


# -- phases ----------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase measured; ``error`` is set when it was cut short."""

    name: str
    sampler: Sampler | None = None
    latencies: list[float] = field(default_factory=list)  # per failover: max over partitions
    per_partition: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)  # leave() durations
    fence_leads: list[float] = field(default_factory=list)
    gone: list[float] = field(default_factory=list)  # until every view had the node gone
    partitions: int = 0  # partition failovers measured
    seconds: float = 0.0
    failovers: int = 0
    timeouts: int = 0
    rounds_note: str = ""
    error: str | None = None
    drains: list[DrainRow] = field(default_factory=list)

    def record(self, tracker: Tracker) -> None:
        self.latencies.append(tracker.latency())
        self.per_partition.extend(tracker.per_partition())
        self.partitions += len(tracker.partitions)
        gone = tracker.gone()
        if gone is not None:
            self.gone.append(gone)


@dataclass
class DrainRow:
    victim: str
    coordinator: bool
    drain_s: float
    settle_s: float
    moves: int
    minimum: int
    maps: int
    led: int


async def leave_phase(
    phase: Phase, endpoint: str, rounds: int, budget: float, interval: float
) -> None:
    prefix = "/bench/leave"
    names = ["a", "b", "c", "d"]
    sampler = phase.sampler = Sampler(LEAVE_P, interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run, budget + 120)
        nodes: dict[str, Running] = {}
        for name in names:
            nodes[name] = await start_node(nursery, node_config(name, endpoint, prefix, LEAVE_P))
            sampler.nodes.append(nodes[name])
        await wait_settled(list(nodes.values()), 30)
        deadline = trio.current_time() + budget
        for i in range(rounds):
            if trio.current_time() > deadline:
                phase.rounds_note = f"stopped after {i} of {rounds} rounds: {budget:.0f} s budget"
                break
            name = names[i % len(names)]
            victim = nodes[name]
            led = [pt for pt in range(LEAVE_P) if victim.ck.is_leader(pt)]
            tracker = sampler.track(led, name)
            tracker.start = trio.current_time()
            await victim.ck.leave()
            phase.calls.append(trio.current_time() - tracker.start)
            with trio.move_on_after(5):
                await tracker.done.wait()
            if tracker.done.is_set():
                phase.record(tracker)
                phase.failovers += 1
            else:
                phase.timeouts += 1
            await victim.stop()
            sampler.forget(victim)
            del nodes[name]
            await wait_converged(list(nodes.values()), 20)
            nodes[name] = await start_node(nursery, node_config(name, endpoint, prefix, LEAVE_P))
            sampler.nodes.append(nodes[name])
            await wait_settled(list(nodes.values()), 30)
        nursery.cancel_scope.cancel()


async def kill_phase(
    phase: Phase, endpoint: str, ttl: float, kills: int, interval: float, logdir: Path
) -> None:
    prefix = f"/bench/kill-{ttl:g}"
    sampler = phase.sampler = Sampler(LEAVE_P, interval, external=True)
    rng = random.Random(int(ttl * 1000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run, kills * (ttl + 60) + 60)
        nodes = []
        for name in ["a", "b", "c"]:
            cfg = node_config(name, endpoint, prefix, LEAVE_P, session_ttl=ttl)
            nodes.append(await start_node(nursery, cfg))
        sampler.nodes.extend(nodes)
        await wait_settled(nodes, 30)
        for k in range(kills):
            child = f"k{k}"
            async with child_node(child, endpoint, prefix, LEAVE_P, ttl, logdir) as proc:
                await wait_settled(nodes, 30, extra=[child])
                await trio.sleep(rng.uniform(0, ttl / 3))  # a random phase of its keepalives
                await wait_settled(nodes, 5, extra=[child])
                view = nodes[0].ck.view
                led = [pt for pt, owner in view.leaders.items() if owner.node_id == child]
                tracker = sampler.track(led, child)
                tracker.start = trio.current_time()
                proc.kill()
                with trio.move_on_after(ttl + 10):
                    await tracker.done.wait()
                if tracker.done.is_set():
                    phase.record(tracker)
                    phase.failovers += 1
                else:
                    phase.timeouts += 1
            await wait_converged(nodes, 30)
        nursery.cancel_scope.cancel()


async def cutoff_phase(phase: Phase, endpoint: str, cuts: int, interval: float) -> None:
    prefix = "/bench/cut"
    names = ["a", "b", "c", "d"]
    ttl = 2.0
    sampler = phase.sampler = Sampler(LEAVE_P, interval)
    async with trio.open_nursery() as nursery:
        proxies = {name: await nursery.start(_serve_proxy, endpoint) for name in names}
        nursery.start_soon(sampler.run, cuts * 60 + 60)
        nodes: list[Running] = []
        for name in names:
            cfg = node_config(
                name,
                proxies[name].endpoint,
                prefix,
                LEAVE_P,
                session_ttl=ttl,
                etcd_request_timeout=0.5,
            )
            nodes.append(await start_node(nursery, cfg))
        sampler.nodes.extend(nodes)
        await wait_settled(nodes, 30)
        for i in range(cuts):
            victim = nodes[i % len(nodes)]
            led = [pt for pt in range(LEAVE_P) if victim.ck.is_leader(pt)]
            tracker = sampler.track(led, victim.id)
            tracker.start = trio.current_time()
            proxies[victim.id].cut()
            with trio.move_on_after(ttl + 10):
                await tracker.done.wait()
            if tracker.done.is_set():
                phase.record(tracker)
                lead = tracker.fence_lead()
                if lead is not None:
                    phase.fence_leads.append(lead)
                phase.failovers += 1
            else:
                phase.timeouts += 1
            proxies[victim.id].restore()
            await wait_settled(nodes, 60)
        nursery.cancel_scope.cancel()


async def _serve_proxy(target: str, task_status: trio.TaskStatus[Proxy]) -> None:
    async with open_proxy(target) as proxy:
        task_status.started(proxy)
        await trio.sleep_forever()


async def drain_phase(phase: Phase, endpoint: str, trials: int, interval: float) -> None:
    names = [f"n{i}" for i in range(5)]
    sampler = phase.sampler = Sampler(DRAIN_P, interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run, trials * 120 + 60)
        for trial in range(trials):
            prefix = f"/bench/drain-{trial}"
            nodes: list[Running] = []
            for name in names:
                nodes.append(
                    await start_node(nursery, node_config(name, endpoint, prefix, DRAIN_P))
                )
            sampler.nodes = list(nodes)
            sampler._owner = [None] * DRAIN_P  # a new cluster: leaders are not failovers
            sampler._unled_since = [None] * DRAIN_P
            sampler._epoch = [0] * DRAIN_P
            await wait_settled(nodes, 60)
            view = nodes[0].ck.view
            assert view.map is not None and view.coordinator is not None
            coordinator = view.coordinator.node_id
            # Odd trials drain the coordinator, even ones another node.
            victim = next(n for n in nodes if (n.id == coordinator) == (trial % 2 == 1))
            before = view.map.as_assignment()
            led = sum(victim.ck.is_leader(pt) for pt in range(DRAIN_P))
            start = trio.current_time()
            sampler.timing = True
            with trio.fail_after(60):
                await victim.ck.leave(drain=True)
            drain_s = trio.current_time() - start
            sampler.timing = False
            await victim.stop()
            sampler.forget(victim)
            rest = [n for n in nodes if n is not victim]
            settle_s = drain_s + await wait_settled(rest, 30)
            after_view = rest[0].ck.view
            assert after_view.map is not None
            after = after_view.map.as_assignment()
            phase.drains.append(
                DrainRow(
                    victim=victim.id,
                    coordinator=victim.id == coordinator,
                    drain_s=drain_s,
                    settle_s=settle_s,
                    moves=count_moves(before, after),
                    minimum=minimum_moves(before, [n.id for n in rest], DRAIN_P, R),
                    maps=after_view.map.version - view.map.version,
                    led=led,
                )
            )
            phase.failovers += 1
            for n in rest:
                await n.stop()
            sampler.nodes = []
        nursery.cancel_scope.cancel()


# -- reporting -------------------------------------------------------------------------------


class LogCounter(logging.Handler):
    """Counts clusterkit's warnings and errors per phase, keeping a few examples."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.phase = "setup"
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[(self.phase, record.levelname)] += 1
        key = (self.phase, str(record.msg))
        if key not in self.examples and len(self.examples) < 20:
            self.examples[key] = f"{record.levelname} {record.getMessage()[:160]}"


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    first = True
    for cells in [header, *rows]:
        line = [cells[0].ljust(widths[0])]
        line += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        print("  ".join(line).rstrip())
        if first:
            print("  ".join("-" * w for w in widths))
            first = False


def latency_row(
    label: str, values: Sequence[float], goal: float | None, unit: str, timeouts: int = 0
) -> list[str]:
    scale, fmt = (1000.0, "{:.1f} ms") if unit == "ms" else (1.0, "{:.2f} s")
    goal_s = f"<= {fmt.format(goal * scale)}" if goal is not None else "-"
    if not values:
        return [label, f"0 (+{timeouts} timed out)" if timeouts else "0", *"----", goal_s, "-"]
    p50, p99, mx = pct(values, 50), pct(values, 99), max(values)
    met = "-" if goal is None else ("yes" if p99 <= goal and not timeouts else "NO")
    n = f"{len(values)}" + (f" (+{timeouts} timed out)" if timeouts else "")
    return [
        label,
        n,
        fmt.format(min(values) * scale),
        fmt.format(p50 * scale),
        fmt.format(p99 * scale),
        fmt.format(mx * scale),
        goal_s,
        met,
    ]


def report(phases: Sequence[Phase], logs: LogCounter, started: float, etcd_version: str) -> None:
    by = {p.name: p for p in phases}
    print(f"etcd {etcd_version} (embedded, loopback); R={R}; rebalance_delay={DELAY} s")
    print()
    print("failover latency: from the event until another node's is_leader(pt) is true for")
    print("every partition the node led (per event: the max over its partitions)")
    rows: list[list[str]] = []
    gone = "  until every view shows it gone"
    leave = by.get("leave")
    if leave is not None:
        label = f"graceful leave(), P={LEAVE_P}, 4 nodes"
        rows.append(latency_row(label, leave.latencies, LEAVE_GOAL, "ms", leave.timeouts))
        rows.append(latency_row("  same, per partition", leave.per_partition, None, "ms"))
        rows.append(latency_row("  the leave() call itself", leave.calls, None, "ms"))
        rows.append(latency_row(gone, leave.gone, None, "ms"))
    for ttl in (2.0, 5.0):
        kill = by.get(f"kill-{ttl:g}")
        if kill is not None:
            label = f"SIGKILL, session_ttl={ttl:g} s"
            rows.append(latency_row(label, kill.latencies, ttl + KILL_SLACK, "s", kill.timeouts))
            rows.append(latency_row(gone, kill.gone, None, "s"))
    cut = by.get("cut")
    if cut is not None:
        label = "cut off by proxy, session_ttl=2 s"
        rows.append(latency_row(label, cut.latencies, None, "s", cut.timeouts))
        rows.append(latency_row(gone, cut.gone, None, "s"))
        rows.append(latency_row("  its last claim -> successor's", cut.fence_leads, None, "ms"))
    render(["scenario", "n", "min", "p50", "p99", "max", "goal", "met"], rows)

    drain = by.get("drain")
    if drain is not None and drain.drains:
        print()
        print(f"drain: 1 of 5 nodes, P={DRAIN_P}, R={R}; moves = count_moves(map before, after)")
        drows = [
            [
                d.victim + (" (coordinator)" if d.coordinator else ""),
                str(d.led),
                f"{d.drain_s:.2f}",
                f"{d.settle_s:.2f}",
                str(d.moves),
                str(d.minimum),
                str(d.maps),
                "yes" if d.moves == d.minimum else "NO",
            ]
            for d in drain.drains
        ]
        header = ["drained node", "it led", "leave(drain=True) s", "until settled s"]
        header += ["moves", "minimum", "maps written", "minimal"]
        render(header, drows)

    print()
    print("overlap checker: is_leader(pt) of every partition on every in-process node")
    orows = []
    for p in phases:
        s = p.sampler
        if s is None:
            continue
        span = s.last_at - s.first_at
        mean = span / (s.samples - 1) if s.samples > 1 else 0.0
        orows.append(
            [
                p.name,
                str(p.failovers),
                str(p.partitions) if p.partitions else "-",
                "n/a" if s.external else str(s.changes),
                str(s.samples),
                f"{mean * 1000:.2f}/{s.max_interval * 1000:.1f}",
                "n/a" if s.external else f"{s.max_gap * 1000:.0f}",
                str(s.epoch_regressions),
                str(s.overlaps),
                "yes" if s.overlaps == 0 else "NO",
            ]
        )
    header = ["phase", "events", "partition failovers", "leader changes", "samples"]
    header += ["interval ms mean/max", "max leaderless ms", "epoch regressions", "overlaps"]
    render([*header, "goal 0"], orows)
    notes = [
        "all in-process nodes share one Python thread: their latencies include the other"
        " nodes' work (the sampler's interval shows how busy the event loop was)",
        f"a replica of rank k in its partition's row waits k x {STAGGER * 1000:.0f} ms before it"
        " campaigns; the node that left or died was rank 0 of what it led",
        "events: leaves / kills / drains / cuts done; partition failovers: partitions the node"
        " led, all measured; leader changes: a partition's claimer differed from the last one"
        " seen (failovers and hand-backs); interval max: while a failover was being timed;"
        " n/a: a member was in another process",
    ]
    for p in phases:
        notes.append(
            f"{p.name}: {p.seconds:.0f} s" + (f"; {p.rounds_note}" if p.rounds_note else "")
        )
        if p.error:
            notes.append(f"{p.name}: ABORTED: {p.error}")
        if p.sampler is not None:
            notes.extend(f"{p.name}: overlap {ex}" for ex in p.sampler.overlap_examples)
    for (phase, level), count in sorted(logs.counts.items()):
        notes.append(f"clusterkit log, {phase}: {count} x {level}")
    notes.extend(f"  e.g. ({phase}) {ex}" for (phase, _), ex in logs.examples.items())
    notes.append(f"total {time.perf_counter() - started:.0f} s")
    print()
    for note in notes:
        print(note)


async def run_phase(
    phases: list[Phase], logs: LogCounter, name: str, body: Callable[[Phase], Any]
) -> None:
    phase = Phase(name)
    phases.append(phase)
    logs.phase = name
    start = time.perf_counter()
    try:
        await body(phase)
    except (Stuck, trio.TooSlowError, clusterkit.ClusterKitError, AssertionError) as exc:
        phase.error = f"{type(exc).__name__}: {exc}"[:1500]
    finally:
        phase.seconds = time.perf_counter() - start
        if phase.error is None and trio.current_effective_deadline() <= trio.current_time():
            phase.error = "cut short by --max-seconds"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few rounds of each")
    parser.add_argument("--leaves", type=int, default=100, help="graceful leave rounds")
    parser.add_argument("--leave-budget", type=float, default=150.0, help="seconds at most")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs at session_ttl=2")
    parser.add_argument("--kills-ttl5", type=int, default=3, help="SIGKILLs at session_ttl=5")
    parser.add_argument("--drains", type=int, default=2, help="drain trials")
    parser.add_argument("--cuts", type=int, default=4, help="proxy cut-offs")
    parser.add_argument("--interval", type=float, default=0.001, help="sampling interval (s)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="whole run at most")
    args = parser.parse_args()
    if args.quick:
        args.leaves, args.kills, args.kills_ttl5, args.drains, args.cuts = 8, 2, 1, 1, 2
    started = time.perf_counter()
    logs = LogCounter()
    log = logging.getLogger("clusterkit")
    log.addHandler(logs)
    log.propagate = False
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="clusterkit-failover-") as tmp:
        logdir = Path(tmp)
        async with clusterkit.open_embedded_etcd() as etcd:
            ep = etcd.endpoints[0]
            iv = args.interval
            with trio.move_on_after(args.max_seconds):
                await run_phase(
                    phases,
                    logs,
                    "leave",
                    lambda ph: leave_phase(ph, ep, args.leaves, args.leave_budget, iv),
                )
                for ttl, kills in ((2.0, args.kills), (5.0, args.kills_ttl5)):
                    if kills > 0:
                        body = partial(
                            kill_phase,
                            endpoint=ep,
                            ttl=ttl,
                            kills=kills,
                            interval=iv,
                            logdir=logdir,
                        )
                        await run_phase(phases, logs, f"kill-{ttl:g}", body)
                if args.drains > 0:
                    drain_iv = max(iv, 0.002)  # P=256 x 5 nodes: 1280 calls per sample
                    body = partial(drain_phase, endpoint=ep, trials=args.drains, interval=drain_iv)
                    await run_phase(phases, logs, "drain", body)
                if args.cuts > 0:
                    body = partial(cutoff_phase, endpoint=ep, cuts=args.cuts, interval=iv)
                    await run_phase(phases, logs, "cut", body)
            logs.phase = "teardown"
            report(phases, logs, started, etcd.version)


if __name__ == "__main__":
    trio.run(main)
