"""recipes/workers.py: the costliest ready task first, dependencies kept, a task's error raised in the parent."""
import math
import time

import pytest

from unlearn_fast.recipes.workers import Task, next_task, run_tasks


class Lines:
    def __init__(self):
        self.items = []

    def line(self, *args, **kwargs):
        self.items.append((args, kwargs))


def test_next_task_is_the_costliest_and_ties_keep_the_given_order():
    tasks = [Task("a", abs, (1,), cost=2.0), Task("b", abs, (1,), cost=5.0), Task("c", abs, (1,), cost=5.0)]
    assert next_task(tasks).key == "b"
    assert next_task(tasks[:1]).key == "a"


def test_one_worker_runs_the_costliest_ready_task_first_and_waits_for_dependencies():
    # each task returns the time it ran: with one worker the order of those times is the order of the tasks
    tasks = [Task("teach", time.time_ns, cost=1.0), Task("long", time.time_ns, cost=5.0, after="teach"),
             Task("mid", time.time_ns, cost=3.0), Task("short", time.time_ns, cost=0.5)]
    results = run_tasks(tasks, 1, Lines())
    assert list(results) == ["teach", "long", "mid", "short"]  # in the given order, whatever ran first
    assert sorted(results, key=results.get) == ["mid", "teach", "long", "short"]


def test_results_come_back_from_two_workers():
    results = run_tasks([Task(i, math.factorial, (i,), cost=i) for i in range(8)], 2, Lines())
    assert results == {i: math.factorial(i) for i in range(8)}


def test_a_task_error_is_raised_in_the_parent_and_bad_task_lists_are_refused():
    with pytest.raises(ValueError, match="math domain error"):
        run_tasks([Task("bad", math.sqrt, (-1.0,)), Task("ok", abs, (1,), after="bad")], 2, Lines())
    with pytest.raises(ValueError, match="distinct"):
        run_tasks([Task("a", abs, (1,)), Task("a", abs, (2,))], 1, Lines())
    with pytest.raises(ValueError, match="unknown keys"):
        run_tasks([Task("a", abs, (1,), after="z")], 1, Lines())
