"""Read-only queries behind the report (app/services/ops/reports/) and ``python -m app status``.

Every function takes a connection (``connect(path, readonly=True)``) and ``since``: Unix epoch
seconds (UTC) or None for the whole database. Times returned are epoch seconds; per-round
counters are the round's differences, as stored.
"""
from __future__ import annotations

import sqlite3
from typing import Iterator

_EPOCH_ZERO = -1e18   # "since the beginning" without a second query shape


def _since(since: float | None) -> float:
    return _EPOCH_ZERO if since is None else float(since)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


# -- overview ---------------------------------------------------------------------------------

def overview(conn: sqlite3.Connection, since: float | None) -> dict:
    """Counts and time span of what the report covers: rounds, evaluations, anomalies, blocks."""
    s = _since(since)
    row = conn.execute("SELECT COUNT(*), MIN(start_time), MAX(end_time), COALESCE(SUM(total_packets), 0),"
                       " COALESCE(SUM(dropped_packets), 0) FROM rounds WHERE end_time >= ?", (s,)).fetchone()
    evaluations = conn.execute("SELECT COUNT(*) FROM evaluations WHERE started_at >= ?", (s,)).fetchone()[0]
    anomalies = conn.execute("SELECT COUNT(*) FROM anomalies WHERE created_at >= ?", (s,)).fetchone()[0]
    blocks = conn.execute("SELECT COUNT(*) FROM blacklist WHERE created_at >= ? OR status = 'active'", (s,)).fetchone()[0]
    interfaces = [r[0] for r in conn.execute(
        "SELECT DISTINCT interface FROM rounds WHERE end_time >= ? ORDER BY interface", (s,))]
    return {"rounds": row[0], "first_time": row[1], "last_time": row[2], "packets": row[3],
            "dropped_packets": row[4], "evaluations": evaluations, "anomalies": anomalies,
            "blacklist_entries": blocks, "interfaces": interfaces}


# -- per-port series ----------------------------------------------------------------------------

