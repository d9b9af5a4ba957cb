/* portwatch TC egress program: egress (the outbound sibling of bpf/port_flow.c)
 *
 * Hook: TC clsact egress (direct-action) of the same interface as the XDP program. Compiled in
 * the same BCC text as port_flow.c (app/services/kernel/xdp_loader.py joins both; one compile), pinned under
 * PIN_DIR with its own maps; parses with bpf/parse.h, the same rules as ingress.
 *
 * Maps (pinned under PIN_DIR; struct layouts in bpf/common.h):
 *   name         type             key                         value                   entries
 *   eg_ports     percpu_hash      pw_port_key (local port)    pw_egress_port_value    PORT_MAP_SIZE
 *   eg_dests     lru_percpu_hash  pw_addr (remote)            pw_dest_value           SOURCE_MAP_SIZE
 *   eg_dstports  lru_percpu_hash  pw_srcport_key (remote, remote port)  u64 packets   SRCPORT_MAP_SIZE
 *   eg_flows     lru_percpu_hash  pw_flow_key (as sent: src = local)    pw_flow_value FLOW_MAP_SIZE
 *   eg_global    percpu_array     u32 (0)                     pw_global               1
 *   eg_block     lpm_trie         pw_lpm_key (remote)         pw_blacklist_value      BLACKLIST_MAP_SIZE
 *
 * It also writes two maps of bpf/port_flow.c (one BCC text, so both programs see them): conns, the
 * conversations this host opens (its TCP SYNs with their ISN; its first UDP datagram to an address
 * and port that had not written first — an answer to an inbound request opens nothing), refreshed by
 * every later packet of them; and synacks, the ISN of every SYN-ACK it sends. XDP reads them to pass
 * answers and to verify peers (see port_flow.c).
 *
 * GSO: a TSO/GSO super-packet counts as its gso_segs packets, and its bytes as the frames on the
 * wire (skb->len + (segs - 1) * header length), so counts match what the peer receives.
 *
 * It never redirects or modifies a packet, and drops one ONLY when its destination matches an
 * entry of eg_block — empty unless user space switched egress blocking on (off by default:
 * blocklist.egress_block_enabled, app/services/kernel/enforcement.py); the empty trie is the switch, so
 * no flag can be lost between processes. A match is TC_ACT_SHOT, counted as dropped in eg_global
 * and in the entry (like the ingress blacklist). Everything else returns TC_ACT_OK.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "parse.h"


BPF_TABLE_PINNED("percpu_hash", struct pw_port_key, struct pw_egress_port_value, eg_ports, PORT_MAP_SIZE, PIN_DIR "/eg_ports");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_addr, struct pw_dest_value, eg_dests, SOURCE_MAP_SIZE, PIN_DIR "/eg_dests");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_srcport_key, __u64, eg_dstports, SRCPORT_MAP_SIZE, PIN_DIR "/eg_dstports");
BPF_TABLE_PINNED("lru_percpu_hash", struct pw_flow_key, struct pw_flow_value, eg_flows, FLOW_MAP_SIZE, PIN_DIR "/eg_flows");
BPF_TABLE_PINNED("percpu_array", __u32, struct pw_global, eg_global, 1, PIN_DIR "/eg_global");
BPF_TABLE_PINNED("lpm_trie", struct pw_lpm_key, struct pw_blacklist_value, eg_block, BLACKLIST_MAP_SIZE, PIN_DIR "/eg_block", BPF_F_NO_PREALLOC);

static __always_inline void eg_count(struct pw_global *g, struct parsed *p, __u64 packets, __u64 bytes, __u64 payload,
                                     __u64 now)
{
    __u64 syn = is_syn(p) ? packets : 0;
    struct pw_port_key pk = {};
    /* the local port: the source port; ICMP's "port" is its type, as on ingress */
    pk.port = (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) ? p->dport : p->sport;
    pk.proto = p->proto;
    struct pw_egress_port_value pz = {};
    struct pw_egress_port_value *pv = eg_ports.lookup_or_try_init(&pk, &pz);
    if (pv) {
        pv->packets += packets;
        pv->bytes += bytes;
        pv->payload_bytes += payload;
        pv->syn += syn;
    } else {
        count(PW_G_PORT_MAP_FULL, 1);
    }

    struct pw_dest_value dz = {};
    struct pw_dest_value *dv = eg_dests.lookup(&p->dst);
    if (!dv) {
        if (eg_dests.insert(&p->dst, &dz) == 0)
            count(PW_G_SOURCE_INSERTS, 1);
        dv = eg_dests.lookup(&p->dst);
    }
    if (dv) {
        dv->packets += packets;
        dv->bytes += bytes;
        dv->syn += syn;
    }

    if (!p->nonfirst_frag && !(p->short_l4 && p->dport == 0) && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
        struct pw_srcport_key dk = {};
        dk.src = p->dst;
        dk.port = p->dport;
        dk.proto = p->proto;
        __u64 *n = eg_dstports.lookup(&dk);
        if (n) {
            *n += packets;
        } else if (eg_dstports.insert(&dk, &packets) == 0) {
            count(PW_G_SRCPORT_INSERTS, 1);
        } else {
            n = eg_dstports.lookup(&dk);
            if (n)
                *n += packets;
        }
    }

    struct pw_flow_key fk;
    flow_key(&fk, p, 0);
    struct pw_flow_value *fv = eg_flows.lookup(&fk);
    if (!fv) {
        struct pw_flow_value nv = {};
        if (eg_flows.insert(&fk, &nv) == 0)
            count(PW_G_FLOW_INSERTS, 1);
        fv = eg_flows.lookup(&fk);
        if (!fv)
            return;
    }
    if (fv->packets == 0)
        fv->first_seen_ns = now;
    fv->packets += packets;
    fv->bytes += bytes;
    fv->last_seen_ns = now;
    fv->tcp_flags |= p->tcp_flags;
}

