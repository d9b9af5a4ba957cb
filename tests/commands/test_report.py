"""`python -m app report`: success path, bad --since, missing database, help."""
from __future__ import annotations

import time

import pytest

from app.cli import main
from tests.ops_helpers import empty_database, fill_database


def test_report_command_writes_the_report(state_env, capsys):
    db = state_env / "ports.db"
    fill_database(db, end=time.time() - 60, rounds=90)
    out = state_env / "report"
    assert main(["report", "--out", str(out), "--since", "7d"]) == 0
    assert capsys.readouterr().out.strip() == f"report written: {out / 'index.html'}"
    assert (out / "index.html").exists() and (out / "port_tcp_22.png").exists()


def test_report_command_on_an_empty_database(state_env, capsys):
    empty_database(state_env / "ports.db")
    assert main(["report", "--out", str(state_env / "r")]) == 0
    assert "No data yet" in (state_env / "r" / "index.html").read_text()


def test_report_command_uses_the_config_out_dir(state_env, monkeypatch, capsys):
    empty_database(state_env / "ports.db")
    monkeypatch.setenv("PORTWATCH_REPORTS_OUT_DIR", str(state_env / "from-env"))
    assert main(["report"]) == 0
    assert (state_env / "from-env" / "index.html").exists()


@pytest.mark.parametrize("argv, code, message", [
    (["report", "--out", "OUT", "--since", "last tuesday"], 2, "--since 'last tuesday' is neither"),
    (["report", "--out", "OUT", "--top-ports", "-1"], 2, "--top-ports must be 0 or more"),
    (["report", "--out", "OUT", "--db", "ABSENT"], 4, "does not exist yet"),
])
def test_report_command_errors(state_env, capsys, argv, code, message):
    empty_database(state_env / "ports.db")
    argv = [a.replace("OUT", str(state_env / "r")).replace("ABSENT", str(state_env / "absent.db")) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("portwatch: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_report_command_unwritable_output(state_env, capsys):
    empty_database(state_env / "ports.db")
    (state_env / "file").write_text("")
    assert main(["report", "--out", str(state_env / "file" / "sub")]) == 1
    assert "cannot write the report" in capsys.readouterr().err
