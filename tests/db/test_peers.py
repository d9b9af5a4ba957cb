"""Two-way peers in SQLite: record_two_way upserts, two_way_since answers in one query."""
from __future__ import annotations

from app.db.connection import connect
from app.db.peers import peer, record_two_way, two_way_since


def test_peers_are_upserted_and_answer_since_queries(tmp_path):
    conn = connect(tmp_path / "ports.db")
    with conn:
        assert record_two_way(conn, 1, 1000.0, {"198.18.0.2", "::ffff:198.18.0.3"}, ["198.18.0.4"]) == 3
        assert record_two_way(conn, 2, 2000.0, {"198.18.0.2"}, ["198.18.0.2"]) == 1
    row = peer(conn, "198.18.0.2")
    assert (row["first_seen"], row["last_two_way"], row["two_way_rounds"], row["last_round_id"],
            row["last_evidence"]) == (1000.0, 2000.0, 2, 2, "flows+established")
    assert peer(conn, "198.18.0.4")["last_evidence"] == "established"
    assert two_way_since(conn, "198.18.0.2", 2000.0) and not two_way_since(conn, "198.18.0.2", 2000.5)
    assert two_way_since(conn, "::ffff:198.18.0.3", 0) and not two_way_since(conn, "198.18.0.3", 0)
    assert not two_way_since(conn, "198.18.0.9", 0)
    # one indexed lookup: the primary key
    plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN SELECT 1 FROM peers WHERE address = ? "
                                               "AND last_two_way >= ?", ("x", 0)))
    assert "PRIMARY KEY" in plan or "sqlite_autoindex_peers" in plan, plan
