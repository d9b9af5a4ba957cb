"""Test data for the operations tests (reports, status, cleanup, alerts): a database built through
app.db.connection.connect (so init.sql applies) and filled with plain SQL.

``fill_database(path)`` writes a small, plausible history: 3 hours of minute rounds on one
interface, listeners (one appears, one changes process), a port scan and a SYN burst from
198.18.0.9 that the model and the rules flag, a blocklist entry with drops, two evaluations.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from app.db.connection import connect

ATTACKER = "198.18.0.9"
BENIGN = "198.18.0.2"
HOUR = 3600.0


def empty_database(path: str | Path) -> Path:
    conn = connect(path)
    conn.close()
    return Path(path)


def _port_id(conn: sqlite3.Connection, value: int, protocol: str) -> int:
    row = conn.execute("SELECT id FROM ports WHERE value = ? AND protocol = ?", (value, protocol)).fetchone()
    if row:
        return row[0]
    return conn.execute("INSERT INTO ports (value, protocol, label) VALUES (?, ?, ?)",
                        (value, protocol, "ephemeral" if value == -1 else None)).lastrowid


def fill_database(path: str | Path, end: float, rounds: int = 180, interface: str = "pwtest0") -> dict:
    """Fill the database; the last round ends at ``end``. Returns ids the tests refer to."""
    conn = connect(path)
    ids: dict = {"rounds": []}
    with conn:
        ssh = _port_id(conn, 22, "tcp")
        http = _port_id(conn, 80, "tcp")
        dns = _port_id(conn, 53, "udp")
        alt = _port_id(conn, 8080, "tcp")
        eph = _port_id(conn, -1, "tcp")
        ids.update(ssh=ssh, http=http, dns=dns, alt=alt, ephemeral=eph)
        attack_from = rounds * 2 // 3                     # 180 rounds: the attack is rounds 120..129
        attack_to = min(rounds, attack_from + max(2, rounds // 18))
        for i in range(rounds):
            t_end = end - (rounds - 1 - i) * 60.0
            attack = attack_from <= i < attack_to
            blocked = i >= attack_to
            drops = 40 if blocked else 0
            total = 500 + (i % 7) * 10 + (900 if attack else 0) + drops
            rid = conn.execute(
                "INSERT INTO rounds (start_time, end_time, counts_since, interface, xdp_mode, total_packets,"
                " total_bytes, parsed_packets, unparsed_packets, dropped_packets, scanner_status, sniffer_status)"
                " VALUES (?, ?, ?, ?, 'generic', ?, ?, ?, 2, ?, 'ok', 'ok')",
                (t_end - 60, t_end, t_end - 60, interface, total, total * 300, total - 2, drops)).lastrowid
            ids["rounds"].append(rid)
            conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes, syn, synack)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (rid, ssh, 30 + (800 if attack else 0), 4000 + (48000 if attack else 0), 1000,
                          2 + (780 if attack else 0), 2))
            conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes, syn, synack)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", (rid, http, 200 + (i % 5) * 3, 150000, 120000, 10, 10))
            conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes)"
                         " VALUES (?, ?, ?, ?, ?)", (rid, dns, 40, 4000, 2500))
            conn.execute("INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes)"
                         " VALUES (?, ?, ?, ?, ?)", (rid, eph, 220, 90000, 70000))
            conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes, distinct_ports)"
                         " VALUES (?, ?, ?, ?, 3)", (rid, BENIGN, 300, 200000))
            if attack:
                conn.execute("INSERT INTO source_stats (round_id, address, packets, bytes, syn, distinct_ports)"
                             " VALUES (?, ?, 900, 54000, 880, 120)", (rid, ATTACKER))
            if blocked:
                conn.execute("INSERT INTO blacklist_drops (round_id, address, drops) VALUES (?, ?, ?)",
                             (rid, f"{ATTACKER}/32", drops))
            listeners = [(ssh, 1001, "sshd"), (http, 2002, "nginx" if i < rounds // 2 else "apache2"),
                         (dns, 3003, "dnsmasq")]
            if i >= rounds - 30:
                listeners.append((alt, 4004, "python3"))
            for port_id, pid, process in listeners:
                conn.execute("INSERT INTO rounds_ports (round_id, port_id, timestamp, pid, process, address, family,"
                             " state) VALUES (?, ?, ?, ?, ?, '0.0.0.0', 'ipv4', 'LISTEN')",
                             (rid, port_id, t_end, pid, process))
            conn.execute("INSERT INTO packets (timestamp, protocols, qry_name, port_id, dest_port, payload, round_id)"
                         " VALUES (?, 'eth:ethertype:ip:udp:dns', 'example.org', ?, 53, 40, ?)", (t_end - 5, dns, rid))
        first, last = ids["rounds"][0], ids["rounds"][-1]

        def rid_at(index: int) -> int:
            return ids["rounds"][max(0, min(index, rounds - 1))]
        model_path = str(Path(path).parent / "models" / "v1")
        write_model_config(model_path)
        conn.execute("INSERT INTO models (version, created_at, path, threshold, train_windows, status)"
                     " VALUES (1, ?, ?, 0.05, 300, 'active')", (end - 2.5 * HOUR, model_path))
        e1 = conn.execute("INSERT INTO evaluations (started_at, finished_at, first_round_id, last_round_id,"
                          " model_version, threshold, windows, anomalies, duration_s, status)"
                          " VALUES (?, ?, ?, ?, 1, 0.05, 100, 0, 4.2, 'ok')",
                          (end - 1.5 * HOUR, end - 1.5 * HOUR + 4, first, rid_at(attack_from - 1))).lastrowid
        e2 = conn.execute("INSERT INTO evaluations (started_at, finished_at, first_round_id, last_round_id,"
                          " model_version, threshold, windows, anomalies, duration_s, status)"
                          " VALUES (?, ?, ?, ?, 1, 0.06, 60, 3, 5.0, 'ok')",
                          (end - 0.5 * HOUR, end - 0.5 * HOUR + 5, rid_at(attack_from), last)).lastrowid
        # the shape app/services/evaluation/evaluation.py writes for a model anomaly
        reasons = {"port": 22, "protocol": "tcp", "model_version": 1, "score": 0.42, "threshold": 0.06,
                   "features": [
                       {"feature": "syn", "observed": 0.95, "reconstructed": 0.05, "error": 0.81, "share": 0.61},
                       {"feature": "packets", "observed": 0.9, "reconstructed": 0.2, "error": 0.49, "share": 0.3},
                       {"feature": "bytes", "observed": 0.5, "reconstructed": 0.3, "error": 0.04, "share": 0.06},
                       {"feature": "distinct_sources", "observed": 0.1, "reconstructed": 0.08, "error": 0.0004,
                        "share": 0.03}],
                   "sources": [{"address": ATTACKER, "packets": 9000, "bytes": 540000, "share": 0.97}]}
        a_model = conn.execute(
            "INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, first_round_id,"
            " last_round_id, source, created_at) VALUES (?, ?, 'model', 0.42, 0.06, ?, ?, ?, ?, ?)",
            (e2, ssh, json.dumps(reasons), rid_at(attack_from), rid_at(attack_to - 1), ATTACKER,
             end - 0.5 * HOUR + 5)).lastrowid
        a_scan = conn.execute(   # host-wide, as the port-scan rule writes it: no single port
            "INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, first_round_id,"
            " last_round_id, source, created_at) VALUES (?, NULL, 'port_scan', 120, 25, ?, ?, ?, ?, ?)",
            (e2, json.dumps({"rule": ">= 25 distinct local ports", "source": ATTACKER,
                             "sources": [{"address": ATTACKER, "distinct_ports": 120}],
                             "ports": {"tcp": list(range(1, 121))}}),
             rid_at(attack_from), rid_at(attack_from + 3), ATTACKER, end - 0.5 * HOUR + 5)).lastrowid
        a_odd = conn.execute(   # reasons in a shape the report must survive
            "INSERT INTO anomalies (evaluation_id, port_id, detector, score, threshold, reasons, first_round_id,"
            " last_round_id, source, created_at) VALUES (?, ?, 'model', 0.08, 0.06, 'not json', ?, ?, NULL, ?)",
            (e2, http, rid_at(attack_from), rid_at(attack_from + 1), end - 0.5 * HOUR + 5)).lastrowid
        ids.update(evaluations=[e1, e2], anomalies=[a_model, a_scan, a_odd])
        block_at = end - (rounds - 1 - attack_to) * 60.0
        conn.execute("INSERT INTO blacklist (address, reason, evidence, anomaly_id, origin, created_at, expires_at,"
                     " status, drops) VALUES (?, 'port scan and SYN burst on tcp/22', '{}', ?, 'auto', ?, ?, 'active', ?)",
                     (f"{ATTACKER}/32", a_scan, block_at, block_at + 4 * HOUR, 40 * 50))
        conn.execute("INSERT INTO blacklist (address, reason, origin, created_at, expires_at, status, removed_at)"
                     " VALUES ('203.0.113.0/24', 'manual test', 'manual', ?, NULL, 'removed', ?)",
                     (end - 2 * HOUR, end - 1 * HOUR))
        conn.execute("INSERT INTO blacklist_events (at, address, action, detail) VALUES (?, ?, 'block', 'scan')",
                     (block_at, f"{ATTACKER}/32"))
        conn.execute("INSERT INTO blacklist_events (at, address, action, detail) VALUES (?, '203.0.113.0/24',"
                     " 'block', 'manual')", (end - 2 * HOUR,))
        conn.execute("INSERT INTO blacklist_events (at, address, action, detail) VALUES (?, '203.0.113.0/24',"
                     " 'remove', 'manual')", (end - 1 * HOUR,))
    conn.close()
    return ids


def write_model_config(directory: str) -> None:
    """The config.json a loadable model directory holds (what `status` and `model list` read; no weights)."""
    from app.services.evaluation.model import FORMAT, FORMAT_VERSION
    from app.services.evaluation.series import FEATURES
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "config.json").write_text(json.dumps(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "config": {"features": list(FEATURES)}}))
