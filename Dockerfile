# syntax=docker/dockerfile:1
# portwatch in a container: cron in the foreground runs the entries of crontab.example — the
# collector every minute, the evaluator hourly (it also writes the report), the cleanup daily.
#
# Build:
#   docker build -t portwatch .
#   podman build --format docker -t portwatch .     (docker format: OCI images carry no HEALTHCHECK)
# Behind a proxy that re-signs TLS, give pip the machine's CA bundle for the build only (and a local
# mirror the same way: -v DIR:DIR:ro --build-arg PIP_EXTRA_INDEX_URL=file://DIR/simple):
#   podman build --format docker -v /etc/ssl/certs/ca-certificates.crt:/run/build-ca.crt:ro \
#     --build-arg PIP_CERT=/run/build-ca.crt -t portwatch .
# Another Debian base (the same release, e.g. one bootstrapped with mmdebstrap): --build-arg BASE=IMAGE
# Run (XDP watches the HOST's interfaces, so the container shares the host's network and BPF):
#   docker run -d --name portwatch --restart unless-stopped \
#     --privileged --net=host \
#     -v /sys/fs/bpf:/sys/fs/bpf \
#     -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#     -v portwatch-data:/var/lib/portwatch \
#     -v /etc/portwatch:/etc/portwatch:ro \
#     portwatch
#
#   --privileged --net=host    bpf() and attaching XDP need CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN, and
#                              the host's interfaces are only visible in the host's network namespace
#   -v /sys/fs/bpf:/sys/fs/bpf pins (program and maps) outlive the container: load once, read many,
#                              and `python -m app down` can still detach after the container is gone
#   -v /lib/modules, /usr/src  the host kernel's headers, for BCC's one compile of bpf/port_flow.c
#   -v ...:/var/lib/portwatch  the SQLite database, models and reports (reports.out_dir)
#   -v /etc/portwatch          config.toml: cron passes no PORTWATCH_* environment to the jobs
#
# Look inside:  docker exec portwatch portwatch status      (what the HEALTHCHECK runs)
#               docker exec portwatch tail -f /var/log/portwatch/collector.log
# Undo on the host after removing the container:  ip link set dev IF xdp off; rm -r /sys/fs/bpf/portwatch
ARG BASE=debian:bookworm-slim
FROM ${BASE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The Debian packages of scripts/setup.sh that the jobs need (the namespace-lab and test tools, and
# the compiler headers of python3-dev, are left out). Versions come from the base's release and its
# security updates, so they are not pinned here. apt-get clean: a base without Docker's apt hook
# (mmdebstrap's) would keep every downloaded .deb in the layer.
# hadolint ignore=DL3008
RUN echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc libbpf1 bpftool tshark \
      iproute2 sqlite3 util-linux cron procps ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log

WORKDIR /opt/portwatch

# The venv as scripts/setup.sh makes it (system python3 with --system-site-packages, for Debian's bcc
# module) with the runtime requirements only. A layer of its own, rebuilt only when they change.
# Then what no job loads: TensorFlow's C++ headers (for compiling custom ops) and libclang (a
# dependency of TensorFlow's build tooling, never imported at run time).
# pip settings for the build only (empty: none): a CA bundle, extra indexes and find-links
ARG PIP_CERT=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
COPY requirements.txt ./
RUN python3 -m venv --system-site-packages .venv \
 && .venv/bin/python -m pip install --upgrade pip==25.0.1 \
 && .venv/bin/python -m pip install -r requirements.txt \
 && .venv/bin/python -m pip uninstall -y libclang \
 && rm -rf .venv/lib/python3*/site-packages/tensorflow/include

# portwatch itself, installed as a wheel (not editable); the sources stay for crontab.example's paths.
COPY pyproject.toml setup.py MANIFEST.in README.md init.sql crontab.example ./
COPY bpf/ bpf/
COPY app/ app/
RUN .venv/bin/python -m pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && .venv/bin/python -c "import bcc, psutil, pyshark" \
 && install -d -m 0700 /var/log/portwatch /var/lib/portwatch /run/portwatch && mkdir -p /etc/portwatch \
 && crontab -u root crontab.example \
 && ln -s /opt/portwatch/.venv/bin/portwatch /usr/local/bin/portwatch

VOLUME ["/var/lib/portwatch"]
# `portwatch status` exits 1 with one reason when a check fails (no round lately, XDP detached, ...)
HEALTHCHECK --interval=5m --timeout=30s --start-period=10m CMD ["portwatch", "status"]
CMD ["cron", "-f"]
