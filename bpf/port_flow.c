/* portwatch XDP program: port_flow (its TC egress sibling is bpf/egress.c; both parse with bpf/parse.h)
 *
 * Hook: XDP (native where the driver supports it, else generic/skb), ingress of one interface.
 * Loaded by app/services/kernel/xdp_loader.py through BCC; build options come as -D flags:
 *   PIN_DIR            "/sys/fs/bpf/portwatch/<interface>" (string literal, maps are pinned there)
 *   PORT_MAP_SIZE, SOURCE_MAP_SIZE, SRCPORT_MAP_SIZE, FLOW_MAP_SIZE, BLACKLIST_MAP_SIZE, SYNLIMIT_MAP_SIZE,
 *   CONN_MAP_SIZE, SYNACK_MAP_SIZE, SCANNER_MAP_SIZE, REPLY_IDLE_SECONDS (defaults: bpf/common.h)
 *
 * Maps (all pinned under PIN_DIR; struct layouts in bpf/common.h):
 *   name        type             key                   value                      entries
 *   port_stats  percpu_hash      pw_port_key           pw_port_value              PORT_MAP_SIZE
 *   sources     lru_percpu_hash  pw_addr               pw_source_value            SOURCE_MAP_SIZE
 *   srcports    lru_percpu_hash  pw_srcport_key        u64 packets                SRCPORT_MAP_SIZE
 *   flows       lru_percpu_hash  pw_flow_key           pw_flow_value              FLOW_MAP_SIZE
 *   global      percpu_array     u32 (0)               pw_global (enum pw_global) 1
 *
 * Every counter map is per CPU: no atomic instructions on the hot path; user space sums.
 *   blacklist   lpm_trie         pw_lpm_key            pw_blacklist_value         BLACKLIST_MAP_SIZE
 *   config      array (mmapable) u32 (0)               pw_config                  1
 *   meta        array            u32 (0)               pw_meta                    1  (user space only)
 *   synlimit    hash             pw_port_key           pw_synlimit_value          SYNLIMIT_MAP_SIZE
 *   conns       lru_hash         pw_flow_key (answer)  pw_conn_value              CONN_MAP_SIZE   (TC writes)
 *   synacks     lru_hash         pw_flow_key (answer)  pw_synack_value            SYNACK_MAP_SIZE (TC writes)
 *   verified    lru_hash         pw_addr               pw_verified_value          VERIFIED_MAP_SIZE
 *   scanners    hash (no LRU)    pw_addr               pw_scanner_value           SCANNER_MAP_SIZE
 *
 * Answers: a TCP/UDP packet on the reverse tuple of a conversation THIS host opened (conns, written
 * by bpf/egress.c), idle less than REPLY_IDLE_SECONDS, and for TCP carrying ACK, is an answer: it
 * passes even from a blocked source (counted in the entry's `replies`, PW_G_REPLIES_PASSED), is
 * never counted in srcports (scan evidence) and marks its flow PW_FLOW_REPLY. So is an ICMP/ICMPv6
 * error (unreachable, time exceeded, parameter problem, packet too big) quoting a TCP/UDP packet of
 * such a conversation: this host's own traffic bounced, e.g. ECONNREFUSED on a connected UDP socket
 * (it proves nothing: anyone on the path may send one). Verified peers: the
 * ACK acknowledging this host's SYN-ACK ISN + 1 (synacks), the SYN-ACK acknowledging this host's
 * SYN ISN + 1, and the first answer to this host's UDP datagram record their source in verified,
 * with the packet's TTL and source MAC.
 *
 * Parsing (bpf/parse.h): addresses keep their family (an IPv6 ::ffff:a.b.c.d source is never the
 * IPv4 host a.b.c.d); fragments count per source (sources.fragments), a first fragment with a
 * short L4 header with its port when readable; IP-in-IP and GRE count as their OUTER protocol
 * (port 0, the inner packet is not parsed). Per source, the TTL/hop-limit range of the round.
 * LRU evictions are user space's inserts - growth (PW_G_*_INSERTS).
 *
 * What it drops: packets whose source matches the blacklist (except answers, above); and, only where user space set a
 * per-port SYN budget in synlimit (off unless configured), SYNs over that budget (counted first).
 * What it never does: it never drops any other packet, never
 * modifies a packet, and never resets a counter (user space takes differences). Packets it
 * cannot parse (truncated, bad IHL, ...) pass and are counted as unparsed.
 */
