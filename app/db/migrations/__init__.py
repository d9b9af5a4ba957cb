"""Numbered schema migrations, one SQL file each: ``NNN_what.sql`` upgrades a database from version
NNN-1 (version 1 is the first init.sql, which always creates the newest schema for a fresh database).
Each file opens with a comment saying why; numbers may have gaps (reserved by work not merged yet);
app/db/connection.py applies every number above a database's version in ascending order."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(directory: Path = HERE) -> dict[int, str]:
    """{version: SQL} of every ``NNN_*.sql`` in ``directory``; ValueError on a number used twice."""
    found: dict[int, str] = {}
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        number = int(path.name[:3])
        if number in found:
            raise ValueError(f"two schema migrations numbered {number} in {directory}")
        found[number] = path.read_text()
    return found


MIGRATIONS = load()
