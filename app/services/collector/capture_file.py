"""A pcap or pcapng file as arrays: where each packet's bytes are, when it was captured, and the few
header fields a replay needs in user space (addresses, ports, TCP flags) — no per-packet Python object.

The kernel counts (the programs do that, from the raw bytes); these fields only decide each packet's
direction (:func:`most_answered`: the capture's host) and which listeners the host had
(:func:`inferred_listeners`). Link types: :func:`_frame`.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import UsageError

LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6 = 1, 101, 113, 228, 229
SUPPORTED = (LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6)
_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
               b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}   # -> (byte order, ns per tick)
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_FAKE_ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"   # locally administered MACs


@dataclass
class Capture:
    """Packets of one file. buffer: every frame's bytes (Ethernet framed); offsets/lengths: (n,) int64
    byte positions and sizes in ``buffer``; ts_ns: (n,) int64 capture time, Unix ns, in file order."""
    name: str
    buffer: mmap.mmap | bytes | bytearray   # read-only is fine: the kernel copies frames in
    offsets: np.ndarray
    lengths: np.ndarray
    ts_ns: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)


def check(path: str | Path) -> None:
    """UsageError with one sentence when ``path`` cannot be read or does not start as a pcap or pcapng file
    (its first 4 bytes: a replay refuses it before anything starts)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UsageError(f"cannot read the capture {path}: {exc.strerror}") from None
    if magic not in _PCAP_MAGIC and magic != _PCAPNG_SHB:
        raise UsageError(f"{path} is neither a pcap nor a pcapng file")


def read(path: str | Path) -> Capture:
    """Read a pcap or pcapng file (UsageError with one sentence when it is neither, or truncated badly).
    The file is mapped read-only, not copied: the programs get pointers into the page cache."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            data = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) if size >= 24 else fh.read()
    except OSError as exc:
        raise UsageError(f"cannot read the capture {path}: {exc.strerror}") from None
    magic = bytes(data[:4])
    if magic in _PCAP_MAGIC:
        records = _pcap_records(data, path)
    elif magic == _PCAPNG_SHB:
        records = _pcapng_records(data, path)
    else:
        raise UsageError(f"{path} is neither a pcap nor a pcapng file")
    return _frame(path.name, data, *records)


def _pcap_records(data, path: Path):
    """(offsets, lengths, ts_ns, link types) of a classic pcap's records: the one Python loop walks the
    record headers' lengths (each record's place depends on the previous one); the rest is numpy."""
    order, ns_per_tick = _PCAP_MAGIC[bytes(data[:4])]
    if len(data) < 24:
        raise UsageError(f"{path} is a truncated pcap file (no header)")
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    incl_at = struct.Struct(order + "I").unpack_from
    starts = []
    add = starts.append
    pos, end = 24, len(data)
    while pos + 16 <= end:
        nxt = pos + 16 + incl_at(data, pos + 8)[0]
        if nxt > end:
            break                                   # a truncated last record (a capture still being written)
        add(pos)
        pos = nxt
    at = np.asarray(starts, dtype=np.int64)
    if not len(at):
        return at, at, at, []
    buf = np.frombuffer(data, dtype=np.uint8)
    head = np.ascontiguousarray(buf[at[:, None] + np.arange(12)]).view(order + "u4")   # (n, 3): sec, frac, incl
    ts = head[:, 0].astype(np.int64) * 1_000_000_000 + head[:, 1].astype(np.int64) * ns_per_tick
    return at + 16, head[:, 2].astype(np.int64), ts, [linktype] * len(at)


def _pcapng_records(data: bytes, path: Path):
    offsets, lengths, ts, links = [], [], [], []
    interfaces: list[tuple[int, int, int]] = []      # (linktype, ticks per second, ns per tick) per interface id
    order, pos, end = "<", 0, len(data)
    while pos + 12 <= end:
        btype = struct.unpack_from(order + "I", data, pos)[0]
        if btype == 0x0A0D0D0A:                     # section header: byte order, interfaces start over
            order = "<" if data[pos + 8:pos + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            interfaces = []
        blen = struct.unpack_from(order + "I", data, pos + 4)[0]
        if blen < 12 or pos + blen > end:
            break
        body = pos + 8
        if btype == 1:                              # interface description
            linktype = struct.unpack_from(order + "H", data, body)[0]
            interfaces.append((linktype, *_tsresol(data, body + 8, pos + blen - 4, order)))
        elif btype == 6:                            # enhanced packet
            iface, hi, lo, caplen = struct.unpack_from(order + "IIII", data, body)
            if iface >= len(interfaces):
                raise UsageError(f"{path}: a packet names interface {iface}, which the file never described")
            linktype, per_second, ns_per_tick = interfaces[iface]
            ticks = (hi << 32) | lo
            offsets.append(body + 20)
            lengths.append(caplen)
            ts.append(ticks * ns_per_tick if ns_per_tick else ticks * 1_000_000_000 // per_second)
            links.append(linktype)
        pos += blen
    return offsets, lengths, ts, links


def _tsresol(data: bytes, pos: int, end: int, order: str) -> tuple[int, int]:
    """(ticks per second, ns per tick or 0 when not whole) from an interface's if_tsresol option (default µs)."""
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", data, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            v = data[pos + 4]
            per_second = 2 ** (v & 0x7F) if v & 0x80 else 10 ** v
            return per_second, 1_000_000_000 // per_second if 1_000_000_000 % per_second == 0 else 0
        pos += 4 + (length + 3) // 4 * 4
    return 1_000_000, 1000


