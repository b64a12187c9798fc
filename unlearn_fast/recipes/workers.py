"""Work spread over spawned worker processes, costliest ready task first (used by ``unlearn-fast run --jobs``).

A run is many small tasks of unequal length (one method on one seed: 6-25 s for the toy model), some waiting
for another (a seed's model must be taught before its methods run). Handing the workers whole seeds leaves
one idle while the other finishes the last seed (5 seeds on 2 workers: 3 rounds for 2.5 rounds of work);
handing out the costliest ready task whenever a worker frees (longest processing time first, a classic
scheduling rule within 4/3 of the best order) ends with the short tasks, so the workers finish together.

Workers are spawned (no fork of a process holding torch's thread pools), run at the parent's thread count,
send progress lines to the parent through one queue (``RemoteProgress``), and exit when their parent dies.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch


@dataclass(frozen=True)
class Task:
    """``fn(*args)`` in a worker (both picklable: a module-level function); ``cost``: its estimated
    seconds (only the order matters); ``after``: the key of a task that must have finished first."""
    key: Hashable
    fn: Callable
    args: tuple = ()
    cost: float = 1.0
    after: Hashable | None = None


_progress_queue = None  # a worker's line to its parent's progress printer (set by _worker_init)


class RemoteProgress:
    """A worker's stand-in for the parent's progress object: the same ``line`` call, put on the queue."""

    def line(self, *args, **kwargs) -> None:
        _progress_queue.put((args, kwargs))


def _worker_init(threads: int, queue, parent: int) -> None:
    global _progress_queue
    torch.set_num_threads(threads)
    _progress_queue = queue
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent is gone (killed, crashed) stops instead of running on as an orphan."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _print_lines(queue, progress) -> None:
    while (item := queue.get()) is not None:
        args, kwargs = item
        progress.line(*args, **kwargs)


def next_task(ready: list[Task]) -> Task:
    """The costliest ready task (the first of equals: ties keep the given order)."""
    return max(ready, key=lambda t: t.cost)


def run_tasks(tasks: list[Task], jobs: int, progress) -> dict[Hashable, Any]:
    """key -> result of every task, run in ``jobs`` spawned workers, the costliest ready task handed to the
    next free worker; the workers' ``RemoteProgress`` lines go to ``progress.line`` here. A task's exception
    is raised here once the running ones end (no new task starts after it)."""
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("task keys must be distinct")
    missing = [t.after for t in tasks if t.after is not None and t.after not in keys]
    if missing:
        raise ValueError(f"tasks wait for unknown keys {missing}")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()  # handed to the workers when they start (a queue cannot travel with a task)
    printer = threading.Thread(target=_print_lines, args=(queue, progress), daemon=True)
    printer.start()
    pending, running, results = list(tasks), {}, {}
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(torch.get_num_threads(), queue, os.getpid())) as pool:
            while pending or running:
                ready = [t for t in pending if t.after is None or t.after in results]
                while ready and len(running) < jobs:
                    task = next_task(ready)
                    ready.remove(task)
                    pending.remove(task)
                    running[pool.submit(task.fn, *task.args)] = task
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    results[running.pop(future).key] = future.result()
    finally:
        queue.put(None)
        printer.join()
    return {key: results[key] for key in keys}
