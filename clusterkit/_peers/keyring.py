"""The secrets peers accept: the current one and, during a rotation, the previous one (pure).

Theory of operation
-------------------
A rotation replaces the cluster secret without stopping anything. It writes a keyring: the new
secret as ``current``, the old one as ``previous``, the wall-clock time of the rotation and a
window. Every node learns it through its watch within milliseconds, and from then on:

- a node *accepts* a peer that proves either secret, until ``rotated_at + window``;
- a node *dials* with the previous secret during the first half of the window (a peer that has
  not seen the rotation yet knows only that one) and with the new one afterwards.

So every handshake succeeds throughout, provided each node saw the rotation within half a
window and the nodes' clocks agree to within half a window. After the window only the new
secret works, and a node's keeper rewrites the stored keyring without the old one.

The stored form of a keyring without a previous secret is the secret's bytes alone, which is
what clusterkit stored before rotations existed; one with a previous secret is a small JSON
object. Anything else is not a keyring (:meth:`Keyring.decode` raises ``ValueError``).

A :class:`Keyring` is mutable and shared: the peer endpoint, the connection pool and the
keeper hold the same object, and :meth:`Keyring.adopt` changes what all of them use at once.
"""

from __future__ import annotations

import json
import time
from typing import Any

MIN_SECRET = 16


class Keyring:
    """The cluster secret, plus the previous one while a rotation's window is open."""

    __slots__ = ("current", "previous", "rotated_at", "window")

    def __init__(
        self,
        current: bytes,
        previous: bytes | None = None,
        *,
        rotated_at: float = 0.0,
        window: float = 0.0,
    ) -> None:
        self.current = current
        self.previous = previous
        self.rotated_at = rotated_at
        self.window = window

    def __repr__(self) -> str:  # never the secrets themselves
        state = f"rotating until {self.rotated_at + self.window:.0f}" if self.previous else "one"
        return f"<Keyring {state}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _fields(self) -> tuple[bytes, bytes | None, float, float]:
        return (self.current, self.previous, self.rotated_at, self.window)

    def rotating(self, now: float | None = None) -> bool:
        """True while the previous secret is still accepted."""
        now = time.time() if now is None else now
        return self.previous is not None and now < self.rotated_at + self.window

    def ends_in(self, now: float | None = None) -> float:
        """Seconds until the rotation's window closes (0 when none is open)."""
        now = time.time() if now is None else now
        return max(0.0, self.rotated_at + self.window - now) if self.previous else 0.0

    def accepted(self, now: float | None = None) -> tuple[bytes, ...]:
        """The secrets a connecting peer may prove: the current one first."""
        if self.previous is not None and self.rotating(now):
            return (self.current, self.previous)
        return (self.current,)

    def dialing(self, now: float | None = None) -> bytes:
        """The secret to prove when connecting: the previous one in the window's first half."""
        now = time.time() if now is None else now
        if self.previous is not None and now < self.rotated_at + self.window / 2:
            return self.previous
        return self.current

    def adopt(self, other: Keyring) -> None:
        """Take ``other``'s secrets (everyone holding this object uses them from now on)."""
        self.current, self.previous = other.current, other.previous
        self.rotated_at, self.window = other.rotated_at, other.window

    def settled(self) -> Keyring:
        """This keyring without the previous secret."""
        return Keyring(self.current)

    def encode(self) -> bytes:
        """The stored form: the secret alone, or JSON while a previous secret is kept."""
        if self.previous is None:
            return self.current
        return json.dumps(
            {
                "current": self.current.decode("latin-1"),
                "previous": self.previous.decode("latin-1"),
                "rotated_at": self.rotated_at,
                "window": self.window,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, value: bytes) -> Keyring:
        """Parse a stored keyring.

        Raises:
            ValueError: ``value`` is neither a secret (at least 16 bytes, not JSON-looking)
                nor a well-formed rotation keyring.
        """
        if not value.startswith(b"{"):
            if len(value) < MIN_SECRET:
                raise ValueError(f"a stored secret has at least {MIN_SECRET} bytes")
            return cls(value)
        try:
            obj: Any = json.loads(value)
        except ValueError:
            raise ValueError("not a keyring: invalid JSON") from None
        if not isinstance(obj, dict) or set(obj) != {"current", "previous", "rotated_at", "window"}:
            raise ValueError("not a keyring: expected current, previous, rotated_at, window")
        current, previous = obj["current"], obj["previous"]
        rotated_at, window = obj["rotated_at"], obj["window"]
        if not all(isinstance(s, str) and len(s) >= MIN_SECRET for s in (current, previous)):
            raise ValueError(f"not a keyring: secrets are strings of at least {MIN_SECRET}")
        if not all(
            isinstance(x, int | float) and not isinstance(x, bool) and x >= 0
            for x in (rotated_at, window)
        ):
            raise ValueError("not a keyring: rotated_at and window are numbers >= 0")
        return cls(
            current.encode("latin-1"),
            previous.encode("latin-1"),
            rotated_at=float(rotated_at),
            window=float(window),
        )


def as_keyring(secret: bytes | Keyring) -> Keyring:
    """``secret`` itself if it is a keyring, else a keyring of that one secret."""
    return secret if isinstance(secret, Keyring) else Keyring(secret)
