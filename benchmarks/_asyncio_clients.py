"""The asyncio etcd clients that benchmarks/etcd_bridge.py compares clusterkit with.

Run by etcd_bridge.py, one process per client, each on its own asyncio loop:

    python benchmarks/_asyncio_clients.py {aetcd|etcd3-async-client} HOST:PORT

It connects, prints ``{"ready": ...}``, then answers one JSON command per stdin line with one
JSON line on stdout, so the caller can interleave these rounds with its own:

- ``{"op": "seq", "kind": "put"|"get", "n": N}`` -> ``{"ns": [...], "cpu_ns": C}``: N
  sequential calls, each timed with ``perf_counter_ns``; C is the process CPU time they used;
- ``{"op": "conc", "tasks": T, "per_task": P}`` -> ``{"rate": R, "cpu_us": U}``: T tasks each
  making P puts at once (``asyncio.gather``); puts per second and CPU microseconds per put.

This process imports no clusterkit module: each client ships its own generated etcd protos,
which would clash with ours (and each other's) in one protobuf descriptor pool. The packages
come from the ``bench`` extra, or from the venv etcd_bridge.py creates for them.

etcd3-async-client always authenticates on connect (it has no mode without a user); against
the benchmark's etcd, which has auth disabled, the subclass below skips that and sends no
token, and is otherwise the client unchanged.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

VALUE = b"v" * 64
KEY = b"bench/seq/cmp"


async def open_client(name: str, endpoint: str) -> tuple[Any, Callable[[], Awaitable[Any]]]:
    """(client, close) for the client ``name``."""
    host, _, port = endpoint.rpartition(":")
    if name == "aetcd":
        aetcd = importlib.import_module("aetcd")
        client = aetcd.Client(host=host, port=int(port))
        await client.connect()
        return client, client.close
    if name == "etcd3-async-client":
        etcd_client = importlib.import_module("etcd_client")

        class NoAuthClient(etcd_client.EtcdAsyncClient):  # type: ignore[misc,name-defined]
            async def _authenticate(self) -> None:
                self._token = ""

            def _metadata(self) -> tuple[tuple[str, str], ...]:
                return ()

        config = etcd_client.AsyncEtcdConfig(
            endpoint=endpoint, username="", password="", insecure=True
        )
        client = NoAuthClient(config)
        await client.connect()
        return client, client.close
    raise SystemExit(f"unknown client {name!r}")


def calls(name: str, client: Any) -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    """(put(key), get(key)) as each client spells them."""
    if name == "aetcd":
        return (lambda key: client.put(key, VALUE)), (lambda key: client.get(key))
    text = VALUE.decode()
    return (lambda key: client.put(key.decode(), text)), (lambda key: client.get(key.decode()))


async def serve(name: str, endpoint: str) -> None:
    client, close = await open_client(name, endpoint)
    put, get = calls(name, client)
    await put(KEY)
    reply({"ready": name, "python": sys.version.split()[0]})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            if cmd["op"] == "seq":
                call = put if cmd["kind"] == "put" else get
                out: list[int] = []
                cpu0 = time.process_time_ns()
                for _ in range(cmd["n"]):
                    t0 = time.perf_counter_ns()
                    await call(KEY)
                    out.append(time.perf_counter_ns() - t0)
                reply({"ns": out, "cpu_ns": time.process_time_ns() - cpu0})
            elif cmd["op"] == "conc":
                tasks, per_task = cmd["tasks"], cmd["per_task"]
                keys = [f"bench/conc/{i:03d}".encode() for i in range(tasks)]

                async def worker(key: bytes, n: int) -> None:
                    for _ in range(n):
                        await put(key)

                cpu0, t0 = time.process_time_ns(), time.perf_counter_ns()
                await asyncio.gather(*(worker(k, per_task) for k in keys))
                elapsed = time.perf_counter_ns() - t0
                cpu = time.process_time_ns() - cpu0
                n = tasks * per_task
                reply({"rate": n / (elapsed / 1e9), "cpu_us": cpu / n / 1e3})
            else:
                return
    finally:
        await close()


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        asyncio.run(serve(sys.argv[1], sys.argv[2]))
    except Exception as exc:  # report, so the benchmark can say why a column is missing
        reply({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
