"""Alerts for new anomalies and block decisions: webhook (JSON POST), e-mail (SMTP) and syslog.

One public entry: ``send_alerts(conn, settings, events) -> dict`` (each channel's behaviour, the
cooldown and the time bound are described there). Called by the hourly job and the CLI's test alert.
"""
from __future__ import annotations

import logging
import logging.handlers
import smtplib
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Iterable

from app import __version__
from app.db import alerts as alerts_db
from app.services.evaluation.findings import Finding, anomaly_key
from app.services.text import counted, inert, json_dumps, utc

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
BACKOFF_SECONDS = 0.5


@dataclass(frozen=True)
class AlertEvent:
    """Something worth telling a person about.

    kind: 'anomaly' or 'block'; key: identity for the cooldown (the same key within the cooldown
    is sent once per channel); summary: one line; details: JSON-ready facts.
    """
    kind: str
    key: str
    summary: str
    details: dict = field(default_factory=dict)
    at: float | None = None


def anomaly_event(finding: Finding, *, at: float | None = None) -> AlertEvent:
    """An AlertEvent for one stored finding: its summary line (the one ``anomalies show`` prints,
    app/services/evaluation/explain.py) after its stable id, ``anomaly 12: ...``. details: the finding's columns
    (anomaly_id, detector, port, protocol, score, threshold, source, summary) plus the sources it
    names (address, share, evidence class) and the command that explains it."""
    from app.services.evaluation.explain import summary
    line = finding.summary or summary(finding)
    if finding.forged_sources and "not blocked" not in line:     # alerted, never blocked: one-way evidence may be forged
        line += f"; source possibly forged ({', '.join(finding.forged_sources[:5])}): not blocked"
    if finding.source_count is not None and " sources" not in line:
        line += f"; {finding.source_count} sources"
    facts = {"anomaly_id": finding.id, "detector": finding.detector, "port": finding.port,
             "protocol": finding.protocol, "score": finding.score, "threshold": finding.threshold,
             "source": finding.source, "summary": line, "rounds": [finding.first_round_id, finding.last_round_id],
             "show": f"python -m app anomalies show {finding.id}"}
    if finding.sources:
        keys = ("address", "packets", "bytes") if finding.outbound else ("address", "share", "evidence", "forged")
        facts["sources" if not finding.outbound else "destinations"] = [
            {k: v for k, v in s.to_dict().items() if k in keys} for s in finding.sources]
    if finding.source_count is not None:
        facts["source_count"] = finding.source_count
    return AlertEvent("anomaly", anomaly_key(finding), f"anomaly {finding.id}: {inert(line)}", facts, at)


def block_event(address: str, reason: str, *, expires_at: float | None = None, dry_run: bool = False,
                details: dict | None = None, at: float | None = None) -> AlertEvent:
    """An AlertEvent for one block decision (``dry_run``: what would have been blocked)."""
    until = ("until " + utc(expires_at, seconds=False)) if expires_at else "without expiry"
    verb = "would block (dry run)" if dry_run else "blocked"
    facts = {"address": address, "reason": reason, "expires_at": expires_at, "dry_run": dry_run}
    facts.update(details or {})
    return AlertEvent("block", f"block:{address}", f"{verb} {address} {until}: {inert(reason)}", facts, at)


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + max(0.0, seconds)

    def left(self) -> float:
        return self.end - time.monotonic()


def _payload(event: AlertEvent, host: str, now: float) -> dict:
    at = event.at if event.at is not None else now
    return {"source": "portwatch", "version": __version__, "host": host, "kind": event.kind, "key": event.key,
            "summary": event.summary, "text": f"[portwatch {host}] {event.summary}", "details": event.details,
            "at": at, "at_iso": utc(at, iso=True)}


# -- webhook ---------------------------------------------------------------------------------------

class _GiveUp(Exception):
    """A failure that retrying will not fix (4xx, bad URL)."""


