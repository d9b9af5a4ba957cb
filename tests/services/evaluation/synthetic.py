"""Synthetic traffic for evaluator tests and benchmarks (seeded; no kernel, no network).

Two levels:
  * :func:`normal_series` / :func:`inject_spikes`: (P, T, F) feature arrays in original units;
  * :class:`SyntheticStore`: rounds written through the real schema (rounds, ports, port_stats,
    source_stats, source_ports, flows, rounds_ports, packets) into a SQLite file, with helpers to
    add benign background, a port scan, a SYN flood, a volume spike, a new listener.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

import numpy as np

from app.db.connection import connect
from app.db.peers import record_two_way
from app.db.ports import PortIds
from app.services.evaluation.series import FEATURE_INDEX, N_FEATURES

F = FEATURE_INDEX


def normal_series(n_ports: int, n_rounds: int, rng: np.random.Generator, profile: int = 0, start: int = 0) -> np.ndarray:
    """(P, T, F) benign per-port series: log-uniform base rates, a slow daily-like cycle, Poisson noise.

    profile seeds the ports' character (rates, packet sizes, SYN share, phase): the same profile is
    the same ports; rng draws the round-to-round noise. start offsets the cycle (rounds).
    """
    ports = np.random.default_rng(profile)
    base = np.exp(ports.uniform(np.log(5), np.log(5000), size=n_ports))
    size = ports.uniform(60, 1400, size=n_ports)
    syn_share = ports.uniform(0.01, 0.1, size=n_ports)
    phase = ports.uniform(0, 1, size=(n_ports, 1))
    t = np.arange(start, start + n_rounds)
    cycle = 1.0 + 0.4 * np.sin(2 * np.pi * (t / 240.0 + phase))
    packets = rng.poisson(base[:, None] * cycle).astype(np.float32)
    values = np.zeros((n_ports, n_rounds, N_FEATURES), np.float32)
    values[..., F["packets"]] = packets
    mean_payload = np.maximum(size[:, None] * rng.normal(1.0, 0.05, size=packets.shape) - 54, 0)
    values[..., F["mean_payload"]] = np.where(packets > 0, mean_payload, 0)
    values[..., F["bytes"]] = packets * (values[..., F["mean_payload"]] + 54)
    values[..., F["max_payload"]] = np.where(packets > 0, np.minimum(mean_payload * 1.5 + 10, 1460), 0)
    syn = rng.binomial(packets.astype(np.int64), syn_share[:, None]).astype(np.float32)
    values[..., F["syn"]] = syn
    values[..., F["syn_share"]] = np.where(packets > 0, syn / np.maximum(packets, 1), 0)
    values[..., F["syn_synack_ratio"]] = syn
    values[..., F["rst"]] = rng.poisson(syn * 0.02)
    values[..., F["sources"]] = np.minimum(rng.poisson(1 + np.sqrt(base)[:, None] * 0.2, size=packets.shape), packets)
    values[..., F["listening"]] = 1.0
    values[..., F["established"]] = rng.poisson(np.sqrt(base)[:, None] * 0.3, size=packets.shape)
    return values


def inject_spikes(values: np.ndarray, cells: list[tuple[int, int]], factor: float = 30.0) -> np.ndarray:
    """Copy of ``values`` with a volume spike (packets, bytes, SYN ×factor, SYN share up) at (port, t) cells."""
    out = values.copy()
    for p, t in cells:
        row = out[p, t]
        extra = max(row[F["packets"]], 20.0) * factor
        row[F["syn"]] += extra * 0.5
        row[F["packets"]] += extra
        row[F["bytes"]] += extra * 60
        row[F["syn_share"]] = row[F["syn"]] / row[F["packets"]]
        row[F["syn_synack_ratio"]] = row[F["syn"]]
        row[F["sources"]] += 40
    return out


@dataclass
class SyntheticStore:
    """Writes minute rounds into a real portwatch database.

    ports: {(value, protocol): (base packets per round, process name)} of the benign background.
    """

    path: str
    seed: int = 0
    round_seconds: float = 60.0
    start_time: float = 1_700_000_000.0
    ports: dict = field(default_factory=lambda: {(22, "tcp"): (20, "sshd"), (80, "tcp"): (400, "nginx"),
                                                 (443, "tcp"): (900, "nginx"), (53, "udp"): (120, "dnsmasq")})
    clients: int = 20                 # distinct benign client addresses

    def __post_init__(self):
        self.conn: sqlite3.Connection = connect(self.path)
        self.rng = np.random.default_rng(self.seed)
        self.port_ids = PortIds(self.conn)
        self.listeners = {key: proc for key, (_, proc) in self.ports.items()}
        self.n_rounds = self.conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def add_rounds(self, count: int, events: dict | None = None) -> list[int]:
        """Write ``count`` benign rounds; ``events`` maps the k-th new round (0-based) to a list of
        callables ``event(store, round_id, rows)`` that add attack traffic to that round's rows."""
        ids = []
        for k in range(count):
            ids.append(self._add_round((events or {}).get(k, [])))
        return ids

    def _add_round(self, events: list) -> int:
        rng = self.rng
        end = self.start_time + (self.n_rounds + 1) * self.round_seconds
        rows = {"port_stats": {}, "sources": {}, "source_ports": {}, "flows": [], "dns": [], "egress": {},
                "destinations": {}}
        cycle = 1.0 + 0.3 * np.sin(2 * np.pi * self.n_rounds / 240.0)
        for (value, proto), (base, _) in self.ports.items():
            packets = int(rng.poisson(base * cycle))
            if packets == 0:
                continue
            syn = int(rng.binomial(packets, 0.05)) if proto == "tcp" else 0
            self.add_port_traffic(rows, value, proto, packets, packets * 300, syn=syn)
            for c in range(min(3, self.clients)):
                h = (value * 7 + c) % self.clients
                address = f"198.51.{100 + h // 250}.{h % 250 + 1}"
                share = packets // 3
                self.add_source_traffic(rows, address, value, proto, share, syn=syn // 3)
                self.add_egress_traffic(rows, address, value, proto, share * 9 // 10, share * 900)
            if proto == "udp" and value == 53:
                rows["dns"].extend([value] * int(rng.poisson(5)))
        for event in events:
            event(self, rows)
        with self.conn:
            round_id = self.conn.execute(
                "INSERT INTO rounds (start_time, end_time, counts_since, interface, xdp_mode, scanner_status) "
                "VALUES (?, ?, ?, 'pwev0', 'generic', 'ok')", (end - self.round_seconds, end, end - self.round_seconds)).lastrowid
            self.conn.executemany(
                "INSERT INTO port_stats (round_id, port_id, packets, bytes, payload_bytes, min_payload, max_payload, "
                "syn, synack, rst, fin) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, 0)",
                [(round_id, self.port_ids(value, proto), packets, nbytes, max(nbytes - 54 * packets, 0),
                  min(1400, nbytes // max(packets, 1)), syn, synack, rst)
                 for (value, proto), (packets, nbytes, syn, synack, rst) in rows["port_stats"].items()])
            self.conn.executemany(
                "INSERT INTO source_stats (round_id, address, packets, bytes, syn, distinct_ports) VALUES (?, ?, ?, ?, ?, ?)",
                [(round_id, address, packets, nbytes, syn, len(ports))
                 for address, (packets, nbytes, syn, ports) in rows["sources"].items()])
            many = [(round_id, address, value, proto, n) for address, (_, _, _, ports) in rows["sources"].items()
                    if len(ports) >= 10 for (value, proto), n in ports.items()]
            self.conn.executemany("INSERT INTO source_ports (round_id, address, port, protocol, packets) "
                                  "VALUES (?, ?, ?, ?, ?)", many)
            # a source that sent nothing but SYNs never completed a handshake (flags SYN); others SYN|ACK
            few = [(round_id, address, value, proto, n, n * 300, 2 if packets == syn else 18)
                   for address, (packets, _, syn, ports) in rows["sources"].items()
                   if len(ports) < 10 for (value, proto), n in ports.items()]
            self.conn.executemany(
                "INSERT INTO flows (round_id, src_address, src_port, dst_address, dst_port, protocol, "
                "packets, bytes, tcp_flags, reason) VALUES (?, ?, 40000, '192.0.2.1', ?, ?, ?, ?, ?, 'top')", few)
            # what the collector records from the XDP program's verified map: the clients whose
            # handshakes acknowledged this host's ISN
            shaken = {r[1] for r in few if r[3] == "tcp" and r[6] == 18}
            record_two_way(self.conn, round_id, end, {a: ("handshake", 64, None) for a in sorted(shaken)})
            self.conn.executemany(
                "INSERT INTO egress_port_stats (round_id, port_id, packets, bytes) VALUES (?, ?, ?, ?)",
                [(round_id, self.port_ids(value, proto), packets, nbytes)
                 for (value, proto), (packets, nbytes) in rows["egress"].items()])
            self.conn.executemany(
                "INSERT INTO destination_stats (round_id, address, packets, bytes, syn, distinct_ports) "
                "VALUES (?, ?, ?, ?, ?, ?)", [(round_id, address, packets, nbytes, syn, len(ports))
                                              for address, (packets, nbytes, syn, ports) in rows["destinations"].items()])
            self.conn.executemany(
                "INSERT INTO rounds_ports (round_id, port_id, timestamp, pid, process, user, address, family, state, "
                "established) VALUES (?, ?, ?, ?, ?, 'root', '0.0.0.0', 'ipv4', ?, ?)",
                [(round_id, self.port_ids(value, proto), end, 1000 + value, process,
                  "LISTEN" if proto == "tcp" else "BOUND", int(rng.poisson(2)))
                 for (value, proto), process in self.listeners.items()])
            self.conn.executemany(
                "INSERT INTO packets (timestamp, protocols, qry_name, port_id, dest_port, transport, payload, length, "
                "round_id) VALUES (?, 'eth:ethertype:ip:udp:dns', 'example.org', ?, ?, 'udp', 40, 82, ?)",
                [(end, self.port_ids(value, "udp"), value, round_id) for value in rows["dns"]])
        self.n_rounds += 1
        return round_id

    @staticmethod
    def add_port_traffic(rows: dict, value: int, proto: str, packets: int, nbytes: int,
                         syn: int = 0, synack: int = 0, rst: int = 0) -> None:
        old = rows["port_stats"].get((value, proto), (0, 0, 0, 0, 0))
        rows["port_stats"][(value, proto)] = (old[0] + packets, old[1] + nbytes, old[2] + syn, old[3] + synack, old[4] + rst)

    @staticmethod
    def add_egress_traffic(rows: dict, address: str, value: int, proto: str, packets: int, nbytes: int,
                           remote_port: int = 40000, syn: int = 0) -> None:
        """What this host sent from local port (value, proto) to ``address`` (egress_port_stats and
        destination_stats; the remote port counts toward the destination's distinct ports)."""
        old = rows["egress"].get((value, proto), (0, 0))
        rows["egress"][(value, proto)] = (old[0] + packets, old[1] + nbytes)
        packets_old, bytes_old, syn_old, ports = rows["destinations"].get(address, (0, 0, 0, set()))
        ports.add((remote_port, proto))
        rows["destinations"][address] = (packets_old + packets, bytes_old + nbytes, syn_old + syn, ports)

    @staticmethod
    def add_source_traffic(rows: dict, address: str, value: int, proto: str, packets: int, syn: int = 0) -> None:
        packets_old, bytes_old, syn_old, ports = rows["sources"].get(address, (0, 0, 0, {}))
        ports[(value, proto)] = ports.get((value, proto), 0) + packets
        rows["sources"][address] = (packets_old + packets, bytes_old + packets * 300, syn_old + syn, ports)


# --- events (callables for SyntheticStore.add_rounds) ---------------------------------------------

def port_scan(address: str, ports: range | list, proto: str = "tcp"):
    """One SYN to each port from ``address``."""
    def event(store: SyntheticStore, rows: dict) -> None:
        for value in ports:
            store.add_port_traffic(rows, value, proto, 1, 60, syn=1 if proto == "tcp" else 0)
            store.add_source_traffic(rows, address, value, proto, 1, syn=1)
    return event


def syn_flood(value: int, syns: int, sources: list[str]):
    """``syns`` SYNs to port ``value`` spread over ``sources``, no handshake completion."""
    def event(store: SyntheticStore, rows: dict) -> None:
        store.add_port_traffic(rows, value, "tcp", syns, syns * 60, syn=syns)
        for address in sources:
            store.add_source_traffic(rows, address, value, "tcp", syns // len(sources), syn=syns // len(sources))
    return event


def volume_spike(value: int, proto: str, packets: int, address: str, payload: int = 1200):
    """``packets`` large packets to one port from one source (an exfiltration/flood look)."""
    def event(store: SyntheticStore, rows: dict) -> None:
        store.add_port_traffic(rows, value, proto, packets, packets * (payload + 54))
        store.add_source_traffic(rows, address, value, proto, packets)
    return event


def upload(address: str, nbytes: int, local_port: int = -1, remote_port: int = 443):
    """This host sends ``nbytes`` (1,500-byte packets) to ``address`` (an upload or exfiltration)."""
    def event(store: SyntheticStore, rows: dict) -> None:
        store.add_egress_traffic(rows, address, local_port, "tcp", nbytes // 1500, nbytes, remote_port, syn=1)
    return event


def listen(value: int, proto: str, process: str):
    """From this round on, ``process`` holds (value, proto) (a new listener or a changed owner)."""
    def event(store: SyntheticStore, rows: dict) -> None:
        store.listeners[(value, proto)] = process
    return event
