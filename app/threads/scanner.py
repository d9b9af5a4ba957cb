"""ScannerThread: port occupancy for one round (the work is app.services.collector.scanner).

Two scans, at the round's start and at its end, catch a listener that existed for only part of the
round, which matters for folding: a port listened on at either end is not folded into the ephemeral
bucket. A listener that came and went between the two scans is not seen. Schedule and use:
:class:`ScannerThread`.
"""
from __future__ import annotations

import logging

from app.config import Scanner as ScannerConfig
from app.services.collector.scanner import Listener, Scanner, merge_scans
from app.threads.base import WorkerThread

log = logging.getLogger(__name__)


class ScannerThread(WorkerThread):
    """Scans at the start and at the end of a round; ``result`` is ``list[Listener]``.

    One scan when the thread starts (the round's beginning) and one when the round ends (:meth:`stop`,
    or ``round_seconds`` after the start, whichever comes first); :attr:`result` is their union
    (:func:`merge_scans`). round_seconds: the latest the end-of-round scan happens without a
    :meth:`stop` (seconds); None waits for :meth:`stop`. Collector use::

        scanner = ScannerThread(settings.scanner, round_seconds=settings.collector.round_seconds)
        scanner.start()
        ...                                  # the round
        scanner.stop(); scanner.join(timeout)
        scanner.status                       # 'ok', 'disabled', 'error: ...'
        scanner.result                       # [Listener, ...] or None when it failed or is disabled
    """

    def __init__(self, config: ScannerConfig | None = None, round_seconds: float | None = None,
                 scanner: Scanner | None = None):
        config = config or ScannerConfig()
        super().__init__(name="scanner", enabled=config.enabled)
        self.round_seconds = round_seconds
        self.scanner = scanner or Scanner()
        self.first_scan: list[Listener] | None = None

    def work(self) -> list[Listener]:
        self.first_scan = self.scanner.scan()
        self.wait(self.round_seconds)
        last_scan = self.scanner.scan()
        listeners = merge_scans(self.first_scan, last_scan)
        log.debug("scanner: %d listeners (%d at start, %d at end)", len(listeners), len(self.first_scan),
                  len(last_scan))
        return listeners
