/* portwatch XDP program: port_flow
 *
 * Hook: XDP (native where the driver supports it, else generic/skb), ingress of one interface.
 * Loaded by app/services/xdp.py through BCC; build options come as -D flags:
 *   PIN_DIR            "/sys/fs/bpf/portwatch/<interface>" (string literal, maps are pinned there)
 *   PORT_MAP_SIZE, SOURCE_MAP_SIZE, SRCPORT_MAP_SIZE, FLOW_MAP_SIZE, BLACKLIST_MAP_SIZE
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
 *   config      array            u32 (0)               pw_config                  1
 *   meta        array            u32 (0)               pw_meta                    1  (user space only)
 *
 * What it never does: it never drops a packet whose source is not in the blacklist, never
 * modifies a packet, and never resets a counter (user space takes differences). Packets it
 * cannot parse (truncated, bad IHL, ...) pass and are counted as unparsed.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "common.h"

#ifndef PIN_DIR
#error "PIN_DIR must be given as a -D flag"
#endif
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

#define VLAN_MAX_DEPTH 2
#define IPV6_EXT_MAX 6
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

/* IPv6 extension header numbers (linux/in6.h is not usable from BPF C here) */
#define NEXTHDR_HOP      0
#define NEXTHDR_ROUTING  43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH     51
#define NEXTHDR_DEST     60

struct vlan_hdr_ {
    __be16 tci;
    __be16 encap_proto;
};

struct ipv6_opt_hdr_ {
    __u8 nexthdr;
    __u8 hdrlen;
};

struct frag_hdr_ {
    __u8   nexthdr;
    __u8   reserved;
    __be16 frag_off;
    __be32 identification;
};

BPF_TABLE_PINNED("percpu_hash", struct pw_port_key, struct pw_port_value, port_stats, PORT_MAP_SIZE, PIN_DIR "/port_stats");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_addr, struct pw_source_value, sources, SOURCE_MAP_SIZE, PIN_DIR "/sources");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_srcport_key, __u64, srcports, SRCPORT_MAP_SIZE, PIN_DIR "/srcports");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_flow_key, struct pw_flow_value, flows, FLOW_MAP_SIZE, PIN_DIR "/flows");
BPF_TABLE_PINNED("percpu_array", __u32, struct pw_global, global, 1, PIN_DIR "/global");
/* The kernel refuses an LPM trie without BPF_F_NO_PREALLOC. */
BPF_TABLE_PINNED("lpm_trie", struct pw_lpm_key, struct pw_blacklist_value, blacklist, BLACKLIST_MAP_SIZE, PIN_DIR "/blacklist", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct pw_config, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("array", __u32, struct pw_meta, meta, 1, PIN_DIR "/meta");

/* g points at this CPU's struct pw_global; no other CPU writes it */
#define count(idx, n) do { g->c[(idx)] += (n); } while (0)

struct parsed {
    struct pw_addr src;
    struct pw_addr dst;
    __u32 l4_len;           /* bytes from the L4 header to the end of the IP payload */
    __u16 sport;
    __u16 dport;
    __u8  proto;
    __u8  tcp_flags;
    __u8  nonfirst_frag;
    __u8  pad;
};

static __always_inline void map_v4(struct pw_addr *a, __be32 ip)
{
    __builtin_memset(a->addr, 0, 10);
    a->addr[10] = 0xff;
    a->addr[11] = 0xff;
    __builtin_memcpy(&a->addr[12], &ip, 4);
}

/* Returns 0 when the L4 part was parsed (or needs no parsing), -1 when truncated. */
static __always_inline int parse_l4(void *l4, void *data_end, struct parsed *p)
{
    if (p->nonfirst_frag)
        return 0;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return -1;
        __u32 doff = th->doff * 4;
        if (doff < sizeof(*th) || doff > p->l4_len)
            return -1;
        p->sport = bpf_ntohs(th->source);
        p->dport = bpf_ntohs(th->dest);
        /* byte 13 of the TCP header holds the flags */
        p->tcp_flags = ((__u8 *)th)[13];
        p->l4_len -= doff;
        return 0;
    }
    if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end || p->l4_len < sizeof(*uh))
            return -1;
        p->sport = bpf_ntohs(uh->source);
        p->dport = bpf_ntohs(uh->dest);
        p->l4_len -= sizeof(*uh);
        return 0;
    }
    if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        __u8 *type = l4;
        if ((void *)(type + 4) > data_end || p->l4_len < 4)
            return -1;
        p->dport = *type;
        p->l4_len = p->l4_len >= 8 ? p->l4_len - 8 : 0;
        return 0;
    }
    return 0;
}

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

static __always_inline void count_source(struct pw_global *g, struct parsed *p, __u64 frame_len)
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
    sv->packets += 1;
    sv->bytes += frame_len;
    if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x02) && !(p->tcp_flags & 0x10))
        sv->syn += 1;

    if (!p->nonfirst_frag && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
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
            } else {
                n = srcports.lookup(&sk);
                if (n)
                    *n += 1;
            }
        }
    }
}

