"""A minimal HTTP/1.1 server and client for Trio on h11 (one request per connection).

Just enough for the example: ``serve_http(handler, host, port)`` answers each request with
``await handler(method, target)`` -> ``(status, headers, body)``; ``fetch(url)`` sends one
request and, like a browser, follows redirects (307) up to ``max_redirects``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import h11
import trio

Handler = Callable[[str, str], Awaitable[tuple[int, list[tuple[str, str]], bytes]]]
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on ``host:port`` until cancelled; reports the port bound."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def connection(stream: trio.SocketStream) -> None:
        await _connection(stream, handler)

    await trio.serve_listeners(connection, listeners)


async def _connection(stream: trio.abc.Stream, handler: Handler) -> None:
    # The client went away or sent garbage: only this connection ends.
    with contextlib.suppress(trio.BrokenResourceError, h11.ProtocolError):
        await _serve_one(stream, handler)


async def _serve_one(stream: trio.abc.Stream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = None
            while request is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    request = event
                else:
                    return
            status, headers, body = await handler(
                request.method.decode(), request.target.decode("latin-1")
            )
            headers = [*headers, ("content-length", str(len(body))), ("connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


async def fetch(
    url: str, *, method: str = "GET", max_redirects: int = 5, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One request to ``url`` (``http://host:port/path?query``), following redirects:
    ``(status, body)``.

    Raises:
        OSError, trio.BrokenResourceError: the connection failed or broke.
        trio.TooSlowError: no answer within ``timeout``.
    """
    status, _, body = await request(
        url, method=method, max_redirects=max_redirects, timeout=timeout
    )
    return status, body


async def request(
    url: str, *, method: str = "GET", max_redirects: int = 5, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """As :func:`fetch`, with the final answer's headers (lower-case names)."""
    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname and parts.port, url
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = h11.Connection(h11.CLIENT)
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            async with stream:
                head = h11.Request(method=method, target=target, headers=[("host", parts.netloc)])
                await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
                status, headers, body = 0, {}, b""
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError as exc:  # closed before the answer
                        raise trio.BrokenResourceError(str(exc)) from None
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
        location = headers.get("location", "")
        if status in (301, 302, 307, 308) and location:
            url = location
            continue
        return status, headers, body
    return 310, {}, b"too many redirects"
