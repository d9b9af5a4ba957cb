/* portwatch: structs shared by the XDP program (bpf/port_flow.c), the TC egress program
 * (bpf/egress.c) and user space.
 *
 * Every struct read from user space has exactly one ctypes mirror in app/services/kernel/bpf_structs.py,
 * commented with the C name; tests/services/test_bpf_structs.py checks every field offset and
 * size against this header (compiled with the host C compiler) and against the BTF of the
 * program the kernel loaded, so the two sides cannot drift apart silently.
 * Padding is written out: the kernel compares keys byte for byte, so no byte may be left
 * to the compiler.
 */
#ifndef PORTWATCH_COMMON_H
#define PORTWATCH_COMMON_H

/* Map sizes (max entries): these defaults are the one home of them; the loader passes the config's
 * collector.*_map_size (and collector.reply_idle_seconds) as -D flags, and app/config.py reads its
 * defaults from these lines. */
#ifndef PORT_MAP_SIZE
#define PORT_MAP_SIZE 65536
#endif
#ifndef SOURCE_MAP_SIZE
#define SOURCE_MAP_SIZE 65536
#endif
#ifndef SRCPORT_MAP_SIZE
#define SRCPORT_MAP_SIZE 131072
#endif
#ifndef FLOW_MAP_SIZE
#define FLOW_MAP_SIZE 65536
#endif
#ifndef BLACKLIST_MAP_SIZE
#define BLACKLIST_MAP_SIZE 16384
#endif
#ifndef SYNLIMIT_MAP_SIZE
#define SYNLIMIT_MAP_SIZE 1024
#endif
#ifndef CONN_MAP_SIZE
#define CONN_MAP_SIZE 65536
#endif
#ifndef SYNACK_MAP_SIZE
#define SYNACK_MAP_SIZE 65536
#endif
#ifndef VERIFIED_MAP_SIZE
#define VERIFIED_MAP_SIZE 16384
#endif
#ifndef SCANNER_MAP_SIZE
#define SCANNER_MAP_SIZE 1024
#endif
/* how long a conversation this host opened may stay idle and still be answered (collector.reply_idle_seconds) */
#ifndef REPLY_IDLE_SECONDS
#define REPLY_IDLE_SECONDS 300
#endif

/* An address with its family. family is 4 or 6 (the IP header it came in); addr holds IPv6 as
 * is and IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d). The family byte keeps an IPv6 packet whose
 * source is ::ffff:a.b.c.d (which the kernel's own stack discards) apart from the IPv4 host
 * a.b.c.d in every map keyed on addresses, the blacklist trie included. */
#define PW_FAMILY_V4 4
#define PW_FAMILY_V6 6
struct pw_addr {
    __u8  family;
    __u8  addr[16];
    __u8  pad[3];
};

/* port_stats key: local (destination) port and IP protocol. For ICMP/ICMPv6 the "port" is
 * the ICMP type; non-first fragments and other protocols use port 0. */
struct pw_port_key {
    __u16 port;                 /* host byte order */
    __u8  proto;                /* IPPROTO_* */
    __u8  pad;
};

/* port_stats value (per CPU). Counters are cumulative and never reset by the kernel.
 * round_min/round_max hold the payload extremes of the packets seen while the config
 * map's epoch was `epoch`: user space bumps the epoch at every round, so they are
 * per-round extremes without any counter ever being reset. */
struct pw_port_value {
    __u64 packets;
    __u64 bytes;                /* frame bytes */
    __u64 payload_bytes;        /* L4 payload bytes */
    __u64 syn;                  /* SYN without ACK */
    __u64 synack;
    __u64 rst;
    __u64 fin;
    __u32 min_payload;          /* since the map was created */
    __u32 max_payload;
    __u32 round_min;
    __u32 round_max;
    __u32 epoch;
    __u32 pad;
};

/* sources value (LRU, per CPU), key struct pw_addr. ttl_min/ttl_max: the IPv4 TTL / IPv6 hop
 * limit range of this source's packets seen while the config epoch was `epoch` (per round, like
 * pw_port_value.round_min), and its source MAC (the fingerprint a verified peer's one-way evidence is
 * checked against). fragments: IP fragments (first or not) from this source. new_ports:
 * (port, protocol) pairs of this source this CPU added to srcports this round (saturating; reset with
 * the epoch unless the source sits in `scanners`): at PW_SCAN_PROMOTE the source is promoted into
 * `scanners`, where a flood of new sources cannot evict it. */
struct pw_source_value {
    __u64 packets;
    __u64 bytes;
    __u64 syn;
    __u64 fragments;
    __u32 epoch;
    __u8  ttl_min;
    __u8  ttl_max;
    __u16 new_ports;
    __u8  mac[6];               /* Ethernet source of its first packet this round (epoch) */
    __u8  mac_mixed;            /* 1: another source MAC came under this address this round */
    __u8  pad;
};

