"""SnifferThread: the packet-metadata sample of one round (the work is app.services.collector.sniffer).

The capture starts with the thread (the round's beginning) and lasts ``window_fraction x round_seconds``
(45 s of a 60 s round), capped at ``max_packets``; the thread ends by itself shortly after (tshark drain
+ cleanup, a few seconds at most), well before the round ends. :meth:`~SnifferThread.stop` ends the window
early (SIGTERM, run-time bound). Use, and a host without tshark: :class:`SnifferThread`.
"""
from __future__ import annotations

import logging
import os
import threading

from app.config import Sniffer as SnifferConfig
from app.errors import DependencyError
from app.services.collector.sniffer import PacketRecord, SniffResult, Sniffer, window_seconds
from app.threads.base import WorkerThread

log = logging.getLogger(__name__)

STATUS_NO_TSHARK = "no-tshark"
_warned: set[str] = set()                 # dependency messages already logged by this process
_warned_lock = threading.Lock()


class SnifferThread(WorkerThread):
    """One bounded capture on ``interface``; ``result`` is ``list[PacketRecord]`` and
    ``sample`` the whole :class:`SniffResult`.

    round_seconds: the round's length (seconds), scaled by ``config.window_fraction``;
    temp_root: directory for the capture's private temp directory (None: the system's). Collector use::

        sniffer = SnifferThread(interface, settings.sniffer, round_seconds, temp_root=settings.state_path)
        sniffer.start()
        ...                                  # the round
        sniffer.join(timeout)                # no stop(): the window is already bounded
        sniffer.status                       # 'ok', 'disabled', 'no-tshark', 'error: ...'
        sniffer.result                       # [PacketRecord, ...] or None (for insert_packets)
        sniffer.sample                       # SniffResult: the records plus skipped, limit_reached, times
    """

    def __init__(self, interface: str, config: SnifferConfig, round_seconds: float,
                 temp_root: str | os.PathLike | None = None):
        super().__init__(name="sniffer", enabled=config.enabled)
        self.sample: SniffResult | None = None
        self.sniffer = Sniffer(interface, window_seconds(round_seconds, config.window_fraction),
                               max_packets=config.max_packets, bpf_filter=config.bpf_filter,
                               tshark_path=config.tshark_path, temp_root=temp_root,
                               stop_event=self.stop_event, drain_seconds=config.drain_seconds)

    def work(self) -> list[PacketRecord]:
        self.sample = self.sniffer.run()
        return self.sample.records

    def handle_error(self, exc: Exception) -> str:
        """Without tshark the thread ends at once with status 'no-tshark', :attr:`error` holding the
        DependencyError, and logs ONE warning sentence naming the fix - once per process, however many
        rounds a run has (later rounds log it at debug level); the collector records kernel and scanner
        data as usual and should not log it again."""
        if isinstance(exc, DependencyError):
            with _warned_lock:
                first = str(exc) not in _warned
                _warned.add(str(exc))
            log.log(logging.WARNING if first else logging.DEBUG, "packet sampling is off: %s", exc)
            return STATUS_NO_TSHARK
        return super().handle_error(exc)