#include <uapi/linux/bpf.h>

#include "parse.h"

#ifndef PIN_DIR
#error "PIN_DIR must be given as a -D flag"
#endif

BPF_TABLE_PINNED("percpu_hash", struct pw_port_key, struct pw_port_value, port_stats, PORT_MAP_SIZE, PIN_DIR "/port_stats");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_addr, struct pw_source_value, sources, SOURCE_MAP_SIZE, PIN_DIR "/sources");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_srcport_key, __u64, srcports, SRCPORT_MAP_SIZE, PIN_DIR "/srcports");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_flow_key, struct pw_flow_value, flows, FLOW_MAP_SIZE, PIN_DIR "/flows");
BPF_TABLE_PINNED("percpu_array", __u32, struct pw_global, global, 1, PIN_DIR "/global");
/* The kernel refuses an LPM trie without BPF_F_NO_PREALLOC. */
BPF_TABLE_PINNED("lpm_trie", struct pw_lpm_key, struct pw_blacklist_value, blacklist, BLACKLIST_MAP_SIZE, PIN_DIR "/blacklist", BPF_F_NO_PREALLOC);
/* mmap-able: a replay moves the clock (pw_config.clock_ns) by a memory write, not a syscall per tick */
BPF_TABLE_PINNED("array", __u32, struct pw_config, config, 1, PIN_DIR "/config", BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct pw_meta, meta, 1, PIN_DIR "/meta");
BPF_TABLE_PINNED("hash", struct pw_port_key, struct pw_synlimit_value, synlimit, SYNLIMIT_MAP_SIZE, PIN_DIR "/synlimit");
BPF_TABLE_PINNED("lru_hash", struct pw_flow_key, struct pw_conn_value, conns, CONN_MAP_SIZE, PIN_DIR "/conns");
BPF_TABLE_PINNED("lru_hash", struct pw_flow_key, struct pw_synack_value, synacks, SYNACK_MAP_SIZE, PIN_DIR "/synacks");
BPF_TABLE_PINNED("lru_hash", struct pw_addr, struct pw_verified_value, verified, VERIFIED_MAP_SIZE, PIN_DIR "/verified");
BPF_TABLE_PINNED("hash", struct pw_addr, struct pw_scanner_value, scanners, SCANNER_MAP_SIZE, PIN_DIR "/scanners");

static __always_inline void count_port(struct pw_global *g, struct parsed *p, __u64 frame_len, __u32 epoch)
{
    struct pw_port_key pk = {};
    pk.port = p->dport;
    pk.proto = p->proto;
    struct pw_port_value zero = {};
    struct pw_port_value *pv = port_stats.lookup_or_try_init(&pk, &zero);
    if (!pv) {
        count(PW_G_PORT_MAP_FULL, 1);
        return;
    }
    /* per-CPU value: no other CPU writes this copy, plain updates are safe */
    __u32 payload = p->l4_len;
    if (pv->packets == 0 || payload < pv->min_payload)
        pv->min_payload = payload;
    if (payload > pv->max_payload)
        pv->max_payload = payload;
    if (pv->epoch != epoch || pv->packets == 0) {
        pv->epoch = epoch;
        pv->round_min = payload;
        pv->round_max = payload;
    } else {
        if (payload < pv->round_min)
            pv->round_min = payload;
        if (payload > pv->round_max)
            pv->round_max = payload;
    }
    pv->packets += 1;
    pv->bytes += frame_len;
    pv->payload_bytes += payload;
    if (p->proto == IPPROTO_TCP) {
        __u8 f = p->tcp_flags;
        if ((f & 0x02) && !(f & 0x10))
            pv->syn += 1;
        if ((f & 0x02) && (f & 0x10))
            pv->synack += 1;
        if (f & 0x04)
            pv->rst += 1;
        if (f & 0x01)
            pv->fin += 1;
    }
}

