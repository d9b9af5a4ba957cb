/* portwatch: the one packet parser of the XDP ingress (port_flow.c) and TC egress (egress.c)
 * programs, so both directions follow the same rules:
 *
 *   - Ethernet, up to VLAN_MAX_DEPTH 802.1Q/802.1ad tags (the first counted as vlan);
 *   - IPv4 (IHL checked) and IPv6 with a bounded walk over hop-by-hop, routing, destination
 *     options, AH and fragment headers;
 *   - addresses keep their family (struct pw_addr): an IPv6 source ::ffff:a.b.c.d stays IPv6;
 *   - fragments: a non-first fragment has no L4 header (ports 0, counted per source); a first
 *     fragment whose L4 header is cut short (nmap -f) still counts, with its ports when the
 *     first 4 bytes are there (PW_G_SHORT_FRAGMENTS);
 *   - IP-in-IP, GRE, ESP and other protocols are counted as their OUTER protocol (port 0):
 *     the inner packet is not parsed;
 *   - a packet that is truncated or malformed where a header must be is "unparsed": counted,
 *     never dropped.
 *
 * The caller provides `g` (its struct pw_global) for the count() macro.
 */
#ifndef PORTWATCH_PARSE_H
#define PORTWATCH_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "common.h"

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

/* g points at this CPU's struct pw_global; no other CPU writes it */
#define count(idx, n) do { g->c[(idx)] += (n); } while (0)

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

struct parsed {
    struct pw_addr src;
    struct pw_addr dst;
    __u32 l4_len;           /* bytes from the L4 header to the end of the IP payload (then: L4 payload) */
    __u32 hdr_len;          /* bytes from the frame start to the L4 payload (egress GSO accounting) */
    __u16 sport;
    __u16 dport;
    __u8  proto;
    __u8  tcp_flags;
    __u8  frag;             /* any fragment */
    __u8  nonfirst_frag;
    __u8  short_l4;         /* a first fragment whose L4 header is cut short */
    __u8  ttl;              /* IPv4 TTL / IPv6 hop limit */
    __u32 seq;              /* TCP sequence and acknowledgement numbers, host byte order */
    __u32 ack_seq;
};

/* "now" for flow first/last seen and drop times: the kernel's coarse clock (CLOCK_MONOTONIC_COARSE,
 * a tick's resolution, far cheaper), unless user space set a clock in the config map (a replay
 * feeding a capture through BPF_PROG_TEST_RUN: the capture's time). One program, two clocks. */
static __always_inline __u64 pw_now(struct pw_config *cfg)
{
    if (cfg && cfg->clock_ns)
        return cfg->clock_ns;
    return bpf_ktime_get_coarse_ns();
}

#define PARSE_OK 0
#define PARSE_NON_IP 1
#define PARSE_BAD -1

static __always_inline void map_v4(struct pw_addr *a, __be32 ip)
{
    a->family = PW_FAMILY_V4;
    __builtin_memset(a->addr, 0, 10);
    a->addr[10] = 0xff;
    a->addr[11] = 0xff;
    __builtin_memcpy(&a->addr[12], &ip, 4);
}

/* Ethernet, VLAN and IP headers: fills p (addresses, proto, l4_len, ttl, fragment flags) and *l4.
 * Returns PARSE_OK, PARSE_NON_IP or PARSE_BAD. */
static __always_inline int parse_ip(void *data, void *data_end, struct parsed *p, void **l4, struct pw_global *g)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return PARSE_BAD;
    __u16 h_proto = eth->h_proto;
    void *cursor = eth + 1;

#pragma unroll
    for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
        if (h_proto != bpf_htons(ETH_P_8021Q_) && h_proto != bpf_htons(ETH_P_8021AD_))
            break;
        struct vlan_hdr_ *vh = cursor;
        if ((void *)(vh + 1) > data_end)
            return PARSE_BAD;
        if (i == 0)
            count(PW_G_VLAN, 1);
        h_proto = vh->encap_proto;
        cursor = vh + 1;
    }

    if (h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = cursor;
        if ((void *)(iph + 1) > data_end)
            return PARSE_BAD;
        __u32 ihl = iph->ihl * 4;
        __u32 tot = bpf_ntohs(iph->tot_len);
        if (iph->version != 4 || ihl < sizeof(*iph) || tot < ihl)
            return PARSE_BAD;
        if (cursor + ihl > data_end)
            return PARSE_BAD;
        map_v4(&p->src, iph->saddr);
        map_v4(&p->dst, iph->daddr);
        p->proto = iph->protocol;
        p->ttl = iph->ttl;
        p->l4_len = tot - ihl;
        __u16 frag = bpf_ntohs(iph->frag_off);
        if (frag & 0x1FFF)
            p->nonfirst_frag = 1;
        if (frag & 0x3FFF) {
            p->frag = 1;
            count(PW_G_FRAGMENTS, 1);
        }
        *l4 = cursor + ihl;
        count(PW_G_IPV4, 1);
        return PARSE_OK;
    }
    if (h_proto != bpf_htons(ETH_P_IPV6)) {
        count(PW_G_NON_IP, 1);
        return PARSE_NON_IP;
    }
    struct ipv6hdr *ip6 = cursor;
    if ((void *)(ip6 + 1) > data_end)
        return PARSE_BAD;
    if (ip6->version != 6)
        return PARSE_BAD;
    p->src.family = PW_FAMILY_V6;
    p->dst.family = PW_FAMILY_V6;
    __builtin_memcpy(p->src.addr, &ip6->saddr, 16);
    __builtin_memcpy(p->dst.addr, &ip6->daddr, 16);
    p->ttl = ip6->hop_limit;
    p->l4_len = bpf_ntohs(ip6->payload_len);
    __u8 next = ip6->nexthdr;
    void *cur = ip6 + 1;
    /* bounded walk over the common extension headers */
