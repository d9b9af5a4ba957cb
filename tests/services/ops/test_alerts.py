"""Alerts against servers started by the tests on 127.0.0.1: an HTTP webhook receiver, a minimal
SMTP server (EHLO, STARTTLS with a self-signed certificate, AUTH PLAIN, MAIL, RCPT, DATA) and
syslog on a UDP and a unix datagram socket."""
from __future__ import annotations

import base64
import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.config import Settings
from app.db.connection import connect
from app.services.ops import alerts
from app.services.ops.alerts import AlertEvent, anomaly_event, block_event, send_alerts, syslog_address
from app.services.evaluation.findings import Finding, Source


# -- webhook receiver --------------------------------------------------------------------------------

class LoopbackServer:
    """A socketserver on 127.0.0.1 served from a daemon thread while the ``with`` block runs."""

    def serve(self, server) -> None:
        self.server = server
        self.server.daemon_threads = True
        self.port = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class Webhook(LoopbackServer):
    """Answers POSTs with the next status from ``statuses`` (then 200); records the JSON bodies."""

    def __init__(self, statuses=(), delay=0.0):
        self.statuses = list(statuses)
        self.delay = delay
        self.requests: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                outer.attempts += 1
                if outer.delay:
                    time.sleep(outer.delay)
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    outer.requests.append({"json": json.loads(body), "content_type": self.headers["Content-Type"]})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        self.url = f"http://127.0.0.1:{self.port}/hook/secret-token"


@pytest.fixture
def conn(db_path):
    c = connect(db_path)
    yield c
    c.close()


def webhook_settings(url, retries=2, timeout=2.0, cooldown=3600.0, max_seconds=10.0):
    s = Settings()
    s.alerts.webhook_url = url
    s.alerts.webhook_retries = retries
    s.alerts.webhook_timeout = timeout
    s.alerts.cooldown_seconds = cooldown
    s.alerts.max_seconds = max_seconds
    return s


EVENTS = [anomaly_event(Finding("model", 3, 22, "tcp", 1, 2, score=0.42, threshold=0.06, source="198.18.0.9",
                                 sources=[Source("198.18.0.9", packets=90, share=0.9)], id=7)),
          block_event("198.18.0.9/32", "port scan on tcp/22", expires_at=2_000_000_000.0)]


def test_webhook_delivers_json(conn):
    with Webhook() as hook:
        result = send_alerts(conn, webhook_settings(hook.url), EVENTS)
    assert result == {"webhook": {"sent": 2, "suppressed": 0, "failed": 0}}
    assert [r["content_type"] for r in hook.requests] == ["application/json"] * 2
    first = hook.requests[0]["json"]
    assert first["kind"] == "anomaly" and first["details"]["port"] == 22 and first["details"]["anomaly_id"] == 7
    assert first["key"] == "anomaly:model:tcp/22:198.18.0.9"
    assert first["details"]["sources"] == [{"address": "198.18.0.9", "share": 0.9, "evidence": "one-way"}]
    assert first["summary"] == ("anomaly 7: unusual traffic on tcp/22 (error 7.0x the threshold), from 198.18.0.9 "
                                "(90%, one-way), rounds 1-2")
    assert first["details"]["summary"] == first["summary"].split(": ", 1)[1]
    assert first["details"]["show"] == "python -m app anomalies show 7"
    assert hook.requests[1]["json"]["kind"] == "block"
    assert hook.requests[1]["json"]["details"]["address"] == "198.18.0.9/32"


def test_webhook_retries_after_a_500(conn):
    with Webhook(statuses=[500, 503]) as hook:
        result = send_alerts(conn, webhook_settings(hook.url, retries=2), EVENTS[:1])
    assert result["webhook"] == {"sent": 1, "suppressed": 0, "failed": 0}
    assert hook.attempts == 3 and len(hook.requests) == 1


