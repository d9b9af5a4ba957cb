"""ScannerThread: scans at start and end of a round; the result is their union."""
from __future__ import annotations

import socket

from app.config import Scanner as ScannerConfig
from app.threads.scanner import ScannerThread


def test_listener_opened_during_the_round_is_in_the_result():
    thread = ScannerThread(ScannerConfig(), round_seconds=30)
    thread.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        while thread.first_scan is None and thread.is_alive():
            thread.wait(0.01)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        thread.stop()
        thread.join(10)
    finally:
        sock.close()
    assert not thread.is_alive()
    assert thread.status == "ok"
    assert (port, "tcp") not in {(x.port, x.protocol) for x in thread.first_scan}
    assert (port, "tcp") in {(x.port, x.protocol) for x in thread.result}


def test_round_seconds_bounds_the_thread_without_stop():
    thread = ScannerThread(ScannerConfig(), round_seconds=0.2)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and thread.status == "ok"


def test_disabled_scanner():
    thread = ScannerThread(ScannerConfig(enabled=False))
    thread.start()
    thread.join(5)
    assert (thread.status, thread.result) == ("disabled", None)
