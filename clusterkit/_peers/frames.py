"""Peer wire frames: a closed set of msgpack arrays, decoded strictly (pure).

Theory of operation
-------------------
Every websocket message between two nodes is ONE msgpack array whose first element is the
frame kind. The decoder accepts exactly the shapes below and raises :class:`FrameError` for
anything else — bytes that are not msgpack, trailing garbage, a frame over the size limit,
an unknown kind, a field of the wrong type — so a malformed or hostile peer can only ever
get its own connection closed (with websocket close code 1002 or 1009), never crash a node.

| kind | shape                                   | meaning                               |
| ---- | --------------------------------------- | ------------------------------------- |
| 0    | ``[0, id, method, payload]``            | request; the answer carries ``id``    |
| 1    | ``[1, id, payload]``                    | response                              |
| 2    | ``[2, id, error_type, message, data]``  | the handler raised (data: any / nil)  |
| 3    | ``[3, method, payload]``                | one-way message                       |
| 4    | ``[4, stream, payload]``                | a stream item                         |
| 5    | ``[5, stream, nil | [type, message]]``  | end of one direction / abort a stream |
| 6    | ``[6, stream, credit]``                 | flow control: the receiver wants more |
| 7    | ``[7, nonce]``                          | handshake: server challenge           |
| 8    | ``[8, node_id, nonce, mac]``            | handshake: client answer              |
| 9    | ``[9, node_id, mac]``                   | handshake: server proof               |
| 10   | ``[10, stream, method, payload]``       | open a stream                         |
| 11   | ``[11, [frame_bytes, ...]]``            | a batch of frames (not nested)        |

``payload`` is any msgpack value (no extension types); ids, stream numbers and credits are
non-negative integers below 2**63; methods, node ids and error types are non-empty strings
of at most 256 characters; nonces and macs are 32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .._errors import PeerProtocolError

MAX_FRAME = 16 * 1024 * 1024  # default limit of one frame, in bytes
_MAX_ID = 2**63 - 1
_MAX_NAME = 256
_TOKEN = 32


class FrameError(PeerProtocolError):
    """A peer sent bytes that are not a valid frame (the connection must be closed).

    Attributes:
        close_code: the websocket close code to use (1009 too big, 1002 protocol error).
    """

    def __init__(self, message: str, *, close_code: int = 1002) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    method: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    payload: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: int
    error_type: str
    message: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Notify:
    method: str
    payload: Any


@dataclass(frozen=True, slots=True)
class StreamItem:
    stream: int
    payload: Any


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """``error`` None: the sender will send no more items (half-close). Otherwise
    ``(type, message)``: the stream is aborted in both directions."""

    stream: int
    error: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class StreamCredit:
    stream: int
    credit: int


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    node_id: str
    nonce: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    node_id: str
    mac: bytes


@dataclass(frozen=True, slots=True)
class StreamOpen:
    stream: int
    method: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Batch:
    """Several encoded frames in one websocket message (never a batch of batches)."""

    frames: tuple[bytes, ...]


Frame = (
    Request
    | Response
    | ErrorReply
    | Notify
    | StreamItem
    | StreamEnd
    | StreamCredit
    | Challenge
    | Answer
    | Proof
    | StreamOpen
    | Batch
)


def encode(frame: Frame) -> bytes:
    """The msgpack bytes of ``frame``."""
    match frame:
        case Request(id=i, method=m, payload=p):
            obj: list[Any] = [0, i, m, p]
        case Response(id=i, payload=p):
            obj = [1, i, p]
        case ErrorReply(id=i, error_type=t, message=msg, data=d):
            obj = [2, i, t, msg, d]
        case Notify(method=m, payload=p):
            obj = [3, m, p]
        case StreamItem(stream=s, payload=p):
            obj = [4, s, p]
        case StreamEnd(stream=s, error=e):
            obj = [5, s, list(e) if e is not None else None]
        case StreamCredit(stream=s, credit=c):
            obj = [6, s, c]
        case Challenge(nonce=n):
            obj = [7, n]
        case Answer(node_id=node, nonce=n, mac=mac):
            obj = [8, node, n, mac]
        case Proof(node_id=node, mac=mac):
            obj = [9, node, mac]
        case StreamOpen(stream=s, method=m, payload=p):
            obj = [10, s, m, p]
        case Batch(frames=fs):
            obj = [11, list(fs)]
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_ID:
        raise FrameError(f"{what} must be an integer in [0, 2**63)")
    return value


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= _MAX_NAME:
        raise FrameError(f"{what} must be a non-empty string of at most {_MAX_NAME} chars")
    return value


def _token(value: Any, what: str) -> bytes:
    if type(value) is not bytes or len(value) != _TOKEN:
        raise FrameError(f"{what} must be {_TOKEN} bytes")
    return value


_ARITY = {0: 4, 1: 3, 2: 5, 3: 3, 4: 3, 5: 3, 6: 3, 7: 2, 8: 4, 9: 3, 10: 4, 11: 2}


def decode(data: bytes, *, max_size: int = MAX_FRAME) -> Frame:
    """Parse one frame, strictly.

    Raises:
        FrameError: the bytes are not exactly one valid frame (``close_code`` says how to
            close the connection).
    """
    if len(data) > max_size:
        raise FrameError(f"frame of {len(data)} bytes exceeds {max_size}", close_code=1009)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
        )
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"not a msgpack frame: {type(exc).__name__}") from None
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise FrameError("a frame is a msgpack array starting with its kind")
    kind = obj[0]
    if kind not in _ARITY:
        raise FrameError(f"unknown frame kind {kind}")
    if len(obj) != _ARITY[kind]:
        raise FrameError(f"frame kind {kind} has {_ARITY[kind]} fields, got {len(obj)}")
    match kind:
        case 0:
            return Request(_int(obj[1], "request id"), _name(obj[2], "method"), obj[3])
        case 1:
            return Response(_int(obj[1], "response id"), obj[2])
        case 2:
            message = obj[3]
            if type(message) is not str:
                raise FrameError("error message must be a string")
            return ErrorReply(
                _int(obj[1], "error id"), _name(obj[2], "error type"), message, obj[4]
            )
        case 3:
            return Notify(_name(obj[1], "method"), obj[2])
        case 4:
            return StreamItem(_int(obj[1], "stream"), obj[2])
        case 5:
            error = obj[2]
            if error is None:
                return StreamEnd(_int(obj[1], "stream"), None)
            if type(error) is not list or len(error) != 2 or type(error[1]) is not str:
                raise FrameError("stream end error must be nil or [type, message]")
            return StreamEnd(_int(obj[1], "stream"), (_name(error[0], "error type"), error[1]))
        case 6:
            return StreamCredit(_int(obj[1], "stream"), _int(obj[2], "credit"))
        case 7:
            return Challenge(_token(obj[1], "nonce"))
        case 8:
            return Answer(_name(obj[1], "node id"), _token(obj[2], "nonce"), _token(obj[3], "mac"))
        case 9:
            return Proof(_name(obj[1], "node id"), _token(obj[2], "mac"))
        case 10:
            return StreamOpen(_int(obj[1], "stream"), _name(obj[2], "method"), obj[3])
        case _:
            items = obj[1]
            if type(items) is not list or not all(type(b) is bytes for b in items):
                raise FrameError("a batch is a list of encoded frames")
            return Batch(tuple(items))


def decode_batch(data: bytes, *, max_size: int = MAX_FRAME) -> list[Frame]:
    """Parse one websocket message: a frame, or a batch of frames (flattened, one level).

    Raises:
        FrameError: as :func:`decode`; also for a batch inside a batch.
    """
    frame = decode(data, max_size=max_size)
    if not isinstance(frame, Batch):
        return [frame]
    out = [decode(b, max_size=max_size) for b in frame.frames]
    if any(isinstance(x, Batch) for x in out):
        raise FrameError("a batch may not contain a batch")
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not allowed")