def most_anomalous_ports(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """Ports with anomalies, most anomalous first: (port_id, value, protocol, anomalies, worst_ratio).

    worst_ratio is the largest score/threshold of the port's anomalies (1.0 for rule detectors
    without a threshold), so a port flagged once far above the threshold ranks with one flagged often.
    """
    return conn.execute(
        """SELECT a.port_id, p.value, p.protocol, COUNT(*) AS anomalies,
                  MAX(CASE WHEN a.threshold > 0 AND a.score IS NOT NULL THEN a.score / a.threshold ELSE 1.0 END)
                      AS worst_ratio,
                  MAX(a.created_at) AS last_at
           FROM anomalies a JOIN ports p ON p.id = a.port_id
           WHERE a.created_at >= ?
           GROUP BY a.port_id
           ORDER BY anomalies * worst_ratio DESC, last_at DESC
           LIMIT ?""", (_since(since), int(limit))).fetchall()


def port_series(conn: sqlite3.Connection, port_id: int, since: float | None) -> list[sqlite3.Row]:
    """One row per round: (round_id, end_time, packets, bytes, syn) for the port; rounds where the
    port saw nothing have packets = 0 so gaps in traffic show as zeros, not as interpolated lines."""
    return conn.execute(
        """SELECT r.id AS round_id, r.end_time, COALESCE(ps.packets, 0) AS packets,
                  COALESCE(ps.bytes, 0) AS bytes, COALESCE(ps.syn, 0) AS syn
           FROM rounds r LEFT JOIN port_stats ps ON ps.round_id = r.id AND ps.port_id = ?
           WHERE r.end_time >= ?
           ORDER BY r.end_time""", (port_id, _since(since))).fetchall()


_ANOMALY_SPANS = """SELECT a.id, a.evaluation_id, a.port_id, a.detector, a.score, a.threshold, a.source, a.reasons,
                  a.first_round_id, a.last_round_id, a.created_at,
                  (SELECT start_time FROM rounds WHERE id = a.first_round_id) AS span_start,
                  (SELECT end_time FROM rounds WHERE id = a.last_round_id) AS span_end
           FROM anomalies a"""


def port_anomalies(conn: sqlite3.Connection, port_id: int, since: float | None) -> list[sqlite3.Row]:
    """The port's anomalies with the time span of their flagged rounds (span_start, span_end; NULL
    when the rounds are gone) and the anomaly's main source."""
    return conn.execute(f"{_ANOMALY_SPANS} WHERE a.port_id = ? AND a.created_at >= ? ORDER BY a.created_at",
                        (port_id, _since(since))).fetchall()


def hostwide_anomalies(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Anomalies that belong to no single port (a port scan covers many), with their spans."""
    return conn.execute(f"{_ANOMALY_SPANS} WHERE a.port_id IS NULL AND a.created_at >= ? ORDER BY a.created_at",
                        (_since(since),)).fetchall()


def blocked_addresses(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every blocklist entry ever made that is not a dry run: (address, anomaly_id, status, created_at)."""
    return conn.execute("SELECT address, anomaly_id, status, created_at, reason FROM blacklist"
                        " WHERE status != 'dry-run' ORDER BY created_at").fetchall()


# -- model scores -------------------------------------------------------------------------------

def model_scores(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Model anomalies: (created_at, score, threshold, port value, protocol)."""
    return conn.execute(
        """SELECT a.id, a.created_at, a.score, a.threshold, p.value, p.protocol
           FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id
           WHERE a.detector = 'model' AND a.score IS NOT NULL AND a.created_at >= ?
           ORDER BY a.created_at""", (_since(since),)).fetchall()


def evaluation_thresholds(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Evaluations that had a threshold: (time, threshold, model_version, windows, anomalies, status)."""
    return conn.execute(
        """SELECT COALESCE(finished_at, started_at) AS at, threshold, model_version, windows, anomalies, status
           FROM evaluations
           WHERE started_at >= ? AND threshold IS NOT NULL
           ORDER BY started_at""", (_since(since),)).fetchall()


def model_round_errors(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """The model's error per judged round: (at = the round's end, max_error, median_error, model_version,
    threshold), oldest first; empty for a database older than migration 9."""
    if not _has_table(conn, "model_round_errors"):
        return []
    return conn.execute(
        """SELECT r.end_time AS at, e.max_error, e.median_error, e.model_version, e.threshold
           FROM model_round_errors e JOIN rounds r ON r.id = e.round_id
           WHERE r.end_time >= ? ORDER BY r.end_time""", (_since(since),)).fetchall()


def model_anomalies(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """The most recent model anomalies, newest first: the columns ``Finding.from_row`` reads (port
    and protocol from ``ports``) plus created_at and source."""
    return conn.execute(
        """SELECT a.id, a.evaluation_id, a.port_id, a.detector, a.created_at, a.score, a.threshold, a.reasons,
                  a.source, a.first_round_id, a.last_round_id, p.value AS port, p.protocol
           FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id
           WHERE a.detector = 'model' AND a.created_at >= ?
           ORDER BY a.created_at DESC, a.id DESC
           LIMIT ?""", (_since(since), int(limit))).fetchall()


def recent_anomalies(conn: sqlite3.Connection, since: float | None, limit: int) -> list[sqlite3.Row]:
    """Anomalies of every detector, newest first, for the report's table."""
    return conn.execute(
        """SELECT a.id, a.created_at, a.detector, a.score, a.threshold, a.source, p.value, p.protocol,
                  (SELECT group_concat(address || ' ' || evidence || CASE WHEN possibly_forged THEN
                          ' (possibly forged)' ELSE '' END, ', ') FROM v_anomaly_sources s
                    WHERE s.anomaly_id = a.id) AS evidence
           FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id
           WHERE a.created_at >= ?
           ORDER BY a.created_at DESC, a.id DESC
           LIMIT ?""", (_since(since), int(limit))).fetchall()


# -- blocklist ------------------------------------------------------------------------------------

def blacklist_entries(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Entries that were in force at some time after ``since``: (address, created_at, expires_at,
    removed_at, status, origin, reason, drops)."""
    return conn.execute(
        """SELECT address, created_at, expires_at, removed_at, status, origin, reason, drops
           FROM blacklist
           WHERE status != 'dry-run'
             AND (COALESCE(removed_at, expires_at) IS NULL OR COALESCE(removed_at, expires_at) >= ?)
           ORDER BY created_at""", (_since(since),)).fetchall()


def blacklist_events(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """(at, address, action, detail) in time order."""
    return conn.execute("SELECT at, address, action, detail FROM blacklist_events WHERE at >= ? ORDER BY at, id",
                        (_since(since),)).fetchall()


def blacklist_drops(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """Packets dropped per round and blocked address: (end_time, address, drops)."""
    return conn.execute(
        """SELECT r.end_time, bd.address, bd.drops
           FROM blacklist_drops bd JOIN rounds r ON r.id = bd.round_id
           WHERE r.end_time >= ?
           ORDER BY r.end_time""", (_since(since),)).fetchall()


def round_times(conn: sqlite3.Connection, since: float | None) -> list[float]:
    """end_time of every round in the window, in order."""
    return [r[0] for r in conn.execute("SELECT end_time FROM rounds WHERE end_time >= ? ORDER BY end_time",
                                       (_since(since),))]


# -- occupancy ------------------------------------------------------------------------------------

def occupancy(conn: sqlite3.Connection, since: float | None) -> Iterator[sqlite3.Row]:
    """Listeners per round in round order, streamed: (round_id, end_time, value, protocol, pid, process).

    Starts one round before ``since`` so the first round in the window can be compared with its
    predecessor (a listener already there is not "new")."""
    s = _since(since)
    before = conn.execute("SELECT MAX(id) FROM rounds WHERE end_time < ?", (s,)).fetchone()[0]
    first = before if before is not None else -1
    return conn.execute(
        """SELECT rp.round_id, r.end_time, p.value, p.protocol, rp.pid, rp.process
           FROM rounds_ports rp JOIN rounds r ON r.id = rp.round_id JOIN ports p ON p.id = rp.port_id
           WHERE rp.round_id >= ? AND (r.end_time >= ? OR rp.round_id = ?)
           ORDER BY rp.round_id""", (first, s, first))


def scanned_round_ids(conn: sqlite3.Connection, since: float | None) -> list[tuple[int, float]]:
    """(round_id, end_time) of rounds whose scanner ran ('ok' or unknown status): rounds without
    occupancy rows because the scanner failed must not read as "every listener went away"."""
    s = _since(since)
    before = conn.execute("SELECT MAX(id) FROM rounds WHERE end_time < ?", (s,)).fetchone()[0]
    first = before if before is not None else -1
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT id, end_time FROM rounds WHERE id >= ? AND (end_time >= ? OR id = ?)"
        " AND (scanner_status IS NULL OR scanner_status = 'ok') ORDER BY id", (first, s, first))]


# -- the demo's summary ----------------------------------------------------------------------------

def round_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]


def demo_summary(conn: sqlite3.Connection) -> dict:
    """What ``make demo`` prints at the end: rounds, packets XDP saw, findings per detector
    [(detector, count)], distinct DNS names the sniffer saw."""
    return {"rounds": round_count(conn),
            "packets": conn.execute("SELECT COALESCE(SUM(total_packets), 0) FROM rounds").fetchone()[0],
            "findings": [tuple(r) for r in conn.execute(
                "SELECT detector, COUNT(*) FROM anomalies GROUP BY detector ORDER BY detector")],
            "dns_names": conn.execute("SELECT COUNT(DISTINCT qry_name) FROM packets WHERE qry_name IS NOT NULL"
                                      ).fetchone()[0]}


# -- status -----------------------------------------------------------------------------------------

def status_summary(conn: sqlite3.Connection) -> dict:
    """What ``python -m app status`` shows from the database."""
    last_round = conn.execute("SELECT id, start_time, end_time, interface, xdp_mode, total_packets,"
                              " dropped_packets FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    last_eval = conn.execute("SELECT id, started_at, finished_at, model_version, status, anomalies, windows"
                             " FROM evaluations ORDER BY id DESC LIMIT 1").fetchone()
    model = conn.execute("SELECT version, created_at, threshold, status, metadata FROM models"
                         " WHERE status = 'active' ORDER BY version DESC LIMIT 1").fetchone()
    counts = {status: n for status, n in conn.execute("SELECT status, COUNT(*) FROM blacklist GROUP BY status")}
    rounds = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    interfaces = [r[0] for r in conn.execute(
        "SELECT interface FROM rounds GROUP BY interface ORDER BY MAX(end_time) DESC")]
    return {
        "rounds": rounds,
        "interfaces": interfaces,
        "last_round": dict(last_round) if last_round else None,
        "last_evaluation": dict(last_eval) if last_eval else None,
        "model": dict(model) if model else None,
        "blacklist": {"active": counts.get("active", 0), "dry_run": counts.get("dry-run", 0),
                      "expired": counts.get("expired", 0), "removed": counts.get("removed", 0)},
    }


def round_totals(conn: sqlite3.Connection, since: float | None) -> list[sqlite3.Row]:
    """(end_time, interface, total_packets, dropped_packets, unparsed_packets) per round, in time order."""
    return conn.execute("SELECT end_time, interface, total_packets, dropped_packets, unparsed_packets"
                        " FROM rounds WHERE end_time >= ? ORDER BY end_time", (_since(since),)).fetchall()
