"""WorkerThread: failures are logged and recorded, join() is safe unstarted, stop is honoured."""
from __future__ import annotations

import logging
import threading
import time

from app.threads.base import WorkerThread, error_status


class Boom(WorkerThread):
    def work(self):
        raise RuntimeError("disk on fire\nsecond line")


class Sleeper(WorkerThread):
    """Waits for stop for up to 30 s, then reports how long it waited."""

    def __init__(self):
        super().__init__(name="sleeper")
        self.entered = threading.Event()

    def work(self):
        self.entered.set()
        began = time.monotonic()
        stopped = self.wait(30)
        return stopped, time.monotonic() - began


class Answer(WorkerThread):
    def work(self):
        return 42


def test_exception_in_work_is_logged_and_recorded(caplog):
    thread = Boom(name="boom")
    with caplog.at_level(logging.ERROR, logger="app.threads.base"):
        thread.start()
        thread.join(5)
    assert not thread.is_alive()
    assert isinstance(thread.error, RuntimeError)
    assert thread.result is None
    assert thread.status == "error: disk on fire second line"     # one line
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "boom failed: disk on fire" in failures[0].getMessage()
    assert failures[0].exc_info is not None                        # traceback kept in the log
    assert thread.duration is not None and thread.finished_at >= thread.started_at


def test_join_on_a_never_started_thread_is_safe():
    thread = Answer(name="never")
    thread.join()                       # plain threading.Thread raises RuntimeError here
    thread.join(0.1)
    assert thread.status == "not started"
    assert thread.result is None and thread.error is None


def test_result_and_ok_status():
    thread = Answer(name="answer")
    thread.start()
    thread.join(5)
    assert (thread.status, thread.result, thread.error) == ("ok", 42, None)


def test_stop_event_is_honoured():
    thread = Sleeper()
    thread.start()
    assert thread.entered.wait(5)
    assert thread.status == "running"
    began = time.monotonic()
    thread.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - began < 2
    stopped, waited = thread.result
    assert stopped is True and waited < 5
    assert thread.stopping and thread.status == "ok"


def test_disabled_thread_does_nothing():
    thread = Answer(name="off", enabled=False)
    assert thread.status == "disabled"
    thread.start()
    thread.join(5)
    assert thread.status == "disabled" and thread.result is None


def test_error_status_is_bounded_and_never_empty():
    assert error_status(ValueError()) == "error: ValueError"
    assert len(error_status(ValueError("x" * 1000))) == 200
