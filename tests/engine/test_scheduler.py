"""The scheduler on its own: queue, commit window, dispatch, replies, deaths, cancel.

The scheduler is pure bookkeeping over channels, so its workers here are
:class:`FakeChannel` objects: an in-memory :class:`~forkref._engine.model.Channel`
that records what it was sent. No process runs; the pools' tests run the
same code with real workers.
"""

from __future__ import annotations

from typing import Any

import pytest

from forkref._engine.model import (
    FAST_TASK,
    Cancelled,
    Channel,
    Completion,
    Generation,
    Task,
    Worker,
)
from forkref._engine.scheduler import Scheduler
from forkref._engine.wire import ERR, HDR, INIT_FAILED, OK, READY, RETIRE, STARTED
from forkref._share.taskpickle import FnBlob

_FN = FnBlob(1, b"fn", [])


class FakeChannel(Channel):
    """A worker that takes tasks into a list; ``dead`` makes ``send`` fail as a gone worker's."""

    def __init__(self, wid: int, prefetch_max: int = 1 << 16) -> None:
        self.wid = wid
        self.pid = 1000 + wid
        self.fd = 100 + wid  # only compared with None: "open"
        self.prefetch_max = prefetch_max
        self.sent: list[int] = []
        self.payloads: list[bytes | None] = []
        self.dead = False
        self.stops = 0

    def send(self, task: Task) -> None:
        if self.dead:
            raise BrokenPipeError("gone")
        self.sent.append(task.id)
        self.payloads.append(task.payload)

    def read(self) -> list[bytearray]:
        return []

    def stop(self) -> None:
        self.stops += 1

    def kill(self) -> None:
        self.dead = True

    def close(self) -> None:
        self.fd = None


def task(
    task_id: int,
    size: int = 10,
    *,
    late: bool = False,
    on_start: Any = None,
    data: Any = None,
) -> Task:
    """A task of ``size`` bytes; ``late``: not pickled yet (the scheduler pickles it at send)."""
    payload = None if late else b"x" * size
    return Task(
        task_id,
        0,
        _FN,
        (payload, size),
        data=data,
        offset=0,
        on_done=lambda ok, value: None,
        on_start=on_start,
    )


def generation(*channels: FakeChannel, budget: int | None = None) -> Generation:
    gen = Generation(1, 0)
    gen.workers = [Worker(c, gen, budget) for c in channels]
    return gen


def queued(s: Scheduler) -> list[int]:
    return [t.id for t in s.queue]


def late_pickle(t: Task) -> bytes:
    return b"late:" + repr(t.data).encode()


# -- the queue -----------------------------------------------------------------


def test_submitted_tasks_wait_in_incoming_until_drained_in_order() -> None:
    s = Scheduler(late_pickle)
    assert not s.pending()
    s.submit([task(1), task(2)])
    s.submit([task(3)])
    assert s.pending()
    assert not s.queue
    s.drain_incoming()
    assert queued(s) == [1, 2, 3]
    assert not s.incoming
    s.submit([task(4)])
    assert [t.id for t in s.take_all()] == [1, 2, 3, 4]
    assert not s.pending()


# -- the executor's commit window ----------------------------------------------


def test_commit_marks_the_first_window_tasks_started_once() -> None:
    calls: list[int] = []

    def starting(i: int) -> Any:
        return lambda: calls.append(i) or True

    s = Scheduler(late_pickle)
    s.submit([task(i, on_start=starting(i)) for i in range(1, 5)])
    s.drain_incoming()
    completions: list[Completion] = []
    s.commit(2, completions)
    assert calls == [1, 2]
    assert not completions
    assert [t.started for t in s.queue] == [True, True, False, False]
    s.commit(3, completions)  # the window grew by one: only the third starts now
    assert calls == [1, 2, 3]
    assert queued(s) == [1, 2, 3, 4]


def test_a_task_cancelled_before_the_window_reaches_it_is_dropped_and_the_next_moves_in() -> None:
    s = Scheduler(late_pickle)
    s.submit([task(1), task(2, on_start=lambda: False), task(3), task(4)])
    s.drain_incoming()
    completions: list[Completion] = []
    s.commit(2, completions)
    assert [(c[0].id, c[1], type(c[2])) for c in completions] == [(2, -1, Cancelled)]
    assert queued(s) == [1, 3, 4]
    assert [t.started for t in s.queue] == [True, True, False]


