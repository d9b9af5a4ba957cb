"""`python -m app doctor [--json]`: check what portwatch needs on this host and say how to fix each gap.

Checks: root, kernel BPF support, bpffs mounted, kernel headers for BCC, BCC's Python module,
iproute2, tshark and cron, free disk under the database, the venv's imports, the database, the
modes of what portwatch keeps (never world-readable; ``--fix-modes`` tightens them), and once a
database exists the health checks ``status`` exits on (app/services/ops/health.py: 'health <name>').
Each result is ok, warn (portwatch runs with less: e.g. no tshark means no DNS names) or FAIL
(an essential piece is missing). Exit code: 0 when nothing essential fails, else the code of the
first failed essential check (1 a health check, 3 root, 4 database, 5 kernel/BPF, 7 missing dependency).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from app.commands.registry import add_command
from app.errors import EXIT_BPF, EXIT_DB, EXIT_DEPENDENCY, EXIT_ROOT
from app.services.text import counted, json_dumps

DESCRIPTION = """Check this host for what portwatch needs (root, kernel BPF support, bpffs, kernel
headers for BCC, BCC, iproute2, tshark, cron, free disk, the venv's packages, the database, the file
modes) and print how to fix each problem. Exit 0 when every essential check passes. --fix-modes first
gives the database, state, reports, logs and locks their modes (0600/0700, or 0640/2750 for
general.group)."""

# where the checks look (module constants so tests can point them elsewhere)
PROC_MOUNTS = Path("/proc/mounts")
BPF_FS = Path("/sys/fs/bpf")
BPF_SYSCTL = Path("/proc/sys/kernel/unprivileged_bpf_disabled")
MODULES_DIR = Path("/lib/modules")
MIN_FREE_BYTES = 200 * 1024 * 1024          # below this: FAIL (rounds cannot be written for long)
WARN_FREE_BYTES = 1024 * 1024 * 1024        # below this: warn
MIN_KERNEL = (4, 18)                        # XDP generic mode, BPF_F_* map flags, bpffs pins
# module -> (essential, what needs it)
PYTHON_MODULES = {
    "psutil": (True, "the scanner (listening ports)"),
    "numpy": (True, "the evaluator"),
    "sklearn": (True, "the evaluator (scalers)"),
    "tensorflow": (True, "the CNN-LSTM autoencoder"),
    "matplotlib": (False, "the report"),
    "pyshark": (False, "the sniffer (DNS names, protocols)"),
    "pyroute2": (False, "the network-namespace lab and demo"),
}


@dataclass
class Check:
    name: str
    status: str            # 'ok', 'warn', 'FAIL'
    detail: str
    fix: str = ""
    exit_code: int = 0     # for a FAIL: the exit code it maps to


def _ok(name, detail):
    return Check(name, "ok", detail)


def check_root() -> Check:
    if os.geteuid() == 0:
        return _ok("root", "running as root")
    return Check("root", "FAIL", f"running as uid {os.geteuid()}", "run as root: sudo .venv/bin/python -m app ...",
                 EXIT_ROOT)


def _kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def check_kernel_bpf() -> Check:
    version = _kernel_version()
    release = platform.release()
    if version < MIN_KERNEL:
        return Check("kernel BPF", "FAIL", f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
                     "boot a kernel 4.18 or newer (Debian 11+/Ubuntu 20.04+ have one)", EXIT_BPF)
    if not BPF_SYSCTL.exists():
        return Check("kernel BPF", "FAIL", f"kernel {release} has no bpf() system call (CONFIG_BPF_SYSCALL off)",
                     "boot a kernel built with CONFIG_BPF_SYSCALL=y (every distribution kernel is)",
                     EXIT_BPF)
    return _ok("kernel BPF", f"kernel {release} with the bpf() system call")


def check_bpffs() -> Check:
    try:
        mounts = PROC_MOUNTS.read_text().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and fields[1] == str(BPF_FS) and fields[2] == "bpf":
            return _ok("bpffs", f"BPF filesystem mounted on {BPF_FS}")
    return Check("bpffs", "FAIL", f"no BPF filesystem mounted on {BPF_FS}",
                 f"mount -t bpf bpf {BPF_FS}  (make setup does it; in a container: -v /sys/fs/bpf:/sys/fs/bpf)",
                 EXIT_BPF)


def check_headers() -> Check:
    build = MODULES_DIR / platform.release() / "build"
    if (build / "include").exists() or (build / "Makefile").exists():
        return _ok("kernel headers", f"{build} is present (BCC compiles against it)")
    return Check("kernel headers", "FAIL", f"{build} is missing: BCC cannot compile the XDP program",
                 f"apt-get install linux-headers-{platform.release()}, or run make setup (it links the "
                 "distribution's headers); in a container: -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro",
                 EXIT_DEPENDENCY)


def check_bcc() -> Check:
    if importlib.util.find_spec("bcc") is not None:
        return _ok("BCC", "the bcc Python module is importable")
    return Check("BCC", "FAIL", "the bcc Python module is not importable",
                 "apt-get install python3-bpfcc and keep the venv's --system-site-packages (make setup)",
                 EXIT_DEPENDENCY)


def check_data_files() -> Check:
    """The BPF sources and the schema, where app/resources.py finds them (a checkout or a wheel)."""
    from app import resources
    wanted = [resources.BPF_DIR / name for name in ("port_flow.c", "egress.c", "parse.h", "common.h")]
    missing = [str(p) for p in [*wanted, resources.INIT_SQL] if not p.is_file()]
    if missing:
        return Check("data files", "FAIL", f"missing: {', '.join(missing)}",
                     "reinstall portwatch from a complete checkout (pip install .), or run from the checkout",
                     EXIT_DEPENDENCY)
    return _ok("data files", f"BPF sources in {resources.BPF_DIR}, schema {resources.INIT_SQL}")


def check_program(name: str, essential: bool, package: str, purpose: str, path: str | None = None) -> Check:
    found = path if path and Path(path).is_file() and os.access(path, os.X_OK) else shutil.which(name)
    if found:
        return _ok(name, f"{found}")
    return Check(name, "FAIL" if essential else "warn", f"{name} not found ({purpose})",
                 f"apt-get install {package}", EXIT_DEPENDENCY if essential else 0)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(db: Path) -> Check:
    where = _existing_parent(db.parent)
    usage = shutil.disk_usage(where)
    free_mib = usage.free / 1048576
    detail = f"{free_mib:.0f} MiB free on the file system of {where}"
    if usage.free < MIN_FREE_BYTES:
        return Check("free disk", "FAIL", detail, "free space there, or run python -m app cleanup --keep-days 7",
                     EXIT_DB)
    if usage.free < WARN_FREE_BYTES:
        return Check("free disk", "warn", detail, "keep at least 1 GiB free: python -m app cleanup --keep-days 7")
    return _ok("free disk", detail)


def check_modules() -> list[Check]:
    checks = []
    for module, (essential, purpose) in PYTHON_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            checks.append(_ok(f"python {module}", f"importable; used by {purpose}"))
        else:
            checks.append(Check(f"python {module}", "FAIL" if essential else "warn",
                                f"not importable in {os.sys.prefix} (needed by {purpose})",
                                "run make setup (installs requirements.txt into .venv)",
                                EXIT_DEPENDENCY if essential else 0))
    return checks


def check_database(db: Path) -> Check:
    from app.db.connection import check_integrity, connect
    from app.errors import EXIT_ROOT, NeedsRootError, PortwatchError
    if not db.exists():
        return Check("database", "warn", f"{db} does not exist yet", "run python -m app collect once")
    try:
        conn = connect(db, readonly=True)
        try:
            result = check_integrity(conn)
        finally:
            conn.close()
    except NeedsRootError as exc:
        return Check("database", "FAIL", str(exc), "run it as root: sudo .venv/bin/python -m app doctor", EXIT_ROOT)
    except PortwatchError as exc:
        return Check("database", "FAIL", str(exc), "restore a backup or move the file aside", EXIT_DB)
    except Exception as exc:     # sqlite3.DatabaseError during the check itself
        return Check("database", "FAIL", f"{db}: {exc}", "restore a backup or move the file aside", EXIT_DB)
    if result != "ok":
        return Check("database", "FAIL", f"{db} fails its integrity check: {result}",
                     "restore a backup or move the file aside", EXIT_DB)
    return _ok("database", f"{db} passes its integrity check")


def check_health(settings) -> list[Check]:
    """app/services/ops/health.py's checks (what ``status`` exits on), as 'health <name>' rows: a failed
    one is FAIL (exit 1). Left out while the database does not exist or fails its integrity check
    (the database row says so already)."""
    from app.errors import EXIT_ERROR
    from app.services.ops import health
    try:
        result = health.check(settings)
    except Exception as exc:          # a corrupt database: check_database reports it
        return [Check("health", "warn", f"not checked: {exc}", "fix the database first")]
    fixes = {"rounds": "check the collector's cron job (python -m app install-cron) and its log",
             "xdp": "run python -m app collect once (it re-attaches), or python -m app down to remove the pins",
             "evaluation": "read the evaluator's log, then run python -m app evaluate",
             "model": "run python -m app evaluate, or python -m app model list / rollback",
             "database": "lower retention.keep_days and run python -m app cleanup, or raise general.max_db_mb",
             "blocklist": "run python -m app collect once (each round reconciles the map with the ledger)"}
    out = []
    for c in result.checks:
        status = {True: "ok", False: "FAIL", None: "warn"}[c.ok]
        out.append(Check(f"health {c.name}", status, c.detail, "" if c.ok else fixes.get(c.name, ""),
                         EXIT_ERROR if c.ok is False else 0))
    return out


def run_checks(settings) -> list[Check]:
    db = Path(settings.general.db)
    checks = [check_root(), check_kernel_bpf(), check_bpffs(), check_headers(), check_bcc(), check_data_files(),
              check_program("ip", True, "iproute2", "detaching XDP (down) and the network-namespace lab"),
              check_program("tshark", False, "tshark", "the sniffer: DNS names and protocols",
                            settings.sniffer.tshark_path or None),
              check_program("cron", False, "cron", "scheduling the collector and evaluator"),
              check_disk(db)]
    checks += check_modules()
    checks.append(check_database(db))
    checks.append(check_modes(settings))
    if db.exists() and checks[-2].status != "FAIL":
        checks += check_health(settings)
    from app.services.kernel.pin_owner import problems as xdp_problems   # unfinished loads, leftover programs: fail-closed leftovers
    checks += [Check(f"xdp {name}", "warn", text, f"python -m app down --interface {name}")
               for name, text in xdp_problems(settings.general.pin_root)]
    from app.services.kernel.pin_owner import foreign_programs   # a program portwatch did not load: left alone
    checks += [Check(f"xdp {name}", "warn", text, "leave it, or detach it (or collect --replace) to run portwatch there")
               for name, text in foreign_programs(settings.general.pin_root)]
    return checks


def check_modes(settings) -> Check:
    """Database, -wal/-shm, state dir, models, reports, logs and locks: none looser than it should be."""
    from app import permissions
    loose = permissions.audit(settings)
    if not loose:
        who = f"root and group {settings.general.group}" if settings.general.group else "root only"
        return _ok("file modes", f"database, state, reports, logs and locks are readable by {who}")
    more = f" (and {len(loose) - 3} more)" if len(loose) > 3 else ""
    return Check("file modes", "warn", "; ".join(loose[:3]) + more,
                 "sudo .venv/bin/python -m app doctor --fix-modes (scripts/setup.sh does it too)")


def register(sub) -> None:
    parser = add_command(sub, "doctor", "check kernel, BPF, headers, tools, disk and packages; say how to fix",
                         DESCRIPTION)
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--fix-modes", action="store_true",
                        help="first tighten the modes of the database, state, reports, logs and locks")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    if getattr(args, "fix_modes", False):
        from app import permissions
        changed = permissions.tighten(settings)
        if not args.json:
            print(f"tightened {counted(len(changed), 'path')}" + "".join(f"\n  {p}" for p in changed))
    checks = run_checks(settings)
    failed = [c for c in checks if c.status == "FAIL"]
    if args.json:
        print(json_dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
            if c.fix and c.status != "ok":
                print(f"      {'':<{width}}  fix: {c.fix}")
        warned = sum(1 for c in checks if c.status == "warn")
        if failed:
            print(f"{counted(len(failed), 'essential check')} failed: {', '.join(c.name for c in failed)}; "
                  "fix them and run python -m app doctor again")
        else:
            print(f"all essential checks passed ({warned} warning{'s' if warned != 1 else ''})")
    return (failed[0].exit_code or 1) if failed else 0
