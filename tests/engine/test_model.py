"""The engine's records: what a task keeps, when a worker may take work, a channel's defaults."""

from __future__ import annotations

import signal

import pytest

from forkref._engine.model import Channel, Generation, Task, Worker, exit_text
from forkref._share.taskpickle import FnBlob


class QuietChannel(Channel):
    """A channel that only counts what it is asked to do."""

    def __init__(self) -> None:
        self.wid, self.pid, self.fd = 1, None, 3
        self.stops = 0

    def send(self, task: Task) -> None:
        raise BrokenPipeError

    def read(self) -> list[bytearray]:
        return []

    def stop(self) -> None:
        self.stops += 1

    def kill(self) -> None:
        pass

    def close(self) -> None:
        self.fd = None


def make_task(payload: bytes | None) -> Task:
    return Task(
        5,
        0,
        FnBlob(1, b"", []),
        (payload, 42),
        data=["the arguments"],
        offset=7,
        on_done=lambda ok, value: None,
        on_start=None,
    )


def test_a_task_keeps_its_arguments_only_while_it_has_no_pickle() -> None:
    pickled = make_task(b"pickle")
    assert pickled.data is None
    assert pickled.payload == b"pickle"
    assert pickled.size == 42
    late = make_task(None)
    assert late.data == ["the arguments"]
    assert late.payload is None
    assert (late.offset, late.started, late.refs, late.sent_at) == (7, False, [], 0.0)


def test_a_worker_accepts_tasks_while_open_not_stopping_and_within_its_budget() -> None:
    gen = Generation(1, 0)
    w = Worker(QuietChannel(), gen, budget=None)
    assert w.live()
    assert w.accepting()
    assert w.pid is None
    w.budget = 0
    assert w.live()
    assert not w.accepting()
    w.budget = 1
    w.stopping = True
    assert not w.accepting()
    w.stopping = False
    w.channel.close()
    assert not w.live()
    assert not w.accepting()


def test_a_worker_runs_since_its_first_task_reported_its_start() -> None:
    w = Worker(QuietChannel(), Generation(1, 0), budget=None)
    assert w.running_since() is None  # nothing in flight
    first, second = make_task(b"1"), make_task(b"2")
    second.running_at = 7.0  # only the first task held can be running
    w.inflight.extend([first, second])
    assert w.running_since() is None  # sent, not started: unpickling, or queued in the worker
    first.running_at = 12.5
    assert w.running_since() == 12.5
    w.inflight.popleft()
    assert w.running_since() == 7.0


def test_stopping_a_worker_asks_its_channel_once() -> None:
    channel = QuietChannel()
    w = Worker(channel, Generation(1, 0), budget=None)
    w.stop()
    w.stop()
    assert w.stopping
    assert channel.stops == 1


def test_a_generation_starts_empty_and_current() -> None:
    gen = Generation(3, 17)
    assert (gen.number, gen.serial, gen.fork_seq, gen.workers, gen.retiring, gen.server) == (
        3, 17, 0, [], False, None,
    )


def test_channel_defaults_and_its_abstract_close() -> None:
    channel = QuietChannel()
    assert channel.exit_status() is None
    assert channel.stdlib_process() is None
    assert channel.sentinel is None
    assert channel.describe_exit(-signal.SIGKILL) == "killed by signal SIGKILL"

    class NoClose(Channel):
        def send(self, task: Task) -> None: ...
        def read(self) -> list[bytearray]: return []
        def stop(self) -> None: ...
        def kill(self) -> None: ...

    with pytest.raises(TypeError, match="close"):
        NoClose()  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (None, "exit status unknown"),
        (0, "exit code 0"),
        (3, "exit code 3"),
        (-signal.SIGSEGV, "killed by signal SIGSEGV"),
        (-200, "killed by signal 200"),
    ],
)
def test_exit_text(code: int | None, text: str) -> None:
    assert exit_text(code) == text