def test_cancel_queued_takes_only_the_tasks_not_started() -> None:
    s = Scheduler(late_pickle)
    s.submit([task(i) for i in range(1, 5)])
    s.drain_incoming()
    s.commit(2, [])
    s.submit([task(5)])
    assert [t.id for t in s.cancel_queued()] == [3, 4, 5]
    assert queued(s) == [1, 2]


# -- dispatch --------------------------------------------------------------------


def test_dispatch_spreads_tasks_over_the_least_loaded_workers_two_deep() -> None:
    a, b = FakeChannel(1), FakeChannel(2)
    gen = generation(a, b)
    s = Scheduler(late_pickle)
    s.submit([task(i) for i in range(1, 7)])
    s.drain_incoming()
    s.dispatch(gen, [])
    # Slow (unknown) service time: two tasks each, alternating; the rest wait.
    assert a.sent == [1, 3]
    assert b.sent == [2, 4]
    assert queued(s) == [5, 6]
    assert [len(w.inflight) for w in gen.workers] == [2, 2]
    assert gen.workers[0].inflight_bytes == 20


def test_fast_workers_are_fed_deeper_and_max_depth_caps_it() -> None:
    a = FakeChannel(1)
    gen = generation(a)
    gen.workers[0].service = FAST_TASK / 2
    s = Scheduler(late_pickle)
    s.submit([task(i) for i in range(1, 41)])
    s.drain_incoming()
    s.dispatch(gen, [], max_depth=1)
    assert a.sent == [1]
    s.dispatch(gen, [])
    assert len(a.sent) == 32
    assert len(s.queue) == 8


