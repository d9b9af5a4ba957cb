"""Migration 7 (fail closed): rounds.baseline, counter_snapshots.map_id and the database's identity — the same
columns in a migrated database as in a fresh one; old rows are traffic rounds (baseline 0) and old snapshots
carry no map id (trusted as before); baseline rounds never reach the evaluator's queries."""
from __future__ import annotations

from app.db import rounds as rounds_db
from app.db import series
from app.db.connection import connect
from tests.db.test_connection import v1_database


def columns(conn, table):
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def test_migrated_database_has_the_fresh_schema_of_rounds_and_snapshots(tmp_path):
    v1_database(tmp_path / "old.db", with_blocklist=True)
    old, new = connect(tmp_path / "old.db"), connect(tmp_path / "new.db")
    for table in ("rounds", "counter_snapshots", "database_identity"):
        assert columns(old, table) == columns(new, table), table
    assert [tuple(r) for r in old.execute("SELECT interface, baseline FROM rounds")] == [("pw0", 0)]
    old.close()
    new.close()


def test_database_identity_is_made_once_and_kept(tmp_path):
    conn = connect(tmp_path / "a.db")
    assert rounds_db.read_database_id(conn) is None
    first = rounds_db.database_id(conn)
    assert len(first) == 32 and rounds_db.database_id(conn) == first == rounds_db.read_database_id(conn)
    other = connect(tmp_path / "b.db")
    assert rounds_db.database_id(other) != first
    conn.close()
    other.close()


def test_baseline_rounds_are_not_read_as_traffic(tmp_path):
    conn = connect(tmp_path / "a.db")
    with conn:
        ids = [rounds_db.insert_round(conn, {"start_time": t, "end_time": t + 60, "interface": "pw0",
                                             "baseline": int(t == 60)}) for t in (0, 60, 120)]
    assert [r["id"] for r in series.rounds_after(conn, 0, 10)] == [ids[0], ids[2]]
    assert [r["id"] for r in series.rounds_before(conn, ids[2], 5)] == [ids[0]]
    assert series.count_rounds(conn, ids[2]) == 2 and series.count_rounds_after(conn, ids[0]) == 1
    assert [r["id"] for r in series.rounds_since(conn, 0, ids[2] + 1)] == [ids[0], ids[2]]
    conn.close()
