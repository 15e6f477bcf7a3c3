"""``ck.peers`` registration rules and node resolution (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import clusterkit
from clusterkit._peers.service import Peers
from clusterkit._peers.transport import PeerPool


async def handler(payload: Any) -> Any:
    return payload


async def test_registration_rules_and_addresses() -> None:
    async with trio.open_nursery() as nursery:
        pool = PeerPool(nursery, "me", b"s" * 32)
        known = {"b": clusterkit.Node("b", "127.0.0.1", endpoints={"http": "127.0.0.1:7001"})}
        peers = Peers(
            pool, known.get, address="127.0.0.1:7000", timeout=1.0, handlers={}, stream_handlers={}
        )

        @peers.handler("kv.get")
        async def get(payload: Any) -> Any:
            return payload

        assert set(peers.handlers) == {"kv.get"}  # wrapped (counted), not the same object
        for bad in ("", "x" * 257, "clusterkit.migration.stream_partition"):
            with pytest.raises(ValueError):
                peers.add_handler(bad, handler)
            with pytest.raises(ValueError):
                peers.add_stream_handler(bad, lambda s, p: handler(p))
        assert peers.address_of("b") == "127.0.0.1:7001"
        assert peers.address_of(known["b"]) == "127.0.0.1:7001"
        assert peers.address_of("127.0.0.1:7002") == "127.0.0.1:7002"
        with pytest.raises(clusterkit.PeerUnreachable):
            peers.address_of("gone")
        with pytest.raises(clusterkit.PeerUnreachable):
            peers.address_of(clusterkit.Node("c", "127.0.0.1"))  # no peer endpoint
        await pool.aclose()
