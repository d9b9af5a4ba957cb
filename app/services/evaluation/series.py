"""Batch → per-port time series → scaled windows. Pure functions (of the loaded batch and of numpy
arrays), no SQL, no TensorFlow.

A *round* is one time step, whatever its length. :func:`build_series` makes series (P ports, T rounds,
F = len(FEATURES) features, float32, original units); :func:`judge_windows` tiles the new rounds into
windows (N, W, F) that judge each exactly once, :func:`sliding_windows` makes the training ones; their
``index`` (N, 2) is [port, the window's last round]. Scaling for the model is scaler.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from app.services.evaluation.batch import Batch

# Feature names, in column order. Units are per round.
FEATURES: tuple[str, ...] = (
    "packets",           # packets to this local port
    "bytes",             # frame bytes
    "mean_payload",      # L4 payload bytes per packet
    "max_payload",       # largest L4 payload (bytes)
    "syn",               # TCP SYN without ACK
    "syn_share",         # SYNs / packets (a flood is all SYNs)
    "syn_synack_ratio",  # SYN / (SYN-ACK + 1)
    "rst",               # TCP RST
    "sources",           # distinct source addresses seen (flows + source_ports evidence)
    "listening",         # 1 when something holds the port (scanner), else 0
    "process_changed",   # 1 when the owning process name differs from its previous holder
    "established",       # established connections on the port (scanner)
    "dns_packets",       # DNS packets in the sniffer sample
    "out_packets",       # packets this host sent FROM this local port (TC egress, egress_port_stats)
    "out_bytes",         # frame bytes sent from this local port
)
N_FEATURES = len(FEATURES)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURES)}
# Features that are counts over the round (scaled to the nominal round length); the others are
# ratios, sizes or states.
COUNT_FEATURES = ("packets", "bytes", "syn", "rst", "dns_packets", "out_packets", "out_bytes")
# How far a round's length may be stretched to the nominal one (a 10x longer round counts 1/10 each)
MAX_STRETCH = 20.0


@dataclass(frozen=True)
class PortKey:
    """One series: a row of the ``ports`` table."""

    port_id: int
    value: int          # port number, ICMP type, or -1 for the ephemeral bucket
    protocol: str


@dataclass
class Series:
    """Per-port feature rows over consecutive rounds.

    round_ids (T,) int64 ascending; values (P, T, F) float32 in original units; ports: P PortKey.
    """

    round_ids: np.ndarray
    ports: list[PortKey]
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    def port_index(self) -> dict[int, int]:
        """port_id -> row in ``values``."""
        return {key.port_id: i for i, key in enumerate(self.ports)}


def build_series(round_ids: Sequence[int], ports: Sequence[PortKey],
                 port_stats: Iterable[Sequence], occupancy: Iterable[Sequence] = (),
                 dns: Iterable[Sequence] = (), sources: Iterable[Sequence] = (),
                 seconds: Sequence[float | None] | None = None, nominal_seconds: float | None = None,
                 egress: Iterable[Sequence] = ()) -> Series:
    """Assemble (P, T, F) series; rounds and ports absent from the rows stay zero.

    A round in which the port saw nothing is a row of zeros (occupancy features still say whether it
    listened). Counts are per *nominal* round: a round whose counters cover more time than usual (the
    collector skipped a minute, or the evaluator ran between two rounds) has its counts scaled to the
    nominal length, so a gap is not mistaken for a spike.

    seconds: (T,) time each round's counters cover; with ``nominal_seconds``, COUNT_FEATURES of a
    round are scaled by nominal / seconds (clipped to [1/MAX_STRETCH, MAX_STRETCH]).

    round_ids: T round ids, ascending (every round of the range, active or not).
    ports: the P series to build, in output order.
    port_stats rows: (round_id, port_id, packets, bytes, payload_bytes, max_payload, syn, synack, rst).
    occupancy rows: (round_id, port_id, pid, process, established) — one per socket holder.
    dns rows: (round_id, port_id, dns_packets).
    sources rows: (round_id, port_id, distinct_sources).
    egress rows: (round_id, port_id, packets, bytes) sent from the local port (egress_port_stats).
    Rows naming rounds or ports outside the requested ones are ignored.
    """
    round_ids = np.asarray(round_ids, dtype=np.int64)
    t_of = {int(r): t for t, r in enumerate(round_ids)}
    p_of = {key.port_id: i for i, key in enumerate(ports)}
    values = np.zeros((len(ports), len(round_ids), N_FEATURES), dtype=np.float32)
    f = FEATURE_INDEX
    for round_id, port_id, packets, nbytes, payload, max_payload, syn, synack, rst in port_stats:
        t, p = t_of.get(round_id), p_of.get(port_id)
        if t is None or p is None:
            continue
        row = values[p, t]
        row[f["packets"]] = packets
        row[f["bytes"]] = nbytes
        row[f["mean_payload"]] = payload / packets if packets else 0.0
        row[f["max_payload"]] = max_payload or 0
        row[f["syn"]] = syn
        row[f["syn_share"]] = syn / packets if packets else 0.0
        row[f["syn_synack_ratio"]] = syn / (synack + 1.0)
        row[f["rst"]] = rst
    holders: dict[tuple[int, int], set[str]] = {}
    for round_id, port_id, _pid, process, established in occupancy:
        t, p = t_of.get(round_id), p_of.get(port_id)
        if t is None or p is None:
            continue
        values[p, t, f["listening"]] = 1.0
        values[p, t, f["established"]] += established or 0
        holders.setdefault((p, t), set()).add(process or "?")
    previous: dict[int, tuple[int, set[str]]] = {}
    for (p, t) in sorted(holders, key=lambda pt: pt[1]):
        names = holders[(p, t)]
        before = previous.get(p)
        if before is not None and "?" not in names and "?" not in before[1] and names != before[1]:
            values[p, t, f["process_changed"]] = 1.0
        previous[p] = (t, names)
    for round_id, port_id, count in dns:
        t, p = t_of.get(round_id), p_of.get(port_id)
        if t is not None and p is not None:
            values[p, t, f["dns_packets"]] = count
    for round_id, port_id, count in sources:
        t, p = t_of.get(round_id), p_of.get(port_id)
        if t is not None and p is not None:
            values[p, t, f["sources"]] = count
    for round_id, port_id, packets, nbytes in egress:
        t, p = t_of.get(round_id), p_of.get(port_id)
        if t is not None and p is not None:
            values[p, t, f["out_packets"]] = packets
            values[p, t, f["out_bytes"]] = nbytes
    if seconds is not None and nominal_seconds:
        covered = np.array([s if s and s > 0 else nominal_seconds for s in seconds], dtype=np.float64)
        factor = np.clip(nominal_seconds / covered, 1.0 / MAX_STRETCH, MAX_STRETCH).astype(np.float32)
        cols = [f[name] for name in COUNT_FEATURES]
        values[:, :, cols] *= factor[None, :, None]
    return Series(round_ids=round_ids, ports=list(ports), values=values)


# --- from the loaded batch -----------------------------------------------------------------------

def port_activity(batch: "Batch") -> list[tuple[int, int, str, int, int]]:
    """Ports with traffic either way in the batch rounds, busiest first: (port_id, value, protocol,
    packets in + out, rounds with traffic)."""
    first, last = batch.first, batch.last
    packets: dict[int, int] = {}
    active: dict[int, set] = {}
    for row in (*batch.port_stats, *batch.egress_port_stats):
        if first <= row[0] <= last:
            packets[row[1]] = packets.get(row[1], 0) + row[2]
            active.setdefault(row[1], set()).add(row[0])
    rounds = {pid: len(ids) for pid, ids in active.items()}
    order = sorted(packets, key=lambda pid: (-packets[pid], pid))
    return [(pid, *batch.ports[pid], packets[pid], rounds[pid]) for pid in order]


def held_ports(batch: "Batch") -> set[int]:
    """port_ids something held (scanner) in any batch round."""
    return {row[1] for row in batch.occupancy if batch.first <= row[0] <= batch.last}


def source_counts(batch: "Batch") -> list[tuple[int, int, int]]:
    """(round_id, port_id, distinct sources) from the batch's flows/source_ports evidence (real ports only)."""
    seen: dict[tuple[int, int], set[str]] = {}
    for round_id, address, port, protocol, _packets, _bytes in batch.source_ports:
        port_id = batch.port_id(port, protocol)
        if port_id is not None:
            seen.setdefault((round_id, port_id), set()).add(address)
    return [(round_id, port_id, len(addresses)) for (round_id, port_id), addresses in seen.items()]


