"""Benchmark the peer transport against raw Trio TCP with length-prefixed msgpack frames.

Usage::

    python benchmarks/peers.py [--profile ck-rtt|ck-pipelined|ck-stream] [--time-limit S]

Both sides run in this one Trio program on loopback: clusterkit's ``serve_peers`` and a
``PeerPool`` (websocket frames, HMAC handshake, request ids, the batching writer, stream
credit), against a minimal raw protocol written here — a Trio TCP listener, frames of a
4-byte big-endian length and a msgpack array, one reader per connection that answers every
request of a received chunk with one ``send_all``, and a client whose requests each take a
lock and ``send_all`` their frame while one reader task hands answers out by id. Both sides
therefore share one CPU; the numbers are the cost of a message through both ends.

1. sequential round trips of a 100-byte request, median and p99 (goal: <= 2x raw).
2. pipelined throughput: 100 tasks make 20,000 100-byte requests in all (goal: >= 0.7x).
3. streaming 64 KiB values one way: a ``PeerStream`` to a handler that consumes them,
   against ``send_all`` of 64 KiB frames to a raw reader that decodes them (goal: >= 0.5x).

Every measurement runs in interleaved rounds (clusterkit, raw, clusterkit, ...) and reports
the median round. ``--profile X`` runs the clusterkit part X under cProfile once more and
prints where its time goes. The exit status is 1 when a goal was missed.

Where the time goes (py-spy, 2 CPUs, trio 0.35, trio-websocket 0.12.2, wsproto 1.3): a round
trip crosses about 11 Trio scheduler batches against the raw protocol's 4 (caller -> writer
task -> trio-websocket's reader task -> session reader -> handler task -> writer, and back),
so the scheduler is 40% of it and wsproto 17%; the session and codec are under 10%. Uploads
(client -> server) spend 43% in wsproto's pure-Python XOR masking, which RFC 6455 requires of
clients; downloads have none and run about twice as fast. Neither is tunable from here.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio

try:
    import clusterkit  # noqa: F401
except ImportError:  # run from a checkout without installing: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterkit._peers import session as peer_session
from clusterkit._peers import transport as peer_transport
from clusterkit._peers.session import PeerStream
from clusterkit._peers.transport import PeerPool, serve_peers

SECRET = b"benchmark-secret-benchmark-secret"
PAYLOAD = b"x" * 100
RTT_CALLS = 3000
TASKS = 100
PIPELINED = 20_000
VALUE = b"v" * 65536
STREAM_ITEMS = 1500
ROUNDS = 3
RAW_RECEIVE = 256 * 1024
HEADER = struct.Struct(">I")

clock = time.perf_counter_ns


# -- the raw baseline ----------------------------------------------------------------------


def raw_frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def raw_frames(buf: bytearray) -> tuple[list[Any], int]:
    """The complete frames at the start of ``buf`` and how many bytes they took."""
    out: list[Any] = []
    pos = 0
    while len(buf) - pos >= HEADER.size:
        (size,) = HEADER.unpack_from(buf, pos)
        if len(buf) - pos - HEADER.size < size:
            break
        start = pos + HEADER.size
        out.append(msgpack.unpackb(buf[start : start + size], raw=False))
        pos = start + size
    return out, pos


async def raw_serve(stream: trio.SocketStream) -> None:
    """Requests ``[0, id, payload]`` -> ``[1, id, payload]``; items ``[4, value]`` are
    counted; ``[5]`` (end) -> ``[6, count]``; ``[7, n]`` -> n items of ``VALUE``, then
    ``[6, n]``."""
    buf = bytearray()
    items = 0
    async with stream:
        while data := await stream.receive_some(RAW_RECEIVE):
            buf += data
            frames, used = raw_frames(buf)
            del buf[:used]
            out: list[bytes] = []
            for frame in frames:
                match frame[0]:
                    case 0:
                        out.append(raw_frame([1, frame[1], frame[2]]))
                    case 4:
                        items += 1
                    case 5:
                        out.append(raw_frame([6, items]))
                        items = 0
                    case _:
                        item = raw_frame([4, VALUE])
                        for _ in range(frame[1]):
                            await stream.send_all(item)
                        out.append(raw_frame([6, frame[1]]))
            if out:
                await stream.send_all(b"".join(out))


class RawClient:
    """Requests by id over one TCP stream; one reader task resolves them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.lock = trio.StrictFIFOLock()
        self.ids = itertools.count(1)
        self.pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.items = 0

    async def read(self) -> None:
        buf = bytearray()
        while data := await self.stream.receive_some(RAW_RECEIVE):
            buf += data
            frames, used = raw_frames(buf)
            del buf[:used]
            for frame in frames:
                if frame[0] == 4:
                    self.items += 1
                    continue
                key = frame[1] if frame[0] == 1 else -1
                done, box = self.pending.pop(key)
                box.append(frame[-1])
                done.set()

    async def call(self, obj: list[Any], key: int) -> Any:
        done = trio.Event()
        box: list[Any] = []
        self.pending[key] = (done, box)
        async with self.lock:
            await self.stream.send_all(raw_frame(obj))
        await done.wait()
        return box[0]

    async def request(self, payload: Any) -> Any:
        key = next(self.ids)
        return await self.call([0, key, payload], key)

    async def send_items(self, value: bytes, count: int) -> int:
        frame = raw_frame([4, value])
        for _ in range(count):
            async with self.lock:
                await self.stream.send_all(frame)
        answer: int = await self.call([5], -1)
        return answer

    async def receive_items(self, count: int) -> None:
        self.items = 0
        assert await self.call([7, count], -1) == count == self.items