def _frame(name: str, data, offsets, lengths, ts, links) -> Capture:
    """Every frame Ethernet framed, in one buffer the programs can be handed pointers into.

    Link types: Ethernet (1) is used as it is; raw IP (101, 228, 229) and Linux cooked captures (113)
    are given a synthetic Ethernet header (the programs parse from Ethernet), which adds 14 bytes per
    frame for raw IP and changes nothing for cooked ones (16 -> 14 byte header: -2)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    ts_ns = np.asarray(ts, dtype=np.int64)
    kinds = set(links)
    bad = kinds - set(SUPPORTED)
    if bad:
        raise UsageError(f"{name}: link type {min(bad)} is not supported (Ethernet, raw IP and Linux cooked captures are)")
    if kinds <= {LINKTYPE_ETHERNET}:
        return Capture(name, data, offsets, lengths, ts_ns)
    parts, new_offsets, pos = [], [], 0
    for off, length, link in zip(offsets.tolist(), lengths.tolist(), links):
        frame = data[off:off + length]
        if link in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
            version = frame[0] >> 4 if frame else 4
            frame = _FAKE_ETH + (b"\x86\xdd" if version == 6 else b"\x08\x00") + frame
        elif link == LINKTYPE_SLL:
            frame = _FAKE_ETH + frame[14:16] + frame[16:]
        parts.append(frame)
        new_offsets.append(pos)
        pos += len(frame)
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    return Capture(name, bytearray(b"".join(parts)), np.asarray(new_offsets, dtype=np.int64), lengths, ts_ns)


# --- header fields, vectorised ------------------------------------------------------------------

@dataclass
class Headers:
    """Per-packet fields (n,): ip (4, 6 or 0: not IP), src/dst (n,) 'V17' family byte + 16 address bytes
    (IPv4 mapped, as struct pw_addr), proto, sport, dport, flags (TCP flags byte), eth_src (n,) 'V6'."""
    ip: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    proto: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    flags: np.ndarray
    eth_src: np.ndarray


def _gather(buf: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """(n, width) bytes of ``buf`` from positions ``at`` (clipped to the buffer: callers mask)."""
    idx = np.minimum(at[:, None] + np.arange(width), len(buf) - 1)
    return buf[idx]


def headers(cap: Capture) -> Headers:
    """The fields of every packet at once (no Python loop per packet)."""
    buf = np.frombuffer(cap.buffer, dtype=np.uint8)
    n = len(cap)
    off, end = cap.offsets, cap.offsets + cap.lengths
    eth_src = np.ascontiguousarray(_gather(buf, off + 6, 6)).view("V6").reshape(n)
    l3 = off + 14
    etype = _u16(buf, off + 12)
    for _ in range(2):                              # up to two VLAN tags, as bpf/parse.h
        tagged = (etype == 0x8100) | (etype == 0x88A8)
        l3 = np.where(tagged, l3 + 4, l3)
        etype = np.where(tagged, _u16(buf, l3 - 2), etype)
    v4 = (etype == 0x0800) & (end - l3 >= 20)
    v6 = (etype == 0x86DD) & (end - l3 >= 40)
    ip = np.where(v4, 4, np.where(v6, 6, 0)).astype(np.uint8)
    ihl = (_gather(buf, l3, 1)[:, 0] & 0x0F).astype(np.int64) * 4
    proto = np.where(v4, _gather(buf, l3 + 9, 1)[:, 0], np.where(v6, _gather(buf, l3 + 6, 1)[:, 0], 0))
    frag_off = _u16(buf, l3 + 6) & 0x1FFF
    l4 = np.where(v4, l3 + ihl, l3 + 40)
    has_ports = (v4 & (frag_off == 0) | v6) & ((proto == 6) | (proto == 17)) & (end - l4 >= 4)
    sport = np.where(has_ports, _u16(buf, l4), 0)
    dport = np.where(has_ports, _u16(buf, l4 + 2), 0)
    flags = np.where(has_ports & (proto == 6) & (end - l4 >= 14), _gather(buf, l4 + 13, 1)[:, 0], 0)
    return Headers(ip, _addresses(buf, l3, v4, v6, 12, 8), _addresses(buf, l3, v4, v6, 16, 24),
                   proto.astype(np.uint8), sport.astype(np.int64), dport.astype(np.int64), flags.astype(np.uint8),
                   eth_src)


def _u16(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    b = _gather(buf, at, 2).astype(np.int64)
    return (b[:, 0] << 8) | b[:, 1]


def _addresses(buf, l3, v4, v6, v4_at: int, v6_at: int) -> np.ndarray:
    """struct pw_addr bytes (family + 16, no padding) of the address at those header offsets: (n,) 'V17'."""
    n = len(l3)
    out = np.zeros((n, 17), dtype=np.uint8)
    out[v4, 0] = 4
    out[v4, 11:13] = 0xFF
    out[v4, 13:17] = _gather(buf, l3[v4] + v4_at, 4)
    out[v6, 0] = 6
    out[v6, 1:17] = _gather(buf, l3[v6] + v6_at, 16)
    return out.view("V17").reshape(n)


def address_text(raw) -> str:
    """Text of one 'V17' address (as bpf_structs.addr_text)."""
    from app.services.kernel.bpf_structs import addr_text
    return addr_text(bytes(raw))


def address_key(text: str) -> np.void:
    """The 'V17' key of an address text (UsageError when it is not an address)."""
    from app.services.kernel.bpf_structs import addr_bytes
    try:
        return np.frombuffer(addr_bytes(text)[:17], dtype="V17")[0]
    except ValueError:
        raise UsageError(f"{text!r} is not an IP address") from None


def most_answered(h: Headers, ts_ns: np.ndarray) -> str | None:
    """The address that answered the most peers — sent to a peer only after that peer had sent to it
    (ties: the one that received the most packets): on a capture taken on one host, that host.
    None without any IP packet."""
    is_ip = h.ip > 0
    if not is_ip.any():
        return None
    src, dst, ts = h.src[is_ip], h.dst[is_ip], ts_ns[is_ip]
    pair_keys = np.stack([src, dst], axis=1).view("V34").reshape(-1)
    pairs, first_idx = np.unique(pair_keys, return_index=True)
    first = ts[first_idx]
    as_rows = pairs.view("V17").reshape(-1, 2)
    reverse = np.ascontiguousarray(as_rows[:, ::-1]).view("V34").reshape(-1)
    pos = np.minimum(np.searchsorted(pairs, reverse), len(pairs) - 1)
    # pair (A -> P) is an answer when (P -> A) exists and started earlier
    answer = (pairs[pos] == reverse) & (first[pos] < first)
    answered = as_rows[answer, 0]
    received_by, received = np.unique(dst, return_counts=True)
    if len(answered):
        who, peers = np.unique(answered, return_counts=True)
        rx = np.zeros(len(who), dtype=np.int64)
        at = np.minimum(np.searchsorted(received_by, who), len(received_by) - 1)
        rx = np.where(received_by[at] == who, received[at], 0)
        best = np.lexsort((rx, peers))[-1]
        return address_text(who[best])
    return address_text(received_by[np.argmax(received)])


def inferred_listeners(h: Headers, ts_ns: np.ndarray, outbound: np.ndarray) -> list[tuple[int, str, str, int]]:
    """(port, protocol, host address, first answer ns) for every port the host answered on: a SYN-ACK sent
    from it, or a UDP datagram sent from it to a peer that had sent to that port first (a reply, not the
    host's own query from an ephemeral port). ``outbound``: (n,) bool, the packets the host sent."""
    out = []
    synack = outbound & (h.proto == 6) & ((h.flags & 0x12) == 0x12)
    for port, host in set(zip(h.sport[synack].tolist(), map(bytes, h.src[synack]))):
        first = ts_ns[synack & (h.sport == port) & (h.src == np.frombuffer(host, dtype="V17")[0])].min()
        out.append((port, "tcp", address_text(host), int(first)))
    udp_in = ~outbound & (h.proto == 17)
    udp_out = outbound & (h.proto == 17)
    if udp_in.any() and udp_out.any():
        # (peer, host port) keys: what a peer sent to a port, and what the host sent back from it
        key_in = _pair_keys(h.src[udp_in], h.dport[udp_in])
        key_out = _pair_keys(h.dst[udp_out], h.sport[udp_out])
        first_in_keys, first_in_idx = np.unique(key_in, return_index=True)
        pos = np.searchsorted(first_in_keys, key_out)
        pos_c = np.minimum(pos, len(first_in_keys) - 1)
        hit = first_in_keys[pos_c] == key_out
        t_in = ts_ns[udp_in][first_in_idx[pos_c]]
        t_out = ts_ns[udp_out]
        reply = hit & (t_in <= t_out)
        seen = {}
        for port, host, t in zip(h.sport[udp_out][reply].tolist(), map(bytes, h.src[udp_out][reply]),
                                 t_out[reply].tolist()):
            if (port, host) not in seen or t < seen[(port, host)]:
                seen[(port, host)] = t
        out += [(port, "udp", address_text(host), int(t)) for (port, host), t in seen.items()]
    return sorted(out, key=lambda r: (r[3], r[0], r[1]))


def _pair_keys(addr: np.ndarray, port: np.ndarray) -> np.ndarray:
    rows = np.zeros((len(addr), 19), dtype=np.uint8)
    rows[:, :17] = addr.view(np.uint8).reshape(-1, 17)
    rows[:, 17] = port >> 8
    rows[:, 18] = port & 0xFF
    return rows.view("V19").reshape(-1)
