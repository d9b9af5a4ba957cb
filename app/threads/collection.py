"""Scheduling of a collection: K rounds of N seconds, with the scanner and sniffer threads
running during each round, a stop on SIGTERM and a bound on the whole run's time.

The work of a round (maps -> differences -> one transaction) is app/services/collector/collector.py;
this module only decides when it happens and what runs meanwhile.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from app.errors import PortwatchError
from app.services.collector.collector import Collector, Observations, RoundSummary
from app.threads.scanner import ScannerThread

log = logging.getLogger(__name__)
JOIN_SLACK_SECONDS = 30.0


class RunTimeExceeded(PortwatchError):
    pass


def start_threads(settings, interface: str, round_seconds: float) -> dict:
    """The scanner (scans at the start and end of the round) and the sniffer (a bounded window)."""
    threads = {}
    if settings.scanner.enabled:
        threads["scanner"] = ScannerThread(settings.scanner, round_seconds)
    if settings.sniffer.enabled and round_seconds >= 1:
        from app.threads.sniffer import SnifferThread   # asyncio and pyshark: only when sniffing
        threads["sniffer"] = SnifferThread(interface, settings.sniffer, round_seconds, Path(settings.general.state_dir))
    for t in threads.values():
        t.start()
    return threads


def stop_threads(threads: dict) -> Observations:
    """Stop the round's threads (the scanner takes its closing scan now) and collect what they saw."""
    for t in threads.values():
        t.stop()
    for t in threads.values():
        t.join(timeout=JOIN_SLACK_SECONDS)
        if t.is_alive():
            log.warning("%s thread did not finish within %.0f s of the round's end; its data is left out",
                        t.name, JOIN_SLACK_SECONDS)
    seen = Observations()
    scanner, sniffer = threads.get("scanner"), threads.get("sniffer")
    if scanner is not None:
        seen.scanner_status = scanner.status
        seen.listeners = None if scanner.is_alive() else scanner.result
        seen.peers = None if scanner.is_alive() else sorted(scanner.scanner.peers)
    if sniffer is not None:
        seen.sniffer_status = sniffer.status
        seen.packets = None if sniffer.is_alive() else sniffer.result
    return seen


def collect_rounds(collector: Collector, round_seconds: float, n_rounds: int, stop: threading.Event,
                   on_round: Callable[[RoundSummary], None] | None = None,
                   with_threads: bool = True) -> list[RoundSummary]:
    """``n_rounds`` rounds (0: until ``stop``) of ``round_seconds`` on an opened collector."""
    summaries = []
    k = 0
    while (n_rounds == 0 or k < n_rounds) and not stop.is_set():
        start = time.time()
        threads = start_threads(collector.settings, collector.interface, round_seconds) if with_threads else {}
        try:
            deadline = time.monotonic() + round_seconds
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                stop.wait(min(left, 1.0))
        finally:
            seen = stop_threads(threads)
        collector.check_attached()           # a detached program counts nothing: stop, never store empty rounds
        summary = collector.close_round(start, seen)
        summaries.append(summary)
        if on_round:
            on_round(summary)
        k += 1
    return summaries


def after_round_hooks(settings) -> tuple:
    """The collector's after-round hooks: the CrowdSec sync and its fleet-view samples when
    ``crowdsec.lapi_url`` is set (the fleet is imported only then; bounded in time, never raises)."""
    if not settings.crowdsec.lapi_url:
        return ()

    def crowdsec_sync(conn, settings) -> None:
        from app.services.fleet import crowdsec, view
        crowdsec.sync_round(conn, settings)
        view.write_sync(conn, settings)
    return (crowdsec_sync,)


def run_collection(settings, interface: str, round_seconds: float, n_rounds: int,
                   on_round: Callable[[RoundSummary], None] | None = None, with_threads: bool = True,
                   stop: threading.Event | None = None,
                   on_start: Callable[[Collector], None] | None = None, takeover: bool = False,
                   replace: bool = False) -> list[RoundSummary]:
    """The `collect` job: SIGTERM ends it after the current round; it is bounded in run time
    (collector.max_run_seconds, default rounds x round_seconds + 120 s) by SIGALRM.
    on_start(collector): called once the program is attached and the maps are open (its
    ``load_state`` says the mode and whether this run compiled), before the first round."""
    stop = stop or threading.Event()
    limit = settings.collector.max_run_seconds or (n_rounds * round_seconds + 120 if n_rounds else 0)

    def on_alarm(signum, frame):
        raise RunTimeExceeded(f"the collection exceeded its run-time bound of {limit:.0f} s and was stopped "
                              "(the round in progress was not written; the next run counts it)")

    def on_term(signum, frame):
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    old_alarm = old_term = None
    if in_main:
        old_term = signal.signal(signal.SIGTERM, on_term)
        if limit:
            old_alarm = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        with Collector(settings, interface, takeover=takeover, replace=replace,
                       after_round=after_round_hooks(settings)) as collector:
            if on_start:
                on_start(collector)
            return collect_rounds(collector, round_seconds, n_rounds, stop, on_round, with_threads)
    finally:
        if in_main:
            if limit:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_alarm)
            signal.signal(signal.SIGTERM, old_term)