/* A new (port, protocol) pair of p's source: counted in its scanners entry, or towards its promotion. */
static __always_inline void new_port(struct pw_global *g, struct parsed *p, struct pw_source_value *sv, __u64 now)
{
    struct pw_scanner_value *scv = scanners.lookup(&p->src);
    if (scv) {
        __sync_fetch_and_add(&scv->ports, 1);
        scv->last_ns = now;
        return;
    }
    if (sv->new_ports < 0xFFFF)
        sv->new_ports += 1;
    if (sv->new_ports != PW_SCAN_PROMOTE)
        return;
    struct pw_scanner_value nv = {};
    nv.ports = PW_SCAN_PROMOTE;
    nv.first_ns = now;
    nv.last_ns = now;
    if (scanners.insert(&p->src, &nv) == 0)
        count(PW_G_SCANNER_PROMOTIONS, 1);
    else
        count(PW_G_SCANNERS_FULL, 1);
}

/* packets and SYNs of a promoted source (looked up only for a source this CPU saw promoted) */
static __always_inline void count_scanner(struct parsed *p)
{
    struct pw_scanner_value *scv = scanners.lookup(&p->src);
    if (!scv)
        return;
    __sync_fetch_and_add(&scv->packets, 1);
    if (is_syn(p))
        __sync_fetch_and_add(&scv->syn, 1);
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
    return *(__u32 *)a == *(__u32 *)b && *(__u16 *)(a + 4) == *(__u16 *)(b + 4);
}

static __always_inline void count_source(struct pw_global *g, struct parsed *p, __u64 frame_len, __u32 epoch, int reply,
                                         __u64 now, struct ethhdr *eth)
{
    struct pw_source_value zero = {};
    struct pw_source_value *sv = sources.lookup(&p->src);
    if (!sv) {
        if (sources.insert(&p->src, &zero) == 0)
            count(PW_G_SOURCE_INSERTS, 1);
        sv = sources.lookup(&p->src);
        if (!sv)
            return;
    }
    /* per-round TTL range, reset when the round epoch moved on (like round_min in count_port) */
    if (sv->epoch != epoch || sv->packets == 0) {
        /* promotion counts the new pairs of ONE round (a port of an earlier round is not this round's);
         * a promoted source keeps its count unless user space removed its idle scanners entry */
        if (sv->new_ports < PW_SCAN_PROMOTE || !scanners.lookup(&p->src))
            sv->new_ports = 0;
        sv->epoch = epoch;
        sv->ttl_min = p->ttl;
        sv->ttl_max = p->ttl;
        __builtin_memcpy(sv->mac, eth->h_source, 6);
        sv->mac_mixed = 0;
    } else {
        if (p->ttl < sv->ttl_min)
            sv->ttl_min = p->ttl;
        if (p->ttl > sv->ttl_max)
            sv->ttl_max = p->ttl;
        if (!same_mac(sv->mac, eth->h_source))
            sv->mac_mixed = 1;
    }
    sv->packets += 1;
    sv->bytes += frame_len;
    if (is_syn(p))
        sv->syn += 1;
    if (p->frag)
        sv->fragments += 1;
    if (sv->new_ports >= PW_SCAN_PROMOTE)
        count_scanner(p);

    /* which local port: not for non-first fragments (no L4 header), nor a short first fragment
     * without its ports, nor an answer to this host's own conversation (never scan evidence) */
    if (!reply && !p->nonfirst_frag && !(p->short_l4 && p->dport == 0) && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
        struct pw_srcport_key sk = {};
        sk.src = p->src;
        sk.port = p->dport;
        sk.proto = p->proto;
        __u64 *n = srcports.lookup(&sk);
        if (n) {
            *n += 1;
        } else {
            __u64 one = 1;
            /* insert = BPF_NOEXIST: another CPU may have inserted the key meanwhile; then count
             * in this CPU's (zeroed) slot of it */
            if (srcports.insert(&sk, &one) == 0) {
                count(PW_G_SRCPORT_INSERTS, 1);
                new_port(g, p, sv, now);
            } else {
                n = srcports.lookup(&sk);
                if (n)
                    *n += 1;
            }
        }
    }
}

