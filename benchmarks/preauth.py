"""What unauthenticated connections cost a node's peer endpoint: RSS and a legitimate call.

Usage::

    python benchmarks/preauth.py [--connections 1000] [--payload 262144]

The peer endpoint (``serve_peers``, with a node's default ``peer_max_message`` of 16 MiB) runs
in a process of its own, so its RSS is its own. This process then opens ``--connections``
loopback connections that each complete the websocket upgrade and either

- **partial**: start one binary message announcing 16 MiB and send ``--payload`` bytes of it,
  then hold the connection open without a word more; or
- **silent**: say nothing after the upgrade;

and, while they are held, makes legitimate authenticated requests to the same endpoint. Each
scenario runs twice in the same run: with the pre-authentication limits (a 1 KiB message
limit until the handshake succeeds, at most 128 connections pending authentication) and
without them (the baseline: ``peer_max_message`` from the first byte, no bound on pending
connections), each against a fresh server process.

The table shows the server's RSS before, at its peak while the connections are held, and 6 s
later (after the 5 s handshake timeout), the number of connections the server refused, and
the latency of legitimate requests made meanwhile (max of 20). This process and the server
share the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import trio
import trio.lowlevel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clusterkit._peers.transport import PeerPool  # noqa: E402

SECRET = b"preauth-benchmark-secret-32bytes"

SERVER = """
import sys, trio
sys.path.insert(0, sys.argv[1])
from clusterkit._peers.transport import serve_peers

async def ping(payload):
    return payload

async def main(limits):
    kwargs = {} if limits else {"max_pending": None, "preauth_max_frame": 16 * 1024 * 1024}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_peers(
                "victim", sys.argv[3].encode(), {"ping": ping}, "127.0.0.1", 0,
                max_frame=16 * 1024 * 1024, task_status=task_status, **kwargs,
            )
        )
        print(port, flush=True)

trio.run(main, sys.argv[2] == "limits")
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def hostile(port: int, mode: str, payload: int, held: list[trio.SocketStream]) -> str:
    """One connection: upgrade, then a partial 16 MiB message or silence. Returns the HTTP
    status the server answered the upgrade with ('101', '503', or 'closed')."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return "connect failed"
    held.append(stream)
    try:
        await stream.send_all(UPGRADE)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return "closed"
            answer += chunk
        status = answer.split(b" ", 2)[1].decode()
        if status != "101" or mode == "silent":
            return status
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return "closed"
    mask = secrets.token_bytes(4)
    header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 16 * 1024 * 1024) + mask
    try:
        await stream.send_all(header + bytes(payload))  # zeros XOR mask: any bytes will do
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return "101, closed mid-message"
    return status


async def scenario(limits: bool, mode: str, connections: int, payload: int) -> dict[str, object]:
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once per scenario, before any load
        [sys.executable, "-c", SERVER, str(ROOT), "limits" if limits else "none", SECRET.decode()],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        await trio.sleep(0.5)
        before = rss_mb(proc.pid)
        peak = before
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        held: list[trio.SocketStream] = []
        async with trio.open_nursery() as nursery:
            pool = PeerPool(nursery, "bench-client", SECRET, {}, {})

            async def one(i: int) -> None:
                status = await hostile(port, mode, payload, held)
                statuses[status] = statuses.get(status, 0) + 1

            async with trio.open_nursery() as attackers:
                for i in range(connections):
                    attackers.start_soon(one, i)
                    if i % 50 == 49:
                        await trio.lowlevel.checkpoint()
            # every hostile connection is now open (and held); call legitimately meanwhile
            for _ in range(20):
                start = time.perf_counter()
                try:
                    with trio.fail_after(10):
                        await pool.request(f"127.0.0.1:{port}", "ping", b"x", timeout=10)
                    latencies.append(time.perf_counter() - start)
                except Exception:  # a refused or timed-out legitimate call: counted
                    latencies.append(float("inf"))
                peak = max(peak, rss_mb(proc.pid))
                await trio.sleep(0.05)
            with trio.move_on_after(6.0):
                while True:
                    peak = max(peak, rss_mb(proc.pid))
                    await trio.sleep(0.2)
            after = rss_mb(proc.pid)
            for s in held:
                await trio.aclose_forcefully(s)
            await pool.aclose()
            nursery.cancel_scope.cancel()
        return {
            "before": before,
            "peak": peak,
            "after": after,
            "statuses": statuses,
            "call_max_ms": max(latencies) * 1000,
            "call_p50_ms": sorted(latencies)[len(latencies) // 2] * 1000,
        }
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--payload", type=int, default=256 * 1024)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections)), hard))
    print(
        f"{args.connections} loopback connections; partial = {args.payload} bytes of a message "
        f"announcing 16 MiB; server in its own process (pid's RSS); 2 cores shared with this "
        f"process (cpus: {os.cpu_count()})"
    )
    rows = []
    for mode in ("partial", "silent"):
        for limits in (False, True):
            r = await scenario(limits, mode, args.connections, args.payload)
            rows.append((mode, "limits" if limits else "baseline (none)", r))
    header = (
        f"{'connections':<9} {'server':<16} {'RSS before':>10} {'peak':>8} {'+peak':>8} "
        f"{'after 6 s':>9} {'call p50':>9} {'call max':>9}  upgrade answers"
    )
    print(header)
    print("-" * len(header))
    for mode, name, r in rows:
        before, peak, after = r["before"], r["peak"], r["after"]
        assert isinstance(before, float) and isinstance(peak, float) and isinstance(after, float)
        print(
            f"{mode:<9} {name:<16} {before:>8.1f}MB {peak:>6.1f}MB {peak - before:>+6.1f}MB "
            f"{after:>7.1f}MB {r['call_p50_ms']:>7.1f}ms {r['call_max_ms']:>7.1f}ms  "
            f"{r['statuses']}"
        )


if __name__ == "__main__":
    trio.run(main)
