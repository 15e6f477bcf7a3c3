"""The etcd key layout under the cluster prefix ``P`` (see DESIGN.md, "etcd key layout").

| key                        | value                   | lease              |
| -------------------------- | ----------------------- | ------------------ |
| ``P/nodes/<node_id>``      | node record (JSON)      | node session       |
| ``P/coordinator``          | node id                 | coordinator session|
| ``P/map``                  | partition map (JSON)    | none               |
| ``P/ready/<pt>/<node_id>`` | ``"1"``                 | node session       |
| ``P/leaders/<pt>``         | node id                 | leader's session   |
| ``P.secret`` (beside P)    | peer secret (keyring)   | none               |
| ``P/secret``               | the same, earlier versions | none            |
| ``P/cluster``              | cluster identity (JSON) | none               |
| ``P/drain/<node_id>``      | why (text), by an operator | none            |

``P.secret`` is created by the first node when the config gives no ``cluster_secret``. It is
*beside* the prefix, not under it (``.`` sorts before ``/``), so an etcd role can grant read
access to ``P/`` (monitoring, ``clusterkit status``) without the secret: read access to
``P.secret`` is what lets a process join the peer network. Earlier versions kept it at
``P/secret``; a node copies it from there when ``P.secret`` does not exist yet, and
``clusterkit check`` reports the old key until an operator deletes it. ``P/cluster`` is created
once, by the first node that joins: P, R, the hash function and the map format every later
node must share (checked before a node registers). ``P/drain/<node_id>`` is written by an
operator (``clusterkit drain``): the node leaves with ``drain=True`` when it sees it, and while
it exists the node drains again each time it starts (``clusterkit undrain`` deletes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

KeyKind = Literal["node", "coordinator", "map", "ready", "leader", "secret", "cluster", "drain"]


def valid_node_id(node_id: str) -> bool:
    """Node ids are 1-128 characters of ``A-Z a-z 0-9 . _ : -``, not starting with a symbol."""
    return bool(_NODE_ID.fullmatch(node_id))


def is_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts '²', which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """What a key under the prefix names."""

    kind: KeyKind
    node_id: str = ""
    partition: int = -1


class KeyLayout:
    """Builds and parses the keys of one cluster prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.root = (self.prefix + "/").encode()
        self.nodes_prefix = self.root + b"nodes/"
        self.coordinator = self.root + b"coordinator"
        self.map = self.root + b"map"
        self.ready_prefix = self.root + b"ready/"
        self.leaders_prefix = self.root + b"leaders/"
        self.secret = (self.prefix + ".secret").encode()
        self.legacy_secret = self.root + b"secret"
        self.cluster = self.root + b"cluster"
        self.drain_prefix = self.root + b"drain/"

    def __repr__(self) -> str:
        return f"KeyLayout({self.prefix!r})"

    def node(self, node_id: str) -> bytes:
        return self.nodes_prefix + node_id.encode()

    def ready(self, partition: int, node_id: str) -> bytes:
        return self.ready_prefix + f"{partition}/{node_id}".encode()

    def drain(self, node_id: str) -> bytes:
        return self.drain_prefix + node_id.encode()

    def leader(self, partition: int) -> bytes:
        return self.leaders_prefix + str(partition).encode()

    def parse(self, key: bytes) -> ParsedKey | None:
        """Classify a key under the prefix; ``None`` for keys clusterkit does not own."""
        if not key.startswith(self.root):
            return None
        rest = key[len(self.root) :]
        try:
            text = rest.decode()
        except UnicodeDecodeError:
            return None
        if text == "map":
            return ParsedKey("map")
        if text == "coordinator":
            return ParsedKey("coordinator")
        if text == "secret":
            return ParsedKey("secret")
        if text == "cluster":
            return ParsedKey("cluster")
        kind, _, tail = text.partition("/")
        if kind == "nodes" and valid_node_id(tail):
            return ParsedKey("node", node_id=tail)
        if kind == "drain" and valid_node_id(tail):
            return ParsedKey("drain", node_id=tail)
        if kind == "leaders" and is_number(tail):
            return ParsedKey("leader", partition=int(tail))
        if kind == "ready":
            pt, _, node_id = tail.partition("/")
            if is_number(pt) and valid_node_id(node_id):
                return ParsedKey("ready", node_id=node_id, partition=int(pt))
        return None
