"""Leaders across process faults, against a real etcd: SIGKILL, SIGSTOP/SIGCONT, SIGTERM.

Each node is its own interpreter (``tests/node_process.py``) that polls ``is_leader(pt)`` for
every partition every millisecond and prints each change as a JSON line with wall-clock
times, so the intervals of several processes compare (one machine, one clock). From those
lines the checker builds, per partition, the intervals during which a node *surely* led:
from the first poll that saw ``is_leader`` true to the last one that did (an interval still
open when the process is SIGKILLed ends at the kill). It asserts that

- no two nodes' intervals for one partition overlap,
- the epochs of successive intervals of a partition strictly increase,
- no interval is left open by a process that exited,

and, per scenario, that every partition the victim led gets a successor in bounded time.

A node that is SIGKILLed or SIGSTOPped cannot print when its leadership ends. What bounds it
is self-fencing: ``is_leader`` is false from ``fence`` = (send time of the last keepalive
etcd acknowledged) + TTL - margin, which each node prints (``fence`` lines) whenever it moves.
etcd cannot expire the lease before that send time + TTL, so a successor must start after
the victim's last printed ``fence``. That is the check that matters for a paused node; the
cruder bound "pause start + TTL - margin" holds only up to the age of the last keepalive
at the pause (at most one heartbeat interval), and is checked in that corrected form.

Scenarios: SIGKILL of a leader; SIGSTOP for 2 x TTL then SIGCONT; SIGTERM (graceful leave);
a SIGSTOP that ends between the fence and the lease deadline (``is_leader`` false on waking,
then the same session may take the same keys up again). Failover times are printed
(``pytest -s``); every node's lines are kept in the test's ``tmp_path`` as ``<node>.jsonl``.
The last test checks that ``ck.leadership()`` follows the session's deadline as keepalives
extend it (it once cancelled leader work while the node still led).
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trio
from cluster_helpers import node_config, start_node

import clusterkit

P = 16
TTL = 2.0
HEARTBEAT = TTL / 3  # the default heartbeat_interval
NAMES = ("n1", "n2", "n3")
SCRIPT = Path(__file__).with_name("node_process.py")
MAX_LINE = 1 << 16
START_TIMEOUT = 20.0  # all processes started, converged, every preferred replica leading
Line = dict[str, Any]


def _state(pid: int) -> str:
    """The state letter of a process's main thread, from /proc (R, S, T, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0]


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")


@dataclass
class Interval:
    """One node's leadership of one partition, as its poller saw it."""

    node: str
    pt: int
    epoch: int
    start: float  # the first poll that saw is_leader true (after it returned)
    lease: int | None  # the session it led under
    fence: float | None  # the latest self-fencing time of that session printed meanwhile
    end: float | None = None  # the last poll that saw it true (before it), or the kill time
    t_false: float | None = None  # the first poll that saw it false
    killed: bool = False

    def __str__(self) -> str:
        end = f"{self.end:.3f}" if self.end is not None else "open"
        fence = f"{self.fence:.3f}" if self.fence is not None else "-"
        how = " killed" if self.killed else ""
        span = f"[{self.start:.3f}, {end}{how}]"
        return f"{self.node} pt{self.pt} epoch {self.epoch} {span} fence {fence}"


@dataclass
class NodeProcess:
    """A node process, its stdout lines, and the faults the test injected."""

    name: str
    process: trio.Process
    lines: list[Line] = field(default_factory=list)
    leading: dict[int, int] = field(default_factory=dict)  # pt -> epoch, per the stream
    lease: int | None = None  # the session it reported last
    eof: bool = False
    killed_at: float | None = None
    stopped_at: float | None = None
    continued_at: float | None = None
    termed_at: float | None = None

    def ready(self) -> Line | None:
        return next((line for line in self.lines if line.get("ready")), None)


