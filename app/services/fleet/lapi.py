"""A small client of a CrowdSec Local API (LAPI), standard library only (urllib, json, ssl): the
bouncer's decision stream and the machine's login, alerts and deletes (:class:`Lapi` lists the calls).

Every request has a timeout, and a whole sync round a deadline (``Deadline``): a LAPI that is down
or slow costs the collector round at most ``crowdsec.max_seconds``. Failures raise
:class:`LapiError` with one sentence; nothing here touches the database. Used by crowdsec.py only.
"""
from __future__ import annotations

import json
import logging
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from app import __version__

log = logging.getLogger(__name__)

USER_AGENT = f"portwatch-xdp-bouncer/{__version__}"
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class LapiError(Exception):
    """The LAPI could not be reached or refused a request (one sentence). ``status``: HTTP code or None."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Deadline:
    """Seconds left for the LAPI work of one round."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def go_duration(text: str) -> float:
    """Seconds in a Go duration string ('1h4m36.3s', '-3.6ms', '4h'); ValueError when it is not one."""
    text = (text or "").strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _GO_PART.finditer(body):
        if m.start() != pos:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f"not a duration: {text!r}")
    return sign * total


class Lapi:
    """One LAPI at ``url`` (http(s)://host:port). ``timeout``: seconds per request at most.

    The calls portwatch makes, as CrowdSec's own bouncers and agents make them (LAPI swagger,
    pkg/models/localapi_swagger.yaml in crowdsecurity/crowdsec):

      bouncer   GET    /v1/decisions/stream[?startup=true]   header X-Api-Key: <bouncer key>
                -> {"new": [decision, ...] | null, "deleted": [decision, ...] | null}; startup=true gives
                every running decision, later calls what changed since this bouncer's previous pull
                (the LAPI keeps that position per bouncer key: one key per host).
      machine   POST   /v1/watchers/login   {"machine_id", "password"}   -> {"token", "expire"}
                POST   /v1/alerts           [alert with its decisions]   -> ["<alert id>", ...]
                DELETE /v1/decisions?ip=|range=<value>&scenario=<s>      -> {"nbDeleted": "<n>"}
                (header Authorization: Bearer <token>)
    """

    def __init__(self, url: str, timeout: float, ca_file: str = ""):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file or None) if self.url.startswith("https") else None

    def _request(self, method: str, path: str, deadline: Deadline, headers: dict, body=None):
        left = min(self.timeout, deadline.left())
        if left <= 0.05:
            raise LapiError(f"no time left in this round for {method} {path} (crowdsec.max_seconds)")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"User-Agent": USER_AGENT, "Accept": "application/json",
                                                  **({"Content-Type": "application/json"} if data else {}),
                                                  **headers})
        try:
            with urllib.request.urlopen(request, timeout=left, context=self._ssl) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = json.loads(exc.read() or b"{}").get("message", "")
            except (ValueError, AttributeError, OSError):
                pass
            raise LapiError(f"the CrowdSec LAPI at {self.url} answered {method} {path} with HTTP {exc.code}"
                            + (f" ({detail})" if detail else ""), exc.code) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LapiError(f"the CrowdSec LAPI at {self.url} is unreachable ({reason})") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise LapiError(f"the CrowdSec LAPI at {self.url} sent an answer to {method} {path} that is not JSON") \
                from None

    # --- bouncer ----------------------------------------------------------------------------------
    def stream(self, bouncer_key: str, startup: bool, deadline: Deadline) -> tuple[list[dict], list[dict]]:
        """(new, deleted) decisions of the bouncer's stream."""
        path = "/v1/decisions/stream" + ("?startup=true" if startup else "")
        answer = self._request("GET", path, deadline, {"X-Api-Key": bouncer_key})
        if not isinstance(answer, dict):
            raise LapiError(f"the CrowdSec LAPI at {self.url} sent a decision stream that is not an object")
        return list(answer.get("new") or []), list(answer.get("deleted") or [])

    # --- machine ----------------------------------------------------------------------------------
    def login(self, machine_id: str, password: str, deadline: Deadline) -> str:
        answer = self._request("POST", "/v1/watchers/login", deadline, {},
                               {"machine_id": machine_id, "password": password})
        token = answer.get("token") if isinstance(answer, dict) else None
        if not token:
            raise LapiError(f"the CrowdSec LAPI at {self.url} gave machine {machine_id!r} no token")
        return token

    def push_alerts(self, token: str, alerts: list[dict], deadline: Deadline) -> list[str]:
        answer = self._request("POST", "/v1/alerts", deadline, {"Authorization": f"Bearer {token}"}, alerts)
        return [str(a) for a in answer] if isinstance(answer, list) else []

    def delete_decisions(self, token: str, deadline: Deadline, **filters: str) -> int:
        query = urllib.parse.urlencode(filters)
        answer = self._request("DELETE", f"/v1/decisions?{query}", deadline, {"Authorization": f"Bearer {token}"})
        try:
            return int((answer or {}).get("nbDeleted", 0))
        except (TypeError, ValueError, AttributeError):
            return 0


class TokenCache:
    """Machine tokens kept per (url, machine) for the life of the process (a collector running many
    rounds logs in once an hour, not once a round). The LAPI's tokens last an hour; renewed early."""

    def __init__(self):
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def get(self, lapi: Lapi, machine_id: str, password: str, deadline: Deadline) -> str:
        key = (lapi.url, machine_id)
        token, until = self._tokens.get(key, ("", 0.0))
        if token and time.monotonic() < until:
            return token
        token = lapi.login(machine_id, password, deadline)
        self._tokens[key] = (token, time.monotonic() + 45 * 60)
        return token

    def forget(self, lapi: Lapi, machine_id: str) -> None:
        self._tokens.pop((lapi.url, machine_id), None)


TOKENS = TokenCache()
