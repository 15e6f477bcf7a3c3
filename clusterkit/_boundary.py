"""Exception groups at clusterkit's ``async with`` boundaries (nodes, clients, connections).

Trio nurseries wrap errors in ``ExceptionGroup``; users should not have to unwrap them. The
policy, shared by ``open_cluster``, ``open_client`` and the peer connection tasks:

- the user's own exception from the ``async with`` body wins: it is re-raised as itself, never
  wrapped, and other errors that happened while leaving are only reported (``on_extra``);
- otherwise, when exactly one real error happened, it is raised as itself;
- several independent real errors are raised as the group;
- ``trio.Cancelled`` passes through untouched, so outer cancel scopes work as usual.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NoReturn

import trio


def flatten(exc: BaseException) -> list[BaseException]:
    """The leaf exceptions of ``exc`` (itself, if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in flatten(sub)]
    return [exc]


def contains(tree: BaseException, target: BaseException) -> bool:
    """True when every leaf exception of ``target`` is among the leaves of ``tree``.

    Leaves are compared by identity. Groups are not: Trio's cancel scopes rebuild the groups
    an exception travels through (``split``), so the user's group object may come back as an
    equal copy around the very same leaf exceptions.
    """
    leaves = flatten(tree)
    return all(any(leaf is mine for leaf in leaves) for mine in flatten(target))


def reraise(
    group: BaseException,
    user_error: BaseException | None,
    on_extra: Callable[[BaseException], None],
) -> NoReturn:
    """Raise what crosses the boundary for ``group`` (see the module docstring)."""
    if user_error is not None and contains(group, user_error):
        for leaf in flatten(group):
            if not contains(user_error, leaf) and not isinstance(leaf, trio.Cancelled):
                on_extra(leaf)
        raise user_error from None
    real = [leaf for leaf in flatten(group) if not isinstance(leaf, trio.Cancelled)]
    if len(real) == 1 and isinstance(group, BaseExceptionGroup):
        raise real[0] from None
    raise group


@asynccontextmanager
async def single_errors() -> AsyncIterator[None]:
    """Around a nursery: a group holding one real error is raised as that error."""
    try:
        yield
    except BaseException as group:
        reraise(group, None, lambda _: None)
