"""Ctrl-C at any instant of start-up and shutdown exits at once and leaves nothing behind.

Each case runs a small program in a subprocess with a private ``TMPDIR``, sends it SIGINT at 40
evenly spaced instants of its life (measured first by one run without a signal), and checks
that every run exits within a second of the signal, that no etcd process it started is still
running, and that its temp dir holds no ``clusterkit-*`` entry.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTANTS = 40
SHUTDOWN_INSTANTS = 20
EXIT_BOUND = 1.0

PROGRAM = textwrap.dedent(
    """
    import sys, trio, clusterkit

    async def main(mode, endpoint):
        if mode == "cluster":  # embedded etcd: no endpoints given
            cfg = clusterkit.Config(
                node_id="n1",
                partitions=16,
                replica_factor=1,
                http_port=0,
                metrics_port=None,
                grpc_port=0,
            )
            async with clusterkit.open_cluster(cfg):
                print("joined", flush=True)
        else:  # an etcd that accepts connections and never answers
            cfg = clusterkit.ClientConfig(etcd_endpoints=[endpoint], dial_timeout=1.0)
            try:
                async with clusterkit.open_client(cfg):
                    pass
            except clusterkit.ClusterKitError as exc:
                print("gave up:", type(exc).__name__, flush=True)

    trio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
    """
)


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (etcd's --data-dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("clusterkit-*"))


def _run(
    argv: list[str], env: dict[str, str], at: float | None, *, after_joined: bool = False
) -> tuple[float, int, str]:
    """Start the program; SIGINT it ``at`` seconds after the spawn, or after it printed
    ``joined`` (None: let it finish).

    Returns (seconds from the signal to the exit, or the whole life when no signal; return
    code; stderr tail).
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if at is None:
            _out, err = proc.communicate(timeout=60)
            return time.monotonic() - start, proc.returncode, err.decode()[-2000:]
        if after_joined:
            assert proc.stdout is not None
            proc.stdout.readline()  # "joined" (or b"" if it died first)
            start = time.monotonic()
        time.sleep(max(0.0, start + at - time.monotonic()))  # the chosen instant, not a wait
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
            return float("inf"), proc.returncode, err.decode()[-2000:]
        return time.monotonic() - signalled, proc.returncode, err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def silent_etcd() -> Iterator[str]:
    """A loopback port that accepts TCP connections (backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _interrupt_at_every_instant(tmp_path: Path, args: list[str]) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    root = str(Path(__file__).resolve().parent.parent)  # this checkout, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": path}
    env.pop("CLUSTERKIT_ETCD_ENDPOINTS", None)
    argv = [sys.executable, str(script), *args]

    life, code, err = _run(argv, env, None)
    assert code == 0, err
    assert _leftovers(private_tmp) == []

    # Instants spread over the whole life; for the node, also over its shutdown (the last
    # ~0.1 s, after it printed "joined"), which a spread over the life would hit at most once.
    instants = [(life * (i + 0.5) / INSTANTS, False) for i in range(INSTANTS)]
    if args[0] == "cluster":
        instants += [(0.2 * i / SHUTDOWN_INSTANTS, True) for i in range(SHUTDOWN_INSTANTS)]
    slow = []
    for at, after_joined in instants:
        took, code, err = _run(argv, env, at, after_joined=after_joined)
        left = _leftovers(private_tmp)
        alive = _processes_mentioning(str(private_tmp))
        if took > EXIT_BOUND or left or alive:
            slow.append((round(at, 3), after_joined, took, code, left, alive, err[-600:]))
        for pid in alive:  # never leave a stray etcd behind, even when failing
            os.kill(pid, signal.SIGKILL)
    assert slow == [], f"life {life:.2f}s; runs that exited late or left something: {slow}"


@pytest.mark.slow
def test_sigint_at_any_instant_of_open_cluster_on_embedded_etcd(tmp_path: Path) -> None:
    _interrupt_at_every_instant(tmp_path, ["cluster"])


@pytest.mark.slow
def test_sigint_at_any_instant_of_open_client_against_a_silent_etcd(
    tmp_path: Path, silent_etcd: str
) -> None:
    _interrupt_at_every_instant(tmp_path, ["client", silent_etcd])


# SIGINT raised at the worst instant: inside grpcio's start of its channel thread (the
# readiness probe's first call). Unprotected, KeyboardInterrupt lands there, grpcio's call
# bookkeeping is left half done, and closing the probe channel then waits forever.
WORST_INSTANT = textwrap.dedent(
    """
    import signal, sys, threading, trio, clusterkit

    original = threading.Thread.start
    def start(self):
        threading.Thread.start = original
        signal.raise_signal(signal.SIGINT)  # Trio's handler runs at the next bytecode
        return original(self)
    threading.Thread.start = start

    async def main():
        async with clusterkit.open_embedded_etcd(binary=sys.argv[1]):
            print("started", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    """
)


def test_sigint_inside_grpc_thread_start_is_delivered_at_a_checkpoint(
    tmp_path: Path, etcd_binary: str
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    script = tmp_path / "worst_instant.py"
    script.write_text(WORST_INSTANT)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, str(script), etcd_binary],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout.decode().split() == ["interrupted"], proc.stderr.decode()[-2000:]
    assert _leftovers(private_tmp) == []
    assert _processes_mentioning(str(private_tmp)) == []