/* scanners (hash, NOT LRU, shared; atomics, 8-byte aligned in a hash element): sources that reached
 * PW_SCAN_PROMOTE distinct local ports. A spoofed flood evicts sources/srcports entries, never
 * these: the evaluation reads them so a flood cannot hide a scanner. ports: distinct (port,
 * protocol) pairs it reached (from the promotion on, starting at PW_SCAN_PROMOTE; a pair evicted from
 * srcports and reached again counts again: an upper bound under eviction). User space removes an
 * entry once it has been idle for a round. */
#define PW_SCAN_PROMOTE 16
struct pw_scanner_value {
    __u64 ports;
    __u64 packets;
    __u64 syn;
    __u64 first_ns;
    __u64 last_ns;
};

/* srcports key (LRU, per CPU): which local ports a source reached; value: __u64 packets */
struct pw_srcport_key {
    struct pw_addr src;
    __u16 port;
    __u8  proto;
    __u8  pad;
};

/* flows key (LRU, per CPU): the 5-tuple as seen arriving */
struct pw_flow_key {
    struct pw_addr src;
    struct pw_addr dst;
    __u16 sport;
    __u16 dport;
    __u8  proto;
    __u8  pad[3];
};

struct pw_flow_value {
    __u64 packets;
    __u64 bytes;
    __u64 first_seen_ns;        /* bpf_ktime_get_coarse_ns(): CLOCK_MONOTONIC_COARSE (a tick's resolution, far cheaper) */
    __u64 last_seen_ns;
    __u32 tcp_flags;            /* OR of the TCP flag bytes seen, | PW_FLOW_REPLY (ingress flows) */
    __u32 pad;
};
/* an ingress flow whose packets answered a conversation this host opened (see conns): replies are
 * never scan or flood evidence against their sender */
#define PW_FLOW_REPLY 0x100

/* conns (LRU hash, shared by CPUs; written by TC egress, read by XDP): conversations THIS host
 * opened. Key: struct pw_flow_key as the answers arrive (src = the remote, dst = this host, sport =
 * the remote port, dport = the local port). TCP: this host sent the SYN (isn: its sequence number);
 * UDP: this host sent the first datagram (no inbound flow with that tuple was known then).
 * last_out_ns: this host's latest packet on it (coarse ns); an answer is one only while the
 * conversation has been idle less than REPLY_IDLE_SECONDS. */
struct pw_conn_value {
    __u64 last_out_ns;
    __u32 isn;
    __u32 flags;                /* PW_CONN_* */
};
#define PW_CONN_TCP      1
#define PW_CONN_UDP      2
#define PW_CONN_VERIFIED 4      /* its answer already made the remote a verified peer */

/* synacks (LRU hash, shared; written by TC egress, read and deleted by XDP): the SYN-ACKs this host
 * sent, key as the client's ACK will arrive. The ACK that acknowledges isn + 1 completes a handshake
 * a blind forger cannot (it never saw isn). Its own map: a SYN flood evicts these, never conns. */
struct pw_synack_value {
    __u64 sent_ns;
    __u32 isn;
    __u32 pad;
};

/* verified (LRU hash, shared; written by XDP): addresses that proved they are who they say, key
 * struct pw_addr. A packet a blind forger cannot send made it: proof PW_PROOF_*. ttl and mac are
 * the fingerprint of that packet (IPv4 TTL / IPv6 hop limit, Ethernet source address). */
struct pw_verified_value {
    __u64 last_ns;              /* coarse ns of the latest proof */
    __u64 proofs;               /* how many (atomic: the value is 8-byte aligned in a hash element) */
    __u8  proof;                /* PW_PROOF_* of the latest */
    __u8  ttl;
    __u8  mac[6];
};
#define PW_PROOF_HANDSHAKE  1   /* its ACK acknowledged this host's SYN-ACK (ISN + 1) */
#define PW_PROOF_OPENED_TCP 2   /* its SYN-ACK acknowledged this host's SYN (ISN + 1) */
#define PW_PROOF_OPENED_UDP 3   /* it answered this host's datagram from the same address and port */

/* blacklist key (LPM trie). The trie's data is a struct pw_addr: the family byte first, so
 * prefixlen counts 8 family bits + address bits: an IPv4 /24 is 8 + 96 + 24 = 128 (IPv4 is
 * mapped), an IPv6 /64 is 8 + 64 = 72. An IPv4 entry never matches an IPv6 packet from
 * ::ffff:a.b.c.d, nor the reverse. Lookups use prefixlen PW_LPM_FULL.
 *
 * Alignment: a trie node stores the key's data (everything after prefixlen) and then the value,
 * so the value sits at (node data offset + data size). With 20 bytes of data the value's __u64
 * counters were only 4-byte aligned and an atomic add on them straddled a cache line in about
 * half the nodes: a split lock, thousands of ns per dropped packet where the others took tens.
 * pad[4] makes the data 24 bytes so every value is 8-byte aligned (checked below and in
 * tests/services/test_enforcement.py). pad stays zero; it lies beyond every prefix. */
