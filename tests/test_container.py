"""The container image, built and run: a Debian base bootstrapped from this machine's own package
sources (mmdebstrap --variant=minbase, the release read from /etc/os-release, the sources from
/etc/apt: none is named here), imported into podman, the Dockerfile built on it with
`podman build --isolation chroot --network host` (the machine's CA bundle and its own pip sources
mounted for pip, read from its configuration the same way), then the
image's filesystem (podman mount of a created container) run in a chroot: `portwatch --help`,
`doctor` and one `collect` round on a lab veth whose peer namespace sends traffic. (Containers
cannot be started here: the runtime's rlimits are refused; a chroot of the image's filesystem runs
the same files.) The build time and the image size are listed under "saved by the tests".

The base tarball is kept in build/container-base/ for a week (a clean checkout bootstraps it again);
podman's layer cache makes a rebuild with unchanged requirements quick.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "container-base"
CACHE_DAYS = 7
IMAGE = "localhost/portwatch:ci"
# what Docker's -slim images leave out, the same way (dpkg path excludes, kept for later installs)
SLIM = ["path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*"]

pytestmark = [pytest.mark.slow, pytest.mark.kernel]


def run(*cmd: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])}... exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def machine_release() -> str:
    """This machine's Debian release codename, e.g. 'bookworm' (from /etc/os-release)."""
    fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    codename = fields.get("VERSION_CODENAME", "").strip('"')
    assert codename, "/etc/os-release names no VERSION_CODENAME: not a Debian-like machine"
    return codename


def machine_sources(codename: str) -> list[str]:
    """mmdebstrap mirror arguments: this machine's apt sources for its own release (deb822 files by
    path, one-line entries as text); third-party sources for other suites are left out."""
    mirrors = []
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources" and re.search(rf"^Suites:.*\b{re.escape(codename)}\b", text, re.M):
            mirrors.append(str(path))
        elif path.name == "sources.list" or path.suffix == ".list":
            mirrors += [line.strip() for line in text.splitlines()
                        if line.strip().startswith("deb ") and f" {codename}" in line]
    assert mirrors, f"no apt source for {codename} in /etc/apt: cannot bootstrap a base"
    return mirrors


def base_image(codename: str) -> str:
    """localhost/portwatch-base:<codename>, bootstrapped (or taken from the week-old cache) and imported."""
    tag = f"localhost/portwatch-base:{codename}"
    tarball = CACHE / f"{codename}-minbase.tar"
    fresh = tarball.exists() and time.time() - tarball.stat().st_mtime < CACHE_DAYS * 86400
    if not fresh:
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        run("mmdebstrap", "--variant=minbase", "--format=tar", "--aptopt=Acquire::Languages \"none\"",
            *(f"--dpkgopt={o}" for o in SLIM), codename, str(partial), *machine_sources(codename), timeout=1200)
        partial.replace(tarball)
    if not fresh or run("podman", "image", "exists", tag, check=False).returncode != 0:
        run("podman", "import", str(tarball), tag, timeout=300)
    return tag


def ca_bundle() -> str:
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), paths.cafile,
                      paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("no CA bundle on this machine (install ca-certificates)")