def test_webhook_gives_up_after_its_retries_and_does_not_record(conn):
    with Webhook(statuses=[500, 500, 500, 500]) as hook:
        result = send_alerts(conn, webhook_settings(hook.url, retries=1), EVENTS)
    assert result["webhook"] == {"sent": 0, "suppressed": 0, "failed": 2}
    assert hook.attempts == 2        # the endpoint is down: the second event is not tried
    assert conn.execute("SELECT COUNT(*) FROM alerts_sent").fetchone()[0] == 0


def test_webhook_does_not_retry_a_client_error(conn):
    with Webhook(statuses=[404]) as hook:
        result = send_alerts(conn, webhook_settings(hook.url, retries=3), EVENTS[:1])
    assert result["webhook"]["failed"] == 1 and hook.attempts == 1


def test_cooldown_suppresses_duplicates(conn):
    with Webhook() as hook:
        s = webhook_settings(hook.url, cooldown=600)
        first = send_alerts(conn, s, EVENTS, now=1000.0)
        again = send_alerts(conn, s, EVENTS + [EVENTS[0]], now=1300.0)      # within the cooldown
        later = send_alerts(conn, s, EVENTS[:1], now=1000.0 + 601)           # after it
    assert first["webhook"]["sent"] == 2
    assert again["webhook"] == {"sent": 0, "suppressed": 2, "failed": 0}
    assert later["webhook"] == {"sent": 1, "suppressed": 0, "failed": 0}
    assert len(hook.requests) == 3


def test_unreachable_webhook_is_bounded_in_time(conn):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                     # nothing listens there: connection refused
    with Webhook(delay=3.0) as slow:  # answers after 3 s: every attempt times out
        started = time.monotonic()
        result = send_alerts(conn, webhook_settings(slow.url, retries=5, timeout=1.0, max_seconds=2.5),
                             EVENTS * 3)
        elapsed = time.monotonic() - started
    assert result["webhook"]["sent"] == 0 and result["webhook"]["failed"] == 2
    assert elapsed < 4.0
    refused = send_alerts(conn, webhook_settings(f"http://127.0.0.1:{port}/", retries=1), EVENTS)
    assert refused["webhook"] == {"sent": 0, "suppressed": 0, "failed": 2}


def test_no_channel_configured_sends_nothing(conn):
    assert send_alerts(conn, Settings(), EVENTS) == {}


def test_bad_webhook_scheme_is_logged_not_raised(conn, caplog):
    result = send_alerts(conn, webhook_settings("ftp://127.0.0.1/x"), EVENTS)
    assert result["webhook"]["failed"] == 2
    assert "must start with http" in caplog.text


# -- SMTP -----------------------------------------------------------------------------------------------

