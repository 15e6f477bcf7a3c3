"""The wire format of gRPC over HTTP/2, as the Trio channel (http2.py) speaks it.

Frame and settings constants, frame headers, the encoding side of HPACK (literals without
indexing: our requests never touch the server's decoder table), a cached ``hpack.Decoder`` for
the server's header blocks, ``grpc-timeout``, the 5-byte message prefix, and how a finished
stream's headers and trailers become a gRPC status (:class:`RpcError`, a ``grpc.RpcError`` so
that status.py translates it like grpcio's). Pure functions and tables: no I/O.
"""

from __future__ import annotations

import math
import struct
import urllib.parse
from collections.abc import Sequence

import grpc
import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
# Error codes.
E_NO_ERROR, E_PROTOCOL, E_FLOW_CONTROL, E_REFUSED_STREAM, E_CANCEL = 0, 1, 3, 7, 8
E_ENHANCE_YOUR_CALM, E_INADEQUATE_SECURITY = 11, 12

MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
HEADER = struct.Struct(">HBBBL")  # length (24 bits as H + B), type, flags, stream id
U32 = struct.Struct(">L")
MAX_HEADER_BLOCK = 1024 * 1024

Metadata = Sequence[tuple[str, str]] | None


class RpcError(grpc.RpcError):  # type: ignore[misc]
    """A call over the Trio HTTP/2 channel ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
RST_CODES = {
    E_REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,
    E_CANCEL: grpc.StatusCode.CANCELLED,
    E_ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E_INADEQUATE_SECURITY: grpc.StatusCode.PERMISSION_DENIED,
}
HTTP_CODES = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}


# -- HPACK, the encoding side: literals without indexing ---------------------------------------


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _hpack_int(len(data), 7, 0) + data


def literal(name: bytes, value: bytes) -> bytes:
    """A header as an HPACK literal without indexing, with a literal name."""
    return b"\x00" + _string(name) + _string(value)


def _indexed_name_literal(index: int, value: bytes) -> bytes:
    return _hpack_int(index, 4, 0) + _string(value)


def request_block(path: str, authority: str, tls: bool) -> bytes:
    """The constant part of a call's header block (everything but timeout and metadata)."""
    return b"".join(
        (
            b"\x83",  # :method POST (static table 3)
            b"\x87" if tls else b"\x86",  # :scheme https / http (7 / 6)
            _indexed_name_literal(4, path.encode()),  # :path
            _indexed_name_literal(1, authority.encode()),  # :authority
            _indexed_name_literal(31, b"application/grpc"),  # content-type
            literal(b"te", b"trailers"),
            _indexed_name_literal(58, b"clusterkit-http2"),  # user-agent
        )
    )


def grpc_timeout(seconds: float) -> bytes:
    """``grpc-timeout`` for ``seconds``: at most 8 digits, in the finest unit that fits."""
    micros = max(1, math.ceil(seconds * 1e6))
    for unit, scale in ((b"u", 1), (b"m", 1_000), (b"S", 1_000_000), (b"M", 60_000_000)):
        value = -(-micros // scale)
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


class Decoder:
    """``hpack.Decoder`` with a cache for blocks that only reference the table."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self._cache: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        headers = [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        # A block of one-byte indexed fields (0x81-0xfe) reads the table and never changes it.
        if block and all(b > 0x80 and b != 0xFF for b in block):
            if len(self._cache) < 256:
                self._cache[block] = headers
        else:
            self._cache.clear()  # the table may have changed
        return headers


def status_of(
    headers: list[tuple[bytes, bytes]] | None, trailers: list[tuple[bytes, bytes]]
) -> RpcError | None:
    """The gRPC status of a finished stream (from its trailers, or its HTTP status)."""
    found = dict(trailers)
    if headers is not None:
        found = {**dict(headers), **found}
    status = found.get(b"grpc-status")
    if status is None:
        http = found.get(b":status", b"")
        code = HTTP_CODES.get(int(http) if http.isdigit() else 0, grpc.StatusCode.UNKNOWN)
        return RpcError(code, f"HTTP status {http.decode(errors='replace')} without grpc-status")
    if status == b"0":
        return None
    code = _BY_VALUE.get(int(status) if status.isdigit() else -1, grpc.StatusCode.UNKNOWN)
    message = urllib.parse.unquote(found.get(b"grpc-message", b"").decode("utf-8", "replace"))
    return RpcError(code, message)


def message(body: bytes) -> bytes:
    """``body`` as one uncompressed gRPC message (its 5-byte prefix, then the bytes)."""
    return b"\x00" + U32.pack(len(body)) + body
