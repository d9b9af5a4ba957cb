"""Files portwatch writes for others to read, and the size of the database on disk.

:func:`atomic_write` is the one way a file is replaced (the cron file, the metrics textfile, report
figures and pages): a temporary file in the same directory, written, flushed to disk, given its
mode, then renamed over the target, so a reader (cron, node_exporter, a browser) sees the old file
or the new one, never half of one. A failure removes the temporary file and leaves the target as
it was.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_writer(path: str | os.PathLike, *, mode: int = 0o644, binary: bool = False) -> Iterator[IO]:
    """Yield an open file; when the block ends without an exception it replaces ``path``.

    mode: the permission bits the file gets (0o644: cron skips group/other-writable files, and
    node_exporter reads as its own user). binary: bytes instead of UTF-8 text. Raises OSError
    (PermissionError when the directory is not writable) before or while writing.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, content: str | bytes, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``content`` (text is written as UTF-8) in one rename; return the path."""
    with atomic_writer(path, mode=mode, binary=isinstance(content, bytes)) as fh:
        fh.write(content)
    return Path(path)


def database_bytes(db: str | os.PathLike) -> int:
    """Size of the SQLite file plus its WAL and shared-memory files, in bytes (0 when absent)."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += Path(f"{db}{suffix}").stat().st_size
        except OSError:
            pass
    return total
