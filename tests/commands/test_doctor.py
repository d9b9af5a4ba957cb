"""`python -m app doctor`: every check says ok/warn/FAIL with a fix; essential failures exit non-zero."""
from __future__ import annotations

import json

import pytest

from app.cli import main
from app.commands import doctor
from tests.ops_helpers import empty_database


def test_doctor_json_lists_every_check(state_env, capsys):
    empty_database(state_env / "ports.db")
    code = main(["doctor", "--json"])
    data = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in data["checks"]}
    assert {"root", "kernel BPF", "bpffs", "kernel headers", "BCC", "ip", "tshark", "free disk",
            "python psutil", "python tensorflow", "database"} <= names
    for check in data["checks"]:
        assert check["status"] in ("ok", "warn", "FAIL")
        if check["status"] != "ok":
            assert check["fix"], f"{check['name']} says no fix"
    failed = [c for c in data["checks"] if c["status"] == "FAIL"]
    assert data["ok"] is (not failed)
    assert (code == 0) is (not failed)


def test_doctor_text_reports_a_failure_with_its_fix(state_env, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "MODULES_DIR", tmp_path / "no-modules")
    monkeypatch.setattr(doctor, "PROC_MOUNTS", tmp_path / "mounts")
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\n")
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code != 0
    assert "FAIL  bpffs" in out and "fix: mount -t bpf bpf /sys/fs/bpf" in out
    assert "FAIL  kernel headers" in out and "linux-headers-" in out
    assert "essential checks failed" in out


def test_doctor_corrupt_database_exits_with_the_database_code(state_env, capsys, monkeypatch):
    (state_env / "ports.db").write_text("not sqlite" * 100)
    for name in ("check_root", "check_kernel_bpf", "check_bpffs", "check_headers", "check_bcc"):
        monkeypatch.setattr(doctor, name, lambda: doctor.Check("stub", "ok", "stubbed"))
    monkeypatch.setattr(doctor, "check_modules", lambda: [])
    assert main(["doctor"]) == 4
    assert "FAIL  database" in capsys.readouterr().out


def test_individual_checks(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("bpf /sys/fs/bpf bpf rw,relatime 0 0\n")
    monkeypatch.setattr(doctor, "PROC_MOUNTS", mounts)
    assert doctor.check_bpffs().status == "ok"
    assert doctor.check_program("sh", True, "dash", "a shell").status == "ok"
    missing = doctor.check_program("pw-no-such-tool", False, "pkg", "nothing")
    assert missing.status == "warn" and missing.fix == "apt-get install pkg"
    assert doctor.check_program("pw-no-such-tool", True, "pkg", "x").exit_code == 7
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 1 << 62)
    assert doctor.check_disk(tmp_path / "deep" / "ports.db").status == "FAIL"
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 1000)
    assert doctor.check_root().exit_code == 3
    assert doctor.check_database(tmp_path / "absent.db").status == "warn"


def test_doctor_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--help"])
    assert exc.value.code == 0 and "fix each problem" in capsys.readouterr().out.replace("\n", " ")


def test_doctor_fails_without_the_data_files(state_env, capsys, monkeypatch, tmp_path):
    """An install that lost bpf/ or init.sql (a wheel built without them) is an essential failure."""
    from app import resources
    from app.errors import EXIT_DEPENDENCY
    empty_database(state_env / "ports.db")
    assert doctor.check_data_files().status == "ok"
    monkeypatch.setattr(resources, "BPF_DIR", tmp_path / "no-bpf")
    check = doctor.check_data_files()
    assert check.status == "FAIL" and check.exit_code == EXIT_DEPENDENCY
    assert str(tmp_path / "no-bpf" / "port_flow.c") in check.detail and "pip install ." in check.fix
