"""Fleet benchmarks, measured side by side in one run, printed as a ratio table.

The CrowdSec pull's cost per collector round: a real collector round (XDP on a lab veth, no sniffer,
no scanner) with no CrowdSec configured, against rounds synced with a real LAPI (Debian's
`crowdsec -no-cs` on the loopback) holding 1,000 and 10,000 ban decisions: the first round (a full
decision list: mirror, ledger rows, map entries) and the steady rounds after it (a delta pull and the
mirror checked against the ledger), and the same ledger enforced with CrowdSec off (what holding n
entries in the map costs the blocklist's reconcile, whatever their origin). Wall seconds and CPU seconds of the collector process per round,
medians of ROUNDS rounds, as ratios against the round without CrowdSec.

A poisoned member, each aggregation side by side (the evidence for fleet.aggregation's default):
three honest hosts and one sending weights x100 plus noise with a billion windows claimed; for each
strategy, how many honest hosts' checks adopt the aggregate, its error against theirs, its false
alerts a day on their held-out benign windows, and a x40 spike's score over its threshold.

Then one federation (`fleet serve --once` with TLS and three hosts' SuperNodes on the loopback, the
default network shape): its wall time, and the bytes on the wire per host (frames on lo to or from
the SuperLink's port, both ways, counted with scapy, divided by the hosts) against the size of the weights.

Fails (exit 1, one sentence each) when a figure cannot be right: fewer bytes on the wire per host
than the weights it must send, a round that took no time or no CPU.

Runs as root; no traffic is sent but the loopback's own (the decisions' addresses are data only).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app import config  # noqa: E402
from app.services.fleet.lapi import Deadline, Lapi  # noqa: E402
from app.lab import Lab  # noqa: E402
from app.threads import collection  # noqa: E402
from bench.plausible import Plausibility  # noqa: E402
from tests.services.fleet.lapi import LocalApi, unavailable_reason  # noqa: E402

ROUNDS = 5
SIZES = (1000, 10000)


def settings_for(tmp: Path, name: str, pin_root: Path):
    d = tmp / name
    d.mkdir()
    (d / "none.toml").write_text("")
    s = config.load(d / "none.toml", environ={})
    s.general.db, s.general.state_dir, s.general.pin_root = str(d / "bench.db"), str(d / "state"), str(pin_root)
    s.scanner.enabled = s.sniffer.enabled = False
    s.general.run_dir = str(d / "run")
    s.blocklist.max_entries = 20000
    return s


def one_round(settings, lab, takeover: bool = False) -> tuple[float, float]:
    """(wall s, CPU s) of one collector round of 0.05 s, the wait included (the same in every column)."""
    cpu, wall = time.process_time(), time.monotonic()
    collection.run_collection(settings, lab.interface, 0.05, 1, with_threads=False, takeover=takeover)
    return time.monotonic() - wall, time.process_time() - cpu


def take_over(settings, lab) -> None:
    """One unmeasured round in which this column's database takes the bench interface over (each column
    has its own database, and the pins refuse a database that does not own them), CrowdSec off."""
    url, settings.crowdsec.lapi_url = settings.crowdsec.lapi_url, ""
    one_round(settings, lab, takeover=True)
    settings.crowdsec.lapi_url = url


def fill(api: LocalApi, n: int) -> None:
    """n ban decisions, pushed as one alert by a machine (as an agent would)."""
    api.machine("bench-filler", "bench-filler-pw")
    lapi = Lapi(api.url, 120.0)
    token = lapi.login("bench-filler", "bench-filler-pw", Deadline(120))
    base = int(ipaddress.IPv4Address("198.19.0.0"))
    values = [str(ipaddress.IPv4Address(base + 1 + i)) for i in range(n)]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    alert = {"scenario": "bench/fill", "scenario_hash": "", "scenario_version": "1", "message": "bench",
             "events_count": 1, "start_at": stamp, "stop_at": stamp, "capacity": 0, "leakspeed": "0",
             "simulated": False, "remediation": True, "events": [], "source": {"scope": "Ip", "value": values[0]},
             "decisions": [{"origin": "crowdsec", "type": "ban", "scope": "Ip", "value": v, "duration": "4h",
                            "scenario": "bench/fill"} for v in values]}
    lapi.push_alerts(token, [alert], Deadline(300))


def federation(tmp: Path) -> list[tuple[str, float]]:
    """One federation of three hosts with TLS: [(label, value)]."""
    import subprocess
    import numpy as np
    from app.services.fleet import flower
    from tests.services.fleet.test_flower import free_port, make_certs, settings_for
    from tests.services.evaluation.synthetic import SyntheticStore
    d = tmp / "federation"
    d.mkdir()
    make_certs(d)
    port = free_port()
    coordinator = settings_for(d, "coordinator", port)
    hosts = [settings_for(d, f"h{i}", port) for i in range(3)]
    for s in [coordinator, *hosts]:
        s.evaluator.lstm_units, s.evaluator.bottleneck = 32, 8       # the default shape
        s.fleet.min_hosts = 3
    for i, s in enumerate(hosts):
        store = SyntheticStore(s.general.db, seed=i)
        store.add_rounds(120)
        store.close()
    from scapy.layers.inet import TCP
    from scapy.sendrecv import AsyncSniffer
    wire = [0]

    def count(packet) -> None:
        wire[0] += len(packet)
    sniffer = AsyncSniffer(iface="lo", store=False, prn=count,
                           lfilter=lambda p: TCP in p and port in (p[TCP].sport, p[TCP].dport))
    sniffer.start()
    nodes = []
    try:
        time.sleep(1.0)
        for i, s in enumerate(hosts):
            nodes.append(flower.start(flower.supernode_command(s), d / f"h{i}.log", flower.node_home(s)))
        t0 = time.monotonic()
        flower.serve(coordinator, once=True)
        wall = time.monotonic() - t0
    finally:
        for proc in nodes:
            flower.stop(proc)
        time.sleep(0.5)
        sniffer.stop()
    wire = wire[0]
    from app.services.fleet import learning
    n_weights = sum(np.asarray(w).nbytes for w in learning.initial_weights(
        learning.shape_from({"window": 15, "lstm-units": 32, "bottleneck": 8, "seed": 0})))
    return [("federation wall time, 1 round, 3 hosts (s)", wall),
            ("bytes on the wire per host, both ways", wire / 3),
            ("network weights (bytes, float32)", n_weights),
            ("wire bytes per host / weights", wire / 3 / n_weights)]


def _replies(updates: list[tuple[list, int]]):
    """Train replies as the SuperLink hands them to the ServerApp's strategy."""
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
    out = []
    for k, (weights, n) in enumerate(updates):
        meta = Metadata(run_id=1, message_id=f"r{k}", src_node_id=100 + k, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
        out.append(Message(content=RecordDict({"arrays": ArrayRecord(weights),
                                               "metrics": MetricRecord({"num-windows": n})}), metadata=meta))
    return out


def _spike_ratio(model, windows) -> float:
    """Median over ``windows`` (N, W, F) of the window score over the threshold once the last round's
    packets and bytes are x40 (a labelled volume spike): above 1 it flags."""
    import numpy as np
    from app.services.evaluation import series
    spiked = np.array(windows, copy=True)
    for name in ("packets", "bytes"):
        spiked[:, -1, series.FEATURE_INDEX[name]] *= 40
    return float(np.median(model.decision_function(spiked) / model.threshold_))


def poisoned_member(tmp: Path) -> list[tuple]:
    """Three honest hosts (local models fitted, 120 rounds each) and a fourth sending the first one's
    update x100 plus noise with a billion windows claimed: each strategy's aggregate, checked by each
    honest host as it would be before adopting it (learning.check_fleet_model). Rows: (strategy,
    adopted of 3, median error ratio, median false alerts a day, median spike score / threshold)."""
    import statistics as st
    import numpy as np
    from app.db.connection import connect
    from app.services.evaluation import evaluation
    from app.services.fleet import aggregation, learning
    from tests.services.fleet.test_flower import settings_for
    from tests.services.evaluation.synthetic import SyntheticStore
    shape = {"window": 15, "lstm-units": 8, "bottleneck": 4, "seed": 0}
    hosts, updates = [], []
    initial = learning.initial_weights(shape)
    for i in range(3):
        s = settings_for(tmp, f"p{i}", 9)
        s.general.run_dir = str(tmp / f"p{i}" / "run")
        store = SyntheticStore(s.general.db, seed=i, ports={(22, "tcp"): (20 + 30 * i, "sshd"),
                                                            (443, "tcp"): (900 * (i + 1), "nginx")})
        store.add_rounds(120)
        store.close()
        evaluation.run(s)                                          # the local model each host runs
        node_config = {"db": s.general.db, "state-dir": s.general.state_dir, "config": str(tmp / f"p{i}" / "config.toml")}
        updates.append(learning.local_update(node_config, initial, shape))
        hosts.append(s)
    rng = np.random.default_rng(666)
    updates.append(([(w * 100 + rng.normal(0, 1, w.shape)).astype(w.dtype) for w in updates[0][0]], 10 ** 9))
    rows = []
    for name in aggregation.STRATEGIES:
        arrays, _ = aggregation.strategy(name, 0.25, aggregation.Contributions()).aggregate_train(1, _replies(updates))
        weights = arrays.to_numpy_ndarrays()
        verdicts, spikes = [], []
        for s in hosts:
            conn = connect(s.general.db)
            try:
                c = learning.check_fleet_model(conn, s, weights)
                _, held, _ = learning.local_windows(conn, s)
            finally:
                conn.close()
            verdicts.append(c.verdict)
            spikes.append(_spike_ratio(c.model, held))
        rows.append((name, sum(v.adopted for v in verdicts), st.median(v.error_ratio for v in verdicts),
                     st.median(v.false_alerts_per_day for v in verdicts), st.median(spikes)))
    return rows


def main() -> int:
    if os.geteuid() != 0:
        print("bench/fleet.py needs root (XDP on a lab veth)", file=sys.stderr)
        return 1
    reason = unavailable_reason()
    if reason:
        print(f"bench/fleet.py: {reason}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="pw-bench-fleet-"))
    prefix = os.environ.get("PW_TEST_PREFIX", "pwb")[:4]
    low = int(os.environ.get("PW_TEST_SUBNETS", "220-250").split("-")[0])
    lab = Lab(prefix=f"{prefix}fb", subnet=low)
    pins = []
    rows = []
    try:
        lab.create()
        pin = Path(f"/sys/fs/bpf/{prefix}-bench-fleet-{os.getpid()}")
        pins.append(pin)
        base = settings_for(tmp, "base", pin)
        one_round(base, lab)                                     # compile, attach, pin: not measured
        samples = [one_round(base, lab) for _ in range(ROUNDS)]
        ref_wall = statistics.median(w for w, _ in samples)
        ref_cpu = statistics.median(c for _, c in samples)
        rows.append(("no CrowdSec", "-", ref_wall, ref_cpu))
        for n in SIZES:
            api = LocalApi(tmp / f"lapi-{n}")
            try:
                api.start()
                fill(api, n)
                s = settings_for(tmp, f"cs-{n}", pin)
                take_over(s, lab)
                s.crowdsec.lapi_url, s.crowdsec.bouncer_key = api.url, api.bouncer(f"bench-{n}")
                s.crowdsec.max_seconds, s.crowdsec.timeout_seconds = 60.0, 60.0
                first = one_round(s, lab)
                steady = [one_round(s, lab) for _ in range(ROUNDS)]
                rows.append((f"{n:,} decisions, first round (full list)", n, *first))
                rows.append((f"{n:,} decisions, steady round", n, statistics.median(w for w, _ in steady),
                             statistics.median(c for _, c in steady)))
                # the same ledger (n entries enforced), CrowdSec off: what enforcing n entries costs alone
                s.crowdsec.lapi_url = ""
                alone = [one_round(s, lab) for _ in range(ROUNDS)]
                rows.append((f"{n:,} entries enforced, no pull", n, statistics.median(w for w, _ in alone),
                             statistics.median(c for _, c in alone)))
            finally:
                api.stop()
    finally:
        lab.destroy()
        for pin in pins:
            shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    poison_dir = Path(tempfile.mkdtemp(prefix="pw-bench-poison-"))
    try:
        poison = poisoned_member(poison_dir)
    finally:
        shutil.rmtree(poison_dir, ignore_errors=True)
    fed_dir = Path(tempfile.mkdtemp(prefix="pw-bench-federation-"))
    try:
        fed = federation(fed_dir)
    finally:
        shutil.rmtree(fed_dir, ignore_errors=True)
    print("\nOne federation round (Flower, TLS, loopback)")
    for label, value in fed:
        print(f"{label:50} {value:14,.2f}")
    print("\nOne poisoned member of four (x100 + noise, a billion windows claimed), each honest host's check")
    print(f"{'aggregation':14} {'adopted':>8} {'error x local':>14} {'false alerts/d':>15} {'spike / threshold':>18}")
    for name, adopted, ratio, alerts, spike in poison:
        print(f"{name:14} {adopted:>6}/3 {ratio:14.3g} {alerts:15.2f} {spike:18.2f}")
    print(f"\nCrowdSec pull cost per collector round (median of {ROUNDS}; a round includes its 0.05 s wait)")
    print(f"{'round':42} {'wall s':>8} {'x base':>7} {'CPU s':>8} {'x base':>7}")
    for label, _, wall, cpu in rows:
        print(f"{label:42} {wall:8.3f} {wall / ref_wall:7.2f} {cpu:8.3f} {cpu / ref_cpu:7.2f}")
    return plausible(dict(fed), rows).exit_code()


def plausible(fed: dict[str, float], rows: list[tuple]) -> Plausibility:
    checks = Plausibility("bench/fleet.py")
    wire, weights = fed["bytes on the wire per host, both ways"], fed["network weights (bytes, float32)"]
    checks.expect(wire >= weights, f"{wire:,.0f} bytes crossed the wire per host, fewer than the {weights:,.0f} "
                                   "bytes of the weights each host sends (the capture missed the round)")
    for label, _, wall, cpu in rows:
        checks.expect(wall >= 0.05 and cpu > 0, f"'{label}': a round of {wall:.3f} s wall and {cpu:.3f} CPU s, "
                                                "less than its own 0.05 s wait or no CPU at all")
    return checks


if __name__ == "__main__":
    sys.exit(main())
