"""Cron entry point: one collection (the same as `python -m app collect`).

Works from cron's bare environment: run it with the venv's absolute python path; it finds its
package from its own location, not from the working directory or PATH.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.cli import main  # noqa: E402


def run(argv=None) -> int:
    return main(["collect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run())
