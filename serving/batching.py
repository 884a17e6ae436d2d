"""Per-model dynamic batching with one fair scheduler for all the models of a server.

Each model has its own bounded queue. When a worker is free, the scheduler thread visits models
round-robin; a model is due when it has ``max_batch`` texts waiting or its oldest has waited
``max_wait_s`` (0, the default: at once, so batches form only from what arrived while the
workers were busy, and a lone request pays no delay). Due batches run on a small worker pool
(the server's compute threads), so the event loop never computes, and one busy model cannot
starve the others: each gets at most one batch per turn.
Full queues refuse at once (:class:`Overloaded`, 503 with Retry-After); a text whose deadline
passed while it waited is dropped (:class:`DeadlineExceeded`) and never computed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from serving.family import Overloaded, claim
from serving.models import ServedModel, answer_rows


@dataclass
class _Item:
    text: str
    raw: bool
    arrived: float
    deadline: float
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        max_batch: int = 16,
        max_wait_s: float = 0.0,
        per_model_queue: int = 256,
        total_queue: int = 4096,
        deadline_s: float = 30.0,
        workers: int = 1,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.per_model_queue = per_model_queue
        self.total_queue = total_queue
        self.deadline_s = deadline_s
        self.on_batch = on_batch
        self.queues: dict[str, deque[_Item]] = {}
        self.models: dict[str, ServedModel] = {}
        self.waiting = 0
        self.batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self._busy = threading.Semaphore(workers)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch")
            if workers > 1
            else None
        )
        self._lock = threading.Condition()
        self._order: deque[str] = deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, model: ServedModel, texts: list[str], raw: bool = False) -> list[Future]:
        now = time.monotonic()
        items = [_Item(t, raw, now, now + self.deadline_s) for t in texts]
        with self._lock:
            queue = self.queues.setdefault(model.model_id, deque())
            if len(queue) + len(items) > self.per_model_queue:
                raise Overloaded(
                    f"model {model.model_id} has {len(queue)} texts waiting; retry shortly"
                )
            if self.waiting + len(items) > self.total_queue:
                raise Overloaded(f"{self.waiting} texts are waiting in this server; retry shortly")
            if not queue:
                self._order.append(model.model_id)
            self.models[model.model_id] = model
            queue.extend(items)
            self.waiting += len(items)
            self._lock.notify()
        return [item.future for item in items]

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            # Wait for a free worker first: while all are busy, texts keep arriving and the
            # next batch grows (batching under load without a fixed delay at low load).
            self._busy.acquire()
            with self._lock:
                batch = None
                while batch is None:
                    if self._stop:
                        self._busy.release()
                        return
                    batch, wait = self._next_due()
                    if batch is None:
                        self._lock.wait(timeout=wait)
            model_id, items = batch
            if self._pool is None:
                # One compute thread: this one. A hand-off to a pool would cost a wake-up
                # per batch and buy nothing, as the next batch waits for this one anyway.
                self._execute(model_id, items)
            else:
                self._pool.submit(self._execute, model_id, items)

    def _next_due(self) -> tuple[tuple[str, list[_Item]] | None, float | None]:
        """The next model in round-robin order with a full batch or an old enough head; else
        how long until the earliest head comes due."""
        now = time.monotonic()
        soonest = None
        for _ in range(len(self._order)):
            model_id = self._order[0]
            self._order.rotate(-1)
            queue = self.queues[model_id]
            if not queue:
                continue
            due = queue[0].arrived + self.max_wait_s
            if len(queue) >= self.max_batch or due <= now:
                items = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                self.waiting -= len(items)
                if not queue:
                    self._order.remove(model_id)
                return (model_id, items), None
            soonest = due if soonest is None else min(soonest, due)
        return None, None if soonest is None else max(0.0, soonest - now)

    def _execute(self, model_id: str, items: list[_Item]) -> None:
        try:
            live = claim(items)
            if not live:
                return
            model = self.models[model_id]
            try:
                outputs = model.forward([item.text for item in live])
            except Exception as exc:  # noqa: BLE001 - each waiting caller hears of it
                for item in live:
                    item.future.set_exception(exc)
                return
            self.batches += 1
            self.batch_sizes.append(len(live))
            if self.on_batch is not None:
                self.on_batch(model_id, len(live))
            results = answer_rows(
                model.task, outputs, [model.labels] * len(live), [item.raw for item in live]
            )
            for item, result in zip(live, results, strict=True):
                item.future.set_result(result)
        finally:
            self._busy.release()
