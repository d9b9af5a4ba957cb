"""Queries for the fleet: the mirror of a CrowdSec LAPI's decisions, the queue of pushes to it,
its sync state, and the ledger rows the sync reads and writes (table ``blacklist``, origin 'crowdsec').

Writers call these inside ``app.db.blacklist.immediate`` (one transaction per sync step).
"""
from __future__ import annotations

import sqlite3
from typing import Iterable

PUSH_PENDING = "pending"


# --- the decision mirror --------------------------------------------------------------------------

def mirror_ids(conn) -> set[int]:
    return {r[0] for r in conn.execute("SELECT id FROM crowdsec_decisions")}


def upsert_decisions(conn, rows: Iterable[tuple], seen_at: float) -> None:
    """rows: (id, address, scenario, origin, until). A known id keeps its seen_at and refusal."""
    conn.executemany(
        "INSERT INTO crowdsec_decisions (id, address, scenario, origin, until, seen_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET address = excluded.address, scenario = excluded.scenario, "
        "origin = excluded.origin, until = excluded.until",
        ((*r, seen_at) for r in rows))


def delete_decisions(conn, ids: Iterable[int]) -> int:
    cur = conn.executemany("DELETE FROM crowdsec_decisions WHERE id = ?", ((i,) for i in ids))
    return cur.rowcount


def delete_ended(conn, now: float) -> int:
    return conn.execute("DELETE FROM crowdsec_decisions WHERE until <= ?", (now,)).rowcount


def wanted(conn, now: float, slack: float) -> list[sqlite3.Row]:
    """Per address the mirror wants enforced (not refused, running past ``now``) and the ledger does
    not already enforce until the decision's end (less ``slack`` seconds): the latest end, the first
    time seen, one scenario and origin, the decision ids; with the ledger row of that address
    (status, origin, expires_at, removed_at, offences; NULL when none). In steady state: no rows."""
    return conn.execute(
        "SELECT d.address, d.until, d.seen_at, d.scenario, d.origin, d.ids, b.status, b.origin AS ledger_origin, "
        "b.expires_at, b.removed_at, b.offences FROM (SELECT address, MAX(until) AS until, MIN(seen_at) AS seen_at, "
        "MAX(scenario) AS scenario, MAX(origin) AS origin, GROUP_CONCAT(id) AS ids FROM crowdsec_decisions "
        "WHERE refused IS NULL AND until > ? GROUP BY address) d LEFT JOIN blacklist b ON b.address = d.address "
        "WHERE NOT (b.status IS NOT NULL AND b.status IN ('active', 'dry-run') "
        "AND (b.expires_at IS NULL OR b.expires_at >= d.until - ?))", (now, slack)).fetchall()


def refuse(conn, address: str, why: str) -> None:
    conn.execute("UPDATE crowdsec_decisions SET refused = ? WHERE address = ?", (why, address))


def count_mirror(conn) -> tuple[int, int]:
    """(decisions mirrored, of which refused)."""
    row = conn.execute("SELECT COUNT(*), COUNT(refused) FROM crowdsec_decisions").fetchone()
    return row[0], row[1]


def refused_decisions(conn) -> list[sqlite3.Row]:
    return conn.execute("SELECT address, scenario, origin, until, refused FROM crowdsec_decisions "
                        "WHERE refused IS NOT NULL ORDER BY address").fetchall()


# --- the ledger's crowdsec rows -------------------------------------------------------------------

def orphaned_entries(conn) -> list[sqlite3.Row]:
    """Active ledger rows of origin 'crowdsec' that no running mirrored decision backs any more."""
    return conn.execute(
        "SELECT * FROM blacklist b WHERE b.origin = 'crowdsec' AND b.status IN ('active', 'dry-run') AND NOT EXISTS "
        "(SELECT 1 FROM crowdsec_decisions d WHERE d.address = b.address AND d.refused IS NULL)").fetchall()


def lift_entry(conn, address: str, at: float) -> None:
    """A crowdsec row whose decision ended or was deleted in the LAPI: 'expired' now (not a hand
    removal, so a local detection may block the address again at once)."""
    conn.execute("UPDATE blacklist SET status = 'expired', expires_at = MIN(COALESCE(expires_at, ?), ?) "
                 "WHERE address = ? AND origin = 'crowdsec'", (at, at, address))


def set_expiry(conn, address: str, expires_at: float) -> None:
    conn.execute("UPDATE blacklist SET expires_at = ? WHERE address = ?", (expires_at, address))


def count_origin(conn, origin: str, statuses=("active",)) -> int:
    marks = ", ".join("?" * len(statuses))
    return conn.execute(f"SELECT COUNT(*) FROM blacklist WHERE origin = ? AND status IN ({marks})",
                        (origin, *statuses)).fetchone()[0]


