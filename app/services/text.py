"""Text for people: untrusted strings made inert (:func:`inert`, :func:`inert_lines`, :func:`json_dumps`,
:class:`InertStream`, :class:`InertFormatter`), times that never crash a reader (:func:`utc`, :func:`when`),
words that depend on a count (:func:`counted`: "1 anomaly", "2 anomalies").

Why every untrusted string passes through :func:`inert`: its docstring. A shared leaf: imports nothing of portwatch.
"""
from __future__ import annotations

import json
import logging
import re
import time

# C0 controls (tab and newline included: one finding stays one line), DEL, C1 controls, lone surrogates
# (bytes that were not UTF-8, kept by surrogateescape) and the Unicode line/paragraph separators and
# bidi overrides a terminal or browser would act on
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\t\n{_CONTROLS}]")
_UNSAFE_IN_LINES = re.compile(f"[{_CONTROLS}]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def inert_lines(text: str) -> str:
    """``text`` with every control character but newline and tab escaped."""
    return _UNSAFE_IN_LINES.sub(_escape, text)


def json_dumps(obj, **kw) -> str:
    """JSON text holding no raw control character: ASCII only, DEL escaped too (json leaves it raw)."""
    kw["ensure_ascii"] = True
    return json.dumps(obj, **kw).replace("\x7f", "\\u007f")


class InertStream:
    """Wraps a text stream: everything written goes through :func:`inert_lines` (``raw`` bypasses it, for
    the few control sequences portwatch itself sends: ``top``'s clear-screen)."""

    def __init__(self, stream):
        self.raw = stream

    def write(self, s: str) -> int:
        self.raw.write(inert_lines(s))
        return len(s)

    def __getattr__(self, name):
        return getattr(self.raw, name)


class InertFormatter(logging.Formatter):
    """A logging formatter whose records are :func:`inert_lines` (the CLI's log handler)."""

    def format(self, record: logging.LogRecord) -> str:
        return inert_lines(super().format(record))


def inert(value) -> str:
    """``value`` as text with every control character (``_CONTROLS``: C0, DEL, C1, lone surrogates, line
    separators, bidi overrides) escaped as \\xNN / \\uNNNN (None -> '').

    Every string that comes from the network or from another user (process and user names, DNS and TLS
    names, HTTP hosts, CrowdSec scenarios and messages) is stored as received and passed through
    :func:`inert` on its way to any text output — a terminal, a log line, an alert, HTML or JSON — so a
    listener named ``ESC]0;owned BEL`` can neither retitle nor clear root's terminal. The CLI also writes
    its whole stdout through :class:`InertStream` and its logs through :class:`InertFormatter`, so a
    string some output forgot still reaches the terminal inert (only a newline or tab of it survives there:
    the explicit :func:`inert` at each field is what keeps one record on one line).
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="surrogateescape")
    text = str(value)
    return _UNSAFE.sub(_escape, text)


def inert_all(value):
    """``value`` with :func:`inert` applied to every string inside (dicts, lists, tuples); for JSON outputs."""
    if isinstance(value, str):
        return inert(value)
    if isinstance(value, dict):
        return {inert_all(k) if isinstance(k, str) else k: inert_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [inert_all(v) for v in value]
    return value


def utc(t, seconds: bool = True, iso: bool = False, missing: str | None = "-") -> str | None:
    """Unix time ``t`` as UTC text; ``missing`` ('-') for None; a value out of the calendar's range (a
    stored 1e18) as 'at <t> s (out of range)' — a reader shows it and goes on."""
    if t is None:
        return missing
    fmt = "%Y-%m-%dT%H:%M:%SZ" if iso else ("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")
    try:
        return time.strftime(fmt, time.gmtime(float(t)))
    except (OverflowError, OSError, ValueError, TypeError):
        return f"at {t!r} s (out of range)"


# the plurals that are not the singular plus "s"
_IRREGULAR = {"anomaly": "anomalies", "entry": "entries", "listener gone": "listeners gone",
              "new listener": "new listeners", "address": "addresses", "process": "processes",
              "process change": "process changes"}


def plural(n: int, singular: str, many: str | None = None) -> str:
    """``singular`` for n == 1, else its plural (``many``, a known irregular one, or singular + 's')."""
    if n == 1:
        return singular
    return many or _IRREGULAR.get(singular, singular + "s")


def counted(n: int, singular: str, many: str | None = None) -> str:
    """'1 anomaly', '3 anomalies', '5 listeners gone'."""
    return f"{n} {plural(n, singular, many)}"


def duration(seconds: float) -> str:
    """A span in the unit a person reads best: '45 s', '12 min', '3.5 h', '2.1 days'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def when(t: float | None, now: float, missing: str = "-") -> str:
    """A timestamp with its age: '2026-12-02 19:05:07 UTC (12 min ago)'; ``missing`` when t is None."""
    if t is None:
        return missing
    return f"{utc(t)} ({duration(now - t)} ago)"
