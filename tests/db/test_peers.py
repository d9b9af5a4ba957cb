"""Verified peers in SQLite: record_two_way upserts proofs and fingerprints, two_way_since answers in
one query, and only a proof counts."""
from __future__ import annotations

from app.db.connection import connect
from app.db.peers import peer, record_two_way, two_way_since, verified_peers

MAC = "02:00:00:00:00:02"


def test_peers_are_upserted_with_their_proof_and_answer_since_queries(tmp_path):
    conn = connect(tmp_path / "ports.db")
    with conn:
        assert record_two_way(conn, 1, 1000.0, {"198.18.0.2": ("handshake", 64, MAC),
                                                "::ffff:198.18.0.3": ("opened-udp", 63, MAC)}, ["198.18.0.4"]) == 3
        assert record_two_way(conn, 2, 2000.0, {"198.18.0.2": ("opened-tcp", 62, None)}, ["198.18.0.2"]) == 1
        # an older portwatch's row: two-way flows, no proof
        conn.execute("INSERT INTO peers (address, first_seen, last_two_way, two_way_rounds, last_evidence) "
                     "VALUES ('198.18.0.5', 1000, 3000, 1, 'flows')")
    row = peer(conn, "198.18.0.2")
    assert (row["first_seen"], row["last_two_way"], row["two_way_rounds"], row["last_round_id"], row["proof"],
            row["ttl"], row["mac"], row["last_verified"]) == (1000.0, 2000.0, 2, 2, "opened-tcp", 62, None, 2000.0)
    assert (peer(conn, "198.18.0.4")["proof"], peer(conn, "198.18.0.4")["ttl"]) == ("established", None)
    assert two_way_since(conn, "198.18.0.2", 2000.0) and not two_way_since(conn, "198.18.0.2", 2000.5)
    assert two_way_since(conn, "::ffff:198.18.0.3", 0) and not two_way_since(conn, "198.18.0.3", 0)
    assert not two_way_since(conn, "198.18.0.9", 0)
    assert not two_way_since(conn, "198.18.0.5", 0)          # flows prove nothing
    assert [r["address"] for r in verified_peers(conn, 1500.0)] == ["198.18.0.2"]
    # a proof with a TTL replaces the fingerprint whole: no MAC (an off-link sender) clears the older one;
    # an ESTABLISHED socket (no fingerprint) keeps what the kernel's proofs recorded
    with conn:
        record_two_way(conn, 3, 3000.0, {"198.18.0.2": ("handshake", 64, MAC)})
        record_two_way(conn, 4, 4000.0, {}, ["198.18.0.2"])
    assert (peer(conn, "198.18.0.2")["ttl"], peer(conn, "198.18.0.2")["mac"]) == (64, MAC)
    # one indexed lookup: the primary key
    plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN SELECT 1 FROM peers WHERE address = ? "
                                               "AND last_two_way >= ?", ("x", 0)))
    assert "PRIMARY KEY" in plan or "sqlite_autoindex_peers" in plan, plan


def test_migration_11_keeps_socket_peers_and_drops_flow_peers(tmp_path):
    from app.db.connection import MIGRATIONS
    from tests.helpers import UNDO_MIGRATION
    c = connect(tmp_path / "old.db")
    c.executescript(UNDO_MIGRATION[11] + " INSERT INTO peers (address, first_seen, last_two_way, two_way_rounds, last_evidence) VALUES "
                    "('198.18.0.2', 1, 5, 1, 'flows'), ('198.18.0.3', 1, 6, 1, 'flows+established');")
    c.executescript(MIGRATIONS[11])
    assert not two_way_since(c, "198.18.0.2", 0)
    assert two_way_since(c, "198.18.0.3", 6) and peer(c, "198.18.0.3")["proof"] == "established"
    assert "replies" in {r[1] for r in c.execute("PRAGMA table_info(blacklist_drops)")}
    assert "mac" in {r[1] for r in c.execute("PRAGMA table_info(source_stats)")}
    c.close()
