"""`pip install .` outside the checkout: the wheel built from this tree carries every package under
app/ and the data files (bpf/*, init.sql, the Flower App), and the installed `portwatch` command runs
`--help`, `doctor`, `report` on a small store and `fleet status` from a directory that is not the
checkout.

Nothing is downloaded: the wheel is built with the shared venv's setuptools (--no-build-isolation,
--no-index), and the new venv sees the shared venv's third-party packages through a .pth file (a path
listed in a .pth is not a site directory, so the shared venv's editable portwatch stays invisible) and
Debian's bcc through --system-site-packages, as scripts/setup.sh makes the real one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from tests.ops_helpers import fill_database

REPO = Path(__file__).resolve().parent.parent
# what a checkout's top level holds besides the sources: never part of a build
NOT_SOURCES = {".venv", ".git", "build", ".pytest_cache", "reports", "var", "bench", "tests"}


def not_sources(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_SOURCES)}

pytestmark = pytest.mark.slow


def build_wheel(dest: Path) -> Path:
    """A copy of the checkout (the build writes build/ and *.egg-info where it runs) built into a wheel."""
    source = dest / "src"
    shutil.copytree(REPO, source, ignore=not_sources, symlinks=True)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--no-cache-dir", "-q", "-w", str(dest / "dist"), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (dest / "dist").glob("portwatch-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's bin dir, the wheel): the wheel installed, not editable, into a venv of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    subprocess.run([base_python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "shared-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    out = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "-q",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return venv / "bin", wheel


@pytest.fixture
def outside(tmp_path):
    """A working directory outside the checkout and an environment that names nothing in it."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "none.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PORTWATCH_", "VIRTUAL_ENV"))}
    env.update(PORTWATCH_CONFIG=str(work / "none.toml"), PORTWATCH_DB=str(work / "ports.db"),
               PORTWATCH_STATE_DIR=str(work / "state"), PORTWATCH_RUN_DIR=str(work / "run"),
               PORTWATCH_PIN_ROOT=str(work / "no-pins"), PORTWATCH_REPORTS_OUT_DIR=str(work / "reports"))
    return work, env


def portwatch(bin_dir: Path, work: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "portwatch"), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_every_package_and_the_data_files(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "app").rglob("__init__.py")
                if "__pycache__" not in p.parts}
    missing = {p for p in packages if f"{p}/__init__.py" not in names}
    assert not missing, f"packages left out of the wheel: {sorted(missing)}"
    modules = {str(p.relative_to(REPO)) for p in (REPO / "app").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, f"modules left out: {sorted(modules - names)[:10]}"
    data = {f"app/_data/{p.relative_to(REPO)}" for p in [REPO / "init.sql", *(REPO / "bpf").glob("*.[ch]")]}
    assert data <= names, f"data files left out: {sorted(data - names)}"
    flower = {str(p.relative_to(REPO)) for p in (REPO / "app").rglob("flower_app/**/*") if p.is_file()
              and "__pycache__" not in p.parts}
    assert flower and flower <= names, f"Flower App files left out: {sorted(flower - names)}"


def test_installed_command_runs_outside_the_checkout(installed, outside):
    bin_dir, _ = installed
    work, env = outside
    where = subprocess.run([str(bin_dir / "python"), "-c", "import app, app.resources as r; "
                            "print(app.__file__); print(r.BPF_DIR); print(r.INIT_SQL)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    venv = str(bin_dir.parent)
    assert all(line.startswith(venv) for line in where.stdout.split()), where.stdout    # not the checkout's

    help_ = portwatch(bin_dir, work, env, "--help", timeout=60)
    assert help_.returncode == 0 and "collect" in help_.stdout and "fleet" in help_.stdout, help_.stderr

    # the installed package creates the store from the wheel's own init.sql (as collect would)
    created = subprocess.run([str(bin_dir / "python"), "-c", "import sys; from app.db.connection import connect; "
                              "connect(sys.argv[1]).close()", str(work / "ports.db")],
                             cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stdout + created.stderr
    fill_database(work / "ports.db", end=time.time(), rounds=40)

    doctor = portwatch(bin_dir, work, env, "doctor")
    assert "Traceback" not in doctor.stderr, doctor.stderr
    rows = {line.split()[1] + " " + line.split()[2]: line.split()[0] for line in doctor.stdout.splitlines()
            if line[:4] in ("ok  ", "warn", "FAIL")}
    assert rows.get("data files") == "ok", doctor.stdout
    assert rows.get("python tensorflow") == "ok" and rows.get("python matplotlib") == "ok", doctor.stdout
    assert venv in doctor.stdout, doctor.stdout          # the data files it found are the installed copies

    report = portwatch(bin_dir, work, env, "report", "--out", str(work / "report"))
    assert report.returncode == 0, report.stdout + report.stderr
    assert (work / "report" / "index.html").stat().st_size > 0
    assert list((work / "report").glob("*.png")), sorted(p.name for p in (work / "report").iterdir())

    fleet = portwatch(bin_dir, work, env, "fleet", "status", "--json", timeout=120)
    assert fleet.returncode == 0, fleet.stdout + fleet.stderr
    assert fleet.stdout.lstrip().startswith("{"), fleet.stdout
    assert "Traceback" not in fleet.stderr + report.stderr