class SmtpServer(LoopbackServer):
    """A minimal SMTP server: EHLO/HELO, STARTTLS (when given a certificate), AUTH PLAIN, MAIL, RCPT,
    DATA, RSET, NOOP, QUIT. Records every message with whether it came over TLS and who logged in."""

    def __init__(self, certfile=None, keyfile=None):
        self.messages: list[dict] = []
        self.tls_context = None
        if certfile:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(certfile, keyfile)
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                self.tls = False
                self.user = None
                self.mail_from, self.rcpt = None, []
                self.send("220 localhost test SMTP")
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    text = line.decode().rstrip("\r\n")
                    verb, _, arg = text.partition(" ")
                    verb = verb.upper()
                    if verb in ("EHLO", "HELO"):
                        extensions = ["AUTH PLAIN"]
                        if outer.tls_context and not self.tls:
                            extensions.append("STARTTLS")
                        lines = ["localhost"] + extensions
                        for i, item in enumerate(lines):
                            self.send(f"250{'-' if i < len(lines) - 1 else ' '}{item}")
                    elif verb == "STARTTLS" and outer.tls_context and not self.tls:
                        self.send("220 go ahead")
                        self.connection = outer.tls_context.wrap_socket(self.connection, server_side=True)
                        self.rfile = self.connection.makefile("rb")
                        self.wfile = self.connection.makefile("wb")
                        self.tls = True
                    elif verb == "AUTH":
                        mech, _, initial = arg.partition(" ")
                        if mech.upper() != "PLAIN":
                            self.send("504 unsupported")
                            continue
                        if not initial:
                            self.send("334 ")
                            initial = self.rfile.readline().decode().strip()
                        _, user, password = base64.b64decode(initial).decode().split("\0")
                        if password == "s3cret":
                            self.user = user
                            self.send("235 ok")
                        else:
                            self.send("535 bad credentials")
                    elif verb == "MAIL":
                        self.mail_from = arg
                        self.send("250 ok")
                    elif verb == "RCPT":
                        self.rcpt.append(arg)
                        self.send("250 ok")
                    elif verb == "DATA":
                        self.send("354 end with .")
                        data = []
                        while True:
                            chunk = self.rfile.readline()
                            if chunk in (b".\r\n", b".\n", b""):
                                break
                            data.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                        outer.messages.append({"from": self.mail_from, "rcpt": list(self.rcpt), "tls": self.tls,
                                               "user": self.user, "data": b"".join(data).decode()})
                        self.send("250 queued")
                    elif verb in ("RSET", "NOOP"):
                        self.send("250 ok")
                    elif verb == "QUIT":
                        self.send("221 bye")
                        return
                    else:
                        self.send("502 not implemented")

            def send(self, text):
                self.wfile.write(text.encode() + b"\r\n")
                self.wfile.flush()

        self.serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 made with the openssl command line."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def mail_settings(port, starttls, user="", password="", cafile="", password_file=""):
    s = Settings()
    s.alerts.smtp_host = "127.0.0.1"
    s.alerts.smtp_port = port
    s.alerts.smtp_starttls = starttls
    s.alerts.smtp_user = user
    s.alerts.smtp_password = password
    s.alerts.smtp_password_file = password_file
    s.alerts.smtp_cafile = cafile
    s.alerts.mail_from = "portwatch@test.invalid"
    s.alerts.mail_to = "ops@test.invalid, oncall@test.invalid"
    s.alerts.smtp_timeout = 2.0
    return s


def test_email_plain_delivery_with_login(conn):
    with SmtpServer() as smtp:
        result = send_alerts(conn, mail_settings(smtp.port, starttls=False, user="bob", password="s3cret"), EVENTS)
    assert result == {"email": {"sent": 2, "suppressed": 0, "failed": 0}}
    assert len(smtp.messages) == 1           # one message for the batch
    message = smtp.messages[0]
    assert message["user"] == "bob" and not message["tls"]
    assert message["rcpt"] == ["TO:<ops@test.invalid>", "TO:<oncall@test.invalid>"]
    assert "Subject: [portwatch]" in message["data"] and "1 anomaly, 1 block" in message["data"]
    assert "198.18.0.9/32" in message["data"]


def test_email_password_from_file(conn, tmp_path):
    secret = tmp_path / "smtp_password"
    secret.write_text("s3cret\n")
    with SmtpServer() as smtp:
        result = send_alerts(conn, mail_settings(smtp.port, False, user="bob", password_file=str(secret)), EVENTS[:1])
    assert result["email"]["sent"] == 1 and smtp.messages[0]["user"] == "bob"


def test_email_wrong_password_fails_without_raising(conn):
    with SmtpServer() as smtp:
        result = send_alerts(conn, mail_settings(smtp.port, False, user="bob", password="wrong"), EVENTS)
    assert result["email"] == {"sent": 0, "suppressed": 0, "failed": 2}
    assert smtp.messages == []


def test_email_starttls_is_used_and_verified(conn, certificate):
    cert, key = certificate
    with SmtpServer(certfile=cert, keyfile=key) as smtp:
        result = send_alerts(conn, mail_settings(smtp.port, True, user="bob", password="s3cret", cafile=str(cert)),
                             EVENTS)
    assert result["email"]["sent"] == 2
    assert smtp.messages[0]["tls"] is True and smtp.messages[0]["user"] == "bob"


def test_email_starttls_refuses_an_untrusted_certificate(conn, certificate):
    cert, key = certificate
    with SmtpServer(certfile=cert, keyfile=key) as smtp:
        result = send_alerts(conn, mail_settings(smtp.port, True, user="bob", password="s3cret"), EVENTS)
    assert result["email"]["failed"] == 2 and smtp.messages == []


