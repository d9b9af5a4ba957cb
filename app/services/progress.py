"""Progress for a person at a terminal: one self-overwriting line on stderr while something slow runs
(the BCC compile of the XDP program, each model fit). Nothing at all when stderr is not a terminal
(cron, pipes, tests): the log keeps the facts there. The one place below the CLI that writes to a
terminal, and only this line.

    with ticking("compiling the XDP program for eth0 (BCC)"):   # '... 3 s' rewritten every second
        slow()
    line("fitting the model on 960 windows: epoch 2/8")          # '\r' line; final=True ends it
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator


def enabled() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def line(text: str, final: bool = False) -> None:
    """Rewrite the progress line with ``text`` (ended by a newline when ``final``)."""
    if enabled():
        sys.stderr.write(f"\r\x1b[K{text}" + ("\n" if final else ""))
        sys.stderr.flush()


@contextmanager
def ticking(text: str, every: float = 1.0) -> Iterator[None]:
    """'text... N s' on the progress line while the block runs; 'text: done in N s' after it."""
    if not enabled():
        yield
        return
    started = time.monotonic()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            line(f"{text}... {time.monotonic() - started:.0f} s")

    line(f"{text}...")
    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        ticker.join(timeout=2)
        line(f"{text}: {'done' if ok else 'failed'} in {time.monotonic() - started:.1f} s", final=True)
