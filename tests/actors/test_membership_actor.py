"""The membership actor driven through its mailbox, on a fake etcd, under MockClock."""

from __future__ import annotations

import itertools

import trio
import trio.testing
from fake_etcd import FakeEtcd

import clusterkit
from clusterkit._actors.cell import Latest
from clusterkit._actors.membership import Leave, MembershipActor, MembershipMessage, Session
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import Node


def make_actor(
    fake: FakeEtcd,
) -> tuple[MembershipActor, Latest[Session | None], trio.MemorySendChannel[MembershipMessage]]:
    cfg = clusterkit.Config(node_id="n1", session_ttl=3.0, metrics_port=None)
    session: Latest[Session | None] = Latest(None)
    send, receive = trio.open_memory_channel[MembershipMessage](1)
    actor = MembershipActor(
        fake.as_client(), cfg, KeyLayout("/ck"), Node("n1", "h"), session, receive
    )
    return actor, session, send


async def test_session_is_lost_exactly_at_the_local_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEtcd(ttl=3)
    actor, session, _ = make_actor(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        first = session.value
        assert first is not None and first.ttl == 3
        await trio.sleep(5.0)  # keepalives every second keep it alive
        assert session.value is not None and actor.keepalives >= 4
        fake.keepalive_mode = "hang"  # etcd stops answering
        await session.wait_for(lambda s: s is None)
        # Lost exactly when the lease may expire: send time of the last answered keepalive
        # plus the granted TTL — not when the answer arrived, and not later.
        assert trio.current_time() == fake.answered[-1] + 3
        fake.keepalive_mode = "ok"
        rejoined = await session.wait_for(lambda s: s is not None)
        assert rejoined is not None and rejoined.generation == 2
        assert rejoined.lease_id != first.lease_id
        assert actor.statistics()["sessions_lost"] == 1
        nursery.cancel_scope.cancel()


async def test_expired_lease_is_lost_at_once_and_rejoin_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEtcd(ttl=3)
    actor, session, _ = make_actor(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        fake.keepalive_mode = "expired"
        fake.grant_fails = 3  # etcd refuses the first rejoins
        await session.wait_for(lambda s: s is None)
        lost_at = trio.current_time()
        assert lost_at < 1.1  # the first keepalive answer (at ~1 s) said TTL 0
        fake.keepalive_mode = "ok"
        await session.wait_for(lambda s: s is not None)
        grants = [t for t, name, _ in fake.calls if name == "lease_grant"]
        assert len(grants) == 5  # join + 3 refused + 1 granted
        gaps = [b - a for a, b in itertools.pairwise(grants[1:])]
        assert gaps == sorted(gaps) and gaps[0] >= 0.1  # exponential backoff
        nursery.cancel_scope.cancel()


async def test_leave_message_revokes_and_stops(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEtcd(ttl=3)
    actor, session, mailbox = make_actor(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        lease = session.value.lease_id if session.value else None
        done = trio.Event()
        await mailbox.send(Leave(done))
        await done.wait()
        assert session.value is None
        assert ("revoke", lease) in [(name, arg) for _, name, arg in fake.calls]
    # run() returned by itself: the nursery closed without cancellation.
    assert actor.left


async def test_a_slow_revoke_is_never_cut_off_by_the_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEtcd(ttl=3)
    fake.revoke_delay = 2.5  # longer than the 1 s heartbeat
    actor, session, mailbox = make_actor(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        done = trio.Event()
        await mailbox.send(Leave(done))
        await done.wait()
        left_at = trio.current_time()
    names = [(t, name) for t, name, _ in fake.calls]
    assert ("revoke" in [n for _, n in names]) and session.value is None
    assert not [t for t, n in names if n == "keepalive" and t > left_at - 2.5]


async def test_leave_during_rejoin_does_not_register_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEtcd(ttl=3)
    actor, session, mailbox = make_actor(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        fake.keepalive_mode = "expired"
        fake.grant_fails = 1000  # etcd keeps refusing the rejoin
        await session.wait_for(lambda s: s is None)
        txns_before = len([1 for _, n, _ in fake.calls if n == "txn"])
        done = trio.Event()
        await mailbox.send(Leave(done))
        with trio.fail_after(5):
            await done.wait()
        fake.grant_fails = 0  # etcd is back: the node must not come back
        await trio.sleep(10)
    assert len([1 for _, n, _ in fake.calls if n == "txn"]) == txns_before
    assert actor.left and session.value is None