def test_email_refuses_a_server_without_starttls(conn, caplog):
    with SmtpServer() as smtp:
        result = send_alerts(conn, mail_settings(smtp.port, True, user="bob", password="s3cret"), EVENTS)
    assert result["email"]["failed"] == 2 and smtp.messages == []
    assert "does not offer STARTTLS" in caplog.text


def test_email_cooldown(conn):
    with SmtpServer() as smtp:
        s = mail_settings(smtp.port, False)
        send_alerts(conn, s, EVENTS, now=5000.0)
        again = send_alerts(conn, s, EVENTS, now=5010.0)
    assert again["email"] == {"sent": 0, "suppressed": 2, "failed": 0}
    assert len(smtp.messages) == 1


# -- syslog -------------------------------------------------------------------------------------------

def test_syslog_over_udp(conn):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        s = Settings()
        s.alerts.syslog = True
        s.alerts.syslog_address = f"127.0.0.1:{receiver.getsockname()[1]}"
        s.alerts.syslog_facility = "local3"
        result = send_alerts(conn, s, EVENTS)
        lines = [receiver.recv(4096).decode() for _ in range(2)]
    finally:
        receiver.close()
    assert result == {"syslog": {"sent": 2, "suppressed": 0, "failed": 0}}
    # <PRI> = facility local3 (19) * 8 + warning (4) = 156
    assert all(line.startswith("<156>portwatch: ") for line in lines)
    assert "anomaly: anomaly 7: unusual traffic on tcp/22 (error 7.0x the threshold)" in lines[0]
    assert "block: blocked 198.18.0.9/32" in lines[1]


def test_syslog_over_a_unix_socket(conn, tmp_path):
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(5)
    try:
        s = Settings()
        s.alerts.syslog = True
        s.alerts.syslog_address = str(path)
        result = send_alerts(conn, s, EVENTS[1:])
        line = receiver.recv(4096).decode()
    finally:
        receiver.close()
    assert result["syslog"]["sent"] == 1
    assert "portwatch: block: blocked 198.18.0.9/32" in line


def test_syslog_missing_socket_fails_softly(conn, tmp_path):
    s = Settings()
    s.alerts.syslog = True
    s.alerts.syslog_address = str(tmp_path / "absent.sock")
    assert send_alerts(conn, s, EVENTS)["syslog"] == {"sent": 0, "suppressed": 0, "failed": 2}


def test_syslog_address_forms():
    assert syslog_address("/dev/log") == ("/dev/log", socket.SOCK_DGRAM)
    assert syslog_address("127.0.0.1:5514") == (("127.0.0.1", 5514), socket.SOCK_DGRAM)
    assert syslog_address("udp://localhost:514") == (("localhost", 514), socket.SOCK_DGRAM)
    assert syslog_address("tcp://127.0.0.1:601") == (("127.0.0.1", 601), socket.SOCK_STREAM)
    with pytest.raises(ValueError):
        syslog_address("127.0.0.1:notaport")


def test_all_channels_together_and_event_keys(conn):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    try:
        with Webhook() as hook, SmtpServer() as smtp:
            s = mail_settings(smtp.port, False)
            s.alerts.webhook_url = hook.url
            s.alerts.syslog = True
            s.alerts.syslog_address = f"127.0.0.1:{receiver.getsockname()[1]}"
            result = send_alerts(conn, s, [AlertEvent("anomaly", "k1", "one"), AlertEvent("block", "k1", "dup")])
    finally:
        receiver.close()
    assert set(result) == {"syslog", "webhook", "email"}
    assert all(r == {"sent": 1, "suppressed": 0, "failed": 0} for r in result.values())
    assert sorted(r[0] for r in conn.execute("SELECT channel FROM alerts_sent WHERE key = 'k1'")) == \
        ["email", "syslog", "webhook"]
    assert alerts.event_dict(EVENTS[1])["key"] == "block:198.18.0.9/32"
