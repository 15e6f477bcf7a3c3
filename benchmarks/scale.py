"""The control plane at scale: cold start, one join, and what the join costs (issue 9).

Run::

    python benchmarks/scale.py                      # the whole grid, then the virtual runs
    python benchmarks/scale.py --quick              # 3x256 and 3x1024; virtual 16,4096 only
    python benchmarks/scale.py --cells 4x4096 --no-virtual --json out.json
    python benchmarks/scale.py --cells none --virtual 16,4096   # virtual time only

Real cells. One embedded etcd (``clusterkit.open_embedded_etcd()`` with its defaults) serves
the whole run; every cell (N nodes, P partitions; R=3, session_ttl 5 s, rebalance_delay
0.5 s) gets its own key prefix. Every node is its own fresh interpreter
(``benchmarks/_scale_node.py``, never forked), started before the clock runs and told to join
with a ``go`` line, so interpreter start-up is not measured. The benchmark process does not
ask the nodes what they see: it watches the cell's prefix in etcd and mirrors it (node keys,
coordinator, map, leader keys), which tells when the map covers the expected nodes with no
pending moves and when every partition's leader key names the map's preferred replica
(``row[0]``). Per cell:

1. cold start: ``go`` to N nodes at once; time until the map is committed (covers the N
   nodes, nothing pending) and until every partition is led by its preferred replica;
2. 2 s idle (its CPU is reported as "idle CPU", per node, in percent of one core);
3. one join: ``go`` to node N+1; the join window runs from then until settled (map
   committed covering N+1 nodes, nothing pending, every partition led by its preferred
   replica) plus 1 s for stragglers, or until the 120 s cap ('> 120 s').

Columns (join columns are over the join window):

- cold map / cold leaders: seconds from ``go`` to the committed map / to all preferred leaders.
- settle: seconds from the joiner's ``go`` (it still has to connect and register) until
  settled; "map" is until the map covering N+1 nodes was committed.
- revisions: distinct etcd revisions under the prefix in the join window (a Txn is one
  revision however many keys it writes), against the issue's budget 20 + moved/32 where
  moved = ``count_moves(map before, map after)`` (replicas that land on a new node; for an
  unsettled cell the latest map's pending rows count as the target, and when no map was
  written at all, ``minimum_moves`` of the old map onto N+1 nodes stands in). The second table
  breaks them down by key kind (``+`` put, ``-`` delete; "a/b" = a revisions carrying b
  events when a Txn wrote several keys of the kind).
- CPU: ``time.process_time()`` of each node process over the join window (all its threads);
  existing nodes max/mean, the joiner separately. Idle CPU: the busiest existing node over
  the 2 s idle step, in percent of one core.
- keepalive delay: the largest ``max_keepalive_delay`` (or ``..._ms``) any node's
  ``ck.statistics()`` reports; "n/a" when no actor has it. It is a maximum since the node
  started: when it grew during the join window it is the window's ("0.012"), else it only
  bounds it ("<= 0.012").
- loop lag: each node runs a task that sleeps 10 ms and records the overshoot; the largest
  over all nodes in the join window, and the largest per-node p99; "lib" is the library's
  own ``max_loop_lag`` statistic where it has one (same rule as the keepalive delay).
- sessions lost: sum of the nodes' ``MembershipActor.sessions_lost`` increase in the window;
  re-reg: node keys re-created with a new create_revision, seen in etcd; coord changes:
  ``P/coordinator`` puts with a new create_revision (a new election) in the window. For a
  cell whose cold start did not settle (no join is then measured) these three are the cold
  start's ("cold: ..."; coordinator changes = elections after the first).
- goals missed: the issue's goals this cell misses (settle, revisions, CPU, cold start,
  sessions, coordinator, re-registrations), "none" when it meets them all.

What shares the CPU: every node process of the cell, etcd, and this process (its watch and
the mirror) share the machine's cores (2 on the machine the issue was measured on), and
other work on the machine counts too. The notes print etcd's and this process's CPU for
each join window.

Virtual time: ``--virtual "N,P;N,P"`` (default ``64,65536;16,4096``: the small one gives a
number even when the big one is too slow; ``16,4096`` with ``--quick``; ``none`` or
``--no-virtual`` skips) runs one process
with
``clusterkit.testing.open_test_cluster`` (in-memory etcd, MockClock with autojump): N nodes
cold start, then one join, with the same mirror watching the in-memory etcd and an overlap
checker that samples ``is_leader`` on every node every ``--virtual-sample`` virtual seconds.
Times there are virtual (the clock only moves when every task waits, so they show the
protocol's own delays, not CPU; but while work runs in a worker thread, e.g. the
rebalancer's planning, every task waits and virtual time runs freely, so thread time shows up
as virtual seconds); the wall-clock seconds and process CPU are printed beside them. Each
virtual run is its own subprocess (its address space capped by ``--virtual-memory-gb``),
killed after ``--virtual-timeout`` wall-clock seconds ('> timeout', with the last counters
it printed).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

import clusterkit
from clusterkit._core.assignment import count_leader_changes, count_moves, minimum_moves
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import MapRecord, RecordError, decode_map
from clusterkit._etcd.types import EventType, KeyValue, WatchBatch

GRID = ((3, 256), (3, 1024), (5, 1024), (4, 4096), (8, 4096), (8, 16384))
QUICK = ((3, 256), (3, 1024))
VIRTUAL = ((64, 65536), (16, 4096))
QUICK_VIRTUAL = ((16, 4096),)
R = 3
TTL = 5.0
DELAY = 0.5
CAP = 120.0  # seconds a cold start or a join may take
IDLE = 2.0
STRAGGLE = 1.0  # seconds after settle still counted in the join window
REPLY = 5.0  # seconds a node has to answer a report request
NODE_SCRIPT = Path(__file__).with_name("_scale_node.py")

SETTLE_GOAL = {(3, 1024): 2.0, (8, 4096): 3.0, (8, 16384): 10.0}
CPU_GOAL = {(8, 4096): 0.5}
COLD_GOAL = {(8, 16384): 10.0}
KIND_ORDER = ("node", "coordinator", "map", "leader", "ready", "secret")


def budget(moved: int) -> float:
    """The issue's bound on etcd revisions per join."""
    return 20 + moved / 32