static __always_inline void count_flow(struct pw_global *g, struct parsed *p, __u64 frame_len, __u64 now, int reply)
{
    __u32 flags = p->tcp_flags | (reply ? PW_FLOW_REPLY : 0);
    struct pw_flow_key fk;
    flow_key(&fk, p, 0);
    struct pw_flow_value *fv = flows.lookup(&fk);
    if (fv) {
        if (fv->packets == 0)          /* this CPU's first packet of a flow another CPU created */
            fv->first_seen_ns = now;
        fv->packets += 1;
        fv->bytes += frame_len;
        fv->last_seen_ns = now;
        fv->tcp_flags |= flags;
        return;
    }
    struct pw_flow_value nv = {};
    nv.packets = 1;
    nv.bytes = frame_len;
    nv.first_seen_ns = now;
    nv.last_seen_ns = now;
    nv.tcp_flags = flags;
    if (flows.insert(&fk, &nv) == 0) {
        count(PW_G_FLOW_INSERTS, 1);
        return;
    }
    fv = flows.lookup(&fk);
    if (fv) {
        fv->first_seen_ns = now;
        fv->packets += 1;
        fv->bytes += frame_len;
        fv->last_seen_ns = now;
        fv->tcp_flags |= flags;
    }
}

/* 1 when a SYN to this port is over the port's SYN budget for the current one-second window. The
 * entry is shared by CPUs: the window counter is atomic; a window reset racing on two CPUs may let
 * a few extra SYNs through, never drop more than the budget allows. now: the program's clock (pw_now:
 * the coarse monotonic clock live, capture time in a replay), the clock synlimit.set_limit dates the
 * entry's expiry on, so a replay's windows and expiry follow the capture. */
static __always_inline int syn_over_budget(struct parsed *p, __u64 now)
{
    struct pw_port_key k = {};
    k.port = p->dport;
    k.proto = p->proto;
    struct pw_synlimit_value *v = synlimit.lookup(&k);
    if (!v)
        return 0;
    if (v->expires_ns && now >= v->expires_ns)
        return 0;
    if (now - v->window_start_ns >= 1000000000ULL) {
        v->window_start_ns = now;
        v->window_syns = 0;
    }
    if (__sync_fetch_and_add(&v->window_syns, 1) < v->per_second)
        return 0;
    __sync_fetch_and_add(&v->dropped, 1);
    return 1;
}

/* Record p's source as a verified peer (proof PW_PROOF_*), with the packet's TTL and source MAC. */
static __always_inline void verify(struct pw_global *g, struct parsed *p, __u8 proof, void *data, __u64 now)
{
    struct ethhdr *eth = data;          /* parse_ip checked the Ethernet header is there */
    struct pw_verified_value *vv = verified.lookup(&p->src);
    if (vv) {
        vv->last_ns = now;
        vv->proof = proof;
        vv->ttl = p->ttl;
        __builtin_memcpy(vv->mac, eth->h_source, 6);
        __sync_fetch_and_add(&vv->proofs, 1);
    } else {
        struct pw_verified_value nv = {};
        nv.last_ns = now;
        nv.proofs = 1;
        nv.proof = proof;
        nv.ttl = p->ttl;
        __builtin_memcpy(nv.mac, eth->h_source, 6);
        verified.update(&p->src, &nv);
    }
    count(PW_G_VERIFIED, 1);
}

