"""Shared fixtures.

Kernel tests (marked ``kernel``) need root, BPF and network namespaces. Outside CI they skip
with a reason when those are missing; under CI=true a missing capability is a FAILURE, never
a skip (house rule: kernel tests must run in CI).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (run the suite with sudo make test)"
    if not shutil.which("ip"):
        return "needs iproute2's ip"
    if not Path("/sys/fs/bpf").exists():
        return "needs the BPF filesystem"
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], capture_output=True)
        if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
            return "cannot mount bpffs on /sys/fs/bpf"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kernel_unavailable_reason()
    if reason is None or not any("kernel" in item.keywords for item in items):
        return
    if IN_CI:
        raise pytest.UsageError(f"CI=true but the kernel tests cannot run: {reason}")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a kernel test that skipped itself anyway is a failure."""
    if not IN_CI:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (tr.stats.get("skipped", []) if tr else []) if "kernel" in r.keywords]
    if skipped:
        tr.write_line(f"CI=true: {len(skipped)} kernel test(s) were skipped: that is a failure", red=True)
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def private_run_dir(tmp_path_factory):
    """Lock files of every portwatch run the suite starts (in-process or a subprocess that inherits
    the environment) go to a private directory, never the machine's /run/portwatch."""
    run_dir = tmp_path_factory.mktemp("run")
    before = os.environ.get("PORTWATCH_RUN_DIR")
    os.environ["PORTWATCH_RUN_DIR"] = str(run_dir)
    yield run_dir
    if before is None:
        os.environ.pop("PORTWATCH_RUN_DIR", None)
    else:
        os.environ["PORTWATCH_RUN_DIR"] = before
    shutil.rmtree(run_dir, ignore_errors=True)


_counter = [0]


def unique_prefix(tag: str) -> str:
    """A short, unique name prefix for namespaces/links of one test (<= 10 chars)."""
    _counter[0] += 1
    base = os.environ.get("PW_TEST_PREFIX", "pwt")[:4]
    return f"{base}{tag[:2]}{os.getpid() % 100:02d}{_counter[0] % 100:02d}"


@pytest.fixture
def lab(request):
    """A root-namespace veth end (lab.interface) joined to a peer namespace with test hosts.

    Cleans up the namespace, the link, attached XDP and the pins for that interface, even when
    the test fails.
    """
    from app.lab import Lab
    tag = request.node.name.replace("test_", "")
    # Parallel runs on one machine (helpers, bench) each take their own band of 198.18.<n>.0/24:
    # PW_TEST_SUBNETS="40-79" (default 20-219).
    low, high = (int(x) for x in os.environ.get("PW_TEST_SUBNETS", "20-219").split("-"))
    subnet = (os.getpid() + _counter[0] * 7) % (high - low + 1) + low
    the_lab = Lab(prefix=unique_prefix(tag), subnet=subnet)
    try:
        the_lab.create()
        yield the_lab
    finally:
        the_lab.destroy()
        shutil.rmtree(f"/sys/fs/bpf/portwatch/{the_lab.interface}", ignore_errors=True)
        # the interface lock lives at a fixed place (app/services/locks.py): no file left per test link
        Path(f"/run/portwatch/interfaces/{the_lab.interface}.lock").unlink(missing_ok=True)
        pin_root = Path("/sys/fs/bpf/portwatch")
        if pin_root.exists() and not any(pin_root.iterdir()):
            pin_root.rmdir()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "ports.db"


@pytest.fixture
def state_env(tmp_path, monkeypatch):
    """Point every portwatch path into tmp_path (state dir, db, and a pin root with no pins, so
    nothing a test decides can reach a real pinned map of this machine)."""
    monkeypatch.setenv("PORTWATCH_DB", str(tmp_path / "ports.db"))
    monkeypatch.setenv("PORTWATCH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PORTWATCH_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("PORTWATCH_PIN_ROOT", str(tmp_path / "no-pins"))
    monkeypatch.setenv("PORTWATCH_REPORTS_OUT_DIR", str(tmp_path / "reports"))   # the hourly job's report
    monkeypatch.setenv("PORTWATCH_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    return tmp_path


_SAVED: list[str] = []


@pytest.fixture(scope="session")
def saved():
    """saved(line): name a file a test leaves for people to look at (a screenshot, a figure); the
    session's summary lists them under "saved by the tests", failed or not."""
    return _SAVED.append


def pytest_terminal_summary(terminalreporter):
    if _SAVED:
        terminalreporter.section("saved by the tests")
        for line in _SAVED:
            terminalreporter.write_line(line)
