"""The one mirror of bpf/common.h in Python: ctypes structs, numpy dtypes, key codecs, map layouts.

Each C struct read or written from user space has exactly one ``ctypes.Structure`` here, commented
with its C name (and named in ``_c_name_``, which tests/services/test_bpf_structs.py uses to check
every field offset and size against the C compiler and against the BTF of the loaded program).
Everything else reads key and value fields BY NAME, through these structs or the numpy dtypes
built from them (``key_dtype``, ``value_dtype``): no byte offset of a kernel struct appears
outside this module. Addresses are one 16-byte form (IPv4 as IPv4-mapped IPv6); ``addr_text``,
``addr_bytes``, ``lpm_key`` and ``lpm_key_text`` convert them.

Import cost: ctypes only. numpy is imported on the first dtype asked for, so the XDP loader
process and the status command do not pay for it.
"""
from __future__ import annotations

import ctypes
import ipaddress
from functools import lru_cache

# --- ctypes mirrors of bpf/common.h -------------------------------------------------------


class PwAddr(ctypes.Structure):            # struct pw_addr
    _c_name_ = "pw_addr"
    _fields_ = [("addr", ctypes.c_uint8 * 16)]


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
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("syn", ctypes.c_uint64)]


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


class PwGlobal(ctypes.Structure):          # struct pw_global
    _c_name_ = "pw_global"
    _fields_ = [("c", ctypes.c_uint64 * 20)]  # PW_G_MAX = len(GLOBAL_NAMES)


class PwLpmKey(ctypes.Structure):          # struct pw_lpm_key
    _c_name_ = "pw_lpm_key"
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class PwBlacklistValue(ctypes.Structure):  # struct pw_blacklist_value
    _c_name_ = "pw_blacklist_value"
    _fields_ = [("drops", ctypes.c_uint64), ("drop_bytes", ctypes.c_uint64), ("last_drop_ns", ctypes.c_uint64)]


class PwConfig(ctypes.Structure):          # struct pw_config
    _c_name_ = "pw_config"
    _fields_ = [("epoch", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PwMeta(ctypes.Structure):            # struct pw_meta
    _c_name_ = "pw_meta"
    _fields_ = [("source_hash", ctypes.c_uint8 * 32), ("loaded_at", ctypes.c_uint64),
                ("program_id", ctypes.c_uint32), ("mode", ctypes.c_uint32)]


MIRRORS = (PwAddr, PwPortKey, PwPortValue, PwSourceValue, PwSrcportKey, PwFlowKey, PwFlowValue, PwGlobal,
           PwLpmKey, PwBlacklistValue, PwConfig, PwMeta)

# enum pw_global_index, in order
GLOBAL_NAMES = ("total", "bytes", "parsed", "unparsed", "non_ip", "dropped", "dropped_bytes", "ipv4", "ipv6",
                "tcp", "udp", "icmp", "icmpv6", "other_l4", "fragments", "vlan", "flow_inserts",
                "srcport_inserts", "source_inserts", "port_map_full")
assert len(GLOBAL_NAMES) == len(PwGlobal._fields_[0][1]()), "GLOBAL_NAMES must name every PW_G_* counter"

# map name -> (BPF map type number of uapi/linux/bpf.h, key mirror, value mirror), as bpf/port_flow.c declares them
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
}
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

    Byte arrays (``__u8 x[n]``) and ``struct pw_addr`` become ``S<n>`` (fixed-width bytes: sortable,
    comparable, usable in np.unique/np.isin; numpy strips their trailing NULs when they become Python
    bytes, which ``addr_text`` undoes); other arrays become sub-arrays; a scalar mirror (the u64 value of
    srcports, the u32 index of an array map) becomes one field named ``value``. ``itemsize`` pads each
    element (per-CPU values are rounded up to 8 bytes per CPU).
    """
    import numpy as np
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

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def addr_text(raw: bytes) -> str:
    """Text of a struct pw_addr: dotted IPv4 for IPv4-mapped addresses, else IPv6.

    ``raw`` is its 16 bytes, or fewer when numpy's ``S16`` stripped trailing NULs (padded back here).
    """
    if len(raw) != 16:
        raw = raw.ljust(16, b"\x00")
    if raw[:12] == _V4_MAPPED:
        return "%d.%d.%d.%d" % tuple(raw[12:16])
    return str(ipaddress.IPv6Address(raw))


def addr_bytes(text: str) -> bytes:
    """Inverse of addr_text: the 16 bytes of a struct pw_addr (IPv4 becomes IPv4-mapped IPv6)."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return _V4_MAPPED + ip.packed
    return ip.packed


def lpm_key(network) -> bytes:
    """The struct pw_lpm_key of an ipaddress network (IPv4 as IPv4-mapped, prefixlen + 96).

    An IPv4-mapped IPv6 network (``::ffff:198.18.0.0/112``) gives the same key as its IPv4 form.
    """
    key = PwLpmKey()
    if network.version == 4:
        key.prefixlen = network.prefixlen + 96
        raw = _V4_MAPPED + network.network_address.packed
    else:
        key.prefixlen = network.prefixlen
        raw = network.network_address.packed
    ctypes.memmove(key.addr, raw, 16)
    return bytes(key)


def lpm_key_text(raw: bytes) -> str:
    """CIDR text of a struct pw_lpm_key (IPv4-mapped prefixes of 96 bits or more become IPv4 CIDRs)."""
    key = PwLpmKey.from_buffer_copy(raw[:ctypes.sizeof(PwLpmKey)])
    addr = bytes(key.addr)
    if addr[:12] == _V4_MAPPED and key.prefixlen >= 96:
        return f"{addr_text(addr)}/{key.prefixlen - 96}"
    return str(ipaddress.IPv6Network((addr, key.prefixlen), strict=False))
