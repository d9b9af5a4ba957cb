"""Base class of the collector's worker threads, in the style of fail2ban's ``JailThread``.

A thread owns scheduling and lifetime only; the work itself lives in a service (``app/services/``),
which never imports threads. :class:`WorkerThread` adds to ``threading.Thread`` a stop event the work
can poll or wait on (so the collector can end a round early: SIGTERM, run-time bound), a ``run`` that
logs and survives exceptions, a ``join`` safe on a thread that never started, and a ``status``.
Subclasses implement ``work`` and return its result, which lands in ``result``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_DISABLED = "disabled"
STATUS_NOT_STARTED = "not started"
STATUS_RUNNING = "running"
MAX_STATUS_CHARS = 200


def error_status(exc: BaseException) -> str:
    """``'error: <one line>'`` for an exception, at most MAX_STATUS_CHARS characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {text}"[:MAX_STATUS_CHARS]


class WorkerThread(threading.Thread):
    """A daemon thread with a stop event, logged failures and a status string.

    ``enabled=False`` makes a thread that does nothing when started and reports ``'disabled'``.
    After :meth:`join` returns (and the thread is no longer alive), :attr:`result` holds what
    :meth:`work` returned (None on failure) and :attr:`error` the exception it raised (or None).
    ``started_at`` / ``finished_at`` are epoch seconds, ``duration`` seconds (monotonic).
    """

    def __init__(self, name: str, enabled: bool = True):
        super().__init__(name=name, daemon=True)
        self.enabled = enabled
        self.result: Any = None
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.duration: float | None = None
        self._stop_event = threading.Event()
        self._outcome: str | None = None

    # lifetime ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the thread to finish soon; returns at once (use :meth:`join` to wait)."""
        self._stop_event.set()

    @property
    def stop_event(self) -> threading.Event:
        """The event set by :meth:`stop`, for services that poll or wait on it."""
        return self._stop_event

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def wait(self, seconds: float | None) -> bool:
        """Sleep up to ``seconds`` (None: until stopped); True when stop was requested."""
        return self._stop_event.wait(seconds)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread like ``Thread.join`` (timeout included); a no-op on a thread that never
        started (disabled, or the collector failed before starting it)."""
        if self.ident is None:
            return
        super().join(timeout)

    # outcome ---------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """The text the collector stores in ``rounds.scanner_status`` / ``sniffer_status``: 'ok',
        'disabled', 'error: <one line>' (subclasses add their own, e.g. 'no-tshark'), or 'not started' /
        'running' while there is no outcome yet."""
        if not self.enabled:
            return STATUS_DISABLED
        if self._outcome is not None:
            return self._outcome
        return STATUS_RUNNING if self.ident is not None else STATUS_NOT_STARTED

    def run(self) -> None:
        """Run :meth:`work`, logging and surviving its exception: the failure is kept in :attr:`error` and
        summarised in :attr:`status` instead of vanishing into the thread's stderr."""
        if not self.enabled:
            log.debug("%s is disabled", self.name)
            return
        self.started_at = time.time()
        began = time.monotonic()
        try:
            self.result = self.work()
            outcome = STATUS_OK
        except Exception as exc:  # noqa: BLE001 - a worker must never die silently
            self.error = exc
            outcome = self.handle_error(exc)
        finally:
            self.duration = time.monotonic() - began
            self.finished_at = time.time()
        self._outcome = outcome

    def handle_error(self, exc: Exception) -> str:
        """Log ``exc`` and return the status it means; subclasses map their expected errors
        (e.g. a missing dependency) to a word and a one-line warning instead of a traceback."""
        log.error("%s failed: %s", self.name, exc, exc_info=exc)
        return error_status(exc)

    def work(self) -> Any:
        """The thread's job; its return value becomes :attr:`result`."""
        raise NotImplementedError
