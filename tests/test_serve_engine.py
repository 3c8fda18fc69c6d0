"""The decode engine in a process of its own (serve/engine.py): concurrent requests batched, each
with its own tokens; a full queue, cancels, a dead or stopped process reach every caller."""

import threading

import pytest
from test_decode import alone, prompt, tiny

from smallgpt.decode import SamplingSettings
from smallgpt.errors import UserError
from smallgpt.serve.engine import EngineProcess, QueueFull


def test_scheduler_batches_concurrent_requests_each_gets_its_own_text():
    model = tiny()
    settings = [SamplingSettings(max_new_tokens=30 + i, temperature=0) for i in range(6)]
    settings[5] = SamplingSettings(max_new_tokens=30, temperature=1.0, seed=5)
    prompts = [prompt(2 + 4 * i, i) for i in range(6)]
    scheduler = EngineProcess(model, max_batch=4, max_queue=8)
    results: dict[int, list[int]] = {}
    start = threading.Barrier(6)

    def client(i: int) -> None:
        start.wait()
        with scheduler.submit(prompts[i], settings[i]) as stream:
            results[i] = list(stream)
            assert stream.finish_reason == "length"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    scheduler.stop()
    assert [results[i] for i in range(6)] == [alone(model, p, s) for p, s in zip(prompts, settings)]
    assert scheduler.stats.max_batch_size > 1 and scheduler.load == (0, 0)


def test_scheduler_queue_full_and_cancel_on_close():
    model = tiny()
    scheduler = EngineProcess(model, max_batch=1, max_queue=1)
    endless = SamplingSettings(max_new_tokens=10**9, temperature=0)
    short = SamplingSettings(max_new_tokens=5, temperature=0)
    running = scheduler.submit(prompt(3, 0), endless)
    next(running)  # it holds the only slot now
    queued = scheduler.submit(prompt(4, 1), short)
    with pytest.raises(QueueFull):
        scheduler.submit(prompt(5, 2), short)
    assert scheduler.load == (1, 1)
    queued.close()  # leaves the queue: room for another
    waiting = scheduler.submit(prompt(5, 2), short)
    running.close()  # frees the slot: the waiting request runs
    assert list(waiting) == alone(model, prompt(5, 2), short)
    assert running.finish_reason == queued.finish_reason == "cancelled" and list(queued) == []
    with pytest.raises(UserError, match="temperature"):
        scheduler.submit([1], SamplingSettings(temperature=-1))
    scheduler.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        scheduler.submit([1], SamplingSettings())


def test_streams_sharing_a_notify_get_one_call_per_step():
    """The server's hand-over: however many streams got a token in a step, their shared notify
    (one event loop's wake-up) is called once for that step."""
    scheduler = EngineProcess(tiny(), max_batch=4)
    loop = Handover()
    # a bound method per stream, all equal: as the server's
    streams = [
        scheduler.submit(prompt(3, i), SamplingSettings(max_new_tokens=10), loop.wake) for i in range(4)
    ]
    tokens = sum(len(list(stream)) for stream in streams)
    scheduler.stop()
    assert tokens == 40 and scheduler.stats.max_batch_size == 4
    assert loop.calls == scheduler.stats.steps < tokens


class Handover:
    calls = 0

    def wake(self) -> None:
        self.calls += 1


def test_a_dead_engine_process_reaches_every_caller():
    scheduler = EngineProcess(tiny(), max_batch=1)
    streams = [scheduler.submit([1, 2], SamplingSettings(max_new_tokens=10**9)) for _ in range(2)]
    next(streams[0])  # the engine runs
    scheduler._process.kill()  # as a crash of the engine's process would
    for stream in streams:
        with pytest.raises(RuntimeError, match="decoding failed"):
            list(stream)
    with pytest.raises(RuntimeError, match="stopped"):
        scheduler.submit([1], SamplingSettings())
    scheduler.stop()


def test_a_pipe_that_broke_before_the_reader_noticed_is_a_stopped_scheduler():
    """Between the engine's process dying and its reader seeing the end, submit says the scheduler
    has stopped (not a BrokenPipeError) and closing a stream raises nothing."""
    scheduler = EngineProcess(tiny(), max_batch=1)
    stream = scheduler.submit([1, 2], SamplingSettings(max_new_tokens=10**9))
    next(stream)
    scheduler._commands.close()  # as a pipe to a dead process fails
    stream.close()
    with pytest.raises(RuntimeError, match="stopped"):
        scheduler.submit([1], SamplingSettings())
    assert scheduler.load == (0, 0)  # the refused request was never counted
    scheduler._process.kill()
    scheduler.stop()


def test_scheduler_stop_ends_open_streams():
    scheduler = EngineProcess(tiny(), max_batch=1)
    stream = scheduler.submit([1, 2], SamplingSettings(max_new_tokens=10**9, temperature=0))
    next(stream)
    scheduler.stop()
    list(stream)  # ends instead of blocking
    assert stream.finish_reason == "cancelled"
    assert not scheduler._process.is_alive()
