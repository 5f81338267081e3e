"""asyncio helpers for stopping tasks reliably.

Why not ``task.cancel(); with suppress(CancelledError): await task``: that also swallows a
cancellation aimed at the *caller* (an outer ``wait_for``/``cancel`` then never takes
effect), and one ``cancel()`` is not always enough — on Python 3.11, ``asyncio.wait_for``
returns the inner result when its task is cancelled just as the inner awaitable completes
(CPython gh-86296). redis-py wraps every socket write in ``wait_for`` when a socket timeout is
set, so a task cancelled during a Redis call can lose the cancellation and keep looping
(it then leaves ``Task.cancelling()`` above 0 with no cancellation pending, so that counter
cannot tell whether the caller is being cancelled either).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "wait_bounded"]

T = TypeVar("T")

#: how often a task that ignored its cancellation is cancelled again
RECANCEL_S = 0.2


async def cancel_and_wait(task: asyncio.Future[Any], *, recancel_s: float = RECANCEL_S) -> None:
    """Cancel *task* and return once it is done, cancelling it again every *recancel_s*
    seconds while it keeps running (a lost cancellation, see the module doc).

    The task's own ``CancelledError`` is absorbed; any other exception it ended with is raised.
    A cancellation of the caller is never absorbed: it propagates at once (the task has
    been cancelled and finishes on its own).
    """
    while not task.done():
        task.cancel()
        # asyncio.wait never absorbs the caller's cancellation and never raises the task's
        await asyncio.wait((task,), timeout=recancel_s)
    if not task.cancelled():
        error = task.exception()
        if error is not None:
            raise error


async def wait_bounded(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Run *coro* as a task for at most *timeout_s* seconds (then TimeoutError), like
    ``asyncio.wait_for`` but with :func:`cancel_and_wait`'s guarantees: the task is stopped
    even if it ignores one cancellation, and a cancellation of the caller always propagates."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait((task,), timeout=timeout_s)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await cancel_and_wait(task)
        raise
    if not task.done():
        with contextlib.suppress(Exception):
            await cancel_and_wait(task)
        raise TimeoutError(f"gave up after {timeout_s:g} s")
    return task.result()
