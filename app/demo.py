"""`make demo`: a self-contained lab in network namespaces, end to end, in a few minutes.

    root namespace (this host)                      namespace pwdemo-a (the "internet")
    HTTP :8080 + DNS :53 on 198.18.77.1   <── veth ──>   benign clients .2 (HTTP) and .3 (DNS)
    XDP + collector on the root end                       attacker .5 (port scan, SYN burst)

Benign traffic, an evaluation, the attack, a second evaluation that blocks it in XDP, a report, then all removed
again; through `python -m app ...` in child processes, database and state in --out (default /tmp/portwatch-demo)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from app.db import reports as queries
from app.lab import Lab

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ROUND_SECONDS = 3

BENIGN_CLIENT = r"""
import http.client, socket, struct, sys, threading, time, random
http_src, dns_src, server, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
end = time.monotonic() + seconds
def dns_query(name, qid):
    q = struct.pack('!HHHHHH', qid, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\0' + struct.pack('!HH', 1, 1)
    return q
def web():                      # a page every ~0.3 s, whatever the answers take
    rnd = random.Random(7); tick = time.monotonic()
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(server, 8080, timeout=2, source_address=(http_src, 0))
            c.request('GET', '/'); c.getresponse().read(); c.close()
        except OSError:
            pass
        tick += 0.2 + rnd.random() * 0.2
        time.sleep(max(0.0, tick - time.monotonic()))
def dns():                      # a lookup every ~0.3 s, on its own schedule
    rnd = random.Random(8); tick = time.monotonic(); i = 0
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind((dns_src, 0)); udp.settimeout(1)
    while time.monotonic() < end:
        i += 1
        try:
            udp.sendto(dns_query(rnd.choice(['www.demo.test', 'mail.demo.test', 'api.demo.test']), i & 0xFFFF), (server, 53))
            udp.recv(512)
        except OSError:
            pass
        tick += 0.2 + rnd.random() * 0.2
        time.sleep(max(0.0, tick - time.monotonic()))
threads = [threading.Thread(target=web, daemon=True), threading.Thread(target=dns, daemon=True)]
for t in threads: t.start()
for t in threads: t.join()
"""

HTTP_PROBE = r"""
import http.client, sys
try:
    c = http.client.HTTPConnection(sys.argv[2], 8080, timeout=3, source_address=(sys.argv[1], 0))
    c.request('GET', '/'); r = c.getresponse(); r.read(); print(r.status)
except OSError as exc:
    print('failed', exc)
"""


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


class Demo:
    def __init__(self, work: Path, keep: bool):
        self.work = work
        self.keep = keep
        self.lab = Lab(prefix="pwdemo", subnet=77, extra_hosts=3)
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PORTWATCH_CONFIG=str(work / "config.toml"), PYTHONUNBUFFERED="1")
        self.db = work / "ports.db"

    # --- plumbing -------------------------------------------------------------------------------
    def app(self, *args: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
        cmd = [PY, "-m", "app", *args]
        out = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=900)
        if check and out.returncode != 0:
            raise SystemExit(f"demo: `{' '.join(args)}` failed: {out.stderr.strip().splitlines()[-1:]}")
        if not quiet and out.stdout.strip():
            for line in out.stdout.strip().splitlines():
                print(f"    {line}", flush=True)
        return out

    def background(self, cmd: list[str], ns: bool = False) -> subprocess.Popen:
        full = ["ip", "netns", "exec", self.lab.namespace, *cmd] if ns else cmd
        p = subprocess.Popen(full, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def write_config(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "config.toml").write_text(f"""# portwatch demo configuration (made by app/demo.py)
db = "{self.db}"
state_dir = "{self.work / 'state'}"
run_dir = "{self.work / 'run'}"
interface = "{self.lab.interface}"

[collector]
round_seconds = {ROUND_SECONDS}

[sniffer]
window_fraction = 0.8

[evaluator]
window = 5
warmup_rounds = 12
train_stride = 1
epochs = 6
scan_ports = 25
syn_flood_syns = 100
calibration_min_expected = 0    # a 3-minute demo cannot fill the held-out pool a day's alert budget needs

[blocklist]
base_ttl_seconds = 600

[reports]
out_dir = "{self.work / 'report'}"
""")

    # --- the story ------------------------------------------------------------------------------
    def run(self, benign_seconds: float, attack_rounds: int) -> int:
        """The demo's steps, each through the real command line (`python -m app ...`) in a child process:

        1. benign background (HTTP requests, DNS queries) while the collector records rounds of 3 s;
        2. the first evaluation (rules run; the model trains on what it has);
        3. the attack: a port scan and a SYN burst from one address, still collecting;
        4. the second evaluation: findings -> block decisions -> the pinned XDP blacklist map;
        5. proof: the attacker's packets are dropped in XDP, the benign hosts still get answers;
        6. a report and a printed summary (:meth:`summary`); :meth:`cleanup` removes everything again
           (namespaces, XDP, pins, servers)."""
        if self.db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.work / "state", ignore_errors=True)
        shutil.rmtree(self.work / "report", ignore_errors=True)
        self.lab.create()
        self.write_config()
        lab = self.lab
        attacker, web_client, dns_client = lab.host_v4(3), lab.host_v4(0), lab.host_v4(1)
        say(f"lab up: this host {lab.root_v4} on {lab.interface}; benign {web_client} (HTTP), {dns_client} (DNS); "
            f"attacker {attacker}")
        web_root = self.work / "www"
        web_root.mkdir(exist_ok=True)
        (web_root / "index.html").write_text("<h1>portwatch demo</h1>\n")
        self.background([PY, "-m", "http.server", "8080", "--bind", lab.root_v4, "--directory", str(web_root)])
        self.background(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--port=53", "--bind-interfaces",
                         f"--listen-address={lab.root_v4}", "--address=/demo.test/198.18.77.1",
                         f"--pid-file={self.work / 'dnsmasq.pid'}"])
        time.sleep(1.0)

        # load XDP once (the first round compiles), then the collector runs on its own, as under cron
        say("loading XDP and recording a first round (compiles once, in its own process)")
        self.app("collect", "--round-seconds", "1", "--rounds", "1", "--no-sniffer", quiet=False)
        log = open(self.work / "collector.log", "w")
        collector = subprocess.Popen([PY, "-m", "app", "collect", "--rounds", "0"], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(collector)
        say(f"collector running: rounds of {ROUND_SECONDS} s (log: {self.work / 'collector.log'})")
        say(f"benign background for {benign_seconds:.0f} s")
        client = self.background([PY, "-c", BENIGN_CLIENT, web_client, dns_client, lab.root_v4,
                                  str(benign_seconds + 90 + attack_rounds * ROUND_SECONDS)], ns=True)
        time.sleep(benign_seconds)
        say(f"{self.count_rounds()} rounds so far; evaluation 1: rules on the benign rounds, the model trains")
        self.app("evaluate", quiet=False)

        say(f"attack from {attacker}: a port scan (SYN to 200 ports) and a SYN burst at :8080")
        lab.send("--kind", "syn", "--src", attacker, "--dst", lab.root_v4, "--ports", "1-200", "--count", "1",
                 "--iface", lab.peer_interface)
        lab.send("--kind", "syn", "--src", attacker, "--dst", lab.root_v4, "--ports", "8080", "--count", "1500",
                 "--iface", lab.peer_interface)
        time.sleep(attack_rounds * ROUND_SECONDS)

        say(f"{self.count_rounds()} rounds so far; evaluation 2: findings -> block decisions -> the pinned XDP map")
        self.app("evaluate", quiet=False)

        say(f"proof: {attacker} sends 300 UDP packets; benign {web_client} asks for a page")
        lab.send("--src", attacker, "--dst", lab.root_v4, "--ports", "8080", "--count", "300")
        probe = lab.run(PY, "-c", HTTP_PROBE, web_client, lab.root_v4).stdout.strip()
        time.sleep(ROUND_SECONDS + 1)                    # a round records the drops
        collector.send_signal(signal.SIGTERM)            # ends after the round in progress
        collector.wait(timeout=60)
        log.close()
        entries = json.loads(self.app("blacklist", "list", "--json").stdout or "[]")

        say("report")
        self.app("report", "--out", str(self.work / "report"), quiet=False)
        client.send_signal(signal.SIGTERM)
        return self.summary(entries, attacker, [web_client, dns_client], probe)

    def count_rounds(self) -> int:
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
            try:
                return queries.round_count(conn)
            finally:
                conn.close()
        except sqlite3.Error:
            return 0

    def summary(self, entries: list[dict], attacker: str, benign: list[str], probe: str) -> int:
        conn = sqlite3.connect(self.db)
        try:
            seen = queries.demo_summary(conn)
        finally:
            conn.close()
        n_rounds, packets, findings, dns = seen["rounds"], seen["packets"], seen["findings"], seen["dns_names"]
        active = {e["address"].split("/")[0]: e for e in entries if e.get("status") == "active"}
        blocked = attacker in active
        benign_blocked = [b for b in benign if b in active]
        drops = active.get(attacker, {}).get("drops", 0)
        print("\n==================== portwatch demo: summary ====================")
        print(f"rounds recorded        {n_rounds} ({packets} packets seen by XDP)")
        print(f"DNS names sniffed      {dns}")
        print("findings               " + (", ".join(f"{d} x{n}" for d, n in findings) or "none"))
        print(f"attacker {attacker:<14}{'BLOCKED' if blocked else 'NOT blocked'}"
              + (f" ({active[attacker]['reason']}; {drops} packets dropped in XDP)" if blocked else ""))
        print(f"benign hosts blocked   {', '.join(benign_blocked) if benign_blocked else 'none'}")
        print(f"benign HTTP after      {probe}")
        print(f"report                 {self.work / 'report' / 'index.html'}")
        print("==================================================================\n")
        return 0 if blocked and not benign_blocked and probe == "200" else 1

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run([PY, "-m", "app", "down", "--interface", self.lab.interface], cwd=REPO, env=self.env,
                       capture_output=True)
        self.lab.destroy()
        if not self.keep:
            shutil.rmtree(self.work / "state", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/portwatch-demo", help="work directory (database, report)")
    parser.add_argument("--benign-seconds", type=float, default=96.0)
    parser.add_argument("--attack-rounds", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the state directory (models)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces and XDP): run `sudo make demo`", file=sys.stderr)
        return 3
    demo = Demo(Path(args.out), args.keep)
    t0 = time.monotonic()
    try:
        rc = demo.run(args.benign_seconds, args.attack_rounds)
    finally:
        demo.cleanup()
    say(f"done in {time.monotonic() - t0:.0f} s; namespaces, XDP and pins removed")
    return rc


if __name__ == "__main__":
    sys.exit(main())