/* The conns key of the TCP/UDP packet an ICMP or ICMPv6 error quotes (destination unreachable, time
 * exceeded, parameter problem; ICMPv6 packet too big), as that packet's answer would arrive: the quoted
 * packet went from this host (its source) to the remote (its destination). 0 when k was filled. */
static __always_inline int icmp_quoted_key(struct pw_flow_key *k, struct parsed *p, void *l4, void *data_end)
{
    __u8 *icmp = l4;
    if ((void *)(icmp + 8) > data_end)
        return -1;
    __u8 type = icmp[0];
    void *inner = icmp + 8;
    void *ports;
    __u8 proto;
    __builtin_memset(k, 0, sizeof(*k));
    if (p->proto == IPPROTO_ICMP) {
        if (type != 3 && type != 11 && type != 12)
            return -1;
        struct iphdr *ih = inner;
        if ((void *)(ih + 1) > data_end)
            return -1;
        __u32 ihl = ih->ihl * 4;
        if (ih->version != 4 || ihl < sizeof(*ih) || (bpf_ntohs(ih->frag_off) & 0x1FFF))
            return -1;
        proto = ih->protocol;
        ports = inner + (ihl & 0x3C);               /* 20..60: a bound the verifier can follow */
        map_v4(&k->src, ih->daddr);
        map_v4(&k->dst, ih->saddr);
    } else {
        if (type < 1 || type > 4)                   /* ICMPv6 errors: 1 unreachable ... 4 parameter problem */
            return -1;
        struct ipv6hdr *ih = inner;
        if ((void *)(ih + 1) > data_end)
            return -1;
        proto = ih->nexthdr;
        ports = ih + 1;
        k->src.family = PW_FAMILY_V6;
        k->dst.family = PW_FAMILY_V6;
        __builtin_memcpy(k->src.addr, &ih->daddr, 16);
        __builtin_memcpy(k->dst.addr, &ih->saddr, 16);
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return -1;
    __be16 *pp = ports;
    if ((void *)(pp + 2) > data_end)
        return -1;
    k->sport = bpf_ntohs(pp[1]);                    /* the remote's port */
    k->dport = bpf_ntohs(pp[0]);                    /* this host's port */
    k->proto = proto;
    return 0;
}

/* 1 when the ICMP/ICMPv6 error p quotes a packet of a conversation this host opened (conns, idle <
 * REPLY_IDLE_SECONDS). It proves nothing (whoever is on the path may send one): no verified peer. */
static __always_inline int icmp_answer_of(struct pw_global *g, struct parsed *p, void *l4, void *data_end, __u64 now)
{
    struct pw_flow_key fk;
    if (p->nonfirst_frag || icmp_quoted_key(&fk, p, l4, data_end) < 0)
        return 0;
    struct pw_conn_value *cv = conns.lookup(&fk);
    if (!cv || now - cv->last_out_ns > REPLY_IDLE_SECONDS * 1000000000ULL)
        return 0;
    count(PW_G_REPLIES, 1);
    return 1;
}

/* 1 when p answers a conversation this host opened (conns: reverse tuple, idle < REPLY_IDLE_SECONDS,
 * TCP with ACK). Records the proofs a blind forger cannot give (see the header comment). */
static __always_inline int answer_of(struct pw_global *g, struct parsed *p, void *data, __u64 now)
{
    if (!has_conversation(p))
        return 0;
    struct pw_flow_key fk;
    flow_key(&fk, p, 0);
    struct pw_conn_value *cv = conns.lookup(&fk);
    if (cv) {
        if (now - cv->last_out_ns > REPLY_IDLE_SECONDS * 1000000000ULL)
            return 0;
        if (p->proto == IPPROTO_TCP && !(p->tcp_flags & 0x10))
            return 0;                   /* an answer acknowledges something: a bare SYN opens, not answers */
        if (!(cv->flags & PW_CONN_VERIFIED) && (p->proto == IPPROTO_UDP ||
                ((p->tcp_flags & 0x12) == 0x12 && p->ack_seq == cv->isn + 1))) {
            cv->flags |= PW_CONN_VERIFIED;
            verify(g, p, p->proto == IPPROTO_UDP ? PW_PROOF_OPENED_UDP : PW_PROOF_OPENED_TCP, data, now);
        }
        count(PW_G_REPLIES, 1);
        return 1;
    }
    if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x16) == 0x10) {
        /* an ACK (no SYN, no RST): does it complete a handshake this host answered? */
        struct pw_synack_value *sv = synacks.lookup(&fk);
        if (sv && p->ack_seq == sv->isn + 1) {
            verify(g, p, PW_PROOF_HANDSHAKE, data, now);
            synacks.delete(&fk);
        }
    }
    return 0;
}

