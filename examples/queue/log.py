"""One partition's log on disk: segment files of checksummed records (no Trio, no network).

Theory of operation
-------------------
A partition's directory holds segment files named by their first offset
(``00000000000000000000.log``); a segment is closed at ``SEGMENT_BYTES`` and a new one begun.
A record on disk is ``[u32 length][u32 crc32][msgpack [offset, epoch, kind, topic, key, value,
producer, seq]]``. ``kind`` is ``"m"`` (a message) or ``"c"`` (a consumer group's committed
position: ``topic`` is the group, ``seq`` the position), so positions are stored and
replicated with the log itself and recovered with it.

Recovery (``open``) reads every segment, checks lengths and checksums, and cuts the file at the
first record that does not check out (a write torn by a crash): what survives is a prefix of
what was written. Offsets are dense from 0; every record carries the epoch of the leader that
assigned its offset, and one leader assigns each offset of its epoch once, so two records with
the same ``(offset, epoch)`` are the same record. ``truncate(offset)`` drops a diverged tail
(records an old leader appended that the new one replaced).

Durability: ``fsync="always"`` syncs before ``append`` returns; ``"interval"`` syncs at most
every ``FSYNC_INTERVAL`` s (a SIGKILL loses nothing, the OS has the data; a power loss of
every replica within the interval could); ``"never"`` leaves it to the OS.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

SEGMENT_BYTES = 4 << 20
FSYNC_INTERVAL = 0.05
_HEADER = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    epoch: int
    kind: str  # "m": message; "c": a group's committed position
    topic: str  # the topic, or for "c" the group
    key: bytes
    value: bytes
    producer: str = ""
    seq: int = 0  # the producer's sequence number, or for "c" the committed position

    def pack(self) -> bytes:
        body: bytes = msgpack.packb(self.wire())
        return _HEADER.pack(len(body), zlib.crc32(body)) + body

    @classmethod
    def unpack(cls, body: bytes) -> Record:
        return cls(*msgpack.unpackb(body))

    def wire(self) -> list[object]:
        return [
            self.offset,
            self.epoch,
            self.kind,
            self.topic,
            self.key,
            self.value,
            self.producer,
            self.seq,
        ]


class PartitionLog:
    """The records of one partition on this node (see the module docstring)."""

    def __init__(self, directory: Path, *, fsync: str = "interval") -> None:
        if fsync not in ("always", "interval", "never"):
            raise ValueError("fsync is 'always', 'interval' or 'never'")
        self.dir = directory
        self.fsync = fsync
        self.records: list[Record] = []  # in memory too: the example keeps it simple
        self._segments: list[tuple[int, Path]] = []  # (first offset, path)
        self._file: BinaryIO | None = None
        self._size = 0
        self._synced = 0.0
        self.recovered_bytes_cut = 0
        self._open()

    @property
    def next_offset(self) -> int:
        return len(self.records)

    def epoch_at(self, offset: int) -> int | None:
        return self.records[offset].epoch if 0 <= offset < len(self.records) else None

    def end_of_epoch(self, epoch: int) -> int:
        """The first offset whose epoch is newer than ``epoch`` (or the log's end)."""
        for record in self.records:
            if record.epoch > epoch:
                return record.offset
        return len(self.records)

    def read(self, start: int, limit: int, end: int | None = None) -> list[Record]:
        stop = len(self.records) if end is None else min(end, len(self.records))
        return self.records[start : min(stop, start + limit)]

    def append(self, records: list[Record]) -> None:
        """Append records whose offsets continue the log."""
        for record in records:
            if record.offset != len(self.records):
                raise ValueError(f"offset {record.offset} does not continue the log")
            data = record.pack()
            if self._file is None or self._size + len(data) > SEGMENT_BYTES:
                self._roll(record.offset)
            assert self._file is not None
            self._file.write(data)
            self._size += len(data)
            self.records.append(record)
        if self._file is None:  # nothing appended
            return
        self._file.flush()
        now = time.monotonic()
        if self.fsync == "always" or (
            self.fsync == "interval" and now - self._synced >= FSYNC_INTERVAL
        ):
            os.fsync(self._file.fileno())
            self._synced = now

    def truncate(self, offset: int) -> None:
        """Drop every record from ``offset`` on (a diverged tail)."""
        if offset >= len(self.records):
            return
        self.records = self.records[:offset]
        self._close()
        for first, path in list(self._segments):
            if first >= offset:
                path.unlink()
                self._segments.remove((first, path))
        if self._segments:  # rewrite the last segment's kept records
            first, path = self._segments[-1]
            with open(path, "wb") as f:
                for record in self.records[first:]:
                    f.write(record.pack())
                f.flush()
                os.fsync(f.fileno())
            self._file = open(path, "ab")  # noqa: SIM115 - kept open for appends
            self._size = path.stat().st_size

    def close(self) -> None:
        self._close()

    # -- internals ---------------------------------------------------------------------------

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.dir.glob("*.log"))
        for path in paths:
            first = int(path.stem)
            if first != len(self.records):  # a gap: later segments are unusable
                path.unlink()
                continue
            data = path.read_bytes()
            pos = 0
            while pos + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, pos)
                body = data[pos + _HEADER.size : pos + _HEADER.size + length]
                if len(body) != length or zlib.crc32(body) != crc:
                    break
                try:
                    record = Record.unpack(body)
                except Exception:
                    break
                if record.offset != len(self.records):
                    break
                self.records.append(record)
                pos += _HEADER.size + length
            if pos < len(data):  # a torn or corrupt tail: cut it
                self.recovered_bytes_cut += len(data) - pos
                with open(path, "r+b") as f:
                    f.truncate(pos)
            self._segments.append((first, path))
        if self._segments:
            first, path = self._segments[-1]
            self._file = open(path, "ab")  # noqa: SIM115 - kept open for appends
            self._size = path.stat().st_size

    def _roll(self, first: int) -> None:
        self._close()
        path = self.dir / f"{first:020d}.log"
        self._file = open(path, "ab")  # noqa: SIM115 - kept open for appends
        self._size = 0
        self._segments.append((first, path))

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