#pragma unroll
    for (int i = 0; i < IPV6_EXT_MAX; i++) {
        if (next == NEXTHDR_FRAGMENT) {
            struct frag_hdr_ *fh = cur;
            if ((void *)(fh + 1) > data_end || p->l4_len < sizeof(*fh))
                return PARSE_BAD;
            if (bpf_ntohs(fh->frag_off) & 0xFFF8)
                p->nonfirst_frag = 1;
            p->frag = 1;
            count(PW_G_FRAGMENTS, 1);
            next = fh->nexthdr;
            cur = fh + 1;
            p->l4_len -= sizeof(*fh);
            continue;
        }
        if (next == NEXTHDR_HOP || next == NEXTHDR_ROUTING || next == NEXTHDR_DEST || next == NEXTHDR_AUTH) {
            struct ipv6_opt_hdr_ *oh = cur;
            if ((void *)(oh + 1) > data_end)
                return PARSE_BAD;
            /* AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1 */
            __u32 len = next == NEXTHDR_AUTH ? ((__u32)oh->hdrlen + 2) * 4 : ((__u32)oh->hdrlen + 1) * 8;
            if (len > p->l4_len)
                return PARSE_BAD;
            next = oh->nexthdr;
            cur = (void *)oh + len;
            p->l4_len -= len;
            continue;
        }
        break;
    }
    p->proto = next;
    *l4 = cur;
    count(PW_G_IPV6, 1);
    return PARSE_OK;
}

/* A first fragment whose L4 header is cut short: its ports when the first 4 bytes are there. */
static __always_inline int short_first_fragment(void *l4, void *data_end, struct parsed *p)
{
    if (!p->frag)
        return -1;                  /* not a fragment: a truncated packet is unparsed */
    __be16 *ports = l4;
    if ((void *)(ports + 2) <= data_end && p->l4_len >= 4) {
        p->sport = bpf_ntohs(ports[0]);
        p->dport = bpf_ntohs(ports[1]);
    }
    p->short_l4 = 1;
    p->l4_len = 0;
    return 0;
}

/* Returns 0 when the L4 part was parsed (or needs no parsing), -1 when truncated. */
static __always_inline int parse_l4(void *data, void *l4, void *data_end, struct parsed *p)
{
    if (p->nonfirst_frag)
        return 0;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return short_first_fragment(l4, data_end, p);
        __u32 doff = th->doff * 4;
        if (doff < sizeof(*th) || doff > p->l4_len)
            return short_first_fragment(l4, data_end, p);
        p->sport = bpf_ntohs(th->source);
        p->dport = bpf_ntohs(th->dest);
        /* byte 13 of the TCP header holds the flags */
        p->tcp_flags = ((__u8 *)th)[13];
        p->seq = bpf_ntohl(th->seq);
        p->ack_seq = bpf_ntohl(th->ack_seq);
        p->l4_len -= doff;
        p->hdr_len = (__u32)(l4 - data) + doff;
        return 0;
    }
    if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end || p->l4_len < sizeof(*uh))
            return short_first_fragment(l4, data_end, p);
        p->sport = bpf_ntohs(uh->source);
        p->dport = bpf_ntohs(uh->dest);
        p->l4_len -= sizeof(*uh);
        p->hdr_len = (__u32)(l4 - data) + sizeof(*uh);
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

static __always_inline int is_syn(struct parsed *p)
{
    return p->proto == IPPROTO_TCP && (p->tcp_flags & 0x02) && !(p->tcp_flags & 0x10);
}

/* The flow key of p as it travelled (reverse 0), or as its answer will travel (reverse 1). */
static __always_inline void flow_key(struct pw_flow_key *k, struct parsed *p, int reverse)
{
    __builtin_memset(k, 0, sizeof(*k));
    k->src = reverse ? p->dst : p->src;
    k->dst = reverse ? p->src : p->dst;
    k->sport = reverse ? p->dport : p->sport;
    k->dport = reverse ? p->sport : p->dport;
    k->proto = p->proto;
}

/* 1 when p belongs to a TCP or UDP conversation with both ports known (not a fragment's tail). */
static __always_inline int has_conversation(struct parsed *p)
{
    return !p->nonfirst_frag && !p->short_l4 && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP);
}

#endif /* PORTWATCH_PARSE_H */
