#!/usr/bin/env bash
# portwatch setup: idempotent install on a fresh Debian/Ubuntu machine, as root.
#   - Debian packages (BCC's Python binding, bpftool, libbpf, tshark, iproute2, ...)
#   - kernel headers fallback for BCC where /lib/modules/$(uname -r)/build is missing
#   - bpffs mounted on /sys/fs/bpf
#   - .venv on the system python3 with --system-site-packages (so it sees Debian's `bcc`)
#     and the pinned requirements
# Every step checks before it acts, so a second run is quick and changes nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
SYS_PY=/usr/bin/python3

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo make setup): installing packages and mounting bpffs need it."
command -v apt-get >/dev/null || die "apt-get not found: portwatch's setup supports Debian and Ubuntu only."

APT_PACKAGES=(python3 python3-venv python3-dev python3-bpfcc bpfcc-tools libbpf1 bpftool
              tshark iproute2 sqlite3 util-linux cron dnsmasq-base nftables iptables
              procps ca-certificates logrotate
              hping3 nmap                               # attack tools of the kernel tests
              tcpreplay                                 # replays a capture live into a lab (replay test)
              libxdp1 xdp-tools                         # libxdp neighbours: xdp-filter beside portwatch (kernel tests)
              chromium                                  # tests: the report page in a browser
              podman mmdebstrap)                        # tests: the container image, built and run

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer once, non-interactively.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CrowdSec (the fleet's shared blocklist, see README "Many hosts"): Debian's package, for `cscli` and
# the tests' own LAPI (`crowdsec -no-cs` on the loopback). Installed offline: a non-empty
# online_api_credentials.yaml made first keeps the post-install step from registering with CrowdSec's
# online service (README.Debian). Setup never leaves it running: the unit the package enables (and,
# under systemd, starts) is stopped and disabled when this script installs the package; a crowdsec
# the operator installed and runs is left alone.
if ! dpkg-query -W -f='${Status}' crowdsec 2>/dev/null | grep -q 'install ok installed'; then
  mkdir -p /etc/crowdsec
  if [ ! -s /etc/crowdsec/online_api_credentials.yaml ]; then
    install -m 600 /dev/null /etc/crowdsec/online_api_credentials.yaml
    echo "# no thanks: installed by portwatch's setup without CrowdSec's Central API (see README.Debian)" \
      > /etc/crowdsec/online_api_credentials.yaml
  fi
  say "installing crowdsec (offline: no Central API registration; not left running)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-cache policy crowdsec | grep -q 'Candidate: (none)'; then apt-get update -qq; fi
  apt-get install -y -qq --no-install-recommends crowdsec >/dev/null
  if [ -d /run/systemd/system ]; then
    systemctl disable --now crowdsec.service >/dev/null 2>&1 || true
  else
    systemctl disable crowdsec.service >/dev/null 2>&1 || true   # no systemd running: drop the enable link
  fi
  if [ -d /run/systemd/system ] && systemctl is-active --quiet crowdsec.service; then
    die "crowdsec.service is still running after its install: stop it (systemctl disable --now crowdsec)."
  fi
fi

# Kernel headers: BCC compiles against /lib/modules/$(uname -r)/build. Container and cloud
# kernels ship none; the distribution's headers are close enough for XDP (UAPI structs only).
KREL="$(uname -r)"
find_headers() {
  # Debian/Ubuntu header packages register themselves as /lib/modules/<version>/{build,source}
  local d
  for d in $(ls -d /lib/modules/*/ 2>/dev/null | sort -V -r); do
    d="${d%/}"
    [ "$(basename "$d")" = "$KREL" ] && continue
    if [ -e "$d/build/include" ]; then echo "$d"; return 0; fi
  done
  return 1
}
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
  if ! hdir="$(find_headers)"; then
    arch="$(dpkg --print-architecture)"
    say "installing the distribution's kernel headers (linux-headers-$arch)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "linux-headers-$arch" >/dev/null 2>&1 \
      || apt-get install -y -qq --no-install-recommends linux-headers-generic >/dev/null 2>&1 \
      || die "no kernel headers for $KREL and none installable: install your kernel's headers."
    hdir="$(find_headers)" || die "kernel headers installed but not found under /lib/modules: install your kernel's headers."
  fi
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$(readlink -f "$hdir/build")" "/lib/modules/$KREL/build"
  if [ -e "$hdir/source" ]; then ln -sfn "$(readlink -f "$hdir/source")" "/lib/modules/$KREL/source"; fi
  say "no kernel headers for $KREL: BCC will use the distribution's $(basename "$hdir") headers (linked at /lib/modules/$KREL/build)"
fi

# bpffs: pins live under /sys/fs/bpf/portwatch/<interface>/
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf: this kernel lacks BPF filesystem support."
  say "mounted bpffs on /sys/fs/bpf"
fi

# The venv must use the system python3: Debian's bcc module is built for it.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$VENV"
  say "creating $VENV (system python3, --system-site-packages for bcc)"
  "$SYS_PY" -m venv --system-site-packages "$VENV"
fi

stamp="$VENV/.requirements.sha256"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing pinned Python requirements (TensorFlow is large: this takes a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip==25.0.1 >/dev/null
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" >/dev/null
  echo "$want" > "$stamp"
fi

"$VENV/bin/python" -c 'import bcc, psutil, pyshark, pyroute2' \
  || die "the venv cannot import bcc/psutil/pyshark/pyroute2: remove .venv and run make setup again."
# Tab completion of the `portwatch` command (argcomplete, pinned in requirements.txt) for bash:
# bash-completion reads /etc/bash_completion.d; `ln -s $VENV/bin/portwatch /usr/local/bin/` puts
# the command on PATH. Other shells: eval "$(.venv/bin/register-python-argcomplete --shell zsh portwatch)".
if [ -d /etc/bash_completion.d ] && [ -x "$VENV/bin/register-python-argcomplete" ]; then
  "$VENV/bin/register-python-argcomplete" portwatch > /etc/bash_completion.d/portwatch.tmp \
    && mv /etc/bash_completion.d/portwatch.tmp /etc/bash_completion.d/portwatch \
    && say "shell completion: /etc/bash_completion.d/portwatch (the portwatch command)"
fi
# Least privilege: what portwatch keeps (database, -wal/-shm, state dir, models, reports, logs, locks)
# is root-only (0600/0700), or readable by general.group (0640/0750) — never world-readable. Files
# made by an older portwatch (0644) are tightened here; `doctor` reports any that are loose again.
# (doctor's exit code is about the other checks: only its first line, what it tightened, matters here)
modes="$(cd "$ROOT" && "$VENV/bin/python" -m app doctor --fix-modes 2>/dev/null || true)"
say "file modes: ${modes%%$'\n'*}"
say "ready ($VENV)"
