"""Read-only queries the evaluator runs on the collector's tables, and :func:`load_batch`: everything
one evaluation reads, loaded once (the rules and the series are pure functions of a :class:`Batch`).

rounds, ports, port_stats, rounds_ports, packets, source_stats, source_ports, flows, and what leaves
the host: egress_port_stats, destination_stats and outbound flows (``flows.direction = 'out'``). Every
function takes an open connection and returns plain tuples, sqlite3.Row objects or a Batch;
nothing here writes. Round ranges are inclusive: ``first <= round_id <= last``. Baseline rounds
(rounds.baseline = 1: counts from before this database watched the interface) are never read as traffic.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

# A round's length in seconds: the counters cover (counts_since, end_time].
_ROUND_SECONDS = "(r.end_time - COALESCE(r.counts_since, r.start_time))"


def rounds_after(conn: sqlite3.Connection, after_id: int, limit: int) -> list[sqlite3.Row]:
    """Up to ``limit`` rounds with id > after_id, ascending: id, start_time, end_time, seconds, scanner_status."""
    return conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.id > ? AND r.baseline = 0 ORDER BY r.id LIMIT ?", (after_id, limit)).fetchall()


def rounds_before(conn: sqlite3.Connection, before_id: int, count: int) -> list[sqlite3.Row]:
    """The ``count`` rounds just before ``before_id``, ascending (same columns as rounds_after)."""
    rows = conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.id < ? AND r.baseline = 0 ORDER BY r.id DESC LIMIT ?", (before_id, count)).fetchall()
    return rows[::-1]


def rounds_since(conn: sqlite3.Connection, since_time: float, before_id: int) -> list[sqlite3.Row]:
    """Rounds that ended at or after ``since_time`` with id < before_id, ascending."""
    return conn.execute(
        f"SELECT r.id, r.start_time, r.end_time, {_ROUND_SECONDS} AS seconds, r.scanner_status "
        "FROM rounds r WHERE r.end_time >= ? AND r.id < ? AND r.baseline = 0 ORDER BY r.id", (since_time, before_id)).fetchall()


def count_rounds(conn: sqlite3.Connection, upto_id: int) -> int:
    """Rounds with id <= upto_id (how much history exists at the end of a batch)."""
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE id <= ? AND baseline = 0", (upto_id,)).fetchone()[0]


def count_rounds_since(conn: sqlite3.Connection, since_time: float, before_id: int) -> int:
    """Rounds that ended at or after ``since_time`` with id < before_id (a detector's look-back)."""
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE end_time >= ? AND id < ? AND baseline = 0",
                        (since_time, before_id)).fetchone()[0]


def count_rounds_after(conn: sqlite3.Connection, after_id: int) -> int:
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE id > ? AND baseline = 0", (after_id,)).fetchone()[0]


