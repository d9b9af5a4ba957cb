"""`replay CAPTURE`: a pcap/pcapng through the same kernel programs, rounds in capture time.

Exit codes: 0 done; 2 not a capture / bad flag; 3 needs root; 4 database problem; 5 BPF problem;
7 BCC, tshark or pyshark missing.
"""
from __future__ import annotations

from app.commands.registry import add_command
from app.durations import arg as duration

DESCRIPTION = """Feed every packet of a capture through the compiled XDP (to the host) and TC egress (from
it) programs with BPF_PROG_TEST_RUN — no interface, no namespace, the host's own pins untouched — and
store rounds cut at capture timestamps, exactly as a live collector would (rounds.replayed = 1, with the
capture's name). Listeners are inferred from what the host answered; the sniffer's fields come from the
capture through tshark. With --evaluate-every, the evaluation runs at capture-time boundaries and its
blocks (and SYN limits) are applied to the replay's own maps, so later packets of blocked sources are dropped;
what it would have alerted is written to <db>.replay-alerts.jsonl (marked replayed), never sent."""


def register(sub) -> None:
    p = add_command(sub, "replay", "replay a pcap/pcapng through the kernel programs into the store", DESCRIPTION)
    p.add_argument("capture", help="pcap or pcapng file (Ethernet, raw IP or Linux cooked)")
    p.add_argument("--host", action="append", default=[],
                   help="this host's address (repeatable; default: the capture's most-answered address)")
    p.add_argument("--round-seconds", type=duration(), default=None,
                   help="capture seconds per round (default: collector.round_seconds, 60)")
    p.add_argument("--evaluate-every", type=duration(), default=None,
                   help="evaluate and block every this much capture time (e.g. 1h) and after the last round")
    p.add_argument("--no-sniffer", action="store_true", help="skip the tshark fields (DNS, TLS, protocols)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: the replay (capture, hosts, packets, rounds) and each evaluation")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from app.services.collector import replay
    from app.services.collector.capture_file import address_key
    for host in args.host:
        address_key(host)                          # one sentence for a bad address, before anything starts
    loop = None
    if args.evaluate_every:
        from app.services.jobs import ClosedLoop
        from pathlib import Path
        loop = ClosedLoop(args.evaluate_every, capture=Path(args.capture).name)
    result = replay.replay(settings, args.capture, args.host, args.round_seconds or settings.collector.round_seconds,
                           after_round=loop, sniff=not args.no_sniffer)
    if args.json:
        import dataclasses
        from app.services.text import json_dumps
        print(json_dumps({"replay": dataclasses.asdict(result), "evaluations": [job.as_dict() for job in
                                                                                (loop.jobs if loop else [])]},
                         indent=2, default=str))
        return 0
    quiet = getattr(args, "quiet", False)
    for line in result.lines() if not quiet else result.lines()[-1:]:
        print(line, flush=True)
    for job in (loop.jobs if loop else []):
        for line in job.lines():
            print(line, flush=True)
    return 0
