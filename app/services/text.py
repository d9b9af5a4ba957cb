"""Words portwatch prints, one home each: counts ("1 anomaly", "2 anomalies", "5 listeners gone"), UTC
timestamps and "how long ago" text. A shared leaf: standard library only."""
from __future__ import annotations

import time

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


def utc(t: float | None, seconds: bool = True, missing: str | None = "-") -> str | None:
    """Epoch seconds as '2026-12-02 19:05:07 UTC' ('... 19:05 UTC' without ``seconds``); ``missing``
    when t is None."""
    if t is None:
        return missing
    return time.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC", time.gmtime(t))


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