#define PW_LPM_FULL 136
struct pw_lpm_key {
    __u32 prefixlen;
    struct pw_addr a;
    __u8  pad[4];
};
_Static_assert((sizeof(struct pw_lpm_key) - sizeof(__u32)) % 8 == 0,
               "LPM trie data must be a multiple of 8 bytes so the values' atomics stay aligned");

struct pw_blacklist_value {
    __u64 drops;                /* packets dropped for this entry since it was added */
    __u64 drop_bytes;
    __u64 last_drop_ns;
    __u64 replies;              /* packets passed as answers to conversations this host opened */
};

/* synlimit (hash, shared by CPUs: atomics; a hash element puts its value at round_up(key_size, 8) in
 * an 8-byte-aligned element, so these __u64 are aligned): an optional per-port SYN budget, set by user space
 * (app/services/kernel/synlimit.py). Key struct pw_port_key (local port, IPPROTO_TCP). TCP SYNs without
 * ACK to that port beyond per_second in one one-second window are dropped (after being counted
 * in port_stats/sources like any packet). The entry is ignored once expires_ns (CLOCK_MONOTONIC
 * ns, bpf_ktime_get_ns) has passed; 0 = never. */
struct pw_synlimit_value {
    __u64 per_second;
    __u64 expires_ns;
    __u64 window_start_ns;
    __u64 window_syns;          /* SYNs seen in the current window */
    __u64 dropped;              /* SYNs dropped for this entry since it was set */
};

/* egress (TC, per CPU): per destination address, key struct pw_addr */
struct pw_dest_value {
    __u64 packets;
    __u64 bytes;
    __u64 syn;                  /* SYN without ACK sent */
};

/* egress per (local source port, protocol), key struct pw_port_key */
struct pw_egress_port_value {
    __u64 packets;
    __u64 bytes;
    __u64 payload_bytes;
    __u64 syn;
};

/* config (array, one entry): what user space tells the running program without a reload. */
struct pw_config {
    __u32 epoch;                /* round epoch for round_min/round_max and the sources' TTL ranges */
    __u32 pad;                  /* zero */
    __u64 clock_ns;             /* 0 (live): "now" is the kernel's coarse clock. A replay
                                 * (app/services/collector/replay.py) sets the capture's time here (Unix ns)
                                 * before its packets, so the SAME program stamps flows and drops in
                                 * capture time: pw_now() in parse.h */
};

/* meta (array, one entry): written by the loader after each attach, so the pins say which
 * source they came from and a later run can decide without compiling whether to reload. */
struct pw_meta {
    __u8  source_hash[32];      /* sha256 of port_flow.c + common.h + build flags */
    __u64 loaded_at;            /* Unix seconds */
    __u32 program_id;
    __u32 mode;                 /* 1 native (driver), 2 generic (skb) */
    __u32 egress_program_id;    /* the TC egress program (0: none) */
    __u32 flags;                /* PW_META_CLSACT_ADDED: portwatch added the clsact qdisc */
};
#define PW_META_CLSACT_ADDED 1

/* global counters: one per-CPU array entry holding struct pw_global (one lookup per packet
 * instead of one per counter); index names mirrored in app/services/kernel/bpf_structs.py GLOBAL_NAMES.
 * total = parsed + unparsed + non_ip. dropped is a subset of parsed. */
enum pw_global_index {
    PW_G_TOTAL = 0,
    PW_G_BYTES,
    PW_G_PARSED,
    PW_G_UNPARSED,
    PW_G_NON_IP,
    PW_G_DROPPED,
    PW_G_DROPPED_BYTES,
    PW_G_IPV4,
    PW_G_IPV6,
    PW_G_TCP,
    PW_G_UDP,
    PW_G_ICMP,
    PW_G_ICMPV6,
    PW_G_OTHER_L4,
    PW_G_FRAGMENTS,
    PW_G_VLAN,
    PW_G_FLOW_INSERTS,          /* new flow keys: inserts - growth = LRU evictions */
    PW_G_SRCPORT_INSERTS,
    PW_G_SOURCE_INSERTS,
    PW_G_PORT_MAP_FULL,         /* a new port key could not be stored (map full) */
    PW_G_SHORT_FRAGMENTS,       /* first fragments whose L4 header is cut short (counted, port if readable) */
    PW_G_SYN_LIMITED,           /* SYNs dropped by a per-port SYN limit (not in dropped) */
    PW_G_REPLIES,               /* answers to conversations this host opened (TC egress: conversations opened) */
    PW_G_REPLIES_PASSED,        /* of them, from a blocked source (passed, not dropped) */
    PW_G_VERIFIED,              /* proofs recorded in verified */
    PW_G_SCANNER_PROMOTIONS,    /* sources promoted into scanners */
    PW_G_SCANNERS_FULL,         /* a promotion found scanners full */
    PW_G_MAX
};

struct pw_global {
    __u64 c[PW_G_MAX];
};

#endif /* PORTWATCH_COMMON_H */