int xdp_port_flow(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u64 frame_len = (__u64)(data_end - data);
    __u32 zero_idx = 0;
    struct pw_global *g = global.lookup(&zero_idx);
    /* the verifier rejects the dereference without this NULL check, even for an array */
    if (!g)
        return XDP_PASS;

    count(PW_G_TOTAL, 1);
    count(PW_G_BYTES, frame_len);

    __u32 epoch = 0;
    struct pw_config *cfg = config.lookup(&zero_idx);
    if (cfg)
        epoch = cfg->epoch;

    struct parsed p = {};
    void *l4 = data;
    int rc = parse_ip(data, data_end, &p, &l4, g);
    if (rc == PARSE_NON_IP)
        return XDP_PASS;
    if (rc != PARSE_OK)
        goto unparsed;

    /* the blacklist comes first: a blocked source costs a lookup, its ports and the conns lookup
     * that tells an answer to this host's own conversation (passed: a block never cuts this host
     * off from a destination it talks to) */
    __u64 now = pw_now(cfg);            /* capture time in a replay */
    int l4_ok = parse_l4(data, l4, data_end, &p) == 0;
    int reply = 0;
    if (l4_ok && (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6))
        reply = icmp_answer_of(g, &p, l4, data_end, now);
    else if (l4_ok)
        reply = answer_of(g, &p, data, now);
    struct pw_lpm_key lk = {};
    lk.prefixlen = PW_LPM_FULL;
    lk.a = p.src;
    struct pw_blacklist_value *bv = blacklist.lookup(&lk);
    if (bv && !reply) {
        __sync_fetch_and_add(&bv->drops, 1);
        __sync_fetch_and_add(&bv->drop_bytes, frame_len);
        bv->last_drop_ns = now;         /* the value is shared by CPUs: atomics above */
        count(PW_G_PARSED, 1);
        count(PW_G_DROPPED, 1);
        count(PW_G_DROPPED_BYTES, frame_len);
        return XDP_DROP;
    }
    if (bv) {
        __sync_fetch_and_add(&bv->replies, 1);
        count(PW_G_REPLIES_PASSED, 1);
    }
    if (!l4_ok)
        goto unparsed;

    count(PW_G_PARSED, 1);
    if (p.short_l4)
        count(PW_G_SHORT_FRAGMENTS, 1);
    if (p.proto == IPPROTO_TCP)
        count(PW_G_TCP, 1);
    else if (p.proto == IPPROTO_UDP)
        count(PW_G_UDP, 1);
    else if (p.proto == IPPROTO_ICMP)
        count(PW_G_ICMP, 1);
    else if (p.proto == IPPROTO_ICMPV6)
        count(PW_G_ICMPV6, 1);
    else
        count(PW_G_OTHER_L4, 1);

    count_port(g, &p, frame_len, epoch);
    count_source(g, &p, frame_len, epoch, reply, now, data);
    count_flow(g, &p, frame_len, now, reply);
    /* counted first (the flood stays visible), then an optional per-port SYN budget */
    if (is_syn(&p) && syn_over_budget(&p, now)) {
        count(PW_G_SYN_LIMITED, 1);
        return XDP_DROP;
    }
    return XDP_PASS;

unparsed:
    count(PW_G_UNPARSED, 1);
    return XDP_PASS;
}
