"""One clusterkit node in its own interpreter, for ``benchmarks/scale.py``.

Run by the benchmark as a fresh interpreter (never forked: grpc channels must not cross
``fork()``)::

    python benchmarks/_scale_node.py --id n1 --endpoints 127.0.0.1:2379 --prefix /scale/x \\
        --partitions 1024 --replicas 3 --session-ttl 5 --rebalance-delay 0.5 [--wait-go]

Every line on stdout is one JSON object, flushed at once; ``t`` is wall-clock ``time.time()``:

- ``{"ev": "loaded"}``: imports done; with ``--wait-go`` the node joins only after a ``go``
  line on stdin (so the benchmark can time a join without the interpreter's start-up).
- ``{"ev": "joined"}``: ``open_cluster`` is entered (the node is registered and has a view).
- ``{"ev": "report", ...}`` every ``--report-interval`` seconds (also before joining), in
  answer to a command, and once more at exit (``"final": true``). Fields: ``cpu``
  (``time.process_time()``: user + system of every thread of the process, so the gRPC
  threads count), ``leads`` (partitions for which ``is_leader`` is true), ``lag_max`` /
  ``lag_p99`` (Trio run-loop lag in the current window: a probe task sleeps 10 ms and
  records by how much it overslept),
  ``lag_max_all`` (since start), ``sessions_lost``, ``keepalive_delay`` and ``library_lag``
  (the library's own ``max_keepalive_delay`` / ``max_loop_lag`` statistics, in seconds or
  ``_ms``, wherever an actor reports them, else null) and ``stats`` (``ck.statistics()``).
- ``{"ev": "exit"}`` after the node left.

Commands on stdin, one per line: ``go``; ``mark <seq>`` (start a new lag window, then
report with ``"seq"``); ``report <seq>`` (report with ``"seq"``); ``leave``. SIGTERM, SIGINT
and EOF on stdin (the benchmark went away) make the node leave gracefully (revoking its
session); SIGKILL is always fine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import trio

import clusterkit

PROBE = 0.010  # the lag probe's sleep


def emit(record: dict[str, Any]) -> None:
    record["t"] = time.time()
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def statistic(stats: dict[str, dict[str, Any]], name: str) -> float | None:
    """The largest value of statistic ``name`` (seconds, or ``name_ms``) over all actors."""
    found: list[float] = []
    for values in stats.values():
        if values.get(name) is not None:
            found.append(float(values[name]))
        if values.get(name + "_ms") is not None:
            found.append(float(values[name + "_ms"]) / 1000)
    return max(found, default=None)


class Probe:
    """Measures how late the Trio run loop wakes a task that sleeps ``PROBE`` seconds."""

    def __init__(self) -> None:
        self.window: list[float] = []
        self.max_all = 0.0

    def mark(self) -> None:
        self.window = []

    def summary(self) -> dict[str, float]:
        lags = sorted(self.window)
        p99 = lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)] if lags else 0.0
        return {
            "lag_max": lags[-1] if lags else 0.0,
            "lag_p99": p99,
            "lag_samples": len(lags),
            "lag_max_all": self.max_all,
        }

    async def run(self) -> None:
        while True:
            start = trio.current_time()
            await trio.sleep(PROBE)
            lag = max(0.0, trio.current_time() - start - PROBE)
            self.window.append(lag)
            self.max_all = max(self.max_all, lag)


class Node:
    """The running node's state, as reported."""

    def __init__(self, node_id: str, partitions: int) -> None:
        self.node_id = node_id
        self.partitions = partitions
        self.ck: clusterkit.ClusterKit | None = None
        self.probe = Probe()

    def leads(self) -> int:
        ck = self.ck
        if ck is None:
            return 0
        # ``is_leader`` is false for partitions missing from the node's leadership table
        # (if the library still has one): only those need asking.
        table = getattr(getattr(ck, "_leadership", None), "epochs", None)
        candidates = list(table) if isinstance(table, dict) else range(self.partitions)
        return sum(1 for pt in candidates if ck.is_leader(pt))

    def report(self, **extra: Any) -> None:
        stats: dict[str, Any] = {}
        if self.ck is not None:
            stats = {name: dict(values) for name, values in self.ck.statistics().items()}
        lost = stats.get("MembershipActor", {}).get("sessions_lost")
        delay = statistic(stats, "max_keepalive_delay")
        library_lag = statistic(stats, "max_loop_lag")
        emit(
            {
                "ev": "report",
                "node": self.node_id,
                "cpu": time.process_time(),
                "leads": self.leads(),
                "sessions_lost": lost,
                "keepalive_delay": delay,
                "library_lag": library_lag,
                **self.probe.summary(),
                "stats": stats,
                **extra,
            }
        )

    async def reporter(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self.report()


async def commands(node: Node, go: trio.Event, leave: trio.CancelScope) -> None:
    """Serve the stdin commands; EOF or ``leave`` cancels ``leave``."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                word, _, arg = line.decode().strip().partition(" ")
                if word == "go":
                    go.set()
                elif word == "mark":
                    node.probe.mark()
                    node.report(seq=int(arg))
                elif word == "report":
                    node.report(seq=int(arg))
                elif word == "leave":
                    leave.cancel()
                    return
    leave.cancel()


async def main(args: argparse.Namespace) -> None:
    config = clusterkit.Config(
        node_id=args.id,
        etcd_endpoints=args.endpoints.split(","),
        etcd_prefix=args.prefix.rstrip("/"),
        http_port=0,
        metrics_port=None,
        grpc_port=0,
        partitions=args.partitions,
        replica_factor=args.replicas,
        session_ttl=args.session_ttl,
        rebalance_delay=args.rebalance_delay,
    )
    node = Node(args.id, args.partitions)
    go = trio.Event()
    if not args.wait_go:
        go.set()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:
            body = trio.CancelScope()

            async def until_signal() -> None:
                async for _ in signals:
                    body.cancel()
                    return

            outer.start_soon(until_signal)
            outer.start_soon(node.probe.run)
            outer.start_soon(commands, node, go, body)
            outer.start_soon(node.reporter, args.report_interval)
            emit({"ev": "loaded", "node": args.id})
            with body, trio.move_on_after(args.max_seconds):
                await go.wait()
                async with clusterkit.open_cluster(config) as ck:
                    node.ck = ck
                    emit({"ev": "joined", "node": args.id})
                    await trio.sleep_forever()
            node.report(final=True)
            node.ck = None
            emit({"ev": "exit", "node": args.id})
            outer.cancel_scope.cancel()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--id", required=True, help="node id")
    parser.add_argument("--endpoints", required=True, help="etcd endpoints, comma-separated")
    parser.add_argument("--prefix", required=True, help="the cluster's etcd key prefix")
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--session-ttl", type=float, default=5.0)
    parser.add_argument("--rebalance-delay", type=float, default=0.5)
    parser.add_argument("--report-interval", type=float, default=0.5)
    parser.add_argument("--wait-go", action="store_true", help="join on a 'go' line on stdin")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="leave after this")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(created).3f %(name)s %(levelname)s %(message)s",
    )
    trio.run(main, parse())
