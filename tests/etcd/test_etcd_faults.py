"""Failures of the etcd server as the client sees them: kills, pauses, cancellation, leaks.

Every test here starts its own etcd (never the shared one) and uses the parametrized
server version's binary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import trio

import clusterkit
from clusterkit._etcd.embedded import remove_stale_workdirs
from clusterkit.etcd import EtcdProcess


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return _state(pid) != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False  # a zombie still answers kill(0); its parent reaps it


async def _wait_stopped(pid: int) -> None:
    """Wait until the kernel reports the process as stopped (SIGSTOP delivered)."""
    with trio.fail_after(5):
        while _state(pid) not in ("T", "t"):
            await trio.sleep(0.001)


async def _wait_for_threads(expected: set[str], timeout: float = 10.0) -> set[str]:
    with trio.move_on_after(timeout):
        while {t.name for t in threading.enumerate()} - expected:
            await trio.sleep(0.02)
    return {t.name for t in threading.enumerate()} - expected


async def test_etcd_killed_mid_watch_raises_unavailable(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        async with clusterkit.open_etcd_client(server.endpoints) as client:
            async with client.watch("/k", prefix=True) as watch:
                await client.put("/k/1", "v")
                with trio.fail_after(5):
                    assert (await watch.__anext__()).events[0].kv.value == b"v"
                await server.member.kill()
                with trio.fail_after(10), pytest.raises(clusterkit.EtcdUnavailable):
                    await watch.__anext__()
            with pytest.raises(clusterkit.EtcdUnavailable):
                await client.get("/k/1")


@pytest.mark.slow
async def test_paused_etcd_fails_the_stream_within_seconds(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        async with clusterkit.open_etcd_client(server.endpoints) as client:
            async with client.watch("/p", prefix=True) as watch:
                server.member.pause()
                try:
                    start = trio.current_time()
                    with trio.fail_after(12), pytest.raises(clusterkit.EtcdUnavailable):
                        await watch.__anext__()
                    # keepalive ping every 5 s + 2 s ping timeout: about 7 s, not TCP's ~65 s.
                    assert trio.current_time() - start < 12
                finally:
                    server.member.resume()


async def test_cancelling_a_task_mid_call_cancels_the_rpc(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        config = clusterkit.EtcdConfig(server.endpoints, request_timeout=30)
        async with clusterkit.open_etcd_client(config) as client:
            server.member.pause()  # the call cannot complete
            try:
                assert server.member.pid is not None
                await _wait_stopped(server.member.pid)
                start = trio.current_time()
                with trio.move_on_after(0.2) as scope:
                    result = await client.get("k")
                assert scope.cancelled_caught, f"the call returned {result!r}"
                # gRPC itself reports the RPC cancelled, long before its 30 s deadline.
                with trio.fail_after(2):
                    while client.statistics()["rpc_in_flight"]:
                        await trio.sleep(0.01)
                assert trio.current_time() - start < 3.0
                assert client.statistics()["rpc_cancelled"] == 1
            finally:
                server.member.resume()
            assert (await client.get("k")) is None  # the client still works


async def test_closing_the_client_ends_calls_in_flight(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        config = clusterkit.EtcdConfig(server.endpoints, request_timeout=30)
        async with clusterkit.open_etcd_client(config) as client:
            server.member.pause()
            errors: list[BaseException] = []

            async def get() -> None:
                try:
                    await client.get("k")
                except clusterkit.EtcdUnavailable as exc:
                    errors.append(exc)

            try:
                with trio.fail_after(5):
                    async with trio.open_nursery() as nursery:
                        for _ in range(10):
                            nursery.start_soon(get)
                        # Every call is in flight — or already failed as unavailable (a
                        # channel still connecting to the paused member may say so early).
                        while client.statistics()["rpc_in_flight"] + len(errors) < 10:
                            await trio.sleep(0.01)
                        await client.aclose()
            finally:
                server.member.resume()
            assert len(errors) == 10


async def test_no_thread_leaks_after_close(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    before = {t.name for t in threading.enumerate()}
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        async with client.watch(prefix, prefix=True):
            leases = [await client.lease_grant(30) for _ in range(3)]
            for lease in leases:
                await client.lease_keepalive(lease.id)
            one_watch = threading.active_count()
            async with trio.open_nursery() as nursery:
                watches = [client.watch(f"{prefix}{i}") for i in range(50)]
                for w in watches:
                    await w.__aenter__()
                leases += [await client.lease_grant(30) for _ in range(17)]
                for lease in leases:
                    nursery.start_soon(client.lease_keepalive, lease.id)
            many_watches = threading.active_count()
            for w in watches:
                await w.aclose()
            for lease in leases:
                await client.lease_revoke(lease.id)
    assert many_watches == one_watch
    assert await _wait_for_threads(before) == set()


async def test_embedded_etcd_leaves_no_process_and_no_directory(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        pid = server.member.pid
        workdir = server.member.log_path.parent
        assert pid is not None and _alive(pid) and workdir.exists()
    assert not _alive(pid)
    assert not workdir.exists()


async def test_embedded_etcd_startup_failure_leaves_nothing(etcd_binary: str) -> None:
    before = set(os.listdir("/tmp"))
    with pytest.raises(clusterkit.EmbeddedEtcdError, match="exited at startup"):
        async with clusterkit.open_embedded_etcd(
            binary=etcd_binary, extra_args=["--no-such-flag"], startup_timeout=5
        ):
            pass  # pragma: no cover
    leftovers = {d for d in set(os.listdir("/tmp")) - before if d.startswith("clusterkit-etcd-")}
    assert leftovers == set()


async def test_embedded_etcd_cancelled_during_startup_leaves_no_process(
    etcd_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids: list[int] = []

    async def never_ready(self: EtcdProcess, *, timeout: float = 10.0) -> None:
        assert self.pid is not None
        pids.append(self.pid)
        await trio.sleep_forever()

    monkeypatch.setattr(EtcdProcess, "wait_ready", never_ready)
    with trio.move_on_after(0.5):
        async with clusterkit.open_embedded_etcd(binary=etcd_binary):
            pass  # pragma: no cover
    assert pids and not _alive(pids[0])


async def test_embedded_etcd_dies_with_a_sigkilled_parent(etcd_binary: str, tmp_path: Path) -> None:
    """Its etcd dies with it, and the next start removes the work dir it left behind."""
    script = (
        "import sys, trio, clusterkit\n"
        "async def main():\n"
        "    async with clusterkit.open_embedded_etcd(binary=sys.argv[1]) as e:\n"
        "        print(e.member.pid, flush=True)\n"
        "        await trio.sleep(60)\n"
        "trio.run(main)\n"
    )
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", script, etcd_binary],
                stdout=subprocess.PIPE,
                check=False,
                env={**os.environ, "TMPDIR": str(tmp_path)},
            )
        )
        assert proc.stdout is not None
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some()
        etcd_pid = int(line)
        assert _alive(etcd_pid)
        proc.kill()  # SIGKILL: no cleanup code runs in the parent
    with trio.fail_after(10):
        while _alive(etcd_pid):
            await trio.sleep(0.05)
    _check_the_sweep(tmp_path)


def _check_the_sweep(tmp: Path) -> None:
    left = list(tmp.glob("clusterkit-etcd-*"))
    assert len(left) == 1  # a SIGKILL runs no cleanup ...
    mine = tmp / f"clusterkit-etcd-{os.getpid()}-live"  # a live owner's dir stays
    mine.mkdir()
    assert remove_stale_workdirs(tmp) == left  # ... the next start's sweep removes it
    assert list(tmp.glob("clusterkit-etcd-*")) == [mine]
