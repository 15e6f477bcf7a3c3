"""The end-to-end proof: the example KV store loses no acknowledged write.

Runs ``examples/kv_store/demo.py`` with smaller numbers: three node processes on an embedded
etcd, writes through the routing client, SIGKILL of the busiest leader mid-write, a fourth
node joining and another node draining while keys are overwritten and deleted, then every
key read back from the leaders.
"""

from __future__ import annotations

import trio

from examples.kv_store.demo import run


async def test_no_acknowledged_write_is_lost_through_kill_join_and_drain() -> None:
    with trio.fail_after(240):
        report = await run(keys=1500, partitions=16, concurrency=24, echo=False)
    print("\n".join(report.lines()))
    assert report.lost == 0, report.lost_examples
    assert report.killed and report.drained == sorted({"n1", "n2", "n3"} - {report.killed})[0]
    assert report.verified == report.keys  # every key had an acknowledged write
    assert report.writes_acknowledged + report.writes_unacknowledged == report.writes_attempted
    assert report.writes_acknowledged >= report.keys
    # the survivors and the new node hold the data; the drained and killed nodes are gone
    assert set(report.holdings) == {"n1", "n2", "n3", "n4"} - {report.killed, report.drained}
    assert all(h["keys"] > 0 for h in report.holdings.values())