def _post_once(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"portwatch/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read(65536)
        return response.status


def _post(url: str, body: bytes, cfg, deadline: _Deadline) -> None:
    """POST with retries and backoff inside the deadline; raises the last error when all fail."""
    attempts = 1 + max(0, int(cfg.webhook_retries))
    last: Exception | None = None
    for attempt in range(attempts):
        left = deadline.left()
        if left <= 0.05:
            break
        try:
            _post_once(url, body, min(float(cfg.webhook_timeout), left))
            return
        except urllib.error.HTTPError as exc:
            last = exc
            if exc.code not in RETRY_STATUS:
                raise _GiveUp(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:   # refused, unreachable, timed out
            last = exc
        if attempt + 1 < attempts:
            pause = min(BACKOFF_SECONDS * 2 ** attempt, deadline.left() - 0.05)
            if pause <= 0:
                break
            log.debug("webhook attempt %d failed (%s); retrying in %.1f s", attempt + 1, last, pause)
            time.sleep(pause)
    raise last if last is not None else TimeoutError("no time left for the webhook")


def _send_webhook(events: list[AlertEvent], cfg, deadline: _Deadline, host: str, now: float) -> tuple[list[str], int]:
    url = cfg.webhook_url
    if not url.lower().startswith(("http://", "https://")):
        log.error("alerts.webhook_url must start with http:// or https://; %d alert(s) not sent", len(events))
        return [], len(events)
    sent: list[str] = []
    for index, event in enumerate(events):
        body = json_dumps(_payload(event, host, now), default=str).encode()
        try:
            _post(url, body, cfg, deadline)
            sent.append(event.key)
        except Exception as exc:
            rest = len(events) - index
            log.warning("webhook alert failed (%s): %d alert(s) not delivered on this channel this run",
                        _reason(exc), rest)
            return sent, rest   # the endpoint is down: do not spend the deadline on the others
    return sent, 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


# -- e-mail ------------------------------------------------------------------------------------------

def _smtp_password(cfg) -> str:
    if cfg.smtp_password:
        return cfg.smtp_password
    if cfg.smtp_password_file:
        try:
            return Path(cfg.smtp_password_file).read_text().strip()
        except OSError as exc:
            raise RuntimeError(f"cannot read alerts.smtp_password_file {cfg.smtp_password_file}: {exc.strerror}") from None
    return ""


def _message(events: list[AlertEvent], cfg, host: str, now: float) -> EmailMessage:
    anomalies = sum(1 for e in events if e.kind == "anomaly")
    blocks = sum(1 for e in events if e.kind == "block")
    counts = []
    if anomalies:
        counts.append(counted(anomalies, "anomaly"))
    if blocks:
        counts.append(f"{blocks} block{'s' if blocks != 1 else ''}")
    others = len(events) - anomalies - blocks
    if others:
        counts.append(f"{others} other")
    msg = EmailMessage()
    msg["Subject"] = f"[portwatch] {host}: {', '.join(counts)}"
    msg["From"] = cfg.mail_from or f"portwatch@{host}"
    msg["To"] = ", ".join(a.strip() for a in cfg.mail_to.split(",") if a.strip())
    lines = [f"portwatch on {host} reports:", ""]
    lines += [f"- {e.summary}" for e in events]
    lines += ["", "Details:", ""]
    for e in events:
        lines.append(json_dumps(_payload(e, host, now), indent=2, default=str))
    lines += ["", "Explain a finding: python -m app anomalies show ID",
              "Undo a block: python -m app blacklist remove ADDRESS (or allow it: python -m app allow add ADDRESS)"]
    msg.set_content("\n".join(lines))
    return msg


def _send_email(events: list[AlertEvent], cfg, deadline: _Deadline, host: str, now: float) -> None:
    timeout = max(0.1, min(float(cfg.smtp_timeout), deadline.left()))
    context = ssl.create_default_context(cafile=cfg.smtp_cafile or None)
    message = _message(events, cfg, host, now)
    if int(cfg.smtp_port) == 465:
        server = smtplib.SMTP_SSL(cfg.smtp_host, int(cfg.smtp_port), timeout=timeout, context=context)
    else:
        server = smtplib.SMTP(cfg.smtp_host, int(cfg.smtp_port), timeout=timeout)
    try:
        server.ehlo()
        if cfg.smtp_starttls and int(cfg.smtp_port) != 465:
            if not server.has_extn("starttls"):
                raise RuntimeError(f"{cfg.smtp_host}:{cfg.smtp_port} does not offer STARTTLS (alerts.smtp_starttls "
                                   "is on): refusing to send in clear")
            server.starttls(context=context)
            server.ehlo()
        if cfg.smtp_user:
            server.login(cfg.smtp_user, _smtp_password(cfg))
        server.send_message(message)
    finally:
        try:
            server.quit()
        except (smtplib.SMTPException, OSError):
            server.close()


# -- syslog --------------------------------------------------------------------------------------------

class _SyslogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that remembers a failed emit instead of printing a traceback."""
    error: BaseException | None = None

    def handleError(self, record):
        self.error = sys.exc_info()[1]


def syslog_address(text: str) -> tuple[object, int]:
    """(address, socket type) for SysLogHandler from '/dev/log', 'host:port', 'udp://h:p', 'tcp://h:p'."""
    text = text.strip()
    if text.startswith("/"):
        return text, socket.SOCK_DGRAM      # unix socket: the handler falls back to stream itself
    socktype = socket.SOCK_DGRAM
    if text.startswith("tcp://"):
        socktype, text = socket.SOCK_STREAM, text[6:]
    elif text.startswith("udp://"):
        text = text[6:]
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "514"
    host = host.strip("[]") or "localhost"
    try:
        return (host, int(port)), socktype
    except ValueError:
        raise ValueError(f"alerts.syslog_address {text!r} is not a socket path or host:port") from None


def _send_syslog(events: list[AlertEvent], cfg, host: str, now: float) -> list[str]:
    address, socktype = syslog_address(cfg.syslog_address)
    facility = logging.handlers.SysLogHandler.facility_names.get(cfg.syslog_facility.lower())
    if facility is None:
        raise ValueError(f"alerts.syslog_facility {cfg.syslog_facility!r} is not a syslog facility (daemon, local0, ...)")
    handler = _SyslogHandler(address=address, facility=facility, socktype=socktype)
    handler.ident = "portwatch: "
    sent = []
    try:
        for event in events:
            record = logging.makeLogRecord({
                "name": "portwatch.alerts", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%s: %s (key %s)", "args": (event.kind, event.summary, event.key)})
            handler.error = None
            handler.handle(record)
            if handler.error is not None:
                raise handler.error
            sent.append(event.key)
    finally:
        handler.close()
    return sent


# -- entry -------------------------------------------------------------------------------------------------

def enabled_channels(settings) -> list[str]:
    cfg = settings.alerts
    channels = []
    if cfg.syslog:
        channels.append("syslog")
    if cfg.webhook_url:
        channels.append("webhook")
    if cfg.smtp_host and cfg.mail_to:
        channels.append("email")
    return channels


def send_alerts(conn, settings, events: Iterable[AlertEvent], *, now: float | None = None) -> dict:
    """Deliver ``events`` on every configured channel; never raises for a delivery problem.

    conn: a writable connection for the cooldown ledger (alerts_sent), or None for no cooldown.
    Returns {channel: {"sent": n, "suppressed": n, "failed": n}} for each enabled channel.

    Channels are on when
    configured: ``alerts.webhook_url``; ``alerts.smtp_host`` + ``alerts.mail_to``; ``alerts.syslog``.

      webhook  one JSON POST per event (urllib), ``webhook_timeout`` per attempt, ``webhook_retries``
               retries with exponential backoff on connection errors, timeouts, 408/429/5xx
      e-mail   one message listing every event due; STARTTLS when ``smtp_starttls`` (a server that
               does not offer it is refused rather than sent credentials in clear), implicit TLS on
               port 465; user/password from the config or PORTWATCH_ALERTS_SMTP_USER/_PASSWORD, or
               ``smtp_password_file`` (never in code); ``smtp_cafile`` for a private CA
      syslog   one line per event through logging.handlers.SysLogHandler to ``syslog_address``:
               a unix socket path (/dev/log), ``host:port`` or ``udp://host:port`` (UDP), ``tcp://host:port``

    A key already delivered on a channel within ``alerts.cooldown_seconds`` is suppressed there
    (table alerts_sent). The whole call is bounded by ``alerts.max_seconds``: a channel that stops
    answering costs at most that, never a stuck run; what could not be delivered is logged and
    counted, never raised.
    """
    cfg = settings.alerts
    now = time.time() if now is None else now
    unique: dict[str, AlertEvent] = {}
    for event in events:
        unique.setdefault(event.key, event)
    events = list(unique.values())
    results: dict[str, dict] = {}
    channels = enabled_channels(settings)
    if not events or not channels:
        return {channel: {"sent": 0, "suppressed": 0, "failed": 0} for channel in channels}
    deadline = _Deadline(float(cfg.max_seconds))
    host = socket.gethostname()
    for channel in channels:
        due, suppressed = [], 0
        for event in events:
            last = alerts_db.last_sent(conn, event.key, channel) if conn is not None else None
            if last is not None and now - last < float(cfg.cooldown_seconds):
                suppressed += 1
            else:
                due.append(event)
        sent: list[str] = []
        failed = 0
        if due:
            try:
                if deadline.left() <= 0.05:
                    raise TimeoutError(f"the alert time budget (alerts.max_seconds = {cfg.max_seconds:g} s) is spent")
                if channel == "webhook":
                    sent, failed = _send_webhook(due, cfg, deadline, host, now)
                elif channel == "email":
                    _send_email(due, cfg, deadline, host, now)
                    sent = [e.key for e in due]
                else:
                    sent = _send_syslog(due, cfg, host, now)
                    failed = len(due) - len(sent)
            except Exception as exc:
                failed = len(due) - len(sent)
                log.warning("%s alert failed (%s): %d alert(s) not delivered", channel, _reason(exc), failed)
            if sent and conn is not None:
                alerts_db.mark_sent(conn, sent, channel, now)
        results[channel] = {"sent": len(sent), "suppressed": suppressed, "failed": failed}
        log.info("alerts on %s: %d sent, %d suppressed (cooldown), %d failed", channel, len(sent), suppressed, failed)
    return results


REPLAY_CHANNEL = "replay"      # the cooldown ledger's channel of a replay's alerts (written, never sent)


def record_replayed(conn, settings, events: Iterable[AlertEvent], path: Path, capture: str, now: float) -> dict:
    """A replay's alerts: what ``send_alerts`` would deliver at store time ``now`` (capture time), appended as
    JSON lines to ``path`` (the payload a webhook gets, plus ``"replayed": true`` and the capture's name) and
    recorded in the store's ledger under the ``replay`` channel — never delivered on any configured channel:
    a replay pages no one. The cooldown (``alerts.cooldown_seconds``) runs in store time as it would live.
    Returns {"written": n, "suppressed": n}."""
    unique: dict[str, AlertEvent] = {}
    for event in events:
        unique.setdefault(event.key, event)
    due, suppressed = [], 0
    for event in unique.values():
        last = alerts_db.last_sent(conn, event.key, REPLAY_CHANNEL)
        if last is not None and now - last < float(settings.alerts.cooldown_seconds):
            suppressed += 1
        else:
            due.append(event)
    if due:
        with open(path, "a", encoding="utf-8") as fh:
            for event in due:
                line = _payload(event, f"replay of {capture}", now) | {"replayed": True, "capture": capture}
                fh.write(json_dumps(line, default=str) + "\n")
        alerts_db.mark_sent(conn, [e.key for e in due], REPLAY_CHANNEL, now)
    return {"written": len(due), "suppressed": suppressed}


def event_dict(event: AlertEvent) -> dict:
    """The event as a plain dict (for logs and tests)."""
    return asdict(event)
