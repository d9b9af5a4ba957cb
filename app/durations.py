"""The one duration parser: ``90``, ``90s``, ``15m``, ``1h``, ``7d``, ``2w`` (and fractions, ``1.5h``).

    seconds(text) -> float             ValueError with the reason (the caller names the key or flag)
    flag(name, value, ...) -> float    UsageError naming the flag (exit 2)
    arg(name, ...)                     an argparse ``type=`` that checks kind (finite, sign) at parse time

A plain number is seconds. NaN, infinities and negative values are always refused; zero only where the
caller allows it; ``maximum`` bounds the value (e.g. ``blocklist.max_ttl_seconds`` for a TTL; a duration
flag is never above MAX_SECONDS, and its setting's range in app/config_rules.py applies on top).
"""
from __future__ import annotations

import argparse
import math
import re

from app.errors import UsageError

UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([smhdw]?)\s*$", re.IGNORECASE)
EXAMPLES = "like 90, 15m, 1h or 7d"
MAX_SECONDS = 100 * 366 * 86400.0      # no duration flag means more than a century (a typo: 1e12, 1e308)


def seconds(value, *, allow_zero: bool = False, maximum: float | None = None) -> float:
    """``value`` (a number or a string with an optional unit) in seconds; ValueError says what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration {EXAMPLES}, not {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise ValueError(f"must be a finite duration {EXAMPLES}, not {text!r}")
        if text.startswith("-"):
            raise ValueError(f"must not be negative, got {text!r}")
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(f"must be a duration {EXAMPLES}, not {text!r}")
        mantissa, exponent, unit = match.groups()
        number = float(mantissa + (f"e{exponent}" if exponent else "")) * UNIT_SECONDS[unit.lower()]
    if not math.isfinite(number):
        raise ValueError(f"must be a finite duration {EXAMPLES}, not {value!r}")
    if number < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if number == 0 and not allow_zero:
        raise ValueError(f"must be above 0, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be at most {describe(maximum)} ({maximum:g} s), got {value!r}")
    return number


def flag(name: str, value, *, allow_zero: bool = False, maximum: float | None = MAX_SECONDS) -> float | None:
    """``value`` of command-line flag ``name`` in seconds (None stays None); UsageError names the flag."""
    if value is None:
        return None
    try:
        return seconds(value, allow_zero=allow_zero, maximum=maximum)
    except ValueError as exc:
        raise UsageError(f"{name} {exc}") from None


def arg(allow_zero: bool = False, maximum: float | None = MAX_SECONDS):
    """An argparse ``type=`` for a duration flag (argparse names the flag and exits 2)."""
    def parse(text: str) -> float:
        try:
            return seconds(text, allow_zero=allow_zero, maximum=maximum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = "duration"
    return parse


def describe(value: float) -> str:
    """A short human form: ``7d``, ``1.5h``, ``90s``."""
    for unit in ("d", "h", "m"):
        if value >= UNIT_SECONDS[unit] and value % (UNIT_SECONDS[unit] / 2) == 0:
            return f"{value / UNIT_SECONDS[unit]:g}{unit}"
    return f"{value:g}s"
