"""The typed etcd v3 client: values, conditions and operations.

Open a client with :func:`clusterkit.open_etcd_client`; this module holds the types its
methods take and return.
"""

from ._etcd.client import EtcdClient, open_etcd_client
from ._etcd.embedded import EtcdProcess, ServerTLS, find_etcd_binary
from ._etcd.types import (
    Compare,
    DeleteOp,
    DeleteResult,
    Event,
    EventType,
    GetOp,
    KeepAlive,
    KeyValue,
    Lease,
    LeaseInfo,
    Member,
    Op,
    PutOp,
    PutResult,
    RangeResult,
    Status,
    TxnResult,
    WatchBatch,
    prefix_end,
)
from ._etcd.watch import Watch

__all__ = [
    "Compare",
    "DeleteOp",
    "DeleteResult",
    "EtcdClient",
    "EtcdProcess",
    "Event",
    "EventType",
    "GetOp",
    "KeepAlive",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "Member",
    "Op",
    "PutOp",
    "PutResult",
    "RangeResult",
    "ServerTLS",
    "Status",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "find_etcd_binary",
    "open_etcd_client",
    "prefix_end",
]
