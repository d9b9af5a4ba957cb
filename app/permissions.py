"""File modes: root-only, or readable by one group (``general.group``) — never world-readable.

The CLI calls :func:`configure` once per process and installs :func:`prepare_db` as every writer's
file step; ``doctor`` runs :func:`audit`, ``doctor --fix-modes`` and scripts/setup.sh :func:`tighten`.
Files SQLite creates next to the database (-wal, -shm, -journal) copy the database's mode and owner.
A foundation module: any layer may import it; it imports nothing of portwatch.
"""
from __future__ import annotations

import grp
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_LOG_DIR = Path("/var/log/portwatch")
_gid: int | None = None      # the configured group's id, None: root only


def resolve_group(name: str) -> int | None:
    """The id of group ``name``; None for an empty name or a group that does not exist (logged)."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("general.group %r does not exist on this host: files stay root-only (0600/0700)", name)
        return None


def configure(settings) -> None:
    """Resolve ``general.group`` and set the process umask to match (077, or 027 with a group)."""
    global _gid
    _gid = resolve_group(settings.general.group)
    os.umask(umask())
    if os.geteuid() == 0:                 # the first run tightens the top directories (cheap: two stats)
        for directory in (settings.general.state_dir, settings.reports.out_dir):
            secure(directory)


def umask() -> int:
    return 0o027 if _gid is not None else 0o077


def file_mode() -> int:
    """0600, or 0640 with the group."""
    return 0o640 if _gid is not None else 0o600


def dir_mode() -> int:
    """0700, or 2750 with the group (setgid: new files inherit it)."""
    return 0o2750 if _gid is not None else 0o700


def secure(path: str | Path) -> bool:
    """Give ``path`` (a file or directory we own, or any as root) its mode and group; True if changed.

    Only the permission bits and the group change; a path we may not change is left as it is."""
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or (os.geteuid() != 0 and st.st_uid != os.geteuid()):
        return False
    if stat.S_ISDIR(st.st_mode) and (st.st_mode & stat.S_ISVTX or path.resolve() == Path("/")):
        return False                      # never /tmp-like shared directories or the root
    want = dir_mode() if stat.S_ISDIR(st.st_mode) else file_mode()
    if stat.S_ISREG(st.st_mode):
        want |= st.st_mode & 0o700 & 0o100          # keep the owner's execute bit of an executable
    changed = False
    try:
        if _gid is not None and st.st_gid != _gid:
            os.chown(path, -1, _gid)
            changed = True
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)
            changed = True
    except PermissionError:
        return False
    return changed


def make_dir(path: str | Path) -> Path:
    """``mkdir -p`` where each directory it creates gets dir_mode() (existing ones are left alone)."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        secure(directory)
    return path


def db_files(path: str | Path) -> list[Path]:
    path = Path(path)
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]


def tighten_db(path: str | Path) -> list[Path]:
    """Give the database and its -wal/-shm/-journal their mode; the ones changed."""
    return [p for p in db_files(path) if secure(p)]


def prepare_db(path: str | Path) -> None:
    """Create the database file (and its directories) with portwatch's modes, or tighten it and its
    -wal/-shm: the file step the CLI installs for every writable open (app.db.connection.use_file_step)."""
    path = Path(path)
    make_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode()))
    except FileExistsError:
        pass
    tighten_db(path)


def _too_open(st: os.stat_result) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"mode {mode:04o} lets every local user in"
    if mode & 0o070 and (_gid is None or st.st_gid != _gid):
        return f"mode {mode:04o} lets group {st.st_gid} in, which is not general.group"
    return None


def targets(settings) -> list[tuple[Path, bool]]:
    """(path, recursive) of everything portwatch keeps: state, database, reports, logs, locks."""
    db = Path(settings.general.db)
    out = [(p, False) for p in db_files(db)]
    out += [(Path(settings.general.state_dir), True), (Path(settings.general.run_dir), True),
            (Path(settings.reports.out_dir), True), (DEFAULT_LOG_DIR, True)]
    out += [(p, False) for p in sorted(db.parent.glob(f"{db.name}.v*.bak"))] if db.parent.is_dir() else []
    return out


def _walk(settings):
    seen = set()
    for root, recursive in targets(settings):
        paths = [root]
        if recursive and root.is_dir() and not root.is_symlink() and not root.stat().st_mode & stat.S_ISVTX:
            paths += sorted(root.rglob("*"))
        for path in paths:
            if path in seen or path.is_symlink() or not path.exists():
                continue
            seen.add(path)
            yield path


def audit(settings) -> list[str]:
    """One line per file or directory portwatch keeps whose mode is looser than it should be."""
    problems = []
    for path in _walk(settings):
        why = _too_open(path.lstat())
        if why:
            problems.append(f"{path}: {why}")
    return problems


def tighten(settings) -> list[Path]:
    """Give every file and directory portwatch keeps its mode and group; the ones changed."""
    return [path for path in _walk(settings) if secure(path)]
