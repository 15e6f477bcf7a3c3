"""One clusterkit node in its own interpreter, reporting leadership as JSON lines on stdout.

Run by ``tests/test_crash.py`` as ``python tests/node_process.py --id n1 --endpoints E
--prefix P`` (a fresh interpreter: grpc channels must not cross ``fork()``), so a test can
SIGKILL, SIGSTOP/SIGCONT or SIGTERM a whole node. Every line is one JSON object, flushed at
once; ``t`` is wall-clock ``time.time()`` so several processes on one machine compare:

- ``{"t", "node", "pt", "leader": true, "epoch"}``: the first poll that saw ``is_leader(pt)``
  true (``t`` is taken after that poll: leadership surely held at ``t``).
- ``{"t", "node", "pt", "leader": false, "epoch", "last_true"}``: the first poll that saw it
  false; ``last_true`` is the start of the last poll that saw it true, so leadership surely
  held until ``last_true`` and surely ended before ``t``.
- ``{"t", "node", "fence", "lease"}``: the session changed; ``fence`` is the wall-clock time at
  which this node's ``is_leader`` turns false unless a keepalive extends the session (its
  local lease deadline minus the leader margin), null without a session.
- ``{"t", "node", "ready": true, "preferred", "margin"}``: the map converged (on ``--members``
  if given); ``preferred[pt]`` is each partition's preferred leader.
- ``{"t", "node", "signal"}`` on SIGTERM/SIGINT, then a graceful leave, then
  ``{"t", "node", "exit": true}`` and exit status 0.

``is_leader`` is a pure local call, so polling it for every partition every millisecond is
cheap; it compares the clock with the lease deadline on each call, which is what a process
waking from SIGSTOP must get right.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

import trio

import clusterkit


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Reporter:
    """Polls one node's leadership and session and prints every change."""

    def __init__(self, node_id: str, partitions: int) -> None:
        self.node_id = node_id
        self.partitions = partitions
        self.ck: clusterkit.ClusterKit | None = None
        self.leading: dict[int, int] = {}  # pt -> epoch, while is_leader(pt) is true
        self.last_true: dict[int, float] = {}
        self.session: tuple[int, float] | None = None  # (lease, deadline) last printed

    def poll(self) -> None:
        ck = self.ck
        if ck is None:
            return
        self._session(ck)
        before = time.time()
        now_leading = {pt for pt in range(self.partitions) if ck.is_leader(pt)}
        after = time.time()
        for pt in range(self.partitions):
            if pt in now_leading:
                self.last_true[pt] = before
                if pt not in self.leading:
                    epoch = ck._leadership.epochs.get(pt, -1)
                    self.leading[pt] = epoch
                    emit(
                        {"t": after, "node": self.node_id, "pt": pt, "leader": True, "epoch": epoch}
                    )
            elif pt in self.leading:
                epoch = self.leading.pop(pt)
                emit(
                    {
                        "t": before,
                        "node": self.node_id,
                        "pt": pt,
                        "leader": False,
                        "epoch": epoch,
                        "last_true": self.last_true[pt],
                    }
                )

    def _session(self, ck: clusterkit.ClusterKit) -> None:
        session = ck._session.value
        key = (session.lease_id, session.deadline) if session is not None else None
        if key == self.session:
            return
        self.session = key
        fence = None
        if session is not None:
            fence = session.deadline - ck._margin - trio.current_time() + time.time()
        lease = session.lease_id if session is not None else None
        emit({"t": time.time(), "node": self.node_id, "fence": fence, "lease": lease})

    async def run(self, interval: float) -> None:
        while True:
            self.poll()
            await trio.sleep(interval)


async def main(args: argparse.Namespace) -> None:
    config = clusterkit.Config(
        node_id=args.id,
        etcd_endpoints=args.endpoints.split(","),
        etcd_prefix=args.prefix.rstrip("/"),
        http_port=0,
        metrics_port=None,
        grpc_port=0,
        partitions=args.partitions,
        replica_factor=args.replica_factor,
        session_ttl=args.session_ttl,
        rebalance_delay=args.rebalance_delay,
    )
    members = args.members.split(",") if args.members else None
    reporter = Reporter(args.id, args.partitions)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:
            body = trio.CancelScope()

            async def until_signal() -> None:
                async for signum in signals:
                    emit({"t": time.time(), "node": args.id, "signal": signum})
                    body.cancel()
                    return

            outer.start_soon(until_signal)
            with body:
                async with clusterkit.open_cluster(config) as ck:
                    reporter.ck = ck
                    # In the outer nursery: the poller keeps watching while the node leaves.
                    outer.start_soon(reporter.run, args.poll_interval)
                    view = await ck.wait_converged(members)
                    assert view.map is not None
                    emit(
                        {
                            "t": time.time(),
                            "node": args.id,
                            "ready": True,
                            "preferred": [row[0] for row in view.map.replicas],
                            "margin": ck._margin,
                        }
                    )
                    await trio.sleep_forever()
            outer.cancel_scope.cancel()
            reporter.poll()  # the node has left: report whatever ended meanwhile
            emit({"t": time.time(), "node": args.id, "exit": True})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--id", required=True, help="node id")
    parser.add_argument("--endpoints", required=True, help="etcd endpoints, comma-separated")
    parser.add_argument("--prefix", required=True, help="the cluster's etcd key prefix")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--replica-factor", type=int, default=3)
    parser.add_argument("--session-ttl", type=float, default=2.0)
    parser.add_argument("--rebalance-delay", type=float, default=0.5)
    parser.add_argument("--members", default="", help="ready only once these ids are the members")
    parser.add_argument("--poll-interval", type=float, default=0.001)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(created).3f %(name)s %(levelname)s %(message)s",
    )
    trio.run(main, parse())
