"""The Go README's KV example under a SIGKILL: ``python -m examples.http_kv.demo``.

Starts an etcd (the embedded one), three ``examples.http_kv.node`` processes with their own
HTTP ports, and writers that send ``/set`` to any node and follow its redirect to the leader.
Part-way it SIGKILLs one node; writes and reads go on. At the end every acknowledged write is
read back through ``/get`` (again from any node, redirected to the leader) and the report says
how many were lost (must be 0) and how long the longest write waited through the failover.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

import clusterkit

from .http import fetch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Report:
    acknowledged: int = 0
    lost: int = 0
    wrong: int = 0
    retries: int = 0
    slowest_write: float = 0.0
    reads: int = 0
    killed: str = ""
    notes: list[str] = field(default_factory=list)


class Cluster:
    """Node processes (``python -m module``, each with its own HTTP port), their HTTP
    addresses, and which are alive."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str,
        partitions: int,
        module: str = "examples.http_kv.node",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.partitions = partitions
        self.module = module
        self.extra = extra
        self.procs: dict[str, trio.Process] = {}
        self.http: dict[str, str] = {}
        self.alive: set[str] = set()

    async def start(self, nursery: trio.Nursery, node_id: str) -> None:
        port = free_port()
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                self.module,
                "--id",
                node_id,
                "--http-port",
                str(port),
                "--etcd",
                ",".join(self.endpoints),
                "--prefix",
                self.prefix,
                "--partitions",
                str(self.partitions),
                "--parent-stdin",
                *self.extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        self.procs[node_id] = proc
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while b'"up"' not in buffer:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"node {node_id} exited before it was up")
                buffer += chunk
        self.http[node_id] = f"http://127.0.0.1:{port}"
        self.alive.add(node_id)
        nursery.start_soon(_drain, proc)

    def kill(self, node_id: str) -> None:
        self.alive.discard(node_id)
        self.procs[node_id].send_signal(signal.SIGKILL)

    def any_node(self) -> str:
        return self.http[random.choice(sorted(self.alive))]

    async def aclose(self) -> None:
        for proc in self.procs.values():
            if proc.stdin is not None:
                await proc.stdin.aclose()
        with trio.move_on_after(15):
            for proc in self.procs.values():
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()


async def _drain(proc: trio.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.receive_some(65536):
        pass


async def _write(cluster: Cluster, report: Report, key: str, value: str, deadline: float) -> None:
    """Send ``/set`` until one node's leader acknowledges it (200)."""
    started = trio.current_time()
    while True:
        try:
            status, _ = await fetch(f"{cluster.any_node()}/set?key={key}&value={value}")
            if status == 200:
                break
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            pass
        report.retries += 1
        if trio.current_time() > deadline:
            raise RuntimeError(f"write of {key} not acknowledged in time")
        await trio.sleep(0.05)
    report.slowest_write = max(report.slowest_write, trio.current_time() - started)


async def _read(cluster: Cluster, key: str, deadline: float) -> tuple[int, bytes]:
    while True:
        try:
            status, body = await fetch(f"{cluster.any_node()}/get?key={key}")
            if status in (200, 404):
                return status, body
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            pass
        if trio.current_time() > deadline:
            raise RuntimeError(f"read of {key} not answered in time")
        await trio.sleep(0.05)


async def run(
    *, seconds: float = 6.0, writers: int = 8, partitions: int = 16, log: Any = print
) -> Report:
    """The scenario; returns the report (``lost`` must be 0)."""
    report = Report()
    acked: dict[str, str] = {}
    async with clusterkit.open_embedded_etcd() as etcd, trio.open_nursery() as nursery:
        cluster = Cluster(list(etcd.endpoints), f"/http-kv-{os.getpid()}", partitions)
        for node_id in ("n1", "n2", "n3"):
            await cluster.start(nursery, node_id)
        log(f"3 nodes up: {json.dumps(cluster.http)}")
        deadline = trio.current_time() + seconds + 60
        stop = trio.current_time() + seconds

        async def writer(w: int) -> None:
            i = 0
            while trio.current_time() < stop:
                key, value = f"w{w}-{i}", f"v{i}-{random.getrandbits(32)}"
                await _write(cluster, report, key, value, deadline)
                acked[key] = value
                i += 1

        async def killer() -> None:
            await trio.sleep(seconds / 3)
            report.killed = "n2"
            cluster.kill("n2")
            log(f"SIGKILL n2 after {len(acked):,} acknowledged writes")

        async with trio.open_nursery() as load:
            for w in range(writers):
                load.start_soon(writer, w)
            load.start_soon(killer)
        report.acknowledged = len(acked)
        log(f"{len(acked):,} writes acknowledged; reading every one back")
        for key, value in acked.items():
            status, body = await _read(cluster, key, deadline)
            report.reads += 1
            if status == 404:
                report.lost += 1
            elif body.decode() != value:
                report.wrong += 1
        await cluster.aclose()
        nursery.cancel_scope.cancel()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--writers", type=int, default=16)
    args = parser.parse_args()
    started = time.monotonic()
    report = trio.run(lambda: run(seconds=args.seconds, writers=args.writers))
    print(
        f"acknowledged {report.acknowledged:,}  lost {report.lost}  wrong {report.wrong}  "
        f"reads {report.reads:,}  retries {report.retries:,}  "
        f"slowest write {report.slowest_write:.2f} s (through the SIGKILL of {report.killed})  "
        f"[{time.monotonic() - started:.0f} s]"
    )
    sys.exit(1 if report.lost or report.wrong else 0)


if __name__ == "__main__":
    main()
