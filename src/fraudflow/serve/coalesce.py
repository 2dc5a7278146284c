"""Requests that arrive together, processed together.

Under load, many single-decision requests are ready on the event loop at once. Deciding them
one by one pays, per request, a state-store transaction, a model call and an audit queue
round; deciding them as one group pays each once. ``Coalescer.submit`` queues an item and
returns its own future; an idle service processes it on the next turn of the event loop (a
lone request is a group of one, with no wait).

Self-clocking: one group is in flight at a time. Items that arrive while it awaits its audit
commit queue up and go together as the next group once it is done, so groups grow with the
load instead of every arrival starting a group of its own. The commits are serial in the
audit writer anyway, so the queued items lose little; the service saves a store transaction,
a model call and a commit per item it folds in, which lowers the tail latency at the target
rate against a group per arrival (the open loop of ``benchmarks/serve.py``).
A duplicate transaction_id leaves the group as a marker and waits for its recorded answer in
its own request (``DecisionService.decide``), so no group waits on it.

``process`` gets the group's items in arrival order and returns one outcome per item: a
result, or an exception for that item alone. If ``process`` itself raises, every item of the
group gets that exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")

Process = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    def __init__(self, process: Process[T, R], *, max_group: int = 512) -> None:
        self._process = process
        self._max_group = max_group
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until done
        self._in_flight = 0  # groups being processed; new items wait while there are any

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queued.append((item, future))
        if len(self._queued) == 1 and self._in_flight == 0:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self._max_group):
            task = asyncio.ensure_future(self._run(queued[start : start + self._max_group]))
            self._tasks.add(task)
            self._in_flight += 1
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._in_flight == 0 and self._queued:
            self._flush()

    async def _run(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._process([item for item, _ in group])
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():  # the request was cancelled (client gone)
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
