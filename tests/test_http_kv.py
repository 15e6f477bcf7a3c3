"""The Go README's KV example, ported (examples/http_kv): the app serves its own HTTP API on
http_port, redirects to ``leader.http_addr()``, and loses no acknowledged write through a
SIGKILL of one of its three node processes."""

from __future__ import annotations

import pytest
import trio

from examples.http_kv.demo import run
from examples.http_kv.http import fetch, serve_http


@pytest.mark.slow
async def test_writes_and_reads_are_answered_through_a_sigkill_and_none_is_lost() -> None:
    lines: list[str] = []
    with trio.fail_after(150):
        report = await run(seconds=4.0, writers=6, log=lines.append)
    print("\n".join(lines))
    assert report.killed == "n2"
    assert report.acknowledged > 100
    assert report.lost == 0 and report.wrong == 0
    assert report.reads == report.acknowledged
    assert any("SIGKILL n2 after" in line for line in lines)


async def test_the_http_helpers_follow_redirects_and_survive_garbage() -> None:
    async def handler(method: str, target: str) -> tuple[int, list[tuple[str, str]], bytes]:
        if target.startswith("/a"):
            return 307, [("location", f"http://127.0.0.1:{port}/b{target[2:]}")], b""
        return 200, [], f"{method} {target}".encode()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, handler, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:  # not HTTP at all: that connection ends, the server goes on
            await stream.send_all(b"\x00\x01garbage\r\n\r\n")
            with trio.fail_after(5):
                while await stream.receive_some(4096):
                    pass
        with trio.fail_after(5):
            assert await fetch(f"http://127.0.0.1:{port}/a?key=x") == (200, b"GET /b?key=x")
        nursery.cancel_scope.cancel()