# -- the mirror of one cell's prefix ---------------------------------------------------------


@dataclass
class Waiter:
    pred: Callable[[], bool]
    event: trio.Event = field(default_factory=trio.Event)
    at: float | None = None


@dataclass(frozen=True)
class Mark:
    """A point in the mirror's history (to count what happened between two of them)."""

    event: int
    flag: int
    map: int
    time: float


@dataclass
class Window:
    """What etcd saw between two marks."""

    revisions: int = 0
    events: int = 0
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (revs, events)
    flags: dict[str, int] = field(default_factory=dict)
    maps: int = 0
    max_pending: int = 0


def leader_node(value: bytes) -> str:
    """The node id in a leader key's value (a bare id today; JSON with a node field also ok)."""
    text = value.decode(errors="replace")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            return text
        if isinstance(obj, dict):
            for key in ("node", "node_id", "id"):
                if isinstance(obj.get(key), str):
                    return str(obj[key])
    return text


class Observer:
    """Mirrors one cluster prefix from a watch and counts what etcd saw, by key kind."""

    def __init__(self, prefix: str, partitions: int) -> None:
        self.layout = KeyLayout(prefix)
        self.partitions = partitions
        self.log: list[tuple[int, str]] = []  # per event: (revision, kind label)
        self.flags: list[tuple[int, str]] = []  # (event index, what): elections, re-registrations
        self.maps: list[
            tuple[int, int, int]
        ] = []  # per decoded map: (event index, version, pending)
        self.map: MapRecord | None = None
        self.map_nodes: frozenset[str] = frozenset()
        self.map_pending = 0
        self._raw_map: bytes | None = None
        self._map_dirty = False
        self.decode_seconds: list[float] = []
        self.decode_errors = 0
        self.preferred: list[str | None] = []
        self.leaders: dict[int, str] = {}
        self.bad: set[int] = set(range(partitions))  # partitions not led by the preferred replica
        self.nodes: dict[str, int] = {}  # live node key -> create_revision
        self.ever: set[str] = set()
        self.coordinator: int | None = None  # create_revision of the current coordinator key
        self.batches = 0
        self.revision = 0  # the last revision applied
        self.resumes = 0  # watches resumed after falling behind
        self._waiters: list[Waiter] = []

    # -- feeding

    async def follow(self, client: Any, *, task_status: trio.TaskStatus[None]) -> None:
        """Read the prefix, then apply the watch's batches until cancelled."""
        root = self.layout.root
        snapshot = await client.get_prefix(root)
        if snapshot.kvs:
            self._apply(snapshot.kvs, ())
        self.revision = snapshot.revision
        while True:
            try:
                async with client.watch(root, prefix=True, start_revision=self.revision + 1) as w:
                    if task_status is not trio.TASK_STATUS_IGNORED:
                        task_status.started()
                        task_status = trio.TASK_STATUS_IGNORED
                    async for batch in w:
                        self.apply(batch)
            except clusterkit.WatchOverflow:
                # This task fell behind (the loop is busy): resume after the last revision
                # applied. Counts stay exact; times of what was replayed come late.
                self.resumes += 1

    def apply(self, batch: WatchBatch) -> None:
        puts = [(e.kv, e.type is EventType.PUT) for e in batch.events]
        self._apply((), puts)

    def _apply(self, initial: Iterable[KeyValue], events: Iterable[tuple[KeyValue, bool]]) -> None:
        for kv in initial:
            self._event(kv, True)
        for kv, put in events:
            self._event(kv, put)
            self.revision = max(self.revision, kv.mod_revision)
        self.batches += 1
        if self._map_dirty:
            self._decode_map()
        now = trio.current_time()
        for w in self._waiters:
            if w.at is None and w.pred():
                w.at = now
                w.event.set()

    def _event(self, kv: KeyValue, put: bool) -> None:
        index = len(self.log)
        parsed = self.layout.parse(kv.key)
        if parsed is None:
            rest = kv.key[len(self.layout.root) :].decode(errors="replace")
            kind = "other:" + rest.partition("/")[0]
        else:
            kind = parsed.kind
        self.log.append((kv.mod_revision, kind + ("+" if put else "-")))
        if parsed is None:
            return
        if parsed.kind == "node":
            nid = parsed.node_id
            if put:
                known = self.nodes.get(nid)
                if (known is None and nid in self.ever) or (
                    known is not None and known != kv.create_revision
                ):
                    self.flags.append((index, "reregistration"))
                self.nodes[nid] = kv.create_revision
                self.ever.add(nid)
            else:
                self.nodes.pop(nid, None)
                self.flags.append((index, "node_key_deleted"))
        elif parsed.kind == "coordinator":
            if put and kv.create_revision != self.coordinator:
                self.flags.append((index, "election"))
                self.coordinator = kv.create_revision
            elif not put:
                self.coordinator = None
                self.flags.append((index, "coordinator_gone"))
        elif parsed.kind == "map":
            self._raw_map = kv.value if put else None
            self._map_dirty = True
        elif parsed.kind == "leader":
            pt = parsed.partition
            if put:
                self.leaders[pt] = leader_node(kv.value)
            else:
                self.leaders.pop(pt, None)
            self._recheck(pt)

    def _recheck(self, pt: int) -> None:
        if 0 <= pt < len(self.preferred) and self.leaders.get(pt) == self.preferred[pt]:
            self.bad.discard(pt)
        else:
            self.bad.add(pt)

    def _decode_map(self) -> None:
        self._map_dirty = False
        if self._raw_map is None:
            self.map, self.map_nodes, self.map_pending, self.preferred = None, frozenset(), 0, []
            self.bad = set(range(self.partitions))
            return
        start = time.perf_counter()
        try:
            record = decode_map(self._raw_map)
        except RecordError:
            self.decode_errors += 1
            return
        self.decode_seconds.append(time.perf_counter() - start)
        self.map = record
        self.map_nodes = record.node_ids()
        self.map_pending = len(record.pending)
        self.preferred = [row[0] if row else None for row in record.replicas]
        self.bad = {
            pt
            for pt in range(self.partitions)
            if pt >= len(self.preferred) or self.leaders.get(pt) != self.preferred[pt]
        }
        self.maps.append((len(self.log), record.version, self.map_pending))

    # -- conditions

    def registered(self, ids: frozenset[str]) -> Callable[[], bool]:
        return lambda: ids <= self.nodes.keys()

    def map_settled(self, ids: frozenset[str]) -> Callable[[], bool]:
        return lambda: self.map is not None and not self.map_pending and self.map_nodes == ids

    def settled(self, ids: frozenset[str]) -> Callable[[], bool]:
        committed = self.map_settled(ids)
        return lambda: committed() and not self.bad

    def expect(self, pred: Callable[[], bool]) -> Waiter:
        """Start watching for ``pred``; its ``at`` is the time of the batch that made it true."""
        waiter = Waiter(pred)
        if pred():
            waiter.at = trio.current_time()
            waiter.event.set()
        self._waiters.append(waiter)
        return waiter

    async def wait(self, waiter: Waiter, deadline: float) -> float | None:
        with trio.move_on_at(deadline):
            await waiter.event.wait()
        return waiter.at

    def done(self, *waiters: Waiter) -> None:
        for w in waiters:
            if w in self._waiters:
                self._waiters.remove(w)

    # -- counting

    def mark(self) -> Mark:
        return Mark(len(self.log), len(self.flags), len(self.maps), trio.current_time())

    def window(self, since: Mark, until: Mark | None = None) -> Window:
        until = until or self.mark()
        events = self.log[since.event : until.event]
        revs_by: dict[str, set[int]] = {}
        events_by: Counter[str] = Counter()
        for rev, label in events:
            revs_by.setdefault(label, set()).add(rev)
            events_by[label] += 1
        maps = self.maps[since.map : until.map]
        return Window(
            revisions=len({rev for rev, _ in events}),
            events=len(events),
            by_kind={k: (len(revs_by[k]), events_by[k]) for k in sorted(revs_by, key=_kind_key)},
            flags=dict(Counter(what for _, what in self.flags[since.flag : until.flag])),
            maps=len(maps),
            max_pending=max((pending for _, _, pending in maps), default=0),
        )

    def target(self) -> dict[int, tuple[str, ...]] | None:
        """The latest map's rows with pending moves applied (where the map is heading)."""
        if self.map is None:
            return None
        rows = self.map.as_assignment()
        rows.update(self.map.pending)
        return rows

    def progress(self) -> dict[str, Any]:
        return {
            "events": len(self.log),
            "map_version": self.map.version if self.map else None,
            "map_nodes": len(self.map_nodes),
            "pending": self.map_pending,
            "not_preferred": len(self.bad),
            "leader_keys": len(self.leaders),
            "nodes": len(self.nodes),
            "watch_resumes": self.resumes,
        }