# -- the clusterkit side -------------------------------------------------------------------


async def echo(payload: Any) -> Any:
    return payload


async def sink(stream: PeerStream, payload: Any) -> None:
    async for _ in stream:
        pass


async def source(stream: PeerStream, count: Any) -> None:
    for _ in range(count):
        await stream.send(VALUE)


async def ck_receive_items(pool: PeerPool, addr: str, count: int) -> None:
    stream = await pool.open_stream(addr, "source", count)
    received = 0
    async for _ in stream:
        received += 1
    assert received == count
    await stream.end()


async def ck_send_items(pool: PeerPool, addr: str, value: bytes, count: int) -> None:
    stream = await pool.open_stream(addr, "sink", None)
    for _ in range(count):
        await stream.send(value)
    await stream.end()
    async for _ in stream:  # until the handler returns (it has consumed every item)
        pass


# -- measurements --------------------------------------------------------------------------


@dataclass
class Side:
    request: Callable[[Any], Awaitable[Any]]
    send_items: Callable[[bytes, int], Awaitable[Any]]
    receive_items: Callable[[int], Awaitable[Any]]


async def round_trips(side: Side, calls: int) -> list[int]:
    out: list[int] = []
    for _ in range(calls):
        t0 = clock()
        await side.request(PAYLOAD)
        out.append(clock() - t0)
    return out


async def pipelined(side: Side, total: int, tasks: int = TASKS) -> float:
    """Requests per second with ``tasks`` tasks making ``total`` requests."""
    each = total // tasks

    async def worker() -> None:
        for _ in range(each):
            await side.request(PAYLOAD)

    t0 = clock()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    return each * tasks / ((clock() - t0) / 1e9)


async def streaming(side: Side, count: int, *, upload: bool = True) -> float:
    """MB/s of ``count`` 64 KiB values sent one way (by the client if ``upload``, else by
    the server) and consumed."""
    t0 = clock()
    if upload:
        await side.send_items(VALUE, count)
    else:
        await side.receive_items(count)
    return count * len(VALUE) / ((clock() - t0) / 1e9) / 1e6


def pct(samples: Sequence[int], q: float) -> float:
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


@dataclass(frozen=True)
class Row:
    metric: str
    clusterkit: str
    raw: str
    ratio: str
    goal: str
    result: str