class Cluster:
    """Node processes on one etcd prefix, their merged reports, and fault injection."""

    def __init__(self, endpoints: tuple[str, ...], prefix: str, logs: Path) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.logs = logs
        self.nodes: dict[str, NodeProcess] = {}
        self._changed = trio.Event()

    async def spawn(self, nursery: trio.Nursery, name: str, members: tuple[str, ...]) -> None:
        command = [
            sys.executable,
            str(SCRIPT),
            *("--id", name, "--endpoints", ",".join(self.endpoints), "--prefix", self.prefix),
            *("--partitions", str(P), "--session-ttl", str(TTL), "--members", ",".join(members)),
        ]
        with _log_file(self.logs / f"{name}.err") as stderr:
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=stderr
            )
        node = self.nodes[name] = NodeProcess(name, process)
        nursery.start_soon(self._read, node)

    async def _read(self, node: NodeProcess) -> None:
        stream = node.process.stdout
        assert stream is not None
        buffer = b""
        async with stream:
            while chunk := await stream.receive_some(MAX_LINE):
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                assert len(buffer) < MAX_LINE, f"{node.name}: line too long"
                for raw in complete:
                    self._record(node, json.loads(raw))
        assert buffer == b"", f"{node.name}: truncated last line {buffer!r}"
        node.eof = True
        self._poke()

    def _record(self, node: NodeProcess, line: Line) -> None:
        assert line["node"] == node.name, line
        node.lines.append(line)
        if "pt" in line:
            if line["leader"]:
                node.leading[line["pt"]] = line["epoch"]
            else:
                node.leading.pop(line["pt"], None)
        elif "fence" in line:
            node.lease = line["lease"]
        self._poke()

    def _poke(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Wait for ``condition`` (re-checked on every line); return the time it held."""
        try:
            with trio.fail_after(timeout):
                while True:
                    changed = self._changed
                    if condition():
                        return time.time()
                    await changed.wait()
        except trio.TooSlowError:
            raise AssertionError(f"no {what} within {timeout} s\n{self.summary()}") from None

    def claimants(self, pt: int) -> list[str]:
        """Which nodes' streams say they lead ``pt`` now."""
        return [n.name for n in self.nodes.values() if pt in n.leading and n.killed_at is None]

    def taken_over(self, pts: list[int], victim: str) -> bool:
        """Every one of ``pts`` is led by a node other than ``victim``."""
        return all(any(n != victim for n in self.claimants(pt)) for pt in pts)

    async def settle(self, timeout: float = START_TIMEOUT) -> list[str]:
        """Wait until every node converged and every partition is led by its preferred replica.

        Returns:
            The preferred leader of each partition.
        """

        def settled() -> bool:
            ready = [n.ready() for n in self.nodes.values()]
            if any(r is None for r in ready):
                return False
            preferred = [r["preferred"] for r in ready if r is not None]
            return all(p == preferred[0] for p in preferred) and all(
                self.claimants(pt) == [preferred[0][pt]] for pt in range(P)
            )

        await self.wait_until(settled, timeout, "convergence with one preferred leader each")
        ready = next(iter(self.nodes.values())).ready()
        assert ready is not None
        preferred: list[str] = ready["preferred"]
        return preferred

    async def kill(self, name: str) -> float:
        """SIGKILL a node and reap it; returns a time after which it surely ran no more."""
        node = self.nodes[name]
        node.process.kill()
        with trio.fail_after(5):
            await node.process.wait()
        node.killed_at = time.time()
        return node.killed_at

    async def stop(self, name: str) -> float:
        """SIGSTOP a node; returns a time after which it surely ran no more (until SIGCONT)."""
        node = self.nodes[name]
        node.process.send_signal(signal.SIGSTOP)
        with trio.fail_after(5):
            while _state(node.process.pid) not in ("T", "t"):
                await trio.sleep(0.001)
        node.stopped_at = time.time()
        return node.stopped_at

    def terminate(self, name: str) -> float:
        """SIGTERM a node (graceful leave); returns the time taken *before* sending."""
        node = self.nodes[name]
        node.termed_at = time.time()
        node.process.send_signal(signal.SIGTERM)
        return node.termed_at

    def resume(self, name: str) -> float:
        """SIGCONT a stopped node; returns the time taken *before* sending."""
        now = time.time()
        self.nodes[name].process.send_signal(signal.SIGCONT)
        self.nodes[name].continued_at = now
        return now

    async def shutdown(self, timeout: float = 15.0) -> None:
        """SIGTERM every live node and wait until each left cleanly (status 0)."""
        live = [n for n in self.nodes.values() if n.process.returncode is None]
        for node in live:
            if node.termed_at is None:
                self.terminate(node.name)
        with trio.fail_after(timeout):
            for node in self.nodes.values():
                await node.process.wait()
            await self.wait_until(lambda: all(n.eof for n in self.nodes.values()), timeout, "EOF")
        for node in self.nodes.values():
            if node.killed_at is None:
                assert node.process.returncode == 0, (
                    f"{node.name} exited with {node.process.returncode}"
                )
                assert node.lines and node.lines[-1].get("exit"), f"{node.name}: no exit line"

    def save(self) -> None:
        """Write every node's lines to ``<logs>/<node>.jsonl`` (evidence for a failure)."""
        for node in self.nodes.values():
            with _log_file(self.logs / f"{node.name}.jsonl") as out:
                out.writelines(json.dumps(line).encode() + b"\n" for line in node.lines)

    def kill_all(self) -> None:
        for node in self.nodes.values():
            if node.process.returncode is None:
                node.process.send_signal(signal.SIGCONT)
                node.process.kill()

    def intervals(self) -> dict[int, list[Interval]]:
        """Every node's leadership intervals, per partition, in start order."""
        found: dict[int, list[Interval]] = {pt: [] for pt in range(P)}
        for node in self.nodes.values():
            lease: int | None = None
            fence: float | None = None
            open_: dict[int, Interval] = {}
            for line in node.lines:
                if "fence" in line:
                    lease, fence = line["lease"], line["fence"]
                    for iv in open_.values():
                        if iv.lease == lease and fence is not None:
                            iv.fence = max(iv.fence or fence, fence)
                elif "pt" in line and line["leader"]:
                    pt = line["pt"]
                    assert pt not in open_, f"{node.name}: leader twice for pt {pt}: {line}"
                    open_[pt] = Interval(node.name, pt, line["epoch"], line["t"], lease, fence)
                elif "pt" in line:
                    iv = open_.pop(line["pt"])
                    assert iv.epoch == line["epoch"], (iv, line)
                    iv.end, iv.t_false = line["last_true"], line["t"]
                    found[iv.pt].append(iv)
            for iv in open_.values():
                if node.killed_at is not None:
                    iv.end, iv.killed = node.killed_at, True
                found[iv.pt].append(iv)
        for ivs in found.values():
            ivs.sort(key=lambda iv: iv.start)
        return found

    def summary(self) -> str:
        out = []
        for node in self.nodes.values():
            faults = {
                k: getattr(node, k)
                for k in ("killed_at", "stopped_at", "continued_at", "termed_at")
                if getattr(node, k) is not None
            }
            out.append(
                f"{node.name}: {len(node.lines)} lines, leading {sorted(node.leading)}, "
                f"returncode {node.process.returncode}, {faults}; "
                f"lines in {self.logs / (node.name + '.jsonl')}"
            )
        return "\n".join(out)


def resumed(a: Interval, b: Interval) -> bool:
    """``b`` is ``a``'s leadership taken up again under the same session (the lease never
    lapsed, so nobody else can have led meanwhile): same node, lease and epoch."""
    return (a.node, a.lease, a.epoch) == (b.node, b.lease, b.epoch) and a.lease is not None


def check_invariants(cluster: Cluster, *, allow_resume: bool = False) -> dict[int, list[Interval]]:
    """No overlap, strictly increasing epochs, nothing left open; returns the intervals.

    With ``allow_resume``, an interval may repeat the previous one's epoch if it is the same
    node under the same lease (see :func:`resumed`).
    """
    intervals = cluster.intervals()
    problems: list[str] = []
    for pt, ivs in intervals.items():
        for iv in ivs:
            if iv.end is None:
                problems.append(f"left open by a process that exited: {iv}")
        for i, a in enumerate(ivs):
            for b in ivs[i + 1 :]:  # b.start >= a.start; an open interval claims for ever
                if a.node != b.node and b.start <= (a.end if a.end is not None else math.inf):
                    problems.append(f"overlap on pt {pt}: {a} and {b}")
        for a, b in itertools.pairwise(ivs):
            if b.epoch <= a.epoch and not (allow_resume and resumed(a, b)):
                problems.append(f"epoch not increasing on pt {pt}: {a} then {b}")
    assert not problems, "\n".join(problems) + "\n" + cluster.summary()
    return intervals


def successors(
    intervals: dict[int, list[Interval]], victim: str, pts: list[int], after: float
) -> dict[int, Interval]:
    """For each partition, the first interval of another node that started after ``after``."""
    found = {}
    for pt in pts:
        later = [iv for iv in intervals[pt] if iv.node != victim and iv.start > after]
        assert later, f"pt {pt} got no successor of {victim}: {[str(iv) for iv in intervals[pt]]}"
        found[pt] = later[0]
    return found


def victim_intervals(
    intervals: dict[int, list[Interval]], victim: str, pts: list[int], at: float
) -> dict[int, Interval]:
    """The victim's interval of each partition that was open at ``at`` (the fault)."""
    found = {}
    for pt in pts:
        mine = [
            iv
            for iv in intervals[pt]
            if iv.node == victim and iv.start < at and (iv.t_false is None or iv.t_false > at)
        ]
        assert len(mine) == 1, (pt, [str(iv) for iv in intervals[pt]])
        found[pt] = mine[0]
    return found


def report(
    name: str, fault_at: float, took: dict[int, Interval], was: dict[int, Interval] | None = None
) -> list[float]:
    """Print the failover times (``pytest -s`` shows them); return them sorted."""
    delays = sorted(iv.start - fault_at for iv in took.values())
    line = (
        f"{name}: {len(delays)} partitions failed over in "
        f"{delays[0]:.3f}..{delays[-1]:.3f} s after the fault"
    )
    fences = [took[pt].start - iv.fence for pt, iv in (was or {}).items() if iv.fence is not None]
    if fences:
        line += f"; successors started {min(fences):.3f} s or more after the victim's fence"
    print(line)
    return delays


@asynccontextmanager
async def node_processes(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, logs: Path, names: tuple[str, ...] = NAMES
) -> AsyncIterator[Cluster]:
    """Start one process per name; on exit leave gracefully (or kill them all on error)."""
    cluster = Cluster(etcd.endpoints, prefix, logs)
    try:
        async with trio.open_nursery() as nursery:
            for name in names:
                await cluster.spawn(nursery, name, names)
            yield cluster
            await cluster.shutdown()
    finally:
        cluster.kill_all()
        cluster.save()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            for node in cluster.nodes.values():
                await node.process.wait()


@pytest.mark.slow
async def test_sigkill_of_a_leader_process(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    async with node_processes(etcd, prefix, tmp_path) as cluster:
        preferred = await cluster.settle()
        victim = NAMES[0]
        led = [pt for pt in range(P) if preferred[pt] == victim]
        assert led
        killed_at = await cluster.kill(victim)
        await cluster.wait_until(
            lambda: cluster.taken_over(led, victim), TTL + 3, "successors after SIGKILL"
        )
        await cluster.wait_until(lambda: cluster.nodes[victim].eof, 5, "EOF of the killed node")
    intervals = check_invariants(cluster)
    was = victim_intervals(intervals, victim, led, killed_at)
    took = successors(intervals, victim, led, killed_at)
    delays = report("SIGKILL", killed_at, took, was)
    for pt in led:
        old, new = was[pt], took[pt]
        assert old.killed and old.end == killed_at
        # etcd cannot expire the lease before the last acknowledged keepalive's send + TTL.
        assert old.fence is not None and new.start > old.fence, (str(old), str(new))
        assert new.epoch > old.epoch
    assert delays[-1] <= TTL + 1.5, delays


@pytest.mark.slow
async def test_sigstop_of_a_leader_process_then_sigcont(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    async with node_processes(etcd, prefix, tmp_path) as cluster:
        preferred = await cluster.settle()
        victim = NAMES[0]
        paused = cluster.nodes[victim]
        led = [pt for pt in range(P) if preferred[pt] == victim]
        assert led
        stopped_at = await cluster.stop(victim)
        old_lease = paused.lease
        await cluster.wait_until(
            lambda: cluster.taken_over(led, victim), TTL + 3, "successors while stopped"
        )
        await trio.sleep(max(0.0, stopped_at + 2 * TTL - time.time()))  # the pause
        continued_at = cluster.resume(victim)
        await cluster.wait_until(
            lambda: not any(pt in paused.leading for pt in led), 5, "the woken node's step-downs"
        )

        def rejoined() -> bool:
            return (
                paused.lease not in (None, old_lease)
                and bool(paused.leading)
                and all(len(cluster.claimants(pt)) == 1 for pt in range(P))
            )

        await cluster.wait_until(rejoined, 15, "the woken node leading again")
    intervals = check_invariants(cluster)
    was = victim_intervals(intervals, victim, led, stopped_at)
    took = successors(intervals, victim, led, stopped_at)
    delays = report("SIGSTOP", stopped_at, took, was)
    ready = paused.ready()
    assert ready is not None
    margin = ready["margin"]
    old_epochs = {pt: iv.epoch for pt, iv in was.items()}
    for pt in led:
        old, new = was[pt], took[pt]
        # (1) On waking, is_leader was false at the first poll: no stale leadership.
        assert old.end is not None and old.end < stopped_at, str(old)
        assert old.t_false is not None and old.t_false > continued_at, str(old)
        first_after = next(
            line for line in paused.lines if line.get("pt") == pt and line["t"] > continued_at
        )
        assert first_after["leader"] is False, first_after
        # (2) The successor started after the paused node's self-fencing point, which is
        # at least TTL - margin after its last keepalive, itself at most a heartbeat old.
        assert old.fence is not None and new.start > old.fence, (str(old), str(new))
        assert new.start - stopped_at > TTL - margin - HEARTBEAT - 0.05, (str(old), str(new))
        # (3) Epochs increase (check_invariants checks every partition's whole history).
        assert new.epoch > old.epoch
    stale = [
        line
        for line in paused.lines
        if line.get("leader")
        and line["t"] > continued_at
        and old_epochs.get(line["pt"]) == line["epoch"]
    ]
    assert not stale, stale
    assert delays[-1] <= TTL + 1.5, delays


@pytest.mark.slow
async def test_sigterm_of_a_leader_process_hands_over_at_once(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    async with node_processes(etcd, prefix, tmp_path) as cluster:
        preferred = await cluster.settle()
        victim = NAMES[0]
        led = [pt for pt in range(P) if preferred[pt] == victim]
        assert led
        termed_at = cluster.terminate(victim)
        await cluster.wait_until(
            lambda: cluster.taken_over(led, victim), 3, "successors after SIGTERM"
        )
        with trio.fail_after(10):
            await cluster.nodes[victim].process.wait()
    intervals = check_invariants(cluster)
    took = successors(intervals, victim, led, termed_at)
    delays = report("SIGTERM", termed_at, took)
    assert cluster.nodes[victim].process.returncode == 0
    assert delays[-1] <= 1.0, delays


@pytest.mark.slow
async def test_sigstop_shorter_than_the_lease_wakes_between_fence_and_deadline(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    """Paused right after a keepalive, woken after its fence but before its lease deadline.

    On waking ``is_leader`` must be false (the fence passed), although the session is still
    valid: the next keepalive renews it; the node then removes the leader keys of the epochs
    it stepped down from and wins new terms, with new, higher epochs.
    """
    async with node_processes(etcd, prefix, tmp_path) as cluster:
        preferred = await cluster.settle()
        victim = NAMES[0]
        paused = cluster.nodes[victim]
        led = [pt for pt in range(P) if preferred[pt] == victim]
        assert led
        ready = paused.ready()
        assert ready is not None
        seen = len(paused.lines)
        await cluster.wait_until(
            lambda: any("fence" in line for line in paused.lines[seen:]), 2 * HEARTBEAT, "keepalive"
        )
        renewal = next(line for line in reversed(paused.lines) if "fence" in line)
        fence, ready_lease = renewal["fence"], renewal["lease"]
        stopped_at = await cluster.stop(victim)
        await trio.sleep(max(0.0, fence + ready["margin"] / 2 - time.time()))
        continued_at = cluster.resume(victim)

        def renewed_in_time() -> bool:
            # The keepalive pump (its own thread) may renew the lease on waking before
            # anything on the Trio loop (the poller, the fence timer) runs: the lease never
            # expired, no one else could win, and the node rightly keeps its terms.
            after = [line for line in paused.lines if line["t"] > continued_at]
            renewals = [line for line in after if "fence" in line]
            return (
                bool(renewals)
                and renewals[0]["lease"] == ready_lease
                and renewals[0]["t"] < fence + ready["margin"]
                and not any(line.get("pt") in led for line in after)
            )

        def woke() -> bool:
            after = [line for line in paused.lines if line["t"] > continued_at]
            stepped = all(any(line.get("pt") == pt for line in after) for pt in led)
            return (
                (stepped or renewed_in_time())
                and any("fence" in line for line in after)
                and all(len(cluster.claimants(pt)) == 1 for pt in range(P))
            )

        await cluster.wait_until(woke, TTL + 5, "the woken node's step-downs and a leader each")
        kept = renewed_in_time()
        if kept:
            assert all(cluster.claimants(pt) == [victim] for pt in led)
    # The same term may be taken up again when a keepalive renews the lease after the poller
    # saw the fence pass (the lease never lapsed in etcd: nobody else could lead meanwhile).
    intervals = check_invariants(cluster, allow_resume=True)
    if kept:
        print("short SIGSTOP: the pump renewed the lease before the fence was observed")
        return
    was = victim_intervals(intervals, victim, led, stopped_at)
    outcome = []
    for pt in led:
        old = was[pt]
        assert old.end is not None and old.end < stopped_at, str(old)
        assert old.t_false is not None and old.t_false > continued_at, str(old)
        first_after = next(
            line for line in paused.lines if line.get("pt") == pt and line["t"] > continued_at
        )
        assert first_after["leader"] is False, first_after
        later = [iv for iv in intervals[pt] if iv.start > old.start]
        if later:
            new = later[0]
            outcome.append("resumed" if resumed(old, new) else f"taken by {new.node}")
            assert resumed(old, new) or (old.fence is not None and new.start > old.fence)
    print(
        f"short SIGSTOP: woke {continued_at - fence:.3f} s after its fence: {sorted(set(outcome))}"
    )


@pytest.mark.slow
async def test_leader_work_is_not_cancelled_while_the_node_still_leads(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    config = node_config(
        "a", etcd.endpoints, prefix, partitions=4, replica_factor=1, session_ttl=TTL
    )
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        with trio.fail_after(10):
            await node.ck.wait_converged()
            while not node.ck.is_leader(0):
                await trio.sleep(0.01)
        start = trio.current_time()
        lost_after: float | None = None
        epoch = node.ck.leader_epoch(0)
        try:
            async with node.ck.leadership(0) as epoch:
                await trio.sleep(2 * TTL)  # several keepalives renew the session meanwhile
        except clusterkit.LeadershipLost:
            lost_after = trio.current_time() - start
        still = node.ck.is_leader(0), node.ck.leader_epoch(0)
        await node.stop()
    assert lost_after is None, (
        f"LeadershipLost after {lost_after:.3f} s; (is_leader, epoch) now {still}, was {epoch}"
    )