def _kind_key(label: str) -> tuple[int, str]:
    base = label.rstrip("+-")
    rank = KIND_ORDER.index(base) if base in KIND_ORDER else len(KIND_ORDER)
    return rank, label


# -- node processes ---------------------------------------------------------------------------


class NodeProc:
    """One ``_scale_node.py`` process and what it reported."""

    _seq = itertools.count(1)

    def __init__(self, node_id: str, process: trio.Process, log_path: Path) -> None:
        self.node_id = node_id
        self.process = process
        self.log_path = log_path
        self.loaded = trio.Event()
        self.eof = trio.Event()
        self.joined_at: float | None = None
        self.latest: dict[str, Any] | None = None
        self.replies: dict[int, dict[str, Any]] = {}
        self._reply = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        try:
            while True:
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._line(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.eof.set()
            self._reply.set()

    def _line(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        ev = record.get("ev")
        if ev == "loaded":
            self.loaded.set()
        elif ev == "joined":
            self.joined_at = trio.current_time()
        elif ev == "report":
            self.latest = record
            if "seq" in record:
                self.replies[record["seq"]] = record
                self._reply.set()
                self._reply = trio.Event()

    async def send(self, line: str) -> None:
        stdin = self.process.stdin
        if stdin is None:
            return
        try:
            with trio.move_on_after(REPLY):
                await stdin.send_all((line + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def request(self, command: str) -> dict[str, Any] | None:
        """``mark`` or ``report``; the node's answer, or its latest report if it is slow."""
        seq = next(self._seq)
        await self.send(f"{command} {seq}")
        with trio.move_on_after(REPLY):
            while seq not in self.replies and not self.eof.is_set():
                await self._reply.wait()
        reply = self.replies.pop(seq, None)
        if reply is None and self.latest is not None:
            return {**self.latest, "stale": True}
        return reply

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_lines(self) -> tuple[int, list[str]]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0, []
        bad = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
        return len(bad), bad[:2]


async def spawn(
    node_id: str, endpoint: str, prefix: str, partitions: int, logdir: Path
) -> NodeProc:
    args = [
        sys.executable,
        str(NODE_SCRIPT),
        "--id",
        node_id,
        "--endpoints",
        endpoint,
        "--prefix",
        prefix,
        "--partitions",
        str(partitions),
        "--replicas",
        str(R),
        "--session-ttl",
        str(TTL),
        "--rebalance-delay",
        str(DELAY),
        "--wait-go",
    ]
    log_path = logdir / f"{prefix.strip('/').replace('/', '_')}-{node_id}.log"
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - the child keeps its own fd
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
    return NodeProc(node_id, process, log_path)


async def request_all(procs: Sequence[NodeProc], command: str) -> dict[str, dict[str, Any] | None]:
    answers: dict[str, dict[str, Any] | None] = {}

    async def one(p: NodeProc) -> None:
        answers[p.node_id] = await p.request(command)

    async with trio.open_nursery() as nursery:
        for p in procs:
            nursery.start_soon(one, p)
    return answers


async def stop_all(procs: Sequence[NodeProc], grace: float = 10.0) -> int:
    """Ask every node to leave, SIGKILL whoever is still there after ``grace``; reap all.

    Returns how many had to be killed. Shielded: runs to the end even when cancelled.
    """
    killed = 0
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for p in procs:
                nursery.start_soon(p.send, "leave")
        with trio.move_on_after(grace):
            for p in procs:
                await p.process.wait()
        for p in procs:
            if p.alive():
                killed += 1
                p.process.kill()
            with trio.move_on_after(5):
                await p.process.wait()
            for stream in (p.process.stdin, p.process.stdout):
                if stream is not None:
                    await stream.aclose()
    return killed


def proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of another process, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one real cell ----------------------------------------------------------------------------


@dataclass
class Cell:
    nodes: int
    partitions: int
    prefix: str = ""
    error: str | None = None
    registered_s: float | None = None
    cold_map_s: float | None = None
    cold_leaders_s: float | None = None
    cold_window: Window | None = None
    cold_sessions_lost: int | None = None
    idle_cpu_pct: list[float] = field(default_factory=list)
    join_map_s: float | None = None
    join_settle_s: float | None = None
    join_registered_s: float | None = None
    join_window_s: float = 0.0
    join_window: Window | None = None
    moved_replicas: int | None = None
    moved_leaders: int | None = None
    moved_minimum: bool = False  # no new map: moved_replicas is minimum_moves(old, N+1 nodes)
    cpu_existing: list[float] = field(default_factory=list)
    cpu_joiner: float | None = None
    stale_reports: int = 0
    keepalive_delay: float | None = None
    keepalive_delay_exact: bool = False
    library_lag: float | None = None
    library_lag_exact: bool = False
    lag_max: float | None = None
    lag_p99: float | None = None
    sessions_lost: int | None = None
    etcd_cpu: float | None = None
    bench_cpu: float | None = None
    decode_max_s: float = 0.0
    killed: int = 0
    log_warnings: int = 0
    log_examples: list[str] = field(default_factory=list)
    final_progress: dict[str, Any] = field(default_factory=dict)
    load_before: float = 0.0  # the machine's 1-minute load average
    load_after: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.nodes}x{self.partitions}"


def _window_max(values: Sequence[tuple[float, float | None]]) -> tuple[float | None, bool]:
    """The largest of lifetime maxima read at a window's end, and whether it is the window's.

    A node's lifetime maximum that grew since the mark was reached inside the window; one
    that did not only bounds the window's maximum from above.
    """
    if not values:
        return None, False
    end, start = max(values, key=lambda v: v[0])
    return end, start is not None and end > start


def _cpu(report: dict[str, Any] | None) -> float | None:
    return None if report is None else float(report["cpu"])


def _lost(report: dict[str, Any] | None) -> int | None:
    if report is None or report.get("sessions_lost") is None:
        return None
    return int(report["sessions_lost"])


async def run_cell(
    n: int, p: int, endpoint: str, client: Any, etcd_pid: int | None, logdir: Path
) -> Cell:
    prefix = f"/scale/{n}x{p}-{secrets.token_hex(3)}"
    cell = Cell(n, p, prefix)
    cell.load_before = os.getloadavg()[0]
    observer = Observer(prefix, p)
    ids = [f"n{i}" for i in range(1, n + 2)]
    procs: list[NodeProc] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(observer.follow, client)
            try:
                for nid in ids:
                    proc = await spawn(nid, endpoint, prefix, p, logdir)
                    procs.append(proc)
                    nursery.start_soon(proc.read)
                with trio.fail_after(60):
                    for proc in procs:
                        await proc.loaded.wait()
                await _measure(cell, observer, procs, etcd_pid)
            except (trio.TooSlowError, clusterkit.ClusterKitError, OSError) as exc:
                cell.error = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                cell.killed = await stop_all(procs)
                nursery.cancel_scope.cancel()
    except* (clusterkit.ClusterKitError, OSError) as group:  # the mirror's watch failed
        cell.error = f"watch: {group.exceptions[0]!r}"[:500]
    cell.final_progress = cell.final_progress or observer.progress()
    cell.load_after = os.getloadavg()[0]
    cell.decode_max_s = max(observer.decode_seconds, default=0.0)
    for proc in procs:
        count, examples = proc.log_lines()
        cell.log_warnings += count
        cell.log_examples.extend(f"{proc.node_id}: {ex[:200]}" for ex in examples)
    with trio.move_on_after(30):
        with contextlib.suppress(clusterkit.ClusterKitError):
            await client.delete(observer.layout.root, prefix=True)
    return cell


async def _measure(
    cell: Cell, observer: Observer, procs: list[NodeProc], etcd_pid: int | None
) -> None:
    existing, joiner = procs[:-1], procs[-1]
    first = frozenset(proc.node_id for proc in existing)
    everyone = first | {joiner.node_id}

    # 1. cold start
    cold = observer.mark()
    waiters = [
        observer.expect(pred(first))
        for pred in (observer.registered, observer.map_settled, observer.settled)
    ]
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for proc in existing:
            nursery.start_soon(proc.send, "go")
    at = [await observer.wait(w, t0 + CAP) for w in waiters]
    observer.done(*waiters)
    cell.registered_s, cell.cold_map_s, cell.cold_leaders_s = (
        None if a is None else a - t0 for a in at
    )
    cell.cold_window = observer.window(cold)
    if cell.cold_leaders_s is None:
        reports = await request_all(existing, "report")
        cell.cold_sessions_lost = sum(_lost(r) or 0 for r in reports.values())
        cell.error = "cold start did not settle: no join measured"
        cell.final_progress = observer.progress()
        return

    # 2. idle
    before = await request_all(existing, "mark")
    cell.cold_sessions_lost = sum(_lost(r) or 0 for r in before.values())
    await trio.sleep(IDLE)
    after = await request_all(existing, "report")
    for nid, report in after.items():
        c0, c1 = _cpu(before.get(nid)), _cpu(report)
        if c0 is not None and c1 is not None:
            cell.idle_cpu_pct.append(100 * (c1 - c0) / IDLE)

    # 3. one join
    before = await request_all(procs, "mark")
    etcd0, bench0 = proc_cpu(etcd_pid), time.process_time()
    old = observer.map
    assert old is not None
    join = observer.mark()
    registered = observer.expect(observer.registered(everyone))
    committed = observer.expect(observer.map_settled(everyone))
    settled = observer.expect(observer.settled(everyone))
    t1 = trio.current_time()
    await joiner.send("go")
    settled_at = await observer.wait(settled, t1 + CAP)
    if settled_at is not None:
        await trio.sleep(STRAGGLE)
    end = observer.mark()
    observer.done(registered, committed, settled)
    after = await request_all(procs, "report")
    cell.join_window_s = end.time - t1
    etcd1 = proc_cpu(etcd_pid)
    cell.etcd_cpu = None if etcd0 is None or etcd1 is None else etcd1 - etcd0
    cell.bench_cpu = time.process_time() - bench0
    cell.join_registered_s = None if registered.at is None else registered.at - t1
    cell.join_map_s = None if committed.at is None else committed.at - t1
    cell.join_settle_s = None if settled_at is None else settled_at - t1
    cell.join_window = observer.window(join, end)
    cell.final_progress = observer.progress()
    target = observer.target()
    if target is not None and observer.map is not old:
        cell.moved_replicas = count_moves(old.as_assignment(), target)
        cell.moved_leaders = count_leader_changes(old.as_assignment(), target)
    else:  # no map was written for the join: the least it has to move
        cell.moved_minimum = True
        cell.moved_replicas = minimum_moves(
            old.as_assignment(), sorted(everyone), cell.partitions, R
        )
    lost = 0
    delays: list[tuple[float, float | None]] = []  # (at the end, at the mark)
    library_lags: list[tuple[float, float | None]] = []
    lags: list[float] = []
    p99s: list[float] = []
    for proc in procs:
        r0, r1 = before.get(proc.node_id), after.get(proc.node_id)
        c0, c1 = _cpu(r0), _cpu(r1)
        cell.stale_reports += bool(r1 and r1.get("stale"))
        if c0 is not None and c1 is not None:
            if proc is joiner:
                cell.cpu_joiner = c1 - c0
            else:
                cell.cpu_existing.append(c1 - c0)
        l0, l1 = _lost(r0), _lost(r1)
        if l1 is not None:
            lost += l1 - (l0 or 0)
        if r1 is not None:
            for key, out in (("keepalive_delay", delays), ("library_lag", library_lags)):
                if r1.get(key) is not None:
                    start = r0.get(key) if r0 is not None else None
                    out.append((float(r1[key]), None if start is None else float(start)))
            lags.append(float(r1["lag_max"]))
            p99s.append(float(r1["lag_p99"]))
    cell.sessions_lost = lost
    cell.keepalive_delay, cell.keepalive_delay_exact = _window_max(delays)
    cell.library_lag, cell.library_lag_exact = _window_max(library_lags)
    cell.lag_max = max(lags, default=None)
    cell.lag_p99 = max(p99s, default=None)


# -- virtual time ---------------------------------------------------------------------------


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


class OverlapSampler:
    """Counts (sample, partition) pairs that more than one node claims with ``is_leader``."""

    def __init__(self, cluster: Any, partitions: int, interval: float) -> None:
        self.cluster = cluster
        self.partitions = partitions
        self.interval = interval
        self.samples = 0
        self.overlaps = 0
        self.examples: list[str] = []

    def sample(self) -> None:
        claims: dict[int, str] = {}
        for node in list(self.cluster.nodes.values()):
            ck = node.ck
            table = getattr(getattr(ck, "_leadership", None), "epochs", None)
            candidates = list(table) if isinstance(table, dict) else range(self.partitions)
            for pt in candidates:
                if ck.is_leader(pt):
                    other = claims.setdefault(pt, node.node_id)
                    if other != node.node_id:
                        self.overlaps += 1
                        if len(self.examples) < 3:
                            now = trio.current_time()
                            self.examples.append(f"t={now:.3f} pt={pt} {other},{node.node_id}")
        self.samples += 1

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(self.interval)


def _sessions_lost(cluster: Any) -> int:
    total = 0
    for node in list(cluster.nodes.values()):
        total += int(node.ck.statistics().get("MembershipActor", {}).get("sessions_lost", 0))
    return total


def statistic(stats: dict[str, dict[str, Any]], name: str) -> float | None:
    """The largest value of statistic ``name`` (seconds, or ``name_ms``) over all actors."""
    found: list[float] = []
    for values in stats.values():
        if values.get(name) is not None:
            found.append(float(values[name]))
        if values.get(name + "_ms") is not None:
            found.append(float(values[name + "_ms"]) / 1000)
    return max(found, default=None)


def _keepalive_delay(cluster: Any) -> float | None:
    delays = [
        statistic(node.ck.statistics(), "max_keepalive_delay") for node in cluster.nodes.values()
    ]
    return max((d for d in delays if d is not None), default=None)


async def virtual_worker(n: int, p: int, interval: float) -> None:
    """One virtual-time cell; prints JSON lines (progress, cold, join) for the parent."""
    from clusterkit.testing import open_test_cluster

    wall0, cpu0 = time.perf_counter(), time.process_time()
    phase = "cold"
    settings = {"partitions": p, "replica_factor": R, "session_ttl": TTL, "rebalance_delay": DELAY}
    async with open_test_cluster(**settings) as cluster:
        observer = Observer(cluster.config("probe").etcd_prefix, p)
        sampler = OverlapSampler(cluster, p, interval)

        async def progress() -> None:
            while True:
                await trio.sleep(1.0)
                emit(
                    {
                        "ev": "progress",
                        "phase": phase,
                        "vt": trio.current_time(),
                        "wall": time.perf_counter() - wall0,
                        "cpu": time.process_time() - cpu0,
                        "overlaps": sampler.overlaps,
                        "samples": sampler.samples,
                        **observer.progress(),
                    }
                )

        async with trio.open_nursery() as nursery:
            await nursery.start(observer.follow, cluster.store.client())
            nursery.start_soon(sampler.run)
            nursery.start_soon(progress)
            ids = frozenset(f"v{i}" for i in range(1, n + 1))
            cold = observer.mark()
            waiters = [observer.expect(f(ids)) for f in (observer.map_settled, observer.settled)]
            t0, w0 = trio.current_time(), time.perf_counter()
            async with trio.open_nursery() as starters:
                for nid in sorted(ids):
                    starters.start_soon(cluster.start, nid)
            at = [await observer.wait(w, t0 + 600) for w in waiters]
            observer.done(*waiters)
            window = observer.window(cold)
            emit(
                {
                    "ev": "cold",
                    "map_s": None if at[0] is None else at[0] - t0,
                    "leaders_s": None if at[1] is None else at[1] - t0,
                    "wall": time.perf_counter() - w0,
                    "revisions": window.revisions,
                    "overlaps": sampler.overlaps,
                }
            )
            if at[1] is None:
                nursery.cancel_scope.cancel()
                return
            phase = "idle"
            await trio.sleep(IDLE)
            phase = "join"
            old = observer.map
            assert old is not None
            lost0, overlaps0 = _sessions_lost(cluster), sampler.overlaps
            everyone = ids | {f"v{n + 1}"}
            join = observer.mark()
            committed = observer.expect(observer.map_settled(everyone))
            settled = observer.expect(observer.settled(everyone))
            t1, w1, c1 = trio.current_time(), time.perf_counter(), time.process_time()
            await cluster.start(f"v{n + 1}")
            settled_at = await observer.wait(settled, t1 + 600)
            if settled_at is not None:
                await trio.sleep(STRAGGLE)
            window = observer.window(join)
            target = observer.target()
            moved = count_moves(old.as_assignment(), target) if target else None
            emit(
                {
                    "ev": "join",
                    "map_s": None if committed.at is None else committed.at - t1,
                    "settle_s": None if settled_at is None else settled_at - t1,
                    "wall": time.perf_counter() - w1,
                    "cpu": time.process_time() - c1,
                    "window": asdict(window),
                    "moved": moved,
                    "overlaps": sampler.overlaps - overlaps0,
                    "overlaps_total": sampler.overlaps,
                    "samples": sampler.samples,
                    "examples": sampler.examples,
                    "sessions_lost": _sessions_lost(cluster) - lost0,
                    "keepalive_delay": _keepalive_delay(cluster),
                    "decode_max_s": max(observer.decode_seconds, default=0.0),
                    "watch_resumes": observer.resumes,
                }
            )
            nursery.cancel_scope.cancel()


@dataclass
class VirtualRun:
    nodes: int
    partitions: int
    timeout: float
    cold: dict[str, Any] | None = None
    join: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    timed_out: bool = False
    wall: float = 0.0
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.nodes}x{self.partitions}"


async def run_virtual(
    n: int, p: int, timeout: float, interval: float, memory_gb: float
) -> VirtualRun:
    run = VirtualRun(n, p, timeout)
    args = [sys.executable, __file__, "--virtual-worker", f"{n},{p}"]
    args += ["--virtual-sample", str(interval), "--virtual-memory-gb", str(memory_gb)]
    start = time.perf_counter()
    process = await trio.lowlevel.open_process(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = b""

    async def read_stderr() -> None:
        nonlocal stderr
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            stderr = (stderr + chunk)[-4000:]

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            with trio.move_on_after(timeout) as scope:
                buffer = b""
                while chunk := await process.stdout.receive_some(65536):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        record = json.loads(line)
                        ev = record.pop("ev")
                        if ev == "progress":
                            run.progress = record
                        elif ev == "cold":
                            run.cold = record
                        elif ev == "join":
                            run.join = record
            run.timed_out = scope.cancelled_caught
            if process.poll() is None:
                process.kill()
            with trio.move_on_after(10):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()
            await process.stderr.aclose()
    run.wall = time.perf_counter() - start
    if process.returncode not in (0, -signal.SIGKILL) and not run.timed_out:
        run.error = f"exit {process.returncode}: {stderr.decode(errors='replace')[-600:]}"
    return run


# -- the report -------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2, missing: str = "-") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def _capped(value: float | None, cap: float = CAP) -> str:
    return f"> {cap:.0f} s" if value is None else f"{value:.2f}"


def _bound(value: float | None, exact: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if exact else f"<= {value:.3f}"


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def missed_goals(c: Cell) -> list[str]:
    key = (c.nodes, c.partitions)
    missed = []
    if c.error and c.join_window is None:
        return ["not measured"]
    goal = SETTLE_GOAL.get(key)
    if c.join_settle_s is None:
        missed.append("settle")
    elif goal is not None and c.join_settle_s > goal:
        missed.append(f"settle>{goal:g}")
    w = c.join_window
    if w is not None and c.moved_replicas is not None and w.revisions > budget(c.moved_replicas):
        missed.append("revisions")
    cpu_goal = CPU_GOAL.get(key)
    if cpu_goal is not None and c.cpu_existing and max(c.cpu_existing) > cpu_goal:
        missed.append(f"cpu>{cpu_goal:g}")
    cold_goal = COLD_GOAL.get(key)
    if cold_goal is not None and (c.cold_leaders_s is None or c.cold_leaders_s > cold_goal):
        missed.append(f"cold>{cold_goal:g}")
    if c.sessions_lost:
        missed.append("sessions")
    if c.join_window is not None:
        if c.join_window.flags.get("election"):
            missed.append("coordinator")
        if c.join_window.flags.get("reregistration"):
            missed.append("re-registrations")
    return missed


def report(cells: Sequence[Cell], runs: Sequence[VirtualRun], etcd_version: str) -> None:
    if cells:
        print()
        print(
            f"Real cells: nodes in separate processes, one embedded etcd {etcd_version}, R={R},"
            f" session_ttl={TTL:g} s, rebalance_delay={DELAY:g} s, {os.cpu_count()} CPUs shared"
            " by every node, etcd and this process"
        )
        print()
        header = [
            "N x P",
            "cold map s",
            "cold leaders s",
            "join settle s",
            "join map s",
            "revisions (budget)",
            "moved replicas / leaders",
            "CPU existing max/mean s",
            "CPU joiner s",
            "idle CPU %/node",
            "keepalive delay s",
            "loop lag max/p99 s",
            "sessions lost",
            "re-reg",
            "coord changes",
            "goals missed",
        ]
        rows = [
            [
                "goal (issue 9)",
                "",
                "<= 10 at 8x16384",
                "<= 2 at 3x1024, <= 3 at 8x4096, <= 10 at 8x16384",
                "",
                "<= 20 + moved/32",
                "",
                "<= 0.5 at 8x4096",
                "",
                "independent of P",
                f"< {TTL:g}",
                "",
                "0",
                "0",
                "0",
                "",
            ]
        ]
        for c in cells:
            w = c.join_window
            joined = w is not None
            rows.append(
                [
                    c.name,
                    _capped(c.cold_map_s),
                    _capped(c.cold_leaders_s),
                    _capped(c.join_settle_s) if joined else "-",
                    _capped(c.join_map_s) if joined else "-",
                    (
                        f"{w.revisions} ({budget(c.moved_replicas):.0f})"
                        if w is not None and c.moved_replicas is not None
                        else (str(w.revisions) if w is not None else "-")
                    ),
                    _moved(c) if joined else "-",
                    (
                        f"{max(c.cpu_existing):.2f} / {statistics.mean(c.cpu_existing):.2f}"
                        if c.cpu_existing
                        else "-"
                    ),
                    _s(c.cpu_joiner),
                    (f"{max(c.idle_cpu_pct):.1f}" if c.idle_cpu_pct else "-"),
                    _bound(c.keepalive_delay, c.keepalive_delay_exact) if joined else "-",
                    (
                        f"{_s(c.lag_max, 3)} / {_s(c.lag_p99, 3)}"
                        + (
                            f" (lib {_bound(c.library_lag, c.library_lag_exact)})"
                            if c.library_lag is not None
                            else ""
                        )
                    )
                    if joined
                    else "-",
                    *_losses(c),
                    ", ".join(missed_goals(c)) or "none",
                ]
            )
        render(header, rows)
        _kinds_table(cells)
        _notes(cells)
    if runs:
        _virtual_table(runs)


def _moved(c: Cell) -> str:
    if c.moved_minimum:
        return f"no new map (min {c.moved_replicas})"
    return f"{c.moved_replicas} / {c.moved_leaders}"


def _losses(c: Cell) -> list[str]:
    """Sessions lost, re-registrations, coordinator changes: of the join, else of the cold start."""
    w = c.join_window
    if w is not None:
        lost = "-" if c.sessions_lost is None else str(c.sessions_lost)
        return [lost, str(w.flags.get("reregistration", 0)), str(w.flags.get("election", 0))]
    cold = c.cold_window
    if cold is None:
        return ["-", "-", "-"]
    lost = "-" if c.cold_sessions_lost is None else str(c.cold_sessions_lost)
    changes = max(0, cold.flags.get("election", 0) - 1)
    return [f"cold: {lost}", f"cold: {cold.flags.get('reregistration', 0)}", f"cold: {changes}"]


def _kinds_table(cells: Sequence[Cell]) -> None:
    windows = [(c.name, c.join_window) for c in cells if c.join_window is not None]
    windows += [
        (f"{c.name} cold start", c.cold_window)
        for c in cells
        if c.cold_window is not None and c.cold_leaders_s is None
    ]
    if not windows:
        return
    labels = sorted({k for _, w in windows for k in w.by_kind}, key=_kind_key)
    print()
    print(
        "etcd revisions of the join by key kind (window: joiner's go -> settled + 1 s, or the"
        " cap; for a cold start that did not settle: go -> the cap); a/b = a revisions carrying"
        " b events"
    )
    print()
    header = ["N x P", "revisions", "events", *labels, "maps written", "max pending"]
    header += ["node keys deleted", "coordinator gone"]
    rows = []
    for name, w in windows:
        cols = []
        for label in labels:
            revs, events = w.by_kind.get(label, (0, 0))
            cols.append(str(revs) if revs == events else f"{revs}/{events}")
        rows.append(
            [
                name,
                str(w.revisions),
                str(w.events),
                *cols,
                str(w.maps),
                str(w.max_pending),
                str(w.flags.get("node_key_deleted", 0)),
                str(w.flags.get("coordinator_gone", 0)),
            ]
        )
    render(header, rows)


def _notes(cells: Sequence[Cell]) -> None:
    print()
    for c in cells:
        parts = [f"{c.name} ({c.prefix}):"]
        if c.registered_s is not None:
            parts.append(f"all {c.nodes} registered {c.registered_s:.2f} s after go;")
        if c.cold_window is not None:
            parts.append(f"cold start wrote {c.cold_window.revisions} revisions;")
        if c.join_registered_s is not None:
            parts.append(f"joiner registered {c.join_registered_s:.2f} s after go;")
        if c.join_window is not None:
            parts.append(f"join window {c.join_window_s:.1f} s;")
        if c.etcd_cpu is not None:
            parts.append(f"etcd CPU {c.etcd_cpu:.2f} s,")
        if c.bench_cpu is not None:
            parts.append(f"this process {c.bench_cpu:.2f} s;")
        parts.append(f"map decode max {c.decode_max_s * 1000:.0f} ms;")
        if c.final_progress.get("watch_resumes"):
            resumes = c.final_progress["watch_resumes"]
            parts.append(f"the mirror fell behind {resumes} time(s) (times late);")
        if c.stale_reports:
            parts.append(f"{c.stale_reports} node(s) too slow to answer, latest report used;")
        if c.killed:
            parts.append(f"{c.killed} node(s) SIGKILLed at teardown;")
        parts.append(f"{c.log_warnings} warning/error log lines;")
        parts.append(f"load average {c.load_before:.1f} before, {c.load_after:.1f} after")
        print(" ".join(parts))
        if c.join_settle_s is None or c.cold_leaders_s is None:
            print(f"  not settled, at the cap: {c.final_progress}")
        if c.error:
            print(f"  {c.error}")
        for ex in c.log_examples[:2]:
            print(f"  log: {ex}")


def _virtual_table(runs: Sequence[VirtualRun]) -> None:
    print()
    print(
        f"Virtual time (clusterkit.testing, one process, MockClock; R={R}, session_ttl={TTL:g},"
        f" rebalance_delay={DELAY:g}): times in virtual seconds, wall and CPU beside them"
    )
    print()
    header = ["N x P", "cold map s", "cold leaders s", "cold wall s", "join settle s"]
    header += ["join map s", "join wall s / CPU s", "revisions (budget)", "by kind"]
    header += ["sessions lost", "coord changes", "overlaps (samples)", "goal"]
    rows = []
    for run in runs:
        cold, join = run.cold or {}, run.join or {}
        timeout = f"> timeout ({run.timeout:.0f} s wall)"
        row = [run.name]
        if run.cold is None:
            row += [timeout if run.timed_out else "-", "-", "-"]
        else:
            row += [
                _capped(cold.get("map_s"), 600),
                _capped(cold.get("leaders_s"), 600),
                _s(cold.get("wall"), 1),
            ]
        if run.join is None:
            row += [timeout if run.timed_out and run.cold else "-", "-", "-", "-", "-"]
            row += ["-", "-", "-"]
        else:
            window = join["window"]
            moved = join.get("moved")
            kinds = ", ".join(
                f"{k} {r}" if r == e else f"{k} {r}/{e}" for k, (r, e) in window["by_kind"].items()
            )
            row += [
                _capped(join.get("settle_s"), 600),
                _capped(join.get("map_s"), 600),
                f"{join['wall']:.1f} / {join['cpu']:.1f}",
                f"{window['revisions']} ({budget(moved):.0f})"
                if moved is not None
                else str(window["revisions"]),
                kinds,
                str(join.get("sessions_lost")),
                str(window["flags"].get("election", 0)),
                f"{join['overlaps']} ({join['samples']})",
            ]
        ok = (
            run.join is not None
            and join.get("settle_s") is not None
            and join.get("overlaps") == 0
            and join.get("moved") is not None
            and join["window"]["revisions"] <= budget(join["moved"])
        )
        row.append("met" if ok else "missed")
        rows.append(row)
    render(header, rows)
    for run in runs:
        if run.timed_out and run.progress:
            print(f"{run.name}: last progress before the timeout: {run.progress}")
        if run.error:
            print(f"{run.name}: {run.error}")
        if run.join and run.join.get("watch_resumes"):
            print(f"{run.name}: the mirror fell behind {run.join['watch_resumes']} time(s)")
        if run.join and run.join.get("examples"):
            print(f"{run.name}: overlaps e.g. {run.join['examples']}")


# -- main -------------------------------------------------------------------------------------


def parse_cells(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() in ("", "none"):
        return []
    cells = []
    for item in text.split(","):
        n, _, p = item.strip().lower().partition("x")
        cells.append((int(n), int(p)))
    return cells


def parse_virtual(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for item in text.split(";"):
        n, _, p = item.strip().partition(",")
        out.append((int(n), int(p)))
    return out


async def main(args: argparse.Namespace) -> None:
    cells_wanted = list(QUICK) if args.quick else parse_cells(args.cells)
    if args.virtual is None:
        args.virtual = ";".join(f"{n},{p}" for n, p in (QUICK_VIRTUAL if args.quick else VIRTUAL))
    virtual_wanted = [] if args.no_virtual else parse_virtual(args.virtual)
    cells: list[Cell] = []
    runs: list[VirtualRun] = []
    version = "-"
    started = time.perf_counter()

    def dump() -> None:
        if args.json:
            data = {
                "etcd": version,
                "cpus": os.cpu_count(),
                "cells": [{**asdict(c), "goals_missed": missed_goals(c)} for c in cells],
                "virtual": [asdict(r) for r in runs],
            }
            Path(args.json).write_text(json.dumps(data, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="clusterkit-scale-") as tmp:
        logdir = Path(args.logs) if args.logs else Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        if cells_wanted:
            async with clusterkit.open_embedded_etcd() as etcd:
                version = etcd.version
                async with clusterkit.open_etcd_client(list(etcd.endpoints)) as client:
                    for n, p in cells_wanted:
                        print(f"cell {n}x{p} ...", file=sys.stderr, flush=True)
                        cell = await run_cell(
                            n, p, etcd.endpoints[0], client, etcd.member.pid, logdir
                        )
                        cells.append(cell)
                        dump()
                        print(
                            f"  cold leaders {_capped(cell.cold_leaders_s)}, join settle"
                            f" {_capped(cell.join_settle_s)}",
                            file=sys.stderr,
                            flush=True,
                        )
        for n, p in virtual_wanted:
            print(f"virtual {n}x{p} ...", file=sys.stderr, flush=True)
            runs.append(
                await run_virtual(
                    n, p, args.virtual_timeout, args.virtual_sample, args.virtual_memory_gb
                )
            )
            dump()
    report(cells, runs, version)
    print()
    print(f"total {time.perf_counter() - started:.0f} s")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    grid = ",".join(f"{n}x{p}" for n, p in GRID)
    parser.add_argument("--cells", default=grid, help=f"NxP,... or none (default {grid})")
    parser.add_argument("--quick", action="store_true", help="3x256, 3x1024; virtual 16,4096")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument("--logs", help="keep the node processes' stderr logs in this directory")
    default_virtual = ";".join(f"{n},{p}" for n, p in VIRTUAL)
    quick_virtual = ";".join(f"{n},{p}" for n, p in QUICK_VIRTUAL)
    parser.add_argument(
        "--virtual",
        help=f"N,P;N,P or none (default {default_virtual}; with --quick {quick_virtual})",
    )
    parser.add_argument("--no-virtual", action="store_true", help="skip the virtual-time runs")
    parser.add_argument(
        "--virtual-timeout", type=float, default=300.0, help="wall-clock seconds per virtual run"
    )
    parser.add_argument(
        "--virtual-sample", type=float, default=0.01, help="overlap sampling interval (virtual s)"
    )
    parser.add_argument(
        "--virtual-memory-gb", type=float, default=6.0, help="address-space cap per virtual run"
    )
    parser.add_argument("--virtual-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.virtual_worker:
        limit = int(arguments.virtual_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # fail, don't swamp the machine
        n_, _, p_ = arguments.virtual_worker.partition(",")
        trio.run(
            virtual_worker,
            int(n_),
            int(p_),
            arguments.virtual_sample,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
    else:
        trio.run(main, arguments)