def batch_series(batch: "Batch", ports: Sequence[PortKey]) -> Series:
    """Series (P, T, F) of ``ports`` over the batch's context rounds plus the batch rounds."""
    rounds = list(batch.context) + list(batch.rounds)
    round_ids = [r["id"] for r in rounds]
    lo = round_ids[0]
    return build_series(round_ids, ports, [r for r in batch.port_stats if r[0] >= lo],
                        [r[:5] for r in batch.occupancy if r[0] >= lo], [r for r in batch.dns if r[0] >= lo],
                        [r for r in source_counts(batch) if r[0] >= lo], seconds=[r["seconds"] for r in rounds],
                        nominal_seconds=batch.nominal_seconds,
                        egress=[r for r in batch.egress_port_stats if r[0] >= lo])


# --- windows -----------------------------------------------------------------------------------

def _pad_front(values: np.ndarray, window: int) -> tuple[np.ndarray, int]:
    """Repeat the first round so that T >= window; returns (values, rounds added)."""
    missing = window - values.shape[1]
    if missing <= 0:
        return values, 0
    pad = np.repeat(values[:, :1, :], missing, axis=1)
    return np.concatenate([pad, values], axis=1), missing


def sliding_windows(values: np.ndarray, window: int, stride: int = 1,
                    usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All windows of ``window`` rounds whose last rounds are ``stride`` apart, aligned to the end.

    values: (P, T, F). usable: optional (P, T) bool; a window is kept only when every one of its
    rounds is usable (used to keep flagged or held-out rounds out of training).
    Returns windows (N, window, F) and index (N, 2) = [port, last round t]. T < window gives none.
    """
    n_ports, n_rounds, n_features = values.shape
    ends = np.arange(n_rounds - 1, window - 2, -max(1, stride))[::-1]
    if n_ports == 0 or len(ends) == 0:
        return np.zeros((0, window, n_features), np.float32), np.zeros((0, 2), np.int64)
    index = np.array([(p, t) for p in range(n_ports) for t in ends], dtype=np.int64)
    if usable is not None:
        blocked = ~usable.astype(bool)
        # a window ending at t is blocked when any of t-window+1..t is blocked: cumulative sums
        csum = np.concatenate([np.zeros((n_ports, 1), np.int64), np.cumsum(blocked, axis=1)], axis=1)
        bad = csum[index[:, 0], index[:, 1] + 1] - csum[index[:, 0], index[:, 1] + 1 - window]
        index = index[bad == 0]
    return gather_windows(values, index, window), index


def gather_windows(values: np.ndarray, index: np.ndarray, window: int) -> np.ndarray:
    """Windows (N, window, F) of ``values`` (P, T, F) ending at ``index`` (N, 2) = [port, last t]."""
    if len(index) == 0:
        return np.zeros((0, window, values.shape[2]), np.float32)
    offsets = np.arange(-window + 1, 1)
    rows = index[:, 1:2] + offsets[None, :]
    return values[index[:, 0:1], rows].astype(np.float32)


@dataclass
class JudgeWindows:
    """Windows that judge new rounds, each new round exactly once.

    windows (N, W, F) original units; index (N, 2) = [port, last round t in the *unpadded* series];
    judged (N, W) bool: the positions that are new rounds judged by this window (the rest is context).
    """

    windows: np.ndarray
    index: np.ndarray
    judged: np.ndarray


def judge_windows(values: np.ndarray, window: int, first_new: int) -> JudgeWindows:
    """Tile rounds ``first_new``..T-1 of ``values`` (P, T, F) into windows, from the end backwards.

    Each window ends ``window`` rounds after the previous one; the earliest may start before
    ``first_new`` and take its earlier rounds as context (not judged). When fewer than ``window``
    rounds exist at all, the first round is repeated in front (context only).
    """
    n_ports, n_rounds, n_features = values.shape
    padded, added = _pad_front(values, window)
    first_new_padded = first_new + added
    ends = np.arange(padded.shape[1] - 1, first_new_padded - 1, -window)[::-1]
    if n_ports == 0 or len(ends) == 0 or first_new >= n_rounds:
        return JudgeWindows(np.zeros((0, window, n_features), np.float32), np.zeros((0, 2), np.int64),
                            np.zeros((0, window), bool))
    index = np.array([(p, t) for p in range(n_ports) for t in ends], dtype=np.int64)
    windows = gather_windows(padded, index, window)
    positions = index[:, 1:2] + np.arange(-window + 1, 1)[None, :]
    judged = positions >= first_new_padded
    index = index.copy()
    index[:, 1] -= added
    return JudgeWindows(windows, index, judged)


def round_errors(judge: JudgeWindows, per_round: np.ndarray, round_ids: np.ndarray) -> list[tuple[int, float, float, int]]:
    """(round_id, max, median, ports) of the judged per-round errors ``per_round`` (N, W) over the ports,
    one row per judged round, in round order."""
    window = judge.judged.shape[1] if judge.judged.ndim == 2 else 0
    positions = judge.index[:, 1:2] - window + 1 + np.arange(window)[None, :]
    t, values = positions[judge.judged], per_round[judge.judged]
    out = []
    for u in np.unique(t):
        v = values[t == u]
        out.append((int(round_ids[u]), float(v.max()), float(np.median(v)), int(len(v))))
    return out


def window_rounds(index_row: Sequence[int], window: int) -> np.ndarray:
    """Round positions t (W,) covered by a window ending at index_row[1]; negative = padding."""
    return np.arange(index_row[1] - window + 1, index_row[1] + 1)


# --- masks -------------------------------------------------------------------------------------

def cell_mask(series: Series, cells: Iterable[tuple[int | None, int, int]]) -> np.ndarray:
    """(P, T) bool, True where a (port_id, first_round_id, last_round_id) span covers the cell.

    port_id None marks every port in those rounds.
    """
    mask = np.zeros(series.values.shape[:2], dtype=bool)
    rows = series.port_index()
    for port_id, first, last in cells:
        cols = (series.round_ids >= first) & (series.round_ids <= last)
        if not cols.any():
            continue
        if port_id is None:
            mask[:, cols] = True
        elif port_id in rows:
            mask[rows[port_id], cols] = True
    return mask


def holdout_tiles(n_ports: int, n_rounds: int, window: int, fraction: float,
                  rng: np.random.Generator, start: int = 0) -> np.ndarray:
    """Choose non-overlapping end-aligned tiles of ``window`` rounds to hold out of training.

    Returns index (N, 2) = [port, last t] of the held-out tiles (each lies wholly in start..T-1);
    training windows must avoid their rounds (see :func:`tile_mask`), so held-out scores are
    honest out-of-sample scores for threshold calibration.
    """
    ends = np.arange(n_rounds - 1, start + window - 2, -window)[::-1]
    if n_ports == 0 or len(ends) == 0 or fraction <= 0:
        return np.zeros((0, 2), np.int64)
    index = np.array([(p, t) for p in range(n_ports) for t in ends], dtype=np.int64)
    chosen = rng.random(len(index)) < fraction
    return index[chosen]


def tile_mask(shape: tuple[int, int], index: np.ndarray, window: int) -> np.ndarray:
    """(P, T) bool, True on the rounds of the windows ``index`` (N, 2) = [port, last t]."""
    mask = np.zeros(shape, dtype=bool)
    for p, t in index:
        mask[p, max(0, t - window + 1):t + 1] = True
    return mask
