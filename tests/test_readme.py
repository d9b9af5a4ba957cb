"""The README's command table against the parser: every subcommand and every long option the parser
knows appears in the table (a new option fails here until its README row names it), and every
command's --help has a description and the exit-code footer. Generic: it walks app/cli.py's parser."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from app.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
COMMON = {"--help", "--config", "--db", "--verbose", "--quiet"}       # said once, above the table


def parsers(parser=None, prefix=()) -> dict[tuple, argparse.ArgumentParser]:
    """Every parser by its command path: () the top level, ('anomalies',), ('anomalies', 'list'), ..."""
    parser = parser or build_parser()
    out = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(parsers(sub, (*prefix, name)))
    return out


def leaves() -> dict[tuple, argparse.ArgumentParser]:
    found = parsers()
    return {path: p for path, p in found.items()
            if path and not any(other[:len(path)] == path and other != path for other in found)}


def long_options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


def table() -> tuple[str, list[str]]:
    """(the text above the table, the command cell of every row that runs python -m app)."""
    section = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    intro = section.split("\n| command |", 1)[0]
    cells = [m.group(1) for m in re.finditer(r"^\| `(python -m app [^`]*)`", section, re.M)]
    return intro, cells


def _word(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")


def test_every_subcommand_and_option_is_in_the_readme_table():
    intro, cells = table()
    assert all(_word(o).search(intro) for o in COMMON), "the options every command takes are said above the table"
    missing = []
    for path, parser in sorted(leaves().items()):
        command = f"python -m app {path[0]}"
        rows = [c for c in cells if c == command or c.startswith(command + " ")]
        rows = [c for c in rows if all(_word(word).search(c) for word in path[1:])]
        if not rows:
            missing.append(f"no row for `{' '.join(path)}`")
            continue
        for option in sorted(long_options(parser) - COMMON):
            if not any(_word(option).search(c) for c in rows):
                missing.append(f"`{' '.join(path)} {option}`")
    assert not missing, "README command table lacks: " + "; ".join(missing)


def test_every_help_has_a_description_and_the_exit_codes():
    lacking = []
    for path, parser in parsers().items():
        if not (parser.description or "").strip():
            lacking.append(f"{' '.join(path) or 'portwatch'}: no description")
        if "exit codes:" not in (parser.epilog or ""):
            lacking.append(f"{' '.join(path) or 'portwatch'}: no exit-code footer")
    assert not lacking, lacking
