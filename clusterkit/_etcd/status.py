"""Translate gRPC errors from etcd into clusterkit's exception tree, by table.

etcd reports most errors as a gRPC status code plus a fixed message (``rpctypes`` in etcd's
source). The status code picks the class; a few messages refine it (a compacted revision is
``OUT_OF_RANGE`` like several other errors, an expired token ``UNAUTHENTICATED``...). A raw
``grpc.RpcError`` never leaves the etcd adapter.
"""

from __future__ import annotations

import grpc

from .._errors import (
    AuthenticationFailed,
    EtcdError,
    EtcdTimeout,
    EtcdUnavailable,
    InvalidAuthToken,
    InvalidRequest,
    LeaseNotFound,
    PermissionDenied,
    PreconditionFailed,
    ResourceExhausted,
    RevisionCompacted,
)

BY_CODE: dict[grpc.StatusCode, type[EtcdError]] = {
    grpc.StatusCode.UNAVAILABLE: EtcdUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: EtcdTimeout,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.NOT_FOUND: LeaseNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: InvalidAuthToken,
    grpc.StatusCode.CANCELLED: EtcdUnavailable,
    grpc.StatusCode.ABORTED: EtcdUnavailable,
    grpc.StatusCode.INTERNAL: EtcdUnavailable,
}

# Message fragments (etcd's rpctypes) that refine the class picked by the code.
BY_MESSAGE: tuple[tuple[str, type[EtcdError]], ...] = (
    ("required revision has been compacted", RevisionCompacted),
    ("requested lease not found", LeaseNotFound),
    ("invalid auth token", InvalidAuthToken),
    ("revision of auth store is old", InvalidAuthToken),
    ("authentication failed", AuthenticationFailed),
    ("user name is empty", AuthenticationFailed),
    ("permission denied", PermissionDenied),
    ("no leader", EtcdUnavailable),
    ("leader changed", EtcdUnavailable),
    ("request timed out", EtcdTimeout),
    ("too many requests", ResourceExhausted),
    ("database space exceeded", ResourceExhausted),
)


def translate(exc: grpc.RpcError) -> EtcdError:
    """Map a ``grpc.RpcError`` raised by a call to etcd to a clusterkit error.

    Sync calls raise a ``grpc.Call``, grpc.aio raises ``AioRpcError`` (not a ``grpc.Call``,
    but with the same ``code()`` and ``details()``), the bridge its ``LocalCancellation``.
    """
    has_status = callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None))
    code = exc.code() if has_status else None
    details = (exc.details() if has_status else None) or str(exc)
    cls: type[EtcdError] = BY_CODE.get(code, EtcdError) if code is not None else EtcdError
    lowered = details.lower()
    for fragment, refined in BY_MESSAGE:
        if fragment in lowered:
            cls = refined
            break
    return cls(details, code=code.name if code is not None else None)
