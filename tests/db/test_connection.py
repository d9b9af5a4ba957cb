"""Schema versions: a fresh database gets init.sql at the newest version without a backup; a
database made by an earlier schema is upgraded through the numbered MIGRATIONS, backed up first,
with every row kept."""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from app.db import blacklist as queries
from app.db.connection import INIT_SQL, MIGRATIONS, SCHEMA_VERSION, connect
from app.errors import DatabaseError

# init.sql as of commit 76b3fb7 (schema version 1, blocklist section included)
V1_SQL = (Path(__file__).parent / "fixtures" / "init_v1.sql").read_text()
BLOCKLIST_TABLES = {"blacklist", "blacklist_drops", "blacklist_events", "blacklist_map_counters"}


def tables(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def v1_database(path: Path, with_blocklist: bool) -> None:
    """A version-1 database with rows, made by the previous schema (optionally from before its
    blocklist section existed: the case the migration exists for)."""
    sql = V1_SQL
    if not with_blocklist:
        sql = re.sub(r"^-- blocklist -+\n.*?(?=^-- operations -+$)", "", sql, flags=re.S | re.M)
    conn = sqlite3.connect(path)
    conn.executescript(sql)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    with conn:
        rid = conn.execute("INSERT INTO rounds (start_time, end_time, interface) VALUES (1, 61, 'pw0')").lastrowid
        conn.execute("INSERT INTO ports (value, protocol) VALUES (22, 'tcp')")
        conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes) VALUES (?, 1, 7, 700, 0)",
                     (rid,))
        if with_blocklist:
            conn.execute("INSERT INTO blacklist (address, reason, created_at, status, drops) "
                         "VALUES ('198.18.0.9/32', 'manual', 5, 'active', 12)")
    conn.close()


def test_fresh_database_is_created_at_the_newest_version_without_backup(tmp_path):
    assert SCHEMA_VERSION == max(MIGRATIONS) and SCHEMA_VERSION >= 2      # reserved numbers may leave gaps
    assert f"PRAGMA user_version = {SCHEMA_VERSION};" in INIT_SQL.read_text()
    conn = connect(tmp_path / "new.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert BLOCKLIST_TABLES <= tables(conn)
    conn.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".bak") == []


@pytest.mark.parametrize("with_blocklist", [False, True])
def test_version_1_database_is_migrated_with_its_rows_kept(tmp_path, with_blocklist):
    path = tmp_path / "old.db"
    v1_database(path, with_blocklist)
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert BLOCKLIST_TABLES <= tables(conn)
    assert [tuple(r) for r in conn.execute("SELECT packets, bytes FROM port_stats")] == [(7, 700)]
    assert [tuple(r) for r in conn.execute("SELECT value, protocol FROM ports")] == [(22, "tcp")]
    if with_blocklist:
        [row] = queries.entries(conn, None)
        assert (row["address"], row["status"], row["drops"]) == ("198.18.0.9/32", "active", 12)
    else:
        assert queries.entries(conn, None) == []
    # the new tables work: the map counters a reconcile keeps
    with conn:
        queries.set_map_counter(conn, "pw0", "198.18.0.9/32", 3, 300, 10.0)
    assert queries.map_counters(conn, "pw0") == {"198.18.0.9/32": (3, 300)}
    conn.close()
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("old.db.v1.") and p.name.endswith(".bak")]
    assert len(backups) == 1
    before = sqlite3.connect(backups[0])
    assert before.execute("PRAGMA user_version").fetchone()[0] == 1      # the backup is the untouched original
    before.close()
    again = connect(path)                                                 # a second open changes nothing
    assert again.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    again.close()
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".bak"]) == 1


def test_migration_4_gives_an_old_database_the_allowlist_and_anomalies_updated_at(tmp_path):
    """The migrated schema of the allowlist and anomalies tables equals a fresh one's (init.sql and MIGRATIONS agree)."""
    def shape(conn):
        return {t: [(r[1], r[2]) for r in conn.execute(f"PRAGMA table_info({t})")]
                for t in ("allowlist", "anomalies", "v_recent_anomalies")}
    v1_database(tmp_path / "old.db", True)
    old, fresh = connect(tmp_path / "old.db"), connect(tmp_path / "new.db")
    assert shape(old) == shape(fresh)
    assert ("updated_at", "REAL") in shape(old)["anomalies"] and shape(old)["allowlist"][0] == ("address", "TEXT")
    assert [c for c, _ in shape(old)["v_recent_anomalies"]][-3:] == ["summary", "grown", "reasons"]
    old.close()
    fresh.close()


def test_migration_15_marks_replayed_rounds_and_inferred_listeners(tmp_path):
    """A migrated database's rounds and rounds_ports equal a fresh one's (the replay's marks included)."""
    def shape(conn):
        return {t: [(r[1], r[2]) for r in conn.execute(f"PRAGMA table_info({t})")] for t in ("rounds", "rounds_ports")}
    v1_database(tmp_path / "old.db", False)
    old, fresh = connect(tmp_path / "old.db"), connect(tmp_path / "new.db")
    assert shape(old) == shape(fresh)
    assert shape(old)["rounds"][-2:] == [("replayed", "INTEGER"), ("capture", "TEXT")]
    assert ("inferred", "INTEGER") in shape(old)["rounds_ports"]
    assert {tuple(r) for r in old.execute("SELECT replayed, capture FROM rounds")} == {(0, None)}   # live rounds
    old.close()
    fresh.close()


def test_newer_database_is_refused_with_one_sentence(tmp_path):
    path = tmp_path / "future.db"
    conn = connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DatabaseError, match="newer than this portwatch"):
        connect(path)


# --- the file step: app/db knows no modes; the caller installs them ---------------------------------

def test_the_schema_is_the_one_app_resources_names():
    from app import resources
    assert INIT_SQL == resources.INIT_SQL and INIT_SQL.is_file()


def test_without_an_installed_step_a_new_database_is_root_only_and_a_loose_one_tightened(tmp_path):
    import os
    import stat
    old = os.umask(0o022)                 # a permissive umask: the modes come from the step, not from it
    try:
        db = tmp_path / "a" / "b" / "ports.db"
        connect(db).close()
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        assert [stat.S_IMODE(d.stat().st_mode) for d in (db.parent, db.parent.parent)] == [0o700, 0o700]
        db.chmod(0o644)
        connect(db).close()
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_an_installed_step_runs_before_every_writable_open_and_never_for_a_reader(tmp_path):
    from app.db import connection
    seen = []

    def step(path):
        seen.append(path)
        connection.root_only(path)

    connection.use_file_step(step)
    try:
        connect(tmp_path / "ports.db").close()
        connect(tmp_path / "ports.db", readonly=True).close()
        connect(tmp_path / "ports.db", create=False).close()
    finally:
        connection.use_file_step(connection.root_only)
    assert seen == [tmp_path / "ports.db", tmp_path / "ports.db"]
