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
object; a settled rotation keeps, instead of the old secret, a hash of it (``rotated_from``),
so that a node that missed the whole window (cut off from etcd) can still tell a rotation of
its secret from an overwrite. Anything else is not a keyring (:meth:`Keyring.decode` raises
``ValueError``).

A :class:`Keyring` is mutable and shared: the peer endpoint, the connection pool and the
keeper hold the same object, and :meth:`Keyring.adopt` changes what all of them use at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

MIN_SECRET = 16


def fingerprint(secret: bytes) -> str:
    """A hash of ``secret`` that names it without revealing it."""
    return hashlib.sha256(b"clusterkit-rotated-from|" + secret).hexdigest()[:32]


class Keyring:
    """The cluster secret, plus the previous one while a rotation's window is open."""

    __slots__ = ("current", "previous", "rotated_at", "rotated_from", "window")

    def __init__(
        self,
        current: bytes,
        previous: bytes | None = None,
        *,
        rotated_at: float = 0.0,
        window: float = 0.0,
        rotated_from: str | None = None,
    ) -> None:
        self.current = current
        self.previous = previous
        self.rotated_at = rotated_at
        self.window = window
        self.rotated_from = rotated_from  # fingerprint of the secret a settled rotation replaced

    def __repr__(self) -> str:  # never the secrets themselves
        state = f"rotating until {self.rotated_at + self.window:.0f}" if self.previous else "one"
        return f"<Keyring {state}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _fields(self) -> tuple[bytes, bytes | None, float, float, str | None]:
        return (self.current, self.previous, self.rotated_at, self.window, self.rotated_from)

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
        self.rotated_from = other.rotated_from

    def settled(self) -> Keyring:
        """This keyring without the previous secret (a fingerprint of it instead)."""
        if self.previous is None:
            return Keyring(self.current, rotated_from=self.rotated_from)
        return Keyring(self.current, rotated_from=fingerprint(self.previous))

    def follows(self, keys: Keyring) -> bool:
        """Whether this (stored) keyring is ``keys`` rotated, the same rotation, or settled."""
        if self.previous is not None and self.previous == keys.current:
            return True  # rotated from the secret ``keys`` holds
        if self.previous is None and self.rotated_from == fingerprint(keys.current):
            return True  # a settled rotation of it (``keys`` missed the whole window)
        return self.current == keys.current and self.previous in (None, keys.previous)

    def encode(self) -> bytes:
        """The stored form: the secret alone, or JSON with the previous secret or its hash."""
        if self.previous is None and self.rotated_from is None:
            return self.current
        fields: dict[str, Any] = {"current": self.current.decode("latin-1")}
        if self.previous is None:
            fields["rotated_from"] = self.rotated_from
        else:
            fields["previous"] = self.previous.decode("latin-1")
            fields["rotated_at"], fields["window"] = self.rotated_at, self.window
        return json.dumps(fields, sort_keys=True).encode()

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
        except RecursionError:
            raise ValueError("not a keyring: nested too deeply") from None
        if isinstance(obj, dict) and set(obj) == {"current", "rotated_from"}:
            rotated_from = obj["rotated_from"]
            if not isinstance(rotated_from, str) or len(rotated_from) != 32:
                raise ValueError("not a keyring: rotated_from is a 32-character fingerprint")
            return cls(_secret_field(obj["current"]), rotated_from=rotated_from)
        if not isinstance(obj, dict) or set(obj) != {"current", "previous", "rotated_at", "window"}:
            raise ValueError("not a keyring: expected current, previous, rotated_at, window")
        rotated_at, window = obj["rotated_at"], obj["window"]
        if not all(
            isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x < math.inf
            for x in (rotated_at, window)
        ):
            raise ValueError("not a keyring: rotated_at and window are numbers >= 0")
        return cls(
            _secret_field(obj["current"]),
            _secret_field(obj["previous"]),
            rotated_at=float(rotated_at),
            window=float(window),
        )


def _secret_field(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) < MIN_SECRET:
        raise ValueError(f"not a keyring: secrets are strings of at least {MIN_SECRET}")
    return value.encode("latin-1")


def as_keyring(secret: bytes | Keyring) -> Keyring:
    """``secret`` itself if it is a keyring, else a keyring of that one secret."""
    return secret if isinstance(secret, Keyring) else Keyring(secret)