static __always_inline void count_flow(struct pw_global *g, struct parsed *p, __u64 frame_len, __u64 now)
{
    struct pw_flow_key fk = {};
    fk.src = p->src;
    fk.dst = p->dst;
    fk.sport = p->sport;
    fk.dport = p->dport;
    fk.proto = p->proto;
    struct pw_flow_value *fv = flows.lookup(&fk);
    if (fv) {
        if (fv->packets == 0)          /* this CPU's first packet of a flow another CPU created */
            fv->first_seen_ns = now;
        fv->packets += 1;
        fv->bytes += frame_len;
        fv->last_seen_ns = now;
        fv->tcp_flags |= p->tcp_flags;
        return;
    }
    struct pw_flow_value nv = {};
    nv.packets = 1;
    nv.bytes = frame_len;
    nv.first_seen_ns = now;
    nv.last_seen_ns = now;
    nv.tcp_flags = p->tcp_flags;
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
        fv->tcp_flags |= p->tcp_flags;
    }
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

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        goto unparsed;
    __u16 h_proto = eth->h_proto;
    void *cursor = eth + 1;

#pragma unroll
    for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
        if (h_proto != bpf_htons(ETH_P_8021Q_) && h_proto != bpf_htons(ETH_P_8021AD_))
            break;
        struct vlan_hdr_ *vh = cursor;
        if ((void *)(vh + 1) > data_end)
            goto unparsed;
        if (i == 0)
            count(PW_G_VLAN, 1);
        h_proto = vh->encap_proto;
        cursor = vh + 1;
    }

    struct parsed p = {};
    void *l4;
    if (h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = cursor;
        if ((void *)(iph + 1) > data_end)
            goto unparsed;
        __u32 ihl = iph->ihl * 4;
        __u32 tot = bpf_ntohs(iph->tot_len);
        if (iph->version != 4 || ihl < sizeof(*iph) || tot < ihl)
            goto unparsed;
        if (cursor + ihl > data_end)
            goto unparsed;
        map_v4(&p.src, iph->saddr);
        map_v4(&p.dst, iph->daddr);
        p.proto = iph->protocol;
        p.l4_len = tot - ihl;
        __u16 frag = bpf_ntohs(iph->frag_off);
        if (frag & 0x1FFF)
            p.nonfirst_frag = 1;
        if (frag & 0x3FFF)
            count(PW_G_FRAGMENTS, 1);
        l4 = cursor + ihl;
        count(PW_G_IPV4, 1);
    } else if (h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = cursor;
        if ((void *)(ip6 + 1) > data_end)
            goto unparsed;
        if (ip6->version != 6)
            goto unparsed;
        __builtin_memcpy(p.src.addr, &ip6->saddr, 16);
        __builtin_memcpy(p.dst.addr, &ip6->daddr, 16);
        p.l4_len = bpf_ntohs(ip6->payload_len);
        __u8 next = ip6->nexthdr;
        l4 = ip6 + 1;
        /* bounded walk over the common extension headers */
#pragma unroll
        for (int i = 0; i < IPV6_EXT_MAX; i++) {
            if (next == NEXTHDR_FRAGMENT) {
                struct frag_hdr_ *fh = l4;
                if ((void *)(fh + 1) > data_end || p.l4_len < sizeof(*fh))
                    goto unparsed;
                if (bpf_ntohs(fh->frag_off) & 0xFFF8)
                    p.nonfirst_frag = 1;
                count(PW_G_FRAGMENTS, 1);
                next = fh->nexthdr;
                l4 = fh + 1;
                p.l4_len -= sizeof(*fh);
                continue;
            }
            if (next == NEXTHDR_HOP || next == NEXTHDR_ROUTING || next == NEXTHDR_DEST || next == NEXTHDR_AUTH) {
                struct ipv6_opt_hdr_ *oh = l4;
                if ((void *)(oh + 1) > data_end)
                    goto unparsed;
                /* AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1 */
                __u32 len = next == NEXTHDR_AUTH ? ((__u32)oh->hdrlen + 2) * 4 : ((__u32)oh->hdrlen + 1) * 8;
                if (len > p.l4_len)
                    goto unparsed;
                next = oh->nexthdr;
                l4 = (void *)oh + len;
                p.l4_len -= len;
                continue;
            }
            break;
        }
        p.proto = next;
        count(PW_G_IPV6, 1);
    } else {
        count(PW_G_NON_IP, 1);
        return XDP_PASS;
    }

    /* the blacklist comes first: a blocked source costs one lookup and nothing else */
    struct pw_lpm_key lk = {};
    lk.prefixlen = 128;
    __builtin_memcpy(lk.addr, p.src.addr, 16);
    struct pw_blacklist_value *bv = blacklist.lookup(&lk);
    if (bv) {
        __sync_fetch_and_add(&bv->drops, 1);
        __sync_fetch_and_add(&bv->drop_bytes, frame_len);
        bv->last_drop_ns = bpf_ktime_get_coarse_ns();   /* the value is shared by CPUs: atomics above */
        count(PW_G_PARSED, 1);
        count(PW_G_DROPPED, 1);
        count(PW_G_DROPPED_BYTES, frame_len);
        return XDP_DROP;
    }

    if (parse_l4(l4, data_end, &p) < 0)
        goto unparsed;

    count(PW_G_PARSED, 1);
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
    count_source(g, &p, frame_len);
    count_flow(g, &p, frame_len, bpf_ktime_get_coarse_ns());
    return XDP_PASS;

unparsed:
    count(PW_G_UNPARSED, 1);
    return XDP_PASS;
}