def machine_pip_sources() -> list[str]:
    """podman build arguments that give the build this machine's own pip sources: its extra indexes
    and find-links (pip's configuration and PIP_* variables, read now), local ones mounted read-only
    at the same paths (an index's parent too: its pages link to files beside it). A wheel found
    there is not downloaded again; whatever they lack comes from PyPI as usual."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    found: dict[str, list[str]] = {"extra-index-url": [], "find-links": []}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in found:
            found[name] += [v for v in value.strip().strip("'\"").split() if v not in found[name]]
    args, mounts = [], set()
    for name, values in found.items():
        for value in values:
            local = Path(value[len("file://"):] if value.startswith("file://") else value)
            if value.startswith(("file://", "/")) and local.exists():
                mounts.add(local.parent if name == "extra-index-url" else local)
        if values:
            args += ["--build-arg", f"PIP_{name.upper().replace('-', '_')}={' '.join(values)}"]
    for path in sorted(mounts):
        args += ["-v", f"{path}:{path}:ro"]
    return args


def chroot(root: Path, *argv: str, timeout: float = 300, netns: str | None = None) -> subprocess.CompletedProcess:
    """argv in a chroot of ``root`` with the mounts the README's run flags give a container (proc, sys
    with bpffs, dev, the host's kernel headers read-only), in a private mount namespace: the mounts
    go away with the process."""
    script = ('set -e; r="$1"; shift; mount --rbind /proc "$r/proc"; mount --rbind /sys "$r/sys"; '
              'mount --rbind /dev "$r/dev"; for d in /lib/modules /usr/src; do mkdir -p "$r$d"; '
              'mount --rbind "$d" "$r$d"; mount -o remount,bind,ro "$r$d"; done; exec chroot "$r" "$@"')
    cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "bash", str(root), *argv]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                               "HOME": "/root", "LANG": "C.UTF-8"})


@pytest.fixture(scope="module")
def image(saved):
    for tool in ("podman", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is not installed: scripts/setup.sh installs it (make setup)"
    codename = machine_release()
    t0 = time.monotonic()
    base = base_image(codename)
    based = time.monotonic() - t0
    bundle = ca_bundle()
    t1 = time.monotonic()
    run("podman", "build", "--format", "docker", "--isolation", "chroot", "--network", "host", "--pull=never",
        "--build-arg", f"BASE={base}", "-v", f"{bundle}:/run/build-ca.crt:ro", "--build-arg",
        "PIP_CERT=/run/build-ca.crt", *machine_pip_sources(), "-t", IMAGE, str(REPO), timeout=1800)
    built = time.monotonic() - t1
    (info,) = json.loads(run("podman", "image", "inspect", IMAGE).stdout)
    saved(f"container image {IMAGE} on {base}: base {based:.0f} s, build {built:.0f} s, "
          f"{info['Size'] / 1e6:,.0f} MB")
    return info


@pytest.fixture(scope="module")
def rootfs(image):
    cid = run("podman", "create", IMAGE).stdout.strip()
    try:
        yield Path(run("podman", "mount", cid).stdout.strip())
    finally:
        run("podman", "umount", cid, check=False)
        run("podman", "rm", "-f", cid, check=False)


def test_image_healthcheck_runs_status(image):
    health = image.get("Healthcheck") or image.get("Config", {}).get("Healthcheck") or {}
    assert health.get("Test") == ["CMD", "portwatch", "status"], image.get("Config")


def test_image_holds_no_build_or_test_leftovers(rootfs):
    site = next((rootfs / "opt/portwatch/.venv/lib").glob("python3*/site-packages"))
    left = [p for p in ("tensorflow/include", "pytest", "scapy", "_pytest") if (site / p).exists()]
    assert not left, f"in the image's venv: {left}"
    assert not list((rootfs / "var/cache/apt/archives").glob("*.deb")), "downloaded .debs left in the image"
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages*")), "apt lists left in the image"
    assert not (rootfs / "root/.cache/pip").exists(), "a pip cache left in the image"
    assert (site / "app" / "_data" / "bpf" / "port_flow.c").is_file(), "portwatch is not installed as a wheel"


def test_image_runs_help_doctor_and_a_collect_round(rootfs, lab):
    help_ = chroot(rootfs, "portwatch", "--help")
    assert help_.returncode == 0 and "collect" in help_.stdout, help_.stdout + help_.stderr

    doctor = chroot(rootfs, "portwatch", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for row in ("kernel headers", "BCC", "data files", "python tensorflow", "tshark"):
        assert re.search(rf"^ok\s+{row}\b", doctor.stdout, re.M), f"doctor: {row}\n{doctor.stdout}"

    # one round on the lab's veth while its peer namespace sends UDP to this end throughout: the
    # compile before the round takes a while (bounded: at most 6,000 datagrams in 120 s, stopped after)
    sender = ("import socket, sys, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "end = time.monotonic() + 120\nfor _ in range(6000):\n    if time.monotonic() > end: break\n"
              "    s.sendto(b'portwatch' * 4, (sys.argv[1], 9)); time.sleep(0.02)\n")
    sender_proc = subprocess.Popen(["ip", "netns", "exec", lab.namespace, sys.executable, "-c", sender, lab.root_v4],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        collect = chroot(rootfs, "portwatch", "collect", "--interface", lab.interface, "--round-seconds", "4",
                         "--rounds", "1", timeout=400)
    finally:
        sender_proc.kill()
        sender_proc.wait()
    try:
        assert collect.returncode == 0, collect.stdout + collect.stderr
        rounds = chroot(rootfs, "sqlite3", "/var/lib/portwatch/ports.db",
                        "SELECT COUNT(*), SUM(total_packets), MIN(xdp_mode) FROM rounds")
        count, packets, mode = rounds.stdout.strip().split("|")
        assert int(count) == 1 and int(packets) > 0, rounds.stdout + rounds.stderr
        assert mode.startswith(("generic", "native")), mode
        status = chroot(rootfs, "portwatch", "status", "--interface", lab.interface)
        assert "Traceback" not in status.stderr, status.stderr
    finally:
        down = chroot(rootfs, "portwatch", "down", "--interface", lab.interface)
        assert down.returncode == 0, down.stdout + down.stderr
