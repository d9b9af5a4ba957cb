"""crontab.example at the repository root: every entry parses (5 time fields in range + command),
sets a root-only umask, takes no lock of its own in a world-writable directory (each job locks in
general.run_dir itself), uses absolute paths under /opt/portwatch, logs, and names entry points that
exist in this repository."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_ROOT = "/opt/portwatch"
RANGES = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]
NAMES = {3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
         4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]}
SPECIAL = {"@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\s*=")


def _value(text: str, index: int) -> int:
    names = NAMES.get(index, [])
    if text.lower() in names:
        return names.index(text.lower()) + (1 if index == 3 else 0)
    if not text.isdigit():
        raise ValueError(f"{RANGES[index][0]} {text!r} is not a number")
    return int(text)


def check_field(field: str, index: int) -> None:
    """Raise ValueError unless ``field`` is valid cron syntax within its range (vixie cron)."""
    name, low, high = RANGES[index]
    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"{name} step {step!r} is not a positive number")
        if base == "*":
            continue
        first, _, last = base.partition("-")
        a = _value(first, index)
        b = _value(last, index) if last else a
        for v in (a, b):
            if not low <= v <= high:
                raise ValueError(f"{name} {v} is outside {low}-{high}")
        if b < a:
            raise ValueError(f"{name} range {base} runs backwards")


def parse_crontab(text: str, with_user: bool = False) -> list[dict]:
    """Entries of a crontab; raises ValueError for a line that is not a valid entry."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ENV_LINE.match(stripped):
            continue
        words = stripped.split()
        if words[0] in SPECIAL:
            schedule, rest = [words[0]], stripped.split(None, 1)[1:]
        else:
            if len(words) < 6 + with_user:
                raise ValueError(f"line {number}: needs 5 time fields{', a user' if with_user else ''} and a command")
            schedule = words[:5]
            for index, field in enumerate(schedule):
                try:
                    check_field(field, index)
                except ValueError as exc:
                    raise ValueError(f"line {number}: {exc}") from None
            rest = stripped.split(None, 5)[5:]
        command = rest[0] if rest else ""
        user = None
        if with_user:
            user, _, command = command.partition(" ")
            command = command.strip()
        if not command:
            raise ValueError(f"line {number}: no command")
        entries.append({"line": number, "schedule": schedule, "user": user, "command": command})
    return entries


def test_crontab_example_parses():
    entries = parse_crontab((REPO / "crontab.example").read_text())
    assert [e["schedule"] for e in entries] == [["*", "*", "*", "*", "*"], ["7", "*", "*", "*", "*"],
                                                ["23", "3", "*", "*", "*"]]


def test_crontab_example_commands():
    entries = parse_crontab((REPO / "crontab.example").read_text())
    scripts = []
    for entry in entries:
        words = shlex.split(entry["command"])
        assert words[:3] == ["umask", "077", "&&"], entry["command"]
        assert "flock" not in words and "/run/lock" not in entry["command"]
        assert ">>" in words and words[words.index(">>") + 1].startswith("/var/log/portwatch/")
        assert words[-1] == "2>&1"
        python = f"{INSTALL_ROOT}/.venv/bin/python"
        assert python in words
        for word in words:
            if "/" in word and not word.startswith(("2>", "/run/", "/var/", ">")):
                assert word.startswith(INSTALL_ROOT), f"relative or foreign path {word!r}"
        after = words[words.index(python) + 1:]
        if after[0] == "-m":
            assert after[1:3] == ["app", "cleanup"] and words[3:6] == ["cd", INSTALL_ROOT, "&&"]
            scripts.append("cleanup")
        else:
            script = after[0]
            assert script.startswith(f"{INSTALL_ROOT}/app/")
            assert (REPO / script[len(INSTALL_ROOT) + 1:]).is_file(), f"{script} does not exist in the repository"
            scripts.append(Path(script).name)
    assert scripts == ["port_collector.py", "port_detector.py", "cleanup"]


def test_crontab_example_names_existing_commands():
    from app.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "cleanup" in commands and "collect" in commands and "evaluate" in commands
    collect_options = {o for a in commands["collect"]._actions for o in a.option_strings}
    assert "--round-seconds" in collect_options


@pytest.mark.parametrize("line", ["60 * * * * x", "* 24 * * * x", "* * 0 * * x", "* * * 13 * x", "* * * * 8 x",
                                  "*/0 * * * * x", "5-1 * * * * x", "* * * * x", "a * * * * x"])
def test_parser_rejects_bad_entries(line):
    with pytest.raises(ValueError):
        parse_crontab(line)


def test_parser_accepts_valid_forms():
    text = "MAILTO=root\n*/5 0-6,22 1-31/2 jan-mar mon-fri cmd\n@daily cmd\n0 0 * * 7 cmd\n"
    assert len(parse_crontab(text)) == 3