/* conns and synacks (see the header comment); keys are the tuple as the answer will arrive */
static __always_inline void eg_track(struct pw_global *g, struct parsed *p, __u64 now)
{
    if (!has_conversation(p))
        return;
    struct pw_flow_key rk;
    flow_key(&rk, p, 1);
    __u8 f = p->tcp_flags;
    if (p->proto == IPPROTO_TCP && (f & 0x12) == 0x02) {          /* this host's SYN: it opens */
        struct pw_conn_value cv = {};
        cv.last_out_ns = now;
        cv.isn = p->seq;
        cv.flags = PW_CONN_TCP;
        if (conns.update(&rk, &cv) == 0)
            count(PW_G_REPLIES, 1);
        return;
    }
    if (p->proto == IPPROTO_TCP && (f & 0x12) == 0x12) {          /* this host's SYN-ACK: its ISN */
        struct pw_synack_value sv = {};
        sv.sent_ns = now;
        sv.isn = p->seq;
        synacks.update(&rk, &sv);
        return;
    }
    struct pw_conn_value *cv = conns.lookup(&rk);
    if (cv) {
        cv->last_out_ns = now;
        return;
    }
    /* a UDP datagram on a tuple the remote wrote first (an inbound flow exists) answers a request:
     * that opens nothing, or a forger's request would open a way through a block */
    if (p->proto == IPPROTO_UDP && !flows.lookup(&rk)) {
        struct pw_conn_value nv = {};
        nv.last_out_ns = now;
        nv.flags = PW_CONN_UDP;
        if (conns.insert(&rk, &nv) == 0)
            count(PW_G_REPLIES, 1);
    }
}

int tc_egress(struct __sk_buff *skb)
{
    __u32 zero_idx = 0;
    struct pw_global *g = eg_global.lookup(&zero_idx);
    if (!g)
        return TC_ACT_OK;
    /* the config map is port_flow.c's (one BCC text): its clock, as on ingress */
    struct pw_config *cfg = config.lookup(&zero_idx);
    __u64 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    __u64 len = skb->len;

    /* headers outside the linear part (rare on egress): pull them in; no byte changes */
    if ((long)skb->data_end - (long)skb->data < 128 && skb->len > skb->data_end - skb->data)
        bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128);
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    struct parsed p = {};
    void *l4 = data;
    int rc = parse_ip(data, data_end, &p, &l4, g);
    if (rc == PARSE_NON_IP) {
        count(PW_G_TOTAL, segs);
        count(PW_G_BYTES, len);
        return TC_ACT_OK;
    }
    if (rc == PARSE_OK) {
        /* the off-by-default egress block: a lookup in an empty trie while it is off */
        struct pw_lpm_key lk = {};
        lk.prefixlen = PW_LPM_FULL;
        lk.a = p.dst;
        struct pw_blacklist_value *bv = eg_block.lookup(&lk);
        if (bv) {
            __sync_fetch_and_add(&bv->drops, segs);
            __sync_fetch_and_add(&bv->drop_bytes, len);
            bv->last_drop_ns = pw_now(cfg);
            count(PW_G_TOTAL, segs);
            count(PW_G_BYTES, len);
            count(PW_G_PARSED, segs);
            count(PW_G_DROPPED, segs);
            count(PW_G_DROPPED_BYTES, len);
            return TC_ACT_SHOT;
        }
    }
    if (rc != PARSE_OK || parse_l4(data, l4, data_end, &p) < 0) {
        count(PW_G_TOTAL, segs);
        count(PW_G_BYTES, len);
        count(PW_G_UNPARSED, segs);
        return TC_ACT_OK;
    }
    /* wire bytes of a GSO super-packet: every segment repeats the headers */
    __u64 bytes = len + (segs - 1) * p.hdr_len;
    __u64 payload = segs > 1 && len > p.hdr_len ? len - p.hdr_len : p.l4_len;
    count(PW_G_TOTAL, segs);
    count(PW_G_BYTES, bytes);
    count(PW_G_PARSED, segs);
    if (p.short_l4)
        count(PW_G_SHORT_FRAGMENTS, segs);
    if (p.proto == IPPROTO_TCP)
        count(PW_G_TCP, segs);
    else if (p.proto == IPPROTO_UDP)
        count(PW_G_UDP, segs);
    else if (p.proto == IPPROTO_ICMP)
        count(PW_G_ICMP, segs);
    else if (p.proto == IPPROTO_ICMPV6)
        count(PW_G_ICMPV6, segs);
    else
        count(PW_G_OTHER_L4, segs);
    __u64 now = pw_now(cfg);                 /* capture time in a replay */
    eg_count(g, &p, segs, bytes, payload, now);
    eg_track(g, &p, now);
    return TC_ACT_OK;
}
