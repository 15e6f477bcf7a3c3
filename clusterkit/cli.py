"""``clusterkit``: look at and steer a cluster from outside its processes, through etcd.

Usage (also ``python -m clusterkit``)::

    clusterkit [--endpoints E] [--prefix P] [TLS/user flags] COMMAND [--json]

    status                one screen: nodes, coordinator, map, moving/under-replicated/leaderless
    nodes                 registered nodes: peer and HTTP addresses, state, replicas, leaderships
    partitions [--node N] every partition: replicas, pending move, leader, epoch
    leaders               every partition's leader and epoch
    watch [--count K] [--seconds S]   live events (joins, leaves, map versions, leaders)
    drain NODE [--reason R] [--timeout S]   ask NODE to hand everything off and leave
    undrain NODE          withdraw a drain request
    check                 verify the stored state; exit 1 with the findings
    secret status         whether a secret is stored, and any rotation in progress
    secret rotate [--window S]   replace the stored secret; the old one works S more seconds

Every command reads the same etcd the nodes use: ``--endpoints`` (or
``$CLUSTERKIT_ETCD_ENDPOINTS``), ``--prefix`` (default ``/clusterkit``). ``--json`` prints
one JSON document (for ``watch``: one per line) whose keys are stable for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._config import ENV_ETCD_ENDPOINTS
from ._core.keys import KeyLayout
from ._core.view import ClusterView, ViewState
from ._errors import ClusterKitError
from ._etcd.channel import EtcdConfig
from ._etcd.client import EtcdClient, open_etcd_client
from ._etcd.types import EventType
from ._peers.keyring import Keyring
from ._peers.secret import DEFAULT_ROTATION_WINDOW, rotate_secret

EXIT_FINDINGS = 1
EXIT_ERROR = 2


@dataclass
class Snapshot:
    """The cluster as stored at one revision, the keys it ignored, and the state that built
    it (``watch`` goes on applying events to it)."""

    view: ClusterView
    revision: int
    garbage: list[str]
    state: ViewState
    legacy_secret: str | None = None  # the key, when an earlier version's secret is still there


async def read(etcd: EtcdClient, layout: KeyLayout) -> Snapshot:
    """Read the whole prefix once and build the same view the nodes build."""
    result = await etcd.get_prefix(layout.root)
    state = ViewState(layout)
    garbage = [p for kv in result.kvs if (p := state.apply_kv(kv)) is not None]
    legacy = any(kv.key == layout.legacy_secret for kv in result.kvs)
    return Snapshot(
        state.snapshot(result.revision),
        result.revision,
        garbage,
        state,
        layout.legacy_secret.decode() if legacy else None,
    )


# -- what each command reports (plain data, printed as a table or as JSON) -------------------


def _replicas(view: ClusterView, pt: int) -> list[str]:
    return list(view.map.replicas[pt]) if view.map is not None else []


def status(snap: Snapshot) -> dict[str, Any]:
    view = snap.view
    vmap = view.map
    live = set(view.nodes)
    want = min(vmap.replica_factor, len(view.active_node_ids())) if vmap is not None else 0
    partitions = vmap.partitions if vmap is not None else 0
    under = [
        pt for pt in range(partitions) if sum(1 for n in _replicas(view, pt) if n in live) < want
    ]
    leaderless = [pt for pt in range(partitions) if view.leaders.get(pt) is None]
    return {
        "revision": snap.revision,
        "nodes": len(view.nodes),
        "active": len(view.active_node_ids()),
        "draining": sorted(view.draining_node_ids()),
        "coordinator": view.coordinator.node_id if view.coordinator is not None else None,
        "map_version": vmap.version if vmap is not None else None,
        "partitions": partitions,
        "replica_factor": vmap.replica_factor if vmap is not None else None,
        "moving": sorted(vmap.pending) if vmap is not None else [],
        "under_replicated": under,
        "leaderless": leaderless,
        "ignored_keys": len(snap.garbage),
    }


def nodes(snap: Snapshot) -> list[dict[str, Any]]:
    view = snap.view
    rows = []
    for node_id, node in sorted(view.nodes.items()):
        replicas = (
            sum(1 for row in view.map.replicas if node_id in row) if view.map is not None else 0
        )
        leading = sum(1 for _pt, owner in view.leaders.items() if owner.node_id == node_id)
        rows.append(
            {
                "id": node_id,
                "addr": node.addr,
                "peer": node.peer_addr(),
                "http": node.http_addr(),
                "grpc": node.grpc_addr(),
                "state": node.state,
                "replicas": replicas,
                "leading": leading,
            }
        )
    return rows


def partitions(snap: Snapshot, node: str | None = None) -> list[dict[str, Any]]:
    view = snap.view
    if view.map is None:
        return []
    rows = []
    for pt in range(view.map.partitions):
        replicas = _replicas(view, pt)
        pending = view.map.pending.get(pt)
        if node is not None and node not in replicas and node not in (pending or ()):
            continue
        owner = view.leaders.get(pt)
        rows.append(
            {
                "partition": pt,
                "replicas": replicas,
                "pending": list(pending) if pending is not None else None,
                "leader": owner.node_id if owner is not None else None,
                "epoch": owner.create_revision if owner is not None else None,
            }
        )
    return rows


def leaders(snap: Snapshot) -> list[dict[str, Any]]:
    return [
        {"partition": r["partition"], "leader": r["leader"], "epoch": r["epoch"]}
        for r in partitions(snap)
    ]


def check(snap: Snapshot) -> list[str]:
    """What is wrong with the stored state (empty: nothing)."""
    view = snap.view
    findings = [f"ignored key: {g}" for g in snap.garbage]
    if snap.legacy_secret is not None:
        findings.append(
            f"{snap.legacy_secret}: the cluster secret where earlier versions kept it, readable "
            "by anyone who may read the prefix; nodes now keep it beside the prefix: delete "
            "this key once no node of an earlier version runs"
        )
    if view.map is None:
        if view.nodes:
            findings.append("no readable partition map while nodes are registered")
        return findings
    live = set(view.nodes)
    want = min(view.map.replica_factor, len(view.active_node_ids()))
    for pt in range(view.map.partitions):
        row = _replicas(view, pt)
        alive = [n for n in row if n in live]
        if len(alive) < want:
            findings.append(f"partition {pt}: {len(alive)} live replicas of {want} wanted ({row})")
        owner = view.leaders.get(pt)
        if owner is not None:
            if owner.node_id not in row and owner.node_id not in view.map.pending.get(pt, ()):
                findings.append(f"partition {pt}: leader {owner.node_id} is not a replica")
            if owner.node_id not in live:
                findings.append(f"partition {pt}: leader {owner.node_id} is not registered")
    for pt, node_id in sorted(view.ready):
        if node_id not in live:
            findings.append(f"ready marker of {node_id} (not registered) for partition {pt}")
    return findings


# -- printing -------------------------------------------------------------------------------


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if value is None or value == "":
            return "-"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return str(value)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _summary(report: dict[str, Any]) -> str:
    def many(values: list[int]) -> str:
        if not values:
            return "0"
        shown = ", ".join(map(str, values[:16]))
        return f"{len(values)} ({shown}{', ...' if len(values) > 16 else ''})"

    return "\n".join(
        [
            f"nodes          {report['nodes']} ({report['active']} active"
            + (f", draining {', '.join(report['draining'])}" if report["draining"] else "")
            + ")",
            f"coordinator    {report['coordinator'] or '-'}",
            f"map            version {report['map_version'] or '-'}, "
            f"{report['partitions']} partitions, replica factor {report['replica_factor'] or '-'}",
            f"moving         {many(report['moving'])}",
            f"under-replicated {many(report['under_replicated'])}",
            f"leaderless     {many(report['leaderless'])}",
            f"ignored keys   {report['ignored_keys']}",
        ]
    )


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, sort_keys=True) if args.json else text, flush=True)


# -- commands that act or follow ------------------------------------------------------------


async def _watch(etcd: EtcdClient, layout: KeyLayout, args: argparse.Namespace) -> int:
    snap = await read(etcd, layout)
    state, before = snap.state, snap.view
    start = {"revision": snap.revision, "event": "watching", "prefix": layout.prefix}
    _emit(args, start, " ".join(f"{k}={v}" for k, v in start.items()))
    printed = 0
    with trio.move_on_after(args.seconds if args.seconds else float("inf")):
        async with etcd.watch(layout.root, prefix=True, start_revision=snap.revision + 1) as w:
            async for batch in w:
                for ev in batch.events:
                    state.apply_kv(ev.kv, deleted=ev.type is EventType.DELETE)
                after = state.snapshot(batch.revision)
                for event in _diff(before, after):
                    _emit(args, event, " ".join(f"{k}={v}" for k, v in event.items()))
                    printed += 1
                    if args.count and printed >= args.count:
                        return 0
                before = after
    return 0


def _diff(old: ClusterView, new: ClusterView) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for node_id in sorted(new.nodes.keys() - old.nodes.keys()):
        events.append({"revision": new.revision, "event": "joined", "node": node_id})
    for node_id in sorted(old.nodes.keys() - new.nodes.keys()):
        events.append({"revision": new.revision, "event": "left", "node": node_id})
    for node_id in sorted(old.nodes.keys() & new.nodes.keys()):
        if old.nodes[node_id].state != new.nodes[node_id].state:
            events.append(
                {
                    "revision": new.revision,
                    "event": "state",
                    "node": node_id,
                    "state": new.nodes[node_id].state,
                }
            )
    old_version = old.map.version if old.map is not None else None
    new_version = new.map.version if new.map is not None else None
    if new_version != old_version:
        moving = len(new.map.pending) if new.map is not None else 0
        events.append(
            {"revision": new.revision, "event": "map", "version": new_version, "moving": moving}
        )
    partitions = new.map.partitions if new.map is not None else 0
    for pt in range(partitions):
        a, b = old.leaders.get(pt), new.leaders.get(pt)
        if (a and (a.node_id, a.create_revision)) != (b and (b.node_id, b.create_revision)):
            events.append(
                {
                    "revision": new.revision,
                    "event": "leader",
                    "partition": pt,
                    "leader": b.node_id if b is not None else None,
                    "epoch": b.create_revision if b is not None else None,
                }
            )
    return events


async def _drain(etcd: EtcdClient, layout: KeyLayout, args: argparse.Namespace) -> int:
    snap = await read(etcd, layout)
    if args.node not in snap.view.nodes:
        print(f"clusterkit: node {args.node!r} is not registered", file=sys.stderr)
        return EXIT_FINDINGS
    await etcd.put(layout.drain(args.node), args.reason or "clusterkit drain")
    last = None
    with trio.move_on_after(args.timeout) as waiting:
        while True:
            snap = await read(etcd, layout)
            if args.node not in snap.view.nodes:
                break
            held = sum(1 for r in partitions(snap) if args.node in r["replicas"])
            if held != last:
                _emit(
                    args,
                    {"node": args.node, "partitions": held, "done": False},
                    f"{args.node}: {held} partitions still held",
                )
                last = held
            await trio.sleep(0.2)
    if waiting.cancelled_caught:
        print(
            f"clusterkit: {args.node} did not finish draining in {args.timeout}s", file=sys.stderr
        )
        return EXIT_FINDINGS
    _emit(
        args,
        {"node": args.node, "partitions": 0, "done": True},
        f"{args.node}: drained and left (run `clusterkit undrain {args.node}` before restarting "
        "it into the cluster)",
    )
    return 0


async def run(args: argparse.Namespace) -> int:
    endpoints = tuple(e for e in (args.endpoints or "").split(",") if e)
    if not endpoints:
        print(
            f"clusterkit: give --endpoints or set ${ENV_ETCD_ENDPOINTS} (the nodes' etcd)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    config = EtcdConfig(
        endpoints=endpoints,
        dial_timeout=args.dial_timeout,
        ca_cert=args.cacert,
        cert=args.cert,
        key=args.key,
        username=args.user,
        password=args.password,
    )
    layout = KeyLayout(args.prefix)
    async with open_etcd_client(config) as etcd:
        match args.command:
            case "status":
                report = status(await read(etcd, layout))
                _emit(args, report, _summary(report))
            case "nodes":
                rows = nodes(await read(etcd, layout))
                _emit(
                    args, rows, _table(rows, ["id", "peer", "http", "state", "replicas", "leading"])
                )
            case "partitions":
                rows = partitions(await read(etcd, layout), args.node)
                columns = ["partition", "replicas", "pending", "leader", "epoch"]
                _emit(args, rows, _table(rows, columns))
            case "leaders":
                rows = leaders(await read(etcd, layout))
                _emit(args, rows, _table(rows, ["partition", "leader", "epoch"]))
            case "check":
                findings = check(await read(etcd, layout))
                text = "\n".join(findings) if findings else "ok: no findings"
                _emit(args, {"ok": not findings, "findings": findings}, text)
                return EXIT_FINDINGS if findings else 0
            case "watch":
                return await _watch(etcd, layout, args)
            case "drain":
                return await _drain(etcd, layout, args)
            case "secret":
                return await _secret(etcd, layout, args)
            case "undrain":
                await etcd.delete(layout.drain(args.node))
                _emit(args, {"node": args.node, "drain": False}, f"{args.node}: drain withdrawn")
    return 0


async def _secret(etcd: EtcdClient, layout: KeyLayout, args: argparse.Namespace) -> int:
    """``secret status`` / ``secret rotate``: never prints a secret."""
    if args.action == "rotate":
        keys = await rotate_secret(etcd, layout, window=args.window)
        until = keys.rotated_at + keys.window
        report: dict[str, Any] = {"rotated": True, "old_accepted_until": until}
        _emit(
            args,
            report,
            f"rotated: nodes adopt the new secret now; the old one is accepted until "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))} ({keys.window:.0f} s)",
        )
        return 0
    kv = await etcd.get(layout.secret)
    if kv is None:
        report = {"stored": False, "rotating": False}
        text = "no secret stored (no node has started, or the nodes use cluster_secret)"
    else:
        try:
            keys = Keyring.decode(kv.value)
        except ValueError as exc:
            _emit(args, {"stored": True, "valid": False}, f"the stored secret is unusable: {exc}")
            return EXIT_FINDINGS
        report = {"stored": True, "rotating": keys.rotating(), "ends_in": keys.ends_in()}
        text = (
            f"stored; rotation in progress, the old secret is accepted {keys.ends_in():.0f} s more"
            if keys.rotating()
            else "stored; no rotation in progress"
        )
    _emit(args, report, text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clusterkit", description="Look at and steer a clusterkit cluster through etcd."
    )
    p.add_argument(
        "--endpoints",
        default=os.environ.get(ENV_ETCD_ENDPOINTS, ""),
        help=f"etcd endpoints, comma-separated (default: ${ENV_ETCD_ENDPOINTS})",
    )
    p.add_argument("--prefix", default="/clusterkit", help="the cluster's key prefix")
    p.add_argument("--cacert", help="PEM CA bundle: talk TLS to etcd")
    p.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", help="PEM key of --cert")
    p.add_argument("--user", default=os.environ.get("CLUSTERKIT_ETCD_USER"), help="etcd user")
    p.add_argument(
        "--password",
        default=os.environ.get("CLUSTERKIT_ETCD_PASSWORD"),
        help="etcd password (default: $CLUSTERKIT_ETCD_PASSWORD)",
    )
    p.add_argument("--dial-timeout", type=float, default=5.0, help="seconds to reach etcd")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="one screen about the cluster")
    sub.add_parser("nodes", help="registered nodes")
    parts = sub.add_parser("partitions", help="every partition's replicas and leader")
    parts.add_argument("--node", help="only partitions this node holds or is joining")
    sub.add_parser("leaders", help="every partition's leader and epoch")
    watch = sub.add_parser("watch", help="live cluster events as lines")
    watch.add_argument("--count", type=int, default=0, help="stop after this many events")
    watch.add_argument("--seconds", type=float, default=0.0, help="stop after this long")
    drain = sub.add_parser("drain", help="ask a node to hand everything off and leave")
    drain.add_argument("node")
    drain.add_argument("--reason", default="", help="logged by the node")
    drain.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it")
    undrain = sub.add_parser("undrain", help="withdraw a drain request")
    undrain.add_argument("node")
    sub.add_parser("check", help="verify the stored state (exit 1 with findings)")
    secret = sub.add_parser("secret", help="the stored cluster secret: status, rotate")
    secret.add_argument("action", choices=["status", "rotate"])
    secret.add_argument(
        "--window",
        type=float,
        default=DEFAULT_ROTATION_WINDOW,
        help="seconds the old secret stays accepted (rotate; default 300)",
    )
    for name in sub.choices:
        sub.choices[name].add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clusterkit`` command."""
    args = parser().parse_args(argv)
    try:
        return trio.run(run, args)
    except ClusterKitError as exc:
        print(f"clusterkit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