# --- pushes ---------------------------------------------------------------------------------------

def unpushed_blocks(conn, origins: Iterable[str], now: float) -> list[sqlite3.Row]:
    """Active ledger rows of ``origins`` ('auto', 'manual') still running and never queued, with the
    detector of their anomaly (NULL for manual rows) and the finding's summary when its reasons hold one."""
    origins = tuple(origins)
    marks = ", ".join("?" * len(origins))
    return conn.execute(
        "SELECT b.address, b.reason, b.origin, b.created_at, b.expires_at, a.detector, "
        "json_extract(CASE WHEN json_valid(a.reasons) THEN a.reasons END, '$.summary') AS summary "
        f"FROM blacklist b LEFT JOIN anomalies a ON a.id = b.anomaly_id WHERE b.origin IN ({marks}) "
        "AND b.status = 'active' AND b.expires_at > ? AND NOT EXISTS (SELECT 1 FROM crowdsec_pushes p "
        "WHERE p.address = b.address AND p.block_created_at = b.created_at AND p.action = 'add')",
        (*origins, now)).fetchall()


def unblocked_pushes(conn) -> list[sqlite3.Row]:
    """'add' pushes whose block was removed by hand since, with no 'delete' queued for it yet."""
    return conn.execute(
        "SELECT p.* FROM crowdsec_pushes p JOIN blacklist b ON b.address = p.address WHERE p.action = 'add' "
        "AND p.state IN ('pending', 'sent') AND b.status = 'removed' AND b.removed_at >= p.block_created_at "
        "AND NOT EXISTS (SELECT 1 FROM crowdsec_pushes q WHERE q.address = p.address "
        "AND q.block_created_at = p.block_created_at AND q.action = 'delete')").fetchall()


def queue_push(conn, address: str, block_created_at: float, action: str, scenario: str, message: str | None,
               expires_at: float | None, at: float, state: str = PUSH_PENDING) -> None:
    conn.execute("INSERT OR IGNORE INTO crowdsec_pushes (address, block_created_at, action, scenario, message, "
                 "expires_at, queued_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (address, block_created_at, action, scenario, message, expires_at, at, state))


def pending_pushes(conn, limit: int | None = None) -> list[sqlite3.Row]:
    sql = "SELECT * FROM crowdsec_pushes WHERE state = 'pending' ORDER BY id"
    return conn.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()


def count_pending(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM crowdsec_pushes WHERE state = 'pending'").fetchone()[0]


def set_push_state(conn, push_id: int, state: str, at: float | None = None, alert_id: str | None = None) -> None:
    conn.execute("UPDATE crowdsec_pushes SET state = ?, sent_at = COALESCE(?, sent_at), "
                 "alert_id = COALESCE(?, alert_id), last_error = CASE WHEN ? = 'sent' THEN NULL ELSE last_error END "
                 "WHERE id = ?", (state, at, alert_id, state, push_id))


def push_failed(conn, push_ids: Iterable[int], error: str) -> None:
    conn.executemany("UPDATE crowdsec_pushes SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                     ((error, i) for i in push_ids))


def drop_oldest_pending(conn, keep: int) -> int:
    """Pending pushes beyond the newest ``keep`` become 'dropped'; returns how many."""
    return conn.execute(
        "UPDATE crowdsec_pushes SET state = 'dropped', last_error = 'queue full' WHERE state = 'pending' AND id NOT IN "
        "(SELECT id FROM crowdsec_pushes WHERE state = 'pending' ORDER BY id DESC LIMIT ?)", (keep,)).rowcount


def push_counts(conn) -> dict[str, int]:
    return {r[0]: r[1] for r in conn.execute("SELECT state, COUNT(*) FROM crowdsec_pushes GROUP BY state")}


# --- sync state -----------------------------------------------------------------------------------

def state(conn) -> dict[str, str]:
    return {r[0]: r[1] for r in conn.execute("SELECT key, value FROM crowdsec_state")}


def set_state(conn, values: dict) -> None:
    conn.executemany("INSERT INTO crowdsec_state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                     "value = excluded.value", ((k, None if v is None else str(v)) for k, v in values.items()))


# --- models (the federated model) -----------------------------------------------------------------

def set_model_origin(conn, version: int, origin: str) -> None:
    conn.execute("UPDATE models SET origin = ? WHERE version = ?", (origin, version))


def models_by_origin(conn) -> list[sqlite3.Row]:
    return conn.execute("SELECT version, origin, status, created_at, threshold, train_windows, held_out_rate_per_day, "
                        "budget_per_day, json_extract(metadata, '$.fleet.why') AS not_adopted_because "
                        "FROM models ORDER BY version DESC").fetchall()