def median_round_seconds(conn: sqlite3.Connection, upto_id: int, last: int = 500) -> float | None:
    """Median length (s) of the last ``last`` rounds up to ``upto_id``; None without rounds."""
    rows = conn.execute(
        f"SELECT {_ROUND_SECONDS} FROM rounds r WHERE r.id <= ? AND r.baseline = 0 ORDER BY r.id DESC LIMIT ?",
        (upto_id, last)).fetchall()
    values = sorted(v[0] for v in rows if v[0] is not None and v[0] > 0)
    return values[len(values) // 2] if values else None


def ports_by_id(conn: sqlite3.Connection, port_ids: Iterable[int]) -> dict[int, tuple[int, str]]:
    """port_id -> (value, protocol)."""
    ids = sorted(set(port_ids))
    out: dict[int, tuple[int, str]] = {}
    for chunk in _chunks(ids, 500):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT id, value, protocol FROM ports WHERE id IN ({marks})", chunk):
            out[row[0]] = (row[1], row[2])
    return out


def previous_holders(conn: sqlite3.Connection, port_ids: Sequence[int], before_id: int) -> dict[int, tuple[int, list[tuple]]]:
    """For each port, its most recent holders before ``before_id``: port_id -> (round_id, [(pid, process, user)])."""
    out: dict[int, tuple[int, list[tuple]]] = {}
    for chunk in _chunks(sorted(set(port_ids)), 500):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT rp.port_id, rp.round_id, rp.pid, rp.process, rp.user FROM rounds_ports rp "
            "JOIN (SELECT port_id, MAX(round_id) AS round_id FROM rounds_ports "
            f"      WHERE round_id < ? AND port_id IN ({marks}) GROUP BY port_id) last "
            "  ON last.port_id = rp.port_id AND last.round_id = rp.round_id",
            (before_id, *chunk)).fetchall()
        for port_id, round_id, pid, process, user in rows:
            out.setdefault(port_id, (round_id, []))[1].append((pid, process, user))
    return out


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def ports_by_value(conn: sqlite3.Connection, values: Iterable[int]) -> dict[int, tuple[int, str]]:
    """port_id -> (value, protocol) for every protocol's row of the given port values."""
    out: dict[int, tuple[int, str]] = {}
    for chunk in _chunks(sorted(set(values)), 500):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT id, value, protocol FROM ports WHERE value IN ({marks})", chunk):
            out[row[0]] = (row[1], row[2])
    return out


# --- the batch: loaded once per evaluation ---------------------------------------------------------