def render(rows: Sequence[Row]) -> str:
    table = [Row("metric", "clusterkit", "raw tcp", "ratio", "goal", "pass/fail"), *rows]
    cols = [tuple(vars(r).values()) for r in table]
    widths = [max(len(c[i]) for c in cols) for i in range(6)]
    lines = [
        "  ".join(
            c.rjust(w) if i in (1, 2, 3) else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cols
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def latency_row(metric: str, ck: float, raw: float, limit: float) -> Row:
    ratio = ck / raw
    ok = "pass" if ratio <= limit else "FAIL"
    return Row(
        metric, f"{ck / 1e3:.0f} us", f"{raw / 1e3:.0f} us", f"{ratio:.2f}x", f"<= {limit}x", ok
    )


def rate_row(metric: str, ck: float, raw: float, limit: float, unit: str) -> Row:
    ratio = ck / raw
    ok = "pass" if ratio >= limit else "FAIL"
    return Row(
        metric, f"{ck:,.0f} {unit}", f"{raw:,.0f} {unit}", f"{ratio:.2f}x", f">= {limit}x", ok
    )


async def measure(ck: Side, raw: Side, profile: str | None) -> list[Row]:
    sides = {"ck": ck, "raw": raw}
    for side in sides.values():  # warm up: connections, code paths, allocator
        await round_trips(side, 300)
        await pipelined(side, 2000)
        await streaming(side, 50)
        await streaming(side, 50, upload=False)

    rtt: dict[str, list[int]] = {"ck": [], "raw": []}
    rate: dict[str, list[float]] = {"ck": [], "raw": []}
    mbps: dict[str, list[float]] = {"ck": [], "raw": []}
    down: dict[str, list[float]] = {"ck": [], "raw": []}
    for r in range(ROUNDS):
        order = ["ck", "raw"] if r % 2 == 0 else ["raw", "ck"]
        for name in order:
            rtt[name] += await round_trips(sides[name], RTT_CALLS // ROUNDS)
        for name in order:
            rate[name].append(await pipelined(sides[name], PIPELINED))
        for name in order:
            mbps[name].append(await streaming(sides[name], STREAM_ITEMS))
        for name in order:
            down[name].append(await streaming(sides[name], STREAM_ITEMS, upload=False))

    if profile is not None:
        await run_profiled(ck, profile)

    return [
        latency_row("round trip, median", pct(rtt["ck"], 0.5), pct(rtt["raw"], 0.5), 2.0),
        latency_row("round trip, p99", pct(rtt["ck"], 0.99), pct(rtt["raw"], 0.99), 2.0),
        rate_row(
            f"pipelined ({TASKS} tasks)",
            statistics.median(rate["ck"]),
            statistics.median(rate["raw"]),
            0.7,
            "req/s",
        ),
        rate_row(
            "stream 64 KiB, client->server",
            statistics.median(mbps["ck"]),
            statistics.median(mbps["raw"]),
            0.5,
            "MB/s",
        ),
        rate_row(
            "stream 64 KiB, server->client",
            statistics.median(down["ck"]),
            statistics.median(down["raw"]),
            0.5,
            "MB/s",
        ),
    ]


async def run_profiled(ck: Side, what: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    if what == "ck-rtt":
        await round_trips(ck, RTT_CALLS)
    elif what == "ck-pipelined":
        await pipelined(ck, PIPELINED)
    elif what == "ck-upload":
        await streaming(ck, STREAM_ITEMS)
    else:
        await streaming(ck, STREAM_ITEMS, upload=False)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


async def main(args: argparse.Namespace) -> int:
    with trio.fail_after(args.time_limit):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_peers,
                    "server",
                    SECRET,
                    {"echo": echo},
                    "127.0.0.1",
                    0,
                    stream_handlers={"sink": sink, "source": source},
                )
            )
            addr = f"127.0.0.1:{port}"
            pool = PeerPool(nursery, "client", SECRET)

            async def ck_request(payload: Any) -> Any:
                return await pool.request(addr, "echo", payload, timeout=30)

            ck = Side(
                ck_request,
                partial(ck_send_items, pool, addr),
                partial(ck_receive_items, pool, addr),
            )

            listeners = await nursery.start(partial(trio.serve_tcp, raw_serve, 0, host="127.0.0.1"))
            raw_port = listeners[0].socket.getsockname()[1]
            raw_stream = await trio.open_tcp_stream("127.0.0.1", raw_port)
            client = RawClient(raw_stream)
            nursery.start_soon(client.read)
            raw = Side(client.request, client.send_items, client.receive_items)

            rows = await measure(ck, raw, args.profile)
            await pool.aclose()
            nursery.cancel_scope.cancel()
        await raw_stream.aclose()

    print(
        f"peer transport on loopback, one process; STREAM_WINDOW={peer_session.STREAM_WINDOW} "
        f"HIGH_WATER={peer_session.HIGH_WATER} RECEIVE_BUFFER={peer_transport.RECEIVE_BUFFER} "
        f"QUEUE={peer_transport.QUEUE}"
    )
    print(render(rows))
    return 0 if all(r.result == "pass" for r in rows) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--profile", choices=["ck-rtt", "ck-pipelined", "ck-upload", "ck-download"])
    parser.add_argument("--time-limit", type=float, default=60.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
