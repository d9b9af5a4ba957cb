"""Run locks: one flock'ed file per job in a root-only directory (:func:`hold`, :func:`holding`), and one
per interface at a fixed place (:func:`hold_interface`: collect, --takeover, down); a held lock makes
the other run exit 6 (LockedError).

Job locks (``evaluate``, ``cleanup``) live in ``general.run_dir``; the interface locks in INTERFACE_DIR,
``/run/portwatch/interfaces/<interface>.lock``, which no setting moves. A shared leaf: imports nothing of
portwatch but app.errors.
"""
from __future__ import annotations

import fcntl
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from app.errors import LockedError, PortwatchError

RUN_DIR_MODE = 0o700
LOCK_FILE_MODE = 0o600
# fixed, never from a setting: /run is root's tmpfs (a local user cannot create /run/portwatch first)
INTERFACE_DIR = Path("/run/portwatch/interfaces")


def run_dir(settings) -> Path:
    """The lock directory, created 0700 (tightened when it is ours and looser; refused when not ours)."""
    return _own_dir(Path(settings.general.run_dir), "general.run_dir",
                    "run as root, or set general.run_dir to a directory of your own")


def _own_dir(directory: Path, what: str, fix: str) -> Path:
    try:
        directory.mkdir(mode=RUN_DIR_MODE, parents=True, exist_ok=True)
        st = directory.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise PortwatchError(f"lock directory {directory} ({what}) is not a directory")
        if st.st_uid != os.geteuid():
            raise PortwatchError(f"lock directory {directory} ({what}) belongs to uid {st.st_uid}, not to "
                                 f"this user: remove it ({fix})")
        if stat.S_IMODE(st.st_mode) != RUN_DIR_MODE:
            os.chmod(directory, RUN_DIR_MODE)
    except OSError as exc:
        raise PortwatchError(f"lock directory {directory} ({what}) cannot be used: {exc.strerror} ({fix})") from None
    return directory


def interface_path(interface: str) -> Path:
    """The interface's lock file (fixed place: INTERFACE_DIR)."""
    return INTERFACE_DIR / f"{interface}.lock"


def hold_interface(interface: str, busy: str) -> "Lock":
    """Take ``interface``'s lock without waiting (collect, --takeover, down); LockedError(``busy``) when held.
    Whatever the settings say, every run on ``interface`` meets this one file: a run with another
    ``PORTWATCH_RUN_DIR``, config file, database or pin root still meets it, so no setting lets `down`
    detach under a running collector or two collectors share an interface."""
    if not interface or "/" in interface or interface in (".", ".."):
        raise PortwatchError(f"{interface!r} is not a valid interface name")
    _own_dir(INTERFACE_DIR, "the interface locks", "only root runs collect and down")
    return _take(interface_path(interface), busy)


def path(settings, name: str) -> Path:
    """Where lock ``name`` lives."""
    return Path(settings.general.run_dir) / f"{name}.lock"


class Lock:
    """A held lock; ``close()`` releases it (so does the process's exit)."""

    def __init__(self, lock_path: Path, fd: int):
        self.path, self.fd = lock_path, fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)          # closing the only descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hold(settings, name: str, busy: str) -> Lock:
    """Take lock ``name`` without waiting; LockedError(``busy``) when another process holds it."""
    return _take(run_dir(settings) / f"{name}.lock", busy)


def _take(lock_path: Path, busy: str) -> Lock:
    """Open ``lock_path`` for writing (O_WRONLY|O_CREAT|O_NOFOLLOW, 0600) in a 0700 directory and flock it
    without waiting: a local user can neither open it nor flock it, so nobody but root can make root's
    runs exit 6. The holder writes its pid into it."""
    try:
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_FILE_MODE)
    except OSError as exc:
        raise PortwatchError(f"lock file {lock_path} cannot be opened: {exc.strerror}") from None
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != LOCK_FILE_MODE:
            os.fchmod(fd, LOCK_FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(busy) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return Lock(lock_path, fd)


@contextmanager
def holding(settings, name: str, busy: str) -> Iterator[Lock]:
    """:func:`hold` as a context manager."""
    lock = hold(settings, name, busy)
    try:
        yield lock
    finally:
        lock.close()
