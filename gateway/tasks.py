"""Stopping a background task that owns work in flight (the spools' flusher, the reminder
scan): give it until a deadline to finish what it holds, then cancel it.

    await finish_within(self._task, deadline=5.0)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def finish_within(task: asyncio.Task[Any], deadline: float) -> None:
    """Wait up to ``deadline`` seconds for ``task`` to finish, then cancel it; return once it
    is done. The wait is shielded: a caller cancelled meanwhile leaves the task running. A
    task that fails raises its error here."""
    try:
        async with asyncio.timeout(deadline):
            await asyncio.shield(task)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