def test_what_waits_behind_a_running_task_fits_the_channel_prefetch() -> None:
    a = FakeChannel(1, prefetch_max=100)
    gen = generation(a)
    s = Scheduler(late_pickle)
    s.submit([task(1, size=500), task(2, size=60), task(3, size=60)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert a.sent == [1]  # an idle worker takes any size; nothing fits behind 500 bytes
    gen.workers[0].inflight.clear()
    gen.workers[0].inflight_bytes = 0
    s.dispatch(gen, [])
    assert a.sent == [1, 2]  # 60 + 60 > 100: the third waits
    assert queued(s) == [3]


def test_workers_that_may_not_take_tasks_get_none() -> None:
    stopping, closed, spent, fresh = (FakeChannel(i) for i in range(1, 5))
    gen = generation(stopping, closed, spent, fresh)
    gen.workers[0].stopping = True
    closed.close()
    gen.workers[2].budget = 0
    s = Scheduler(late_pickle)
    s.submit([task(1), task(2), task(3)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert (stopping.sent, closed.sent, spent.sent, fresh.sent) == ([], [], [], [1, 2])
    assert queued(s) == [3]


def test_the_budget_counts_down_with_every_task_sent() -> None:
    a = FakeChannel(1)
    gen = generation(a, budget=3)
    s = Scheduler(late_pickle)
    s.submit([task(i) for i in range(1, 6)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert gen.workers[0].budget == 1
    gen.workers[0].inflight.clear()
    gen.workers[0].inflight_bytes = 0
    s.dispatch(gen, [])
    assert a.sent == [1, 2, 3]
    assert gen.workers[0].budget == 0
    assert queued(s) == [4, 5]


def test_dispatch_starts_each_task_and_drops_one_cancelled_meanwhile() -> None:
    a = FakeChannel(1)
    gen = generation(a)
    s = Scheduler(late_pickle)
    s.submit([task(1, on_start=lambda: False), task(2, on_start=lambda: True)])
    s.drain_incoming()
    completions: list[Completion] = []
    s.dispatch(gen, completions)
    assert a.sent == [2]
    assert [(c[0].id, type(c[2])) for c in completions] == [(1, Cancelled)]
    assert gen.workers[0].inflight[0].started


def test_a_big_task_is_pickled_at_send_and_its_pickle_not_kept() -> None:
    a = FakeChannel(1)
    gen = generation(a)
    s = Scheduler(late_pickle)
    big = task(1, late=True, data=("args",))
    s.submit([big])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert a.payloads == [b"late:('args',)"]
    assert big.payload is None
    assert gen.workers[0].inflight[0] is big


def test_a_big_task_that_cannot_be_pickled_at_send_fails_alone() -> None:
    def failing(t: Task) -> bytes:
        raise ValueError("changed since submit")

    a = FakeChannel(1)
    gen = generation(a)
    s = Scheduler(failing)
    s.submit([task(1, late=True), task(2)])
    s.drain_incoming()
    completions: list[Completion] = []
    s.dispatch(gen, completions)
    assert [(c[0].id, str(c[2])) for c in completions] == [(1, "changed since submit")]
    assert a.sent == [2]


def test_a_send_to_a_gone_worker_puts_the_task_back_first_and_stops_the_worker() -> None:
    gone, alive = FakeChannel(1), FakeChannel(2)
    gone.dead = True
    gen = generation(gone, alive)
    s = Scheduler(late_pickle)
    s.submit([task(1), task(2)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert gen.workers[0].stopping
    assert not gen.workers[0].inflight
    assert alive.sent == [1, 2]


# -- replies ---------------------------------------------------------------------


def reply_message(task_id: int, op: int, body: bytes = b"") -> bytearray:
    return bytearray(HDR.pack(task_id, op) + body)


def test_a_reply_for_the_running_task_completes_it_and_frees_its_room() -> None:
    a = FakeChannel(1)
    gen = generation(a)
    w = gen.workers[0]
    s = Scheduler(late_pickle)
    s.submit([task(1), task(2)])
    s.drain_incoming()
    s.dispatch(gen, [])
    reply = s.reply(w, reply_message(1, OK, b"result"))
    assert isinstance(reply, tuple)
    done, op, body = reply
    assert (done.id, op, bytes(body)) == (1, OK, b"result")
    assert [t.id for t in w.inflight] == [2]
    assert w.inflight_bytes == 10
    assert w.last_done > 0
    assert w.service != FAST_TASK
    err = s.reply(w, reply_message(2, ERR, b"exc"))
    assert isinstance(err, tuple)
    assert err[0].id == 2
    assert err[1] == ERR
    assert not w.inflight
    assert w.inflight_bytes == 0


def test_control_replies_are_returned_as_their_op_and_strays_ignored() -> None:
    a = FakeChannel(1)
    gen = generation(a)
    w = gen.workers[0]
    s = Scheduler(late_pickle)
    for op in (READY, RETIRE, INIT_FAILED):
        assert s.reply(w, reply_message(0, op)) == op
    s.submit([task(7)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert s.reply(w, reply_message(8, OK)) is None  # not the task it runs
    assert [t.id for t in w.inflight] == [7]


def test_a_started_report_marks_the_running_task_and_completes_nothing() -> None:
    a = FakeChannel(1)
    gen = generation(a)
    w = gen.workers[0]
    s = Scheduler(late_pickle)
    s.submit([task(1), task(2)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert s.reply(w, reply_message(2, STARTED)) is None  # not the one it runs: ignored
    assert w.running_since() is None
    assert s.reply(w, reply_message(1, STARTED)) is None
    running_at = w.inflight[0].running_at
    assert running_at > 0
    assert w.running_since() == running_at
    assert [t.id for t in w.inflight] == [1, 2]


# -- a worker gone -------------------------------------------------------------------


def test_a_gone_worker_fails_only_its_running_task_and_requeues_the_rest_first() -> None:
    a, b = FakeChannel(1), FakeChannel(2)
    gen = generation(a, b)
    gen.workers[1].stopping = True
    s = Scheduler(late_pickle)
    s.submit([task(i) for i in range(1, 5)])
    s.drain_incoming()
    s.dispatch(gen, [])
    assert a.sent == [1, 2]
    assert queued(s) == [3, 4]
    w = gen.workers[0]
    running = s.worker_gone(w)
    assert running is not None
    assert running.id == 1
    assert queued(s) == [2, 3, 4]
    assert not w.inflight
    assert w.inflight_bytes == 0
    assert s.worker_gone(w) is None


@pytest.mark.parametrize("window", [0, 1])
def test_commit_with_an_empty_queue_does_nothing(window: int) -> None:
    s = Scheduler(late_pickle)
    completions: list[Completion] = []
    s.commit(window, completions)
    assert not completions
    assert not s.queue