@dataclass
class Batch:
    """What one evaluation reads (plain rows, loaded by :func:`load_batch`).

    rounds: the rounds judged now; context: the rounds just before them that the series get as
    context (ascending); scan_rounds: earlier rounds that ended within the scan span before the
    batch (ascending). Each round is (id, start_time, end_time, seconds, scanner_status) with those
    names (sqlite3.Row or dict). ``lo``: the first round any row below may belong to.
    ports: port_id -> (value, protocol) for every port the rows name (and every protocol's row of
    the port values sources reached, the ephemeral buckets included).
    port_stats: (round_id, port_id, packets, bytes, payload_bytes, max_payload, syn, synack, rst), lo..last.
    occupancy: (round_id, port_id, pid, process, established, user, address) per holder, lo..last,
    ordered by round.
    dns: (round_id, port_id, dns_packets) from the sniffer sample, lo..last.
    source_stats: (round_id, address, packets, bytes, syn, distinct_ports), rules_lo..last (every
    source of every round: read only where the rules look).
    source_ports: (round_id, address, port, protocol, packets, bytes), lo..last: which local port
    each source reached, per round the larger of the source_ports and flows evidence (packets);
    bytes from flows (0 where only source_ports knew it).
    first_occupancy_round: the first round with any scanner data (None: none yet).
    previous_holders: port_id -> (round_id, [(pid, process, user)]) of the ports held in the batch,
    their most recent holders before it.
    nominal_seconds: median round length (s) up to the last round, None without rounds.
    open_scans: stored port_scan anomalies rows (the columns Finding.from_row reads) whose last
    round is at or after the scan span's first round: a scan that goes on grows that finding, and
    the rounds it already holds are not counted again.

    What leaves the host (issue 12):
    egress_port_stats: (round_id, port_id, packets, bytes) outbound per local port, lo..last.
    destination_stats: (round_id, address, packets, bytes, syn, distinct_ports) per remote address
    this host sent to, rules_lo..last.
    outbound_flows: (round_id, dst_address, dst_port, protocol, src_port, packets, bytes, first_seen,
    last_seen, tcp_flags) from flows with direction 'out', beacon_rounds' first..last.
    beacon_rounds: earlier rounds that ended within the beaconing span before the batch (ascending).
    destination_baseline: address -> (rounds, bytes, max_round_bytes) over baseline_rounds rounds
    before the batch (the exfiltration rule's usual rates); host_out_bytes: [(round_id, bytes)] the
    host's outbound bytes (all destinations) per baseline round that sent anything.
    dns_queries: (round_id, timestamp, src_address, dst_address, qry_name, qry_type, rcode, response)
    sniffer rows with a DNS name, batch rounds; response: 1 for a response (rcode or answers set).
    handshakes: address -> {(round_id, port, protocol)} where it completed a TCP handshake with this
    host and no RST came on that flow, lo..last (app/db/peers.py; set by the evaluation: two-way
    evidence); peer_rounds: address -> {round_id} with any completed handshake (two-way history).
    round_counts: round_id -> {new_sources, source_evictions, srcport_evictions}, lo..last, for the
    columns that exist (app/db/peers.py; set by the evaluation).
    """

    rounds: list
    context: list = field(default_factory=list)
    scan_rounds: list = field(default_factory=list)
    ports: dict = field(default_factory=dict)
    port_stats: list = field(default_factory=list)
    occupancy: list = field(default_factory=list)
    dns: list = field(default_factory=list)
    source_stats: list = field(default_factory=list)
    source_ports: list = field(default_factory=list)
    first_occupancy_round: int | None = None
    previous_holders: dict = field(default_factory=dict)
    nominal_seconds: float | None = None
    open_scans: list = field(default_factory=list)
    egress_port_stats: list = field(default_factory=list)
    destination_stats: list = field(default_factory=list)
    outbound_flows: list = field(default_factory=list)
    beacon_rounds: list = field(default_factory=list)
    destination_baseline: dict = field(default_factory=dict)
    baseline_rounds: int = 0
    host_out_bytes: list = field(default_factory=list)
    dns_queries: list = field(default_factory=list)
    handshakes: dict = field(default_factory=dict)
    peer_rounds: dict = field(default_factory=dict)
    round_counts: dict = field(default_factory=dict)
    _by_port: dict | None = field(default=None, repr=False, compare=False)
    _stats_by_port: dict | None = field(default=None, repr=False, compare=False)
    _ids: dict | None = field(default=None, repr=False, compare=False)

    @property
    def first(self) -> int:
        return self.rounds[0]["id"]

    @property
    def last(self) -> int:
        return self.rounds[-1]["id"]

    @property
    def lo(self) -> int:
        earlier = [r["id"] for r in (*self.context[:1], *self.scan_rounds[:1])]
        return min([self.first, *earlier])

    def port_id(self, value: int, protocol: str) -> int | None:
        """The ports.id of (value, protocol) among the loaded ports, or None."""
        if self._ids is None:
            self._ids = {key: pid for pid, key in self.ports.items()}
        return self._ids.get((value, protocol))

    def source_ports_of(self, value: int, protocol: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The source_ports rows of one local port as columns (round_ids, addresses, packets, bytes),
        indexed on first use."""
        if self._by_port is None:
            grouped: dict = {}
            for row in self.source_ports:
                grouped.setdefault((row[2], row[3]), []).append(row)
            self._by_port = {key: (np.array([r[0] for r in rows], dtype=np.int64),
                                   np.array([r[1] for r in rows], dtype=object),
                                   np.array([r[4] for r in rows], dtype=np.int64),
                                   np.array([r[5] for r in rows], dtype=np.int64)) for key, rows in grouped.items()}
        return self._by_port.get((value, protocol), _NO_SOURCES)

    def port_stats_of(self, port_id: int) -> np.ndarray:
        """The port_stats rows of one port, (n, 9) int64 (columns as in ``port_stats``), indexed on first use."""
        if self._stats_by_port is None:
            grouped: dict = {}
            for row in self.port_stats:
                grouped.setdefault(row[1], []).append(row)
            self._stats_by_port = {pid: np.array(rows, dtype=np.int64) for pid, rows in grouped.items()}
        return self._stats_by_port.get(port_id, _NO_STATS)

    def keep_port_indexes_only(self) -> None:
        """Keep only what :meth:`source_ports_of` and :meth:`port_stats_of` read, as compact
        per-port arrays; every other row goes (what the model step needs, in a fraction of the memory)."""
        self.source_ports_of(0, "")
        self.port_stats_of(0)
        self.port_stats, self.occupancy, self.dns, self.source_stats, self.source_ports = [], [], [], [], []
        self._release_outbound()

    def _release_outbound(self) -> None:
        self.egress_port_stats, self.destination_stats, self.outbound_flows, self.dns_queries = [], [], [], []
        self.destination_baseline, self.host_out_bytes = {}, []

    def release(self) -> None:
        """Let every loaded row go (the rounds and ports stay): a caller done reading frees the
        memory before something big (a model fit)."""
        self.port_stats, self.occupancy, self.dns, self.source_stats, self.source_ports = [], [], [], [], []
        self._release_outbound()
        self._by_port = self._stats_by_port = None


_NO_SOURCES = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64),
               np.zeros(0, dtype=np.int64))
_NO_STATS = np.zeros((0, 9), dtype=np.int64)

def _tuples(cursor, text_columns: Sequence[int] = ()) -> list[tuple]:
    """Rows as plain tuples, the text of ``text_columns`` shared (one str per distinct address,
    protocol or process: a batch holds hundreds of thousands of rows naming a few thousand)."""
    if not text_columns:
        return [tuple(r) for r in cursor]
    shared: dict = {}
    out = []
    for row in cursor:
        row = list(row)
        for i in text_columns:
            row[i] = shared.setdefault(row[i], row[i])
        out.append(tuple(row))
    return out


def load_batch(conn: sqlite3.Connection, rounds: Sequence, *, context_rounds: int = 0,
               since_time: float | None = None, beacon_since: float | None = None,
               baseline_since: float | None = None) -> Batch:
    """Everything an evaluation of ``rounds`` reads, one query per table.

    context_rounds: how many rounds before the batch the series get as context; since_time: the
    scan span's start (rounds ending at or after it before the batch are the rules' scan_rounds);
    beacon_since: the beaconing span's start (outbound flows from then on); baseline_since: the
    start of the usual outbound rates (destination_baseline, host_out_bytes).
    """
    rounds = list(rounds)
    first, last = rounds[0]["id"], rounds[-1]["id"]
    context = rounds_before(conn, first, context_rounds) if context_rounds > 0 else []
    scan_rounds = rounds_since(conn, since_time, first) if since_time is not None else []
    batch = Batch(rounds, list(context), list(scan_rounds))
    lo, rules_lo = batch.lo, min([first, *(r["id"] for r in scan_rounds[:1])])
    batch.port_stats = _tuples(conn.execute(
        "SELECT round_id, port_id, packets, bytes, payload_bytes, COALESCE(max_payload, 0), syn, synack, rst "
        "FROM port_stats WHERE round_id BETWEEN ? AND ?", (lo, last)))
    batch.occupancy = _tuples(conn.execute(
        "SELECT round_id, port_id, pid, process, established, user, address FROM rounds_ports "
        "WHERE round_id BETWEEN ? AND ? ORDER BY round_id, id", (lo, last)), (3, 5, 6))
    batch.dns = conn.execute(
        "SELECT round_id, port_id, COUNT(*) FROM packets "
        "WHERE round_id BETWEEN ? AND ? AND port_id IS NOT NULL "
        "  AND (qry_name IS NOT NULL OR protocols LIKE '%dns%') GROUP BY round_id, port_id",
        (lo, last)).fetchall()
    batch.source_stats = _tuples(conn.execute(
        "SELECT round_id, address, packets, bytes, syn, distinct_ports FROM source_stats "
        "WHERE round_id BETWEEN ? AND ?", (rules_lo, last)), (1,))
    batch.source_ports = _tuples(conn.execute(
        "SELECT round_id, address, port, protocol, MAX(packets), MAX(bytes) FROM ("
        "  SELECT round_id, address, port, protocol, packets, 0 AS bytes FROM source_ports"
        "  WHERE round_id BETWEEN ?1 AND ?2"
        "  UNION ALL SELECT round_id, src_address, dst_port, protocol, SUM(packets), SUM(bytes) FROM flows"
        "  WHERE round_id BETWEEN ?1 AND ?2 AND direction = 'in' AND (tcp_flags & 256) = 0"   # 256: an answer
        "  GROUP BY round_id, src_address, dst_port, protocol"
        ") GROUP BY round_id, address, port, protocol", (lo, last)), (1, 3))
    _load_outbound(conn, batch, rules_lo, beacon_since, baseline_since)
    ids = {r[1] for r in batch.port_stats} | {r[1] for r in batch.occupancy} | {r[1] for r in batch.dns}
    ids |= {r[1] for r in batch.egress_port_stats}
    batch.ports = ports_by_id(conn, ids)
    batch.ports.update(ports_by_value(conn, {r[2] for r in batch.source_ports} | {r[4] for r in batch.outbound_flows}
                                      | {-1, 53}))
    batch.first_occupancy_round = conn.execute("SELECT MIN(round_id) FROM rounds_ports").fetchone()[0]
    held = {r[1] for r in batch.occupancy if r[0] >= first}
    batch.previous_holders = previous_holders(conn, held, first)
    batch.nominal_seconds = median_round_seconds(conn, last)
    batch.open_scans = conn.execute(
        "SELECT a.*, p.value AS port, p.protocol FROM anomalies a LEFT JOIN ports p ON p.id = a.port_id "
        "WHERE a.detector = 'port_scan' AND a.last_round_id >= ? AND a.last_round_id < ? ORDER BY a.id",
        (rules_lo, first)).fetchall()
    return batch


def _load_outbound(conn: sqlite3.Connection, batch: Batch, rules_lo: int, beacon_since: float | None,
                   baseline_since: float | None) -> None:
    """What left the host (egress tables, outbound flows, usual outbound rates) and the DNS sample."""
    first, last, lo = batch.first, batch.last, batch.lo
    batch.egress_port_stats = _tuples(conn.execute(
        "SELECT round_id, port_id, packets, bytes FROM egress_port_stats WHERE round_id BETWEEN ? AND ?", (lo, last)))
    batch.destination_stats = _tuples(conn.execute(
        "SELECT round_id, address, packets, bytes, syn, distinct_ports FROM destination_stats "
        "WHERE round_id BETWEEN ? AND ?", (rules_lo, last)), (1,))
    batch.beacon_rounds = list(rounds_since(conn, beacon_since, first)) if beacon_since is not None else []
    flows_lo = min([rules_lo, *(r["id"] for r in batch.beacon_rounds[:1])])
    batch.outbound_flows = _tuples(conn.execute(
        "SELECT round_id, dst_address, dst_port, protocol, src_port, packets, bytes, first_seen, last_seen, tcp_flags "
        "FROM flows WHERE direction = 'out' AND round_id BETWEEN ? AND ? ORDER BY round_id", (flows_lo, last)), (1, 3))
    if baseline_since is not None:
        base = conn.execute("SELECT MIN(id), COUNT(*) FROM rounds WHERE end_time >= ? AND id < ? AND baseline = 0",
                            (baseline_since, first)).fetchone()
        if base[1]:
            batch.baseline_rounds = base[1]
            batch.destination_baseline = {row[0]: (row[1], row[2], row[3]) for row in conn.execute(
                "SELECT address, COUNT(*), SUM(bytes), MAX(bytes) FROM destination_stats "
                "WHERE round_id BETWEEN ? AND ? GROUP BY address", (base[0], first - 1))}
            batch.host_out_bytes = [tuple(r) for r in conn.execute(
                "SELECT round_id, SUM(bytes) FROM destination_stats WHERE round_id BETWEEN ? AND ? "
                "GROUP BY round_id ORDER BY round_id", (base[0], first - 1))]
    batch.dns_queries = _tuples(conn.execute(
        "SELECT round_id, timestamp, src_address, dst_address, qry_name, qry_type, rcode, "
        "       (rcode IS NOT NULL OR resp_name IS NOT NULL) FROM packets "
        "WHERE round_id BETWEEN ? AND ? AND qry_name IS NOT NULL ORDER BY timestamp", (first, last)), (2, 3))
