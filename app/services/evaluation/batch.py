"""The evaluation's batch: :class:`Batch`, everything one evaluation reads (the rules, the series
and the forged-source judge are pure functions of it), and its assembly from app/db/'s plain rows
(:func:`assemble`: the collector's tables; :func:`load_batch`: those plus the verified peers, the
handshakes they completed and the per-round source counts). Imported by the evaluation wing and the
fleet's learning; imports app.db and the config only.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from app.config import Evaluator
from app.db import peers as dbp
from app.db import series as dbs


@dataclass
class Batch:
    """What one evaluation reads (plain rows from app/db/, assembled by :func:`load_batch`).

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

    What leaves the host:
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
    handshakes: address -> {(round_id, port, protocol)} where a verified peer completed a TCP
    handshake with this host and no RST came on that flow, lo..last (two-way evidence); peer_rounds:
    address -> {round_id} with any completed handshake (two-way history).
    round_counts: round_id -> {new_sources, source_evictions, srcport_evictions}, lo..last, for the
    columns that exist.
    peers: address -> its peers row (address, last_verified, last_two_way, ttl, mac) for every
    address with a proof at or after ``peers_since`` (epoch seconds): what forged.judge_sources
    compares one-way evidence with.
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
    peers: dict = field(default_factory=dict)
    peers_since: float | None = None
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


def assemble(conn: sqlite3.Connection, rounds: Sequence, *, context_rounds: int = 0,
             since_time: float | None = None, beacon_since: float | None = None,
             baseline_since: float | None = None) -> Batch:
    """The collector's rows an evaluation of ``rounds`` reads, one query per table.

    context_rounds: how many rounds before the batch the series get as context; since_time: the
    scan span's start (rounds ending at or after it before the batch are the rules' scan_rounds);
    beacon_since: the beaconing span's start (outbound flows from then on); baseline_since: the
    start of the usual outbound rates (destination_baseline, host_out_bytes).
    """
    rounds = list(rounds)
    first, last = rounds[0]["id"], rounds[-1]["id"]
    context = dbs.rounds_before(conn, first, context_rounds) if context_rounds > 0 else []
    scan_rounds = dbs.rounds_since(conn, since_time, first) if since_time is not None else []
    batch = Batch(rounds, list(context), list(scan_rounds))
    lo, rules_lo = batch.lo, min([first, *(r["id"] for r in scan_rounds[:1])])
    batch.port_stats = dbs.port_stats_rows(conn, lo, last)
    batch.occupancy = dbs.occupancy_rows(conn, lo, last)
    batch.dns = dbs.dns_counts(conn, lo, last)
    batch.source_stats = dbs.source_stats_rows(conn, rules_lo, last)
    batch.source_ports = dbs.source_port_rows(conn, lo, last)
    _assemble_outbound(conn, batch, rules_lo, beacon_since, baseline_since)
    ids = {r[1] for r in batch.port_stats} | {r[1] for r in batch.occupancy} | {r[1] for r in batch.dns}
    ids |= {r[1] for r in batch.egress_port_stats}
    batch.ports = dbs.ports_by_id(conn, ids)
    batch.ports.update(dbs.ports_by_value(conn, {r[2] for r in batch.source_ports}
                                          | {r[4] for r in batch.outbound_flows} | {-1, 53}))
    batch.first_occupancy_round = dbs.first_occupancy_round(conn)
    held = {r[1] for r in batch.occupancy if r[0] >= first}
    batch.previous_holders = dbs.previous_holders(conn, held, first)
    batch.nominal_seconds = dbs.median_round_seconds(conn, last)
    batch.open_scans = dbs.open_scans(conn, rules_lo, first)
    return batch


def _assemble_outbound(conn: sqlite3.Connection, batch: Batch, rules_lo: int, beacon_since: float | None,
                       baseline_since: float | None) -> None:
    """What left the host (egress tables, outbound flows, usual outbound rates) and the DNS sample."""
    first, last, lo = batch.first, batch.last, batch.lo
    batch.egress_port_stats = dbs.egress_port_stats_rows(conn, lo, last)
    batch.destination_stats = dbs.destination_stats_rows(conn, rules_lo, last)
    batch.beacon_rounds = list(dbs.rounds_since(conn, beacon_since, first)) if beacon_since is not None else []
    flows_lo = min([rules_lo, *(r["id"] for r in batch.beacon_rounds[:1])])
    batch.outbound_flows = dbs.outbound_flow_rows(conn, flows_lo, last)
    if baseline_since is not None:
        base_first, base_count = dbs.baseline_span(conn, baseline_since, first)
        if base_count:
            batch.baseline_rounds = base_count
            batch.destination_baseline = dbs.destination_totals(conn, base_first, first - 1)
            batch.host_out_bytes = dbs.host_out_bytes(conn, base_first, first - 1)
    batch.dns_queries = dbs.dns_query_rows(conn, first, last)


def load_batch(conn: sqlite3.Connection, rounds: Sequence, cfg: Evaluator, context_rounds: int = 0, *,
               peers_since: float | None = None) -> Batch:
    """The one read of the store an evaluation of ``rounds`` makes: the rules' scan span and
    ``context_rounds`` earlier rounds of series context included, the verified peers (one query:
    those with a proof since the scan span's start, or since ``peers_since`` when earlier — the
    forged-source judge's look-back), the handshakes they completed and the per-round source counts."""
    start = rounds[0]["end_time"]
    scan_start = start - cfg.scan_span_seconds
    batch = assemble(conn, rounds, context_rounds=context_rounds, since_time=scan_start,
                     beacon_since=start - cfg.beacon_span_seconds,
                     baseline_since=start - cfg.exfiltration_baseline_seconds)
    batch.peers_since = scan_start if peers_since is None else min(scan_start, peers_since)
    batch.peers = {row["address"]: row for row in dbp.verified_peers(conn, batch.peers_since)}
    # handshake flows are two-way evidence only from an address that proved itself (app/db/peers.py):
    # SYN then ACK, or PSH|ACK, is what a blind forger sends too
    verified = {a for a, row in batch.peers.items() if row["last_verified"] >= scan_start}
    for round_id, address, port, protocol, reset in dbp.handshake_flows(conn, batch.lo, batch.last):
        batch.peer_rounds.setdefault(address, set()).add(round_id)          # history, reset or not
        if not reset and address in verified:
            batch.handshakes.setdefault(address, set()).add((round_id, port, protocol))   # evidence
    batch.round_counts = dbp.round_counts(conn, batch.lo, batch.last)
    return batch
