"""The one mirror of bpf/common.h in Python: ctypes structs, numpy dtypes, key codecs, map layouts.

Each C struct read or written from user space has exactly one ``ctypes.Structure`` here, commented with
its C name and named in ``_c_name_`` (tests/services/kernel/test_bpf_structs.py checks every field offset
and size against the C compiler and the loaded program's BTF). Everything else reads fields BY NAME,
through these structs or :func:`key_dtype` / :func:`value_dtype`: no byte offset of a kernel struct appears
outside this module. Import cost: ctypes only; numpy is imported on the first dtype asked for, so the
XDP loader process and the status command do not pay for it."""
from __future__ import annotations

import ctypes
import ipaddress
from functools import lru_cache

# --- ctypes mirrors of bpf/common.h -------------------------------------------------------


FAMILY_V4, FAMILY_V6 = 4, 6               # PW_FAMILY_V4, PW_FAMILY_V6
LPM_FULL = 136                             # PW_LPM_FULL: family bits + 128 address bits


class PwAddr(ctypes.Structure):            # struct pw_addr
    _c_name_ = "pw_addr"
    _fields_ = [("family", ctypes.c_uint8), ("addr", ctypes.c_uint8 * 16), ("pad", ctypes.c_uint8 * 3)]


class PwPortKey(ctypes.Structure):         # struct pw_port_key
    _c_name_ = "pw_port_key"
    _fields_ = [("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PwPortValue(ctypes.Structure):       # struct pw_port_value
    _c_name_ = "pw_port_value"
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("payload_bytes", ctypes.c_uint64),
                ("syn", ctypes.c_uint64), ("synack", ctypes.c_uint64), ("rst", ctypes.c_uint64),
                ("fin", ctypes.c_uint64), ("min_payload", ctypes.c_uint32), ("max_payload", ctypes.c_uint32),
                ("round_min", ctypes.c_uint32), ("round_max", ctypes.c_uint32), ("epoch", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class PwSourceValue(ctypes.Structure):     # struct pw_source_value
    _c_name_ = "pw_source_value"
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("syn", ctypes.c_uint64),
                ("fragments", ctypes.c_uint64), ("epoch", ctypes.c_uint32), ("ttl_min", ctypes.c_uint8),
                ("ttl_max", ctypes.c_uint8), ("new_ports", ctypes.c_uint16), ("mac", ctypes.c_uint8 * 6),
                ("mac_mixed", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PwSrcportKey(ctypes.Structure):      # struct pw_srcport_key
    _c_name_ = "pw_srcport_key"
    _fields_ = [("src", PwAddr), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PwFlowKey(ctypes.Structure):         # struct pw_flow_key
    _c_name_ = "pw_flow_key"
    _fields_ = [("src", PwAddr), ("dst", PwAddr), ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class PwFlowValue(ctypes.Structure):       # struct pw_flow_value
    _c_name_ = "pw_flow_value"
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("first_seen_ns", ctypes.c_uint64),
                ("last_seen_ns", ctypes.c_uint64), ("tcp_flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


FLOW_REPLY = 0x100                         # PW_FLOW_REPLY in pw_flow_value.tcp_flags


class PwConnValue(ctypes.Structure):       # struct pw_conn_value
    _c_name_ = "pw_conn_value"
    _fields_ = [("last_out_ns", ctypes.c_uint64), ("isn", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class PwSynackValue(ctypes.Structure):     # struct pw_synack_value
    _c_name_ = "pw_synack_value"
    _fields_ = [("sent_ns", ctypes.c_uint64), ("isn", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PwVerifiedValue(ctypes.Structure):   # struct pw_verified_value
    _c_name_ = "pw_verified_value"
    _fields_ = [("last_ns", ctypes.c_uint64), ("proofs", ctypes.c_uint64), ("proof", ctypes.c_uint8),
                ("ttl", ctypes.c_uint8), ("mac", ctypes.c_uint8 * 6)]


class PwScannerValue(ctypes.Structure):    # struct pw_scanner_value
    _c_name_ = "pw_scanner_value"
    _fields_ = [("ports", ctypes.c_uint64), ("packets", ctypes.c_uint64), ("syn", ctypes.c_uint64),
                ("first_ns", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


SCAN_PROMOTE = 16                          # PW_SCAN_PROMOTE

# PW_PROOF_*: what made an address a verified peer (peers.proof in the database)
PROOFS = {1: "handshake", 2: "opened-tcp", 3: "opened-udp"}


class PwGlobal(ctypes.Structure):          # struct pw_global
    _c_name_ = "pw_global"
    _fields_ = [("c", ctypes.c_uint64 * 27)]  # PW_G_MAX = len(GLOBAL_NAMES)


class PwLpmKey(ctypes.Structure):          # struct pw_lpm_key (pad: keeps trie values 8-byte aligned)
    _c_name_ = "pw_lpm_key"
    _fields_ = [("prefixlen", ctypes.c_uint32), ("a", PwAddr), ("pad", ctypes.c_uint8 * 4)]


class PwBlacklistValue(ctypes.Structure):  # struct pw_blacklist_value
    _c_name_ = "pw_blacklist_value"
    _fields_ = [("drops", ctypes.c_uint64), ("drop_bytes", ctypes.c_uint64), ("last_drop_ns", ctypes.c_uint64),
                ("replies", ctypes.c_uint64)]


class PwSynlimitValue(ctypes.Structure):   # struct pw_synlimit_value
    _c_name_ = "pw_synlimit_value"
    _fields_ = [("per_second", ctypes.c_uint64), ("expires_ns", ctypes.c_uint64), ("window_start_ns", ctypes.c_uint64),
                ("window_syns", ctypes.c_uint64), ("dropped", ctypes.c_uint64)]


class PwDestValue(ctypes.Structure):       # struct pw_dest_value
    _c_name_ = "pw_dest_value"
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("syn", ctypes.c_uint64)]


class PwEgressPortValue(ctypes.Structure):  # struct pw_egress_port_value
    _c_name_ = "pw_egress_port_value"
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("payload_bytes", ctypes.c_uint64),
                ("syn", ctypes.c_uint64)]


class PwConfig(ctypes.Structure):          # struct pw_config
    _c_name_ = "pw_config"
    _fields_ = [("epoch", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("clock_ns", ctypes.c_uint64)]


class PwMeta(ctypes.Structure):            # struct pw_meta
    _c_name_ = "pw_meta"
    _fields_ = [("source_hash", ctypes.c_uint8 * 32), ("loaded_at", ctypes.c_uint64),
                ("program_id", ctypes.c_uint32), ("mode", ctypes.c_uint32), ("egress_program_id", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


META_CLSACT_ADDED = 1                      # PW_META_CLSACT_ADDED

MIRRORS = (PwAddr, PwPortKey, PwPortValue, PwSourceValue, PwSrcportKey, PwFlowKey, PwFlowValue, PwGlobal,
           PwLpmKey, PwBlacklistValue, PwSynlimitValue, PwDestValue, PwEgressPortValue, PwConfig, PwMeta,
           PwConnValue, PwSynackValue, PwVerifiedValue, PwScannerValue)

# enum pw_global_index, in order
GLOBAL_NAMES = ("total", "bytes", "parsed", "unparsed", "non_ip", "dropped", "dropped_bytes", "ipv4", "ipv6",
                "tcp", "udp", "icmp", "icmpv6", "other_l4", "fragments", "vlan", "flow_inserts",
                "srcport_inserts", "source_inserts", "port_map_full", "short_fragments", "syn_limited",
                "replies", "replies_passed", "verified", "scanner_promotions", "scanners_full")
assert len(GLOBAL_NAMES) == len(PwGlobal._fields_[0][1]()), "GLOBAL_NAMES must name every PW_G_* counter"

# map name -> (BPF map type number of uapi/linux/bpf.h, key mirror, value mirror), as bpf/port_flow.c and
# bpf/egress.c declare them
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 1, 2, 5, 6
BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_LPM_TRIE = 9, 10, 11
MAP_LAYOUT = {
    "port_stats": (BPF_MAP_TYPE_PERCPU_HASH, PwPortKey, PwPortValue),
    "sources": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwAddr, PwSourceValue),
    "srcports": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwSrcportKey, ctypes.c_uint64),
    "flows": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwFlowKey, PwFlowValue),
    "global": (BPF_MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, PwGlobal),
    "blacklist": (BPF_MAP_TYPE_LPM_TRIE, PwLpmKey, PwBlacklistValue),
    "config": (BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, PwConfig),
    "meta": (BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, PwMeta),
    "synlimit": (BPF_MAP_TYPE_HASH, PwPortKey, PwSynlimitValue),
    "conns": (BPF_MAP_TYPE_LRU_HASH, PwFlowKey, PwConnValue),
    "synacks": (BPF_MAP_TYPE_LRU_HASH, PwFlowKey, PwSynackValue),
    "verified": (BPF_MAP_TYPE_LRU_HASH, PwAddr, PwVerifiedValue),
    "scanners": (BPF_MAP_TYPE_HASH, PwAddr, PwScannerValue),
    # bpf/egress.c (TC egress); eg_global's names are GLOBAL_NAMES too (dropped* stay 0)
    "eg_ports": (BPF_MAP_TYPE_PERCPU_HASH, PwPortKey, PwEgressPortValue),
    "eg_dests": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwAddr, PwDestValue),
    "eg_dstports": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwSrcportKey, ctypes.c_uint64),
    "eg_flows": (BPF_MAP_TYPE_LRU_PERCPU_HASH, PwFlowKey, PwFlowValue),
    "eg_global": (BPF_MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, PwGlobal),
    "eg_block": (BPF_MAP_TYPE_LPM_TRIE, PwLpmKey, PwBlacklistValue),
}
EGRESS_MAPS = ("eg_ports", "eg_dests", "eg_dstports", "eg_flows", "eg_global")
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}

_SCALARS = {ctypes.c_uint64: ("Q", "<u8"), ctypes.c_uint32: ("I", "<u4"), ctypes.c_uint16: ("H", "<u2"),
            ctypes.c_uint8: ("B", "u1")}


def struct_format(ctype) -> str:
    """A struct-module format (no byte-order prefix) equal to a ctypes mirror's layout.

    Byte arrays become 'Ns' (bytes), other arrays repeat their element, nested structs inline.
    """
    if ctype in _SCALARS:
        return _SCALARS[ctype][0]
    if issubclass(ctype, ctypes.Array):
        if ctype._type_ is ctypes.c_uint8:
            return f"{ctype._length_}s"
        return struct_format(ctype._type_) * ctype._length_
    return "".join(struct_format(t) for _, t in ctype._fields_)


# --- numpy dtypes built from the mirrors --------------------------------------------------

def numpy_dtype(ctype, itemsize: int | None = None):
    """The numpy structured dtype of a ctypes mirror: same field names, same byte offsets.

    Byte arrays (``__u8 x[n]``) and ``struct pw_addr`` (family byte included: a key keyed by one
    pw_addr has one field ``addr``, all of it) become ``S<n>`` (fixed-width bytes: sortable,
    comparable, usable in np.unique/np.isin; numpy strips their trailing NULs when they become Python
    bytes, which ``addr_text`` undoes); other arrays become sub-arrays; a scalar mirror (the u64 value of
    srcports, the u32 index of an array map) becomes one field named ``value``. ``itemsize`` pads each
    element (per-CPU values are rounded up to 8 bytes per CPU).
    """
    import numpy as np
    if ctype is PwAddr:     # a map keyed by one struct pw_addr: one field "addr" holding all of it
        return np.dtype({"names": ["addr"], "formats": [ADDR_DTYPE], "offsets": [0], "itemsize": itemsize or ADDR_SIZE})
    if not isinstance(ctype, type) or not issubclass(ctype, ctypes.Structure):
        return np.dtype({"names": ["value"], "formats": [_SCALARS[ctype][1]], "offsets": [0],
                         "itemsize": itemsize or ctypes.sizeof(ctype)})
    names, formats, offsets = [], [], []
    for fname, ftype in ctype._fields_:
        names.append(fname)
        offsets.append(getattr(ctype, fname).offset)
        if ftype is PwAddr:
            formats.append(f"S{ctypes.sizeof(PwAddr)}")
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            formats.append(numpy_dtype(ftype))
        elif issubclass(ftype, ctypes.Array):
            if ftype._type_ is ctypes.c_uint8:
                formats.append(f"S{ftype._length_}")
            else:
                formats.append((np.dtype(_SCALARS[ftype._type_][1]), ftype._length_))
        else:
            formats.append(_SCALARS[ftype][1])
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": itemsize or ctypes.sizeof(ctype)})


@lru_cache(maxsize=None)
def key_dtype(map_name: str):
    """numpy dtype of the keys of map ``map_name`` (one element per key, fields named as in C)."""
    return numpy_dtype(MAP_LAYOUT[map_name][1])


@lru_cache(maxsize=None)
def value_dtype(map_name: str, stride: int | None = None):
    """numpy dtype of one value (one CPU's slot) of map ``map_name``, padded to ``stride`` bytes."""
    return numpy_dtype(MAP_LAYOUT[map_name][2], stride)


# --- address and LPM-key codecs -----------------------------------------------------------
# Addresses carry their family (struct pw_addr: family byte + 16 bytes, IPv4 mapped); addr_text,
# addr_bytes, lpm_key and lpm_key_text convert them.

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
ADDR_SIZE = ctypes.sizeof(PwAddr)
ADDR_DTYPE = f"S{ADDR_SIZE}"               # numpy dtype of raw struct pw_addr values


def addr_text(raw: bytes) -> str:
    """Text of a struct pw_addr: dotted IPv4 for family 4, IPv6 text for family 6 (an IPv6 packet
    from ::ffff:a.b.c.d stays '::ffff:a.b.c.d', never the IPv4 host).

    ``raw`` is its bytes, or fewer when numpy's ``S20`` stripped trailing NULs (padded back here).
    """
    if len(raw) != ADDR_SIZE:
        raw = raw.ljust(ADDR_SIZE, b"\x00")
    family, addr = raw[0], raw[1:17]
    if family == FAMILY_V4:
        return "%d.%d.%d.%d" % tuple(addr[12:16])
    if addr[:12] == _V4_MAPPED:     # RFC 5952 form, whatever this Python's ipaddress prints
        return "::ffff:%d.%d.%d.%d" % tuple(addr[12:16])
    return str(ipaddress.IPv6Address(addr))


def addr_bytes(text: str) -> bytes:
    """Inverse of addr_text: the bytes of a struct pw_addr (IPv4 family 4 and mapped; IPv6 family 6)."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return bytes([FAMILY_V4]) + _V4_MAPPED + ip.packed + b"\x00" * 3
    return bytes([FAMILY_V6]) + ip.packed + b"\x00" * 3


def lpm_key(network) -> bytes:
    """The struct pw_lpm_key of an ipaddress network: family byte + address, so prefixlen is
    8 + 96 + n for IPv4 (mapped) and 8 + n for IPv6. An IPv4-mapped IPv6 network
    (``::ffff:198.18.0.0/112``) is an IPv6 key: it matches IPv6 packets only, never IPv4 ones."""
    key = PwLpmKey()
    if network.version == 4:
        key.prefixlen = 8 + 96 + network.prefixlen
        key.a.family = FAMILY_V4
        raw = _V4_MAPPED + network.network_address.packed
    else:
        key.prefixlen = 8 + network.prefixlen
        key.a.family = FAMILY_V6
        raw = network.network_address.packed
    ctypes.memmove(key.a.addr, raw, 16)
    return bytes(key)


def lpm_key_text(raw: bytes) -> str:
    """CIDR text of a struct pw_lpm_key (family 4 keys become IPv4 CIDRs)."""
    key = PwLpmKey.from_buffer_copy(raw[:ctypes.sizeof(PwLpmKey)])
    addr = bytes(key.a.addr)
    bits = max(0, key.prefixlen - 8)
    if key.a.family == FAMILY_V4:
        return "%d.%d.%d.%d/%d" % (*addr[12:16], max(0, bits - 96))
    if addr[:12] == _V4_MAPPED and bits >= 96:
        return "::ffff:%d.%d.%d.%d/%d" % (*addr[12:16], bits)
    return str(ipaddress.IPv6Network((addr, bits), strict=False))
