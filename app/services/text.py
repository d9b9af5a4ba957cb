"""Words that depend on a count: "1 anomaly", "2 anomalies", "5 listeners gone" (one home for them)."""
from __future__ import annotations

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
