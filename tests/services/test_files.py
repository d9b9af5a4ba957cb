"""The one atomic file writer and the database size on disk."""
from __future__ import annotations

import stat

import pytest

from app.services.files import atomic_write, atomic_writer, database_bytes


def test_atomic_write_replaces_the_file_with_its_mode(tmp_path):
    target = tmp_path / "portwatch.prom"
    target.write_text("old\n")
    assert atomic_write(target, "new ü\n", mode=0o640) == target
    assert target.read_text(encoding="utf-8") == "new ü\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    atomic_write(tmp_path / "figure.png", b"\x89PNG\r\n")
    assert (tmp_path / "figure.png").read_bytes() == b"\x89PNG\r\n"
    assert stat.S_IMODE((tmp_path / "figure.png").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "portwatch.prom"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "index.html"
    target.write_text("the old page")
    with pytest.raises(RuntimeError, match="drawing failed"):
        with atomic_writer(target) as fh:
            fh.write("half a pa")
            raise RuntimeError("drawing failed")
    assert target.read_text() == "the old page"
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no-such-dir" / "cron", "x")


def test_database_bytes_counts_the_wal_and_shm_files(tmp_path):
    db = tmp_path / "ports.db"
    assert database_bytes(db) == 0
    db.write_bytes(b"x" * 4096)
    (tmp_path / "ports.db-wal").write_bytes(b"w" * 1000)
    (tmp_path / "ports.db-shm").write_bytes(b"s" * 24)
    assert database_bytes(db) == 5120
