"""A fake HTTP/1.1 server and app-process controller for bgsession's tests and demo.

``FakeServer`` is a threaded standard-library HTTP/1.1 server (keep-alive, daemon
threads, ``127.0.0.1`` on a free port by default) that serves deterministic blobs
with strong validators and exact ``Range``/``If-Range``/``416`` semantics, accepts
uploads, answers Basic and Digest challenges, redirects, and misbehaves on demand:
a *fault matrix* (``Fault``) chosen per route and per request cuts, resets,
stalls, throttles, lies about ranges and totals, or answers with an error status.

It also *observes*: body bytes served per path, every request, TCP connections
accepted, and byte boundaries on a path at which a callback runs or the serving
thread holds still (``on_bytes``, ``hold_at``), so a test can kill a client at an
exact offset.  ``AppController`` launches an app as a real subprocess, SIGKILLs it
at such a boundary and relaunches it as a "background launch".

Typical use::

    with FakeServer() as srv:
        route = srv.add_blob("/photo.jpg", size=1_000_000,
                             faults=[Fault(cut_after=300_000), None])   # 1st request cut, 2nd normal
        hold = srv.hold_at("/photo.jpg", 300_000)      # the handler stops there ...
        ...start the client...
        assert hold.wait(5)                              # ... exactly 300,000 body bytes sent
        ...kill the client...; hold.release()

    with AppController([sys.executable, "app.py"], identifier="com.example") as ctl:
        ctl.kill_when(srv, "/photo.jpg", 300_000)        # SIGKILL + reap at that byte
        ctl.launch(); assert ctl.wait(20) == -signal.SIGKILL
        ctl.launch(background=True)                      # BGSESSION_BACKGROUND_EVENTS=com.example

Standard library only; Python 3.9+.  Run ``python fake_server.py --help`` for the
command line (``/files/`` from a directory, ``/blob/<size>?faults…``).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import email.utils
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, TypeVar

__version__ = "0.1.0"

__all__ = [
    "BACKGROUND_EVENTS_ENV",
    "CHUNK_SIZE",
    "DEFAULT_LAST_MODIFIED",
    "AppController",
    "BasicAuth",
    "DigestAuth",
    "FakeServer",
    "Fault",
    "Hold",
    "RequestRecord",
    "Route",
    "blob_bytes",
]

#: Body bytes written (or read) per socket call; boundaries split chunks exactly.
CHUNK_SIZE = 64 * 1024
#: Last-Modified of a new blob route and of every ``/blob/<size>`` (2020-01-01T00:00:00Z).
DEFAULT_LAST_MODIFIED = 1577836800
#: Environment variable that marks a background launch (read by appdelegate.main).
BACKGROUND_EVENTS_ENV = "BGSESSION_BACKGROUND_EVENTS"
#: Throttled bodies are written in about this many pieces per second.
THROTTLE_TICKS_PER_SECOND = 20
#: How often the accept loop checks for stop() (bounds how long stop() takes).
ACCEPT_POLL_INTERVAL = 0.01
#: How long ``FakeServer.stop`` waits for handler threads to finish.
DEFAULT_STOP_TIMEOUT = 5.0
#: Largest ``/blob/<size>`` served (the blob is held in memory).
MAX_QUERY_BLOB = 2 * 1024 ** 3
#: ``/blob/<size>`` entities kept in memory between requests.
QUERY_BLOB_CACHE_ENTRIES = 8
#: A rejected upload's body is read and discarded up to this size (to keep the connection);
#: above it the connection closes.
MAX_DRAIN = 1024 * 1024
#: Idle keep-alive connections are closed after this many seconds.
KEEP_ALIVE_TIMEOUT = 120.0

_BLOB_PATH = re.compile(r"^/blob/([0-9]+)$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$", re.IGNORECASE)
_AUTH_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_NC = re.compile(r"^[0-9a-fA-F]{8}$")
_SIGKILL = getattr(signal, "SIGKILL", None)


# ---------------------------------------------------------------------------
# Blobs and entities
# ---------------------------------------------------------------------------

def blob_bytes(size: int, seed: int = 0) -> bytes:
    """Return ``size`` deterministic pseudo-random bytes for ``seed``.

    SHAKE-256 of the seed, so the bytes are the same on every platform and Python
    version, and ``blob_bytes(n, s)`` is a prefix of ``blob_bytes(m, s)`` for n < m
    (use another seed for content that differs).  About 0.25 s per 100 MiB.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    if size == 0:
        return b""
    return hashlib.shake_256(b"bgsession-fake-blob:%d" % seed).digest(size)


def _http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def _parse_http_date(value: str) -> int | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return int(parsed.timestamp())


def _content_etag(data: bytes) -> str:
    return '"%s"' % hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class _Entity:
    """One immutable version of a resource: bytes and validators (header values or None)."""

    data: bytes
    etag: str | None
    last_modified: str | None
    last_modified_ts: int | None
    content_type: str = "application/octet-stream"

    @classmethod
    def build(cls, data: bytes, *, modified: int, etag: bool = True, weak_etag: bool = False,
              last_modified: bool = True, content_type: str = "application/octet-stream",
              etag_value: str | None = None) -> _Entity:
        tag = None
        if etag or weak_etag:
            tag = etag_value or _content_etag(data)
            if weak_etag:
                tag = "W/" + tag
        return cls(
            data=data if type(data) is bytes else bytes(data),
            etag=tag,
            last_modified=_http_date(modified) if last_modified else None,
            last_modified_ts=modified if last_modified else None,
            content_type=content_type,
        )


# ---------------------------------------------------------------------------
# Faults and the response plan (no I/O)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """How one response misbehaves.  Every field defaults to "behave normally".

    Body faults count *body* bytes of this response (chunk framing excluded).  On an
    upload route, ``cut_after``/``stall_*``/``throttle`` apply to reading the request
    body instead, and ``status`` is sent after the body was read.  ``reset`` without
    ``cut_after`` resets the connection before any response.  ``wrong_total``,
    ``malformed_range`` and ``early_206`` only change a response that is a 206.
    """

    cut_after: int | None = None
    reset: bool = False
    stall_after: int | None = None
    stall_seconds: float | None = None
    throttle: int | None = None
    status: int | None = None
    retry_after: str | None = None
    ignore_range: bool = False
    early_206: int | None = None
    wrong_total: bool = False
    malformed_range: bool = False
    chunked: bool = False
    short_body: int | None = None
    huge_header: int | None = None
    drop_validators: bool = False
    delay: float | None = None

    def __post_init__(self) -> None:
        for name in ("cut_after", "stall_after", "early_206", "short_body", "huge_header"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Fault.{name} must be >= 0, not {value}")
        if self.throttle is not None and self.throttle <= 0:
            raise ValueError(f"Fault.throttle must be > 0 bytes per second, not {self.throttle}")
        for name in ("stall_seconds", "delay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Fault.{name} must be >= 0, not {value}")

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Fault | None:
        """Build a Fault from query parameters (``cut_after=1000&chunked=1``); None if none given.

        Unknown parameters are ignored; a bad value raises ValueError.
        """
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in query:
                continue
            raw = query[f.name]
            default = f.default
            if isinstance(default, bool):
                kwargs[f.name] = _parse_bool(raw)
            elif f.name in ("stall_seconds", "delay"):
                kwargs[f.name] = float(raw)
            elif f.name == "retry_after":
                kwargs[f.name] = raw
            else:
                kwargs[f.name] = int(raw)
        return cls(**kwargs) if kwargs else None


NO_FAULT = Fault()


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


@dataclass(frozen=True)
class _Plan:
    """What to send: status, headers, which body bytes, and how to misbehave while sending.

    The body is ``entity.data[span[0]:span[1]]`` when ``span`` is set, else ``body``.
    Only the first ``send`` body bytes are written; then ``abort`` ("close" or "reset")
    ends the connection, if set.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    span: tuple[int, int] | None = None
    send: int = 0
    abort: str | None = None
    chunked: bool = False
    stall_after: int | None = None
    stall_seconds: float | None = None
    throttle: int | None = None
    watched: bool = False

    @property
    def body_length(self) -> int:
        if self.span is not None:
            return self.span[1] - self.span[0]
        return len(self.body)


def _parse_range(value: str | None) -> tuple[int | None, int | None] | None:
    """``bytes=N-M`` -> (N, M), ``bytes=N-`` -> (N, None), ``bytes=-S`` -> (None, S).

    None for anything else, several ranges included (the caller then serves 200).
    """
    if not value or "," in value:
        return None
    match = _RANGE.match(value)
    if not match:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        return None, int(last)
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None
    return start, end


def _resolve_range(requested: tuple[int | None, int | None], size: int) -> tuple[int, int] | None:
    """Turn a parsed range into an inclusive (first, last) within ``size``; None if unsatisfiable."""
    start, end = requested
    if start is None:
        suffix = end or 0
        if suffix == 0 or size == 0:
            return None
        return max(0, size - suffix), size - 1
    if start >= size:
        return None
    last = size - 1 if end is None else min(end, size - 1)
    return start, last


def _if_range_matches(value: str, entity: _Entity) -> bool:
    """If-Range holds only for the current *strong* ETag or the exact Last-Modified date."""
    value = value.strip()
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        return entity.etag is not None and not entity.etag.startswith("W/") and value == entity.etag
    stamp = _parse_http_date(value)
    return stamp is not None and entity.last_modified_ts is not None and stamp == entity.last_modified_ts


def _plan_fixed(status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = (),
                content_type: str | None = "text/plain; charset=utf-8") -> _Plan:
    all_headers = list(headers)
    if content_type and body and not any(k.lower() == "content-type" for k, _ in all_headers):
        all_headers.append(("Content-Type", content_type))
    return _Plan(status=status, headers=tuple(all_headers), body=body, send=len(body))


def _plan_status_fault(fault: Fault) -> _Plan:
    """The small error answer of ``Fault(status=…, retry_after=…)``."""
    assert fault.status is not None
    headers = [("Retry-After", fault.retry_after)] if fault.retry_after is not None else []
    return _plan_fixed(fault.status, b"fault: status %d\n" % fault.status, headers)


class _HeaderLookup(Protocol):
    """Request headers: an ``email.message.Message`` or a dict with lower-case names."""

    def get(self, name: str, default: None = None) -> str | None: ...


def _plan_response(method: str, request_headers: _HeaderLookup, entity: _Entity,
                   fault: Fault = NO_FAULT) -> _Plan:
    """Decide the response to GET/HEAD of ``entity`` under ``fault``.  Pure: no I/O."""
    if fault.status is not None:
        return _apply_common(_plan_status_fault(fault), method, fault)

    size = len(entity.data)
    headers: list[tuple[str, str]] = [("Accept-Ranges", "bytes"), ("Content-Type", entity.content_type)]
    if not fault.drop_validators:
        if entity.etag:
            headers.append(("ETag", entity.etag))
        if entity.last_modified:
            headers.append(("Last-Modified", entity.last_modified))

    requested = None if fault.ignore_range else _parse_range(_get(request_headers, "range"))
    if requested is not None:
        if_range = _get(request_headers, "if-range")
        if if_range is not None and not _if_range_matches(if_range, entity):
            requested = None
    if requested is None:
        plan = _Plan(status=200, headers=tuple(headers), span=(0, size), send=size, watched=True)
        return _apply_common(plan, method, fault)

    resolved = _resolve_range(requested, size)
    if resolved is None:
        headers.append(("Content-Range", "bytes */%d" % size))
        return _apply_common(_Plan(status=416, headers=tuple(headers)), method, fault)

    first, last = resolved
    if fault.early_206:
        first = max(0, first - fault.early_206)
    total = size + 1000 if fault.wrong_total else size
    if fault.malformed_range:
        content_range = "bytes garbage-%d/unknown" % first
    else:
        content_range = "bytes %d-%d/%d" % (first, last, total)
    headers.append(("Content-Range", content_range))
    plan = _Plan(status=206, headers=tuple(headers), span=(first, last + 1),
                 send=last + 1 - first, watched=True)
    return _apply_common(plan, method, fault)


def _apply_common(plan: _Plan, method: str, fault: Fault) -> _Plan:
    """Add the faults that work on any response: body cuts, pacing, chunking, huge header, HEAD."""
    headers = list(plan.headers)
    if fault.huge_header:
        headers.append(("X-Huge-Header", "h" * fault.huge_header))
    if method == "HEAD":
        if fault.chunked and plan.body_length:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Content-Length", str(plan.body_length)))
        return dataclasses.replace(plan, headers=tuple(headers), send=0, body=b"", span=None,
                                   watched=False)
    length = plan.body_length
    send = length
    abort = None
    if fault.short_body is not None:
        send = max(0, length - fault.short_body)
        abort = "close"
    if fault.cut_after is not None:
        send = min(send, fault.cut_after)
        abort = "reset" if fault.reset else "close"
    if fault.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        headers.append(("Content-Length", str(length)))
    return dataclasses.replace(
        plan, headers=tuple(headers), send=send, abort=abort, chunked=fault.chunked,
        stall_after=fault.stall_after, stall_seconds=fault.stall_seconds, throttle=fault.throttle)


def _get(headers: _HeaderLookup, name: str) -> str | None:
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        value = headers.get(name.lower())
    return value


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------

class BasicAuth:
    """HTTP Basic authentication for one user (RFC 7617)."""

    scheme = "Basic"

    def __init__(self, user: str, password: str, realm: str = "fake") -> None:
        self.user = user
        self.password = password
        self.realm = realm

    def challenge(self) -> str:
        """The WWW-Authenticate value sent with a 401."""
        return 'Basic realm="%s", charset="UTF-8"' % self.realm

    def check(self, method: str, target: str, authorization: str | None) -> bool | str:
        """True when ``authorization`` carries this user's credentials."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            text = decoded.decode("latin-1")
        user, sep, password = text.partition(":")
        return bool(sep) and hmac.compare_digest(user.encode(), self.user.encode()) and \
            hmac.compare_digest(password.encode(), self.password.encode())


class DigestAuth:
    """HTTP Digest authentication for one user (RFC 7616; MD5 or SHA-256; qop "auth" or none).

    The nonce is random per instance; ``rotate_nonce()`` replaces it, and a request
    with the old nonce then gets a 401 with ``stale=true``.  ``nc`` must be 8 hex
    digits but repeats are accepted (as Apache does by default).
    """

    scheme = "Digest"
    _HASHES: ClassVar[dict[str, Any]] = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}

    def __init__(self, user: str, password: str, realm: str = "fake", algorithm: str = "MD5",
                 qop: str | None = "auth") -> None:
        if algorithm.upper() not in self._HASHES:
            raise ValueError(f"algorithm must be one of {sorted(self._HASHES)}, not {algorithm!r}")
        if qop not in (None, "auth"):
            raise ValueError(f"qop must be 'auth' or None, not {qop!r}")
        self.user = user
        self.password = password
        self.realm = realm
        self.algorithm = algorithm.upper()
        self.qop = qop
        self.opaque = secrets.token_hex(8)
        self.nonce = secrets.token_hex(16)
        self._stale: set[str] = set()

    def rotate_nonce(self) -> None:
        """Issue a new nonce; the old one is answered with ``stale=true``."""
        self._stale.add(self.nonce)
        self.nonce = secrets.token_hex(16)

    def challenge(self, stale: bool = False) -> str:
        """The WWW-Authenticate value sent with a 401."""
        parts = ['Digest realm="%s"' % self.realm]
        if self.qop:
            parts.append('qop="%s"' % self.qop)
        parts.append("algorithm=%s" % self.algorithm)
        parts.append('nonce="%s"' % self.nonce)
        parts.append('opaque="%s"' % self.opaque)
        if stale:
            parts.append("stale=true")
        return ", ".join(parts)

    def hash(self, text: str) -> str:
        """H() of RFC 7616 for this algorithm, as lower-case hex."""
        digest: str = self._HASHES[self.algorithm](text.encode("utf-8")).hexdigest()
        return digest

    def expected_response(self, method: str, uri: str, nonce: str, nc: str = "", cnonce: str = "") -> str:
        """The ``response`` value a correct client sends."""
        ha1 = self.hash(f"{self.user}:{self.realm}:{self.password}")
        ha2 = self.hash(f"{method}:{uri}")
        if self.qop:
            return self.hash(f"{ha1}:{nonce}:{nc}:{cnonce}:{self.qop}:{ha2}")
        return self.hash(f"{ha1}:{nonce}:{ha2}")

    def check(self, method: str, target: str, authorization: str | None) -> bool | str:
        """True if valid, "stale" for a correct answer to a retired nonce, else False."""
        if not authorization:
            return False
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme.lower() != "digest":
            return False
        params = _parse_auth_params(rest)
        required = ["username", "realm", "nonce", "uri", "response"]
        if self.qop:
            required += ["qop", "nc", "cnonce"]
        if any(name not in params for name in required):
            return False
        if params["username"] != self.user or params["realm"] != self.realm:
            return False
        if params.get("algorithm", "MD5").upper() != self.algorithm:
            return False
        if params["uri"] != target:
            return False
        if self.qop and (params["qop"] != self.qop or not _NC.match(params["nc"]) or not params["cnonce"]):
            return False
        if "opaque" in params and params["opaque"] != self.opaque:
            return False
        nonce = params["nonce"]
        expected = self.expected_response(method, params["uri"], nonce, params.get("nc", ""),
                                          params.get("cnonce", ""))
        if not hmac.compare_digest(expected, params["response"].lower()):
            return False
        if nonce == self.nonce:
            return True
        return "stale" if nonce in self._stale else False


def _parse_auth_params(text: str) -> dict[str, str]:
    params = {}
    for match in _AUTH_PARAM.finditer(text):
        key, value = match.group(1).lower(), match.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key] = value
    return params


# ---------------------------------------------------------------------------
# Observation: request records, watches, holds
# ---------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One request as the server saw it.  ``headers`` has lower-case names."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    client_port: int
    connection: int
    status: int | None = None
    range_header: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    upload_sha256: str | None = None
    fault: Fault | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup."""
        return self.headers.get(name.lower(), default)


class Hold:
    """A byte boundary on a path at which the serving thread stops until ``release()``.

    ``reached`` is set when the boundary is reached (after the action, if any, for
    ``AppController.kill_when``); ``served`` is the path's byte count at that moment.
    """

    def __init__(self, path: str, nbytes: int, action: Callable[[], Any] | None = None,
                 auto_release: bool = False) -> None:
        self.path = path
        self.nbytes = nbytes
        self.reached = threading.Event()
        self.released = threading.Event()
        self.served: int | None = None
        self.error: BaseException | None = None
        self._action = action
        self._auto_release = auto_release

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the boundary is reached; False on timeout."""
        return self.reached.wait(timeout)

    def release(self) -> None:
        """Let the held handler continue (harmless if not reached yet: it then will not stop)."""
        self.released.set()

    def _arrive(self, served: int) -> None:
        self.served = served
        if self._action is not None:
            try:
                self._action()
            except Exception as err:  # kept for the test to inspect  # noqa: BLE001
                self.error = err
        self.reached.set()
        if self._auto_release:
            self.released.set()
        self.released.wait()

    def __repr__(self) -> str:
        state = "released" if self.released.is_set() else "reached" if self.reached.is_set() else "armed"
        return f"<Hold {self.path} at {self.nbytes} {state}>"


@dataclass
class _Watch:
    path: str
    nbytes: int
    callback: Callable[[str, int], Any] | None = None
    hold: Hold | None = None
    fired: bool = False


class _Aborted(Exception):
    """The handler cut the connection on purpose, or the server is stopping."""


# ---------------------------------------------------------------------------
# The HTTP handler (I/O)
# ---------------------------------------------------------------------------

class _BodyReader:
    """Reads a request body framed by Content-Length or chunked transfer coding."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self._rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        try:
            self.remaining = max(0, int(headers.get("Content-Length", "0") or 0))
        except ValueError:
            self.remaining = 0
        self._chunk_left = 0
        self._done = False
        self.incomplete = False

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of body; b"" at the end (``incomplete`` set if the peer hung up early)."""
        if self._done or limit <= 0:
            return b""
        if not self.chunked:
            if self.remaining == 0:
                self._done = True
                return b""
            data: bytes = self._rfile.read(min(limit, self.remaining))
            if not data:
                self._done = self.incomplete = True
                return b""
            self.remaining -= len(data)
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(65537)
            size_text = line.split(b";", 1)[0].strip()
            try:
                self._chunk_left = int(size_text, 16)
            except ValueError:
                self._done = self.incomplete = True
                return b""
            if self._chunk_left == 0:
                while True:  # trailers
                    trailer = self._rfile.readline(65537)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                self._done = True
                return b""
        data = bytes(self._rfile.read(min(limit, self._chunk_left)))
        if not data:
            self._done = self.incomplete = True
            return b""
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(65537)  # CRLF after the chunk data
        return data


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake_server/" + __version__
    disable_nagle_algorithm = True
    timeout = KEEP_ALIVE_TIMEOUT
    server: _HTTPServer

    # -- plumbing ---------------------------------------------------------

    def handle(self) -> None:
        try:
            super().handle()
        except (_Aborted, OSError):  # cut on purpose, or the client went away
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        # The route decides (after auth) whether to send 100 Continue.
        return True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write("%s - - [%s] %s\n" % (self.address_string(), self.log_date_time_string(),
                                                   format % args))

    def _dispatch(self) -> None:
        fake = self.server.fake
        split = urllib.parse.urlsplit(self.path)
        path = split.path or "/"
        record = fake._begin_record(self, path, split.query)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        try:
            route = fake._resolve(path, query)
            query_fault = Fault.from_query(query)
        except ValueError as err:
            self.drain_request_body()
            self.send_plan(record, _plan_fixed(400, ("bad request: %s\n" % err).encode()))
            return
        if route is None:
            self.drain_request_body()
            self.send_plan(record, _plan_fixed(404, b"not found\n"))
            return
        record.path = route.path
        route.serve(self, record, query_fault)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # -- responses --------------------------------------------------------

    def serve_entity(self, record: RequestRecord, entity: _Entity, fault: Fault | None,
                     auth: BasicAuth | DigestAuth | None) -> None:
        """GET/HEAD of a blob: pre-response faults, auth, then the planned response."""
        fault = fault or NO_FAULT
        record.fault = fault if fault != NO_FAULT else None
        self.drain_request_body()
        self._pre_response_faults(fault)
        if self.command not in ("GET", "HEAD"):
            self.send_plan(record, _plan_fixed(405, b"method not allowed\n", [("Allow", "GET, HEAD")]))
            return
        if fault.status is None and auth is not None and not self._authorized(record, auth):
            return
        self.send_plan(record, _plan_response(self.command, self.headers, entity, fault), entity)

    def receive_upload(self, record: RequestRecord, fault: Fault | None,
                       auth: BasicAuth | DigestAuth | None) -> bytes | None:
        """PUT/POST body, read under the fault; None if a response was already sent or the connection cut."""
        fault = fault or NO_FAULT
        record.fault = fault if fault != NO_FAULT else None
        if self.command not in ("PUT", "POST"):
            self.drain_request_body()
            self.send_plan(record, _plan_fixed(405, b"method not allowed\n", [("Allow", "PUT, POST")]))
            return None
        self._pre_response_faults(fault)
        if auth is not None and not self._authorized(record, auth, draining=True):
            return None
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        return self._read_body(record, fault)

    def _pre_response_faults(self, fault: Fault) -> None:
        if fault.reset and fault.cut_after is None:
            self._abort("reset")
        if fault.delay:
            if self.server.fake._stopping.wait(fault.delay):
                self._abort("close")

    def _authorized(self, record: RequestRecord, auth: BasicAuth | DigestAuth, draining: bool = False) -> bool:
        verdict = auth.check(self.command, self.path, self.headers.get("Authorization"))
        if verdict is True:
            return True
        if isinstance(auth, DigestAuth):
            challenge = auth.challenge(stale=verdict == "stale")
        else:
            challenge = auth.challenge()
        headers = [("WWW-Authenticate", challenge)]
        if draining and not self._drain_if_small():
            headers.append(("Connection", "close"))
        plan = _plan_fixed(401, b"authentication required\n", headers)
        self.send_plan(record, plan)
        return False

    def send_plan(self, record: RequestRecord, plan: _Plan, entity: _Entity | None = None) -> None:
        """Write the planned status, headers and body, applying its body faults.

        A plan without framing headers (from ``_plan_fixed``) gets them here.
        """
        names = {name.lower() for name, _ in plan.headers}
        if "content-length" not in names and "transfer-encoding" not in names:
            plan = _apply_common(plan, self.command, NO_FAULT)
        record.status = plan.status
        self.send_response(plan.status)
        for name, value in plan.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if plan.span is not None:
            if entity is None:
                raise RuntimeError("a plan with a span needs its entity")
            view = memoryview(entity.data)[plan.span[0]:plan.span[1]]
        else:
            view = memoryview(plan.body)
        self._send_body(record, view[:plan.send], plan)
        if plan.abort:
            self._abort(plan.abort)
        if plan.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_body(self, record: RequestRecord, view: memoryview, plan: _Plan) -> None:
        fake = self.server.fake
        path = record.path
        total = len(view)
        stall_at = None if plan.stall_after is None else min(plan.stall_after, total)
        pos = 0
        paced_from, paced_bytes = time.monotonic(), 0
        while True:
            if plan.watched:
                fake._fire_due(path, received=False)
            if stall_at is not None and pos >= stall_at:
                stall_at = None
                self._stall(plan.stall_seconds)
                paced_from, paced_bytes = time.monotonic(), 0
            if pos >= total:
                break
            n = min(CHUNK_SIZE, total - pos)
            if stall_at is not None:
                n = min(n, stall_at - pos)
            if plan.throttle:
                n = min(n, max(1, plan.throttle // THROTTLE_TICKS_PER_SECOND))
                self._pace(paced_from, paced_bytes, plan.throttle)
            if plan.watched:
                n = min(n, fake._room(path, received=False))
            piece = view[pos:pos + n]
            # Counted before the write so a client that has the bytes sees them counted;
            # taken back if the write fails.
            record.bytes_sent += n
            fake._advance(path, n, received=False)
            try:
                if plan.chunked:
                    self.wfile.write(b"".join((b"%x\r\n" % n, piece, b"\r\n")))
                else:
                    self.wfile.write(piece)
            except BaseException:
                record.bytes_sent -= n
                fake._advance(path, -n, received=False)
                raise
            pos += n
            paced_bytes += n
            if plan.watched:
                fake._fire_due(path, received=False)

    def _stall(self, seconds: float | None) -> None:
        fake = self.server.fake
        if not fake._wait_stall(seconds):
            self._abort("close")

    def _pace(self, since: float, sent: int, rate: int) -> None:
        due = since + sent / rate - time.monotonic()
        if due > 0 and self.server.fake._stopping.wait(due):
            self._abort("close")

    def _abort(self, how: str) -> None:
        """Close the connection now: FIN ("close") or RST ("reset", SO_LINGER 0)."""
        self.close_connection = True
        sock = self.connection
        try:
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.rfile.close()
        finally:
            sock.close()
        if self.server.fake.verbose:
            self.log_message("%s %s: connection %s by fault", self.command, self.path,
                             "reset" if how == "reset" else "closed")
        raise _Aborted(how)

    # -- request bodies ---------------------------------------------------

    def _body_reader(self) -> _BodyReader:
        return _BodyReader(self.rfile, self.headers)

    def drain_request_body(self) -> None:
        """Read and discard a request body so the connection can be reused."""
        reader = self._body_reader()
        if reader.chunked or self.headers.get("Expect", "").lower() == "100-continue":
            self.close_connection = True  # the body is not read; the connection cannot be reused
            return
        while reader.read(CHUNK_SIZE):
            pass

    def _drain_if_small(self) -> bool:
        reader = self._body_reader()
        if reader.chunked or reader.remaining > MAX_DRAIN or \
                self.headers.get("Expect", "").lower() == "100-continue":
            self.close_connection = True
            return False
        while reader.read(CHUNK_SIZE):
            pass
        return True

    def _read_body(self, record: RequestRecord, fault: Fault) -> bytes:
        fake = self.server.fake
        path = record.path
        reader = self._body_reader()
        parts: list[bytes] = []
        pos = 0
        stall_at = fault.stall_after
        paced_from, paced_bytes = time.monotonic(), 0
        while True:
            fake._fire_due(path, received=True)
            if stall_at is not None and pos >= stall_at:
                stall_at = None
                self._stall(fault.stall_seconds)
                paced_from, paced_bytes = time.monotonic(), 0
            if fault.cut_after is not None and pos >= fault.cut_after:
                self._abort("reset" if fault.reset else "close")
            n = CHUNK_SIZE
            if stall_at is not None:
                n = min(n, stall_at - pos)
            if fault.cut_after is not None:
                n = min(n, fault.cut_after - pos)
            if fault.throttle:
                n = min(n, max(1, fault.throttle // THROTTLE_TICKS_PER_SECOND))
                self._pace(paced_from, paced_bytes, fault.throttle)
            n = min(n, fake._room(path, received=True))
            piece = reader.read(n)
            if not piece:
                break
            parts.append(piece)
            pos += len(piece)
            paced_bytes += len(piece)
            record.bytes_received = pos
            fake._advance(path, len(piece), received=True)
            fake._fire_due(path, received=True)
        if reader.incomplete:
            self._abort("close")
        return b"".join(parts)


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

class _BaseRoute:
    path = ""
    auth: BasicAuth | DigestAuth | None = None
    #: Whether the route's watches count bytes received (uploads) rather than served.
    watches_received = False

    def __init__(self, faults: Sequence[Fault | None] | None = None,
                 default_fault: Fault | None = None) -> None:
        self._lock = threading.Lock()
        self.faults: list[Fault | None] = list(faults or [])
        self.default_fault = default_fault
        self.request_count = 0

    def set_faults(self, faults: Sequence[Fault | None] | None, default_fault: Fault | None = None) -> None:
        """Replace the per-request fault list (counted again from the next request) and the default."""
        with self._lock:
            self.faults = list(faults or [])
            self.default_fault = default_fault
            self.request_count = 0

    def next_fault(self) -> Fault | None:
        with self._lock:
            index = self.request_count
            self.request_count += 1
            if index < len(self.faults):
                return self.faults[index]
            return self.default_fault

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        """Answer one request; ``query_fault`` comes from the query string (used when no route fault)."""
        raise NotImplementedError


class Route(_BaseRoute):
    """A blob served at ``path``: GET/HEAD with validators, ranges and faults."""

    def __init__(self, path: str, data: bytes, *, etag: bool = True, last_modified: bool = True,
                 weak_etag: bool = False, content_type: str = "application/octet-stream",
                 faults: Sequence[Fault | None] | None = None, default_fault: Fault | None = None,
                 auth: BasicAuth | DigestAuth | None = None, modified: int = DEFAULT_LAST_MODIFIED) -> None:
        super().__init__(faults, default_fault)
        self.path = path
        self.auth = auth
        self.content_type = content_type
        self._validators = (etag, weak_etag, last_modified)
        self._entity = self._build(data, modified)

    @property
    def data(self) -> bytes:
        """The current bytes."""
        return self._entity.data

    @property
    def etag(self) -> str | None:
        """The current ETag header value (quoted, ``W/`` prefixed when weak), or None."""
        return self._entity.etag

    @property
    def last_modified(self) -> str | None:
        """The current Last-Modified header value, or None."""
        return self._entity.last_modified

    def update(self, data: bytes) -> None:
        """Replace the entity: new bytes, their ETag, and a Last-Modified at least one second later.

        The ETag is a content hash, so updating with identical bytes keeps it.
        """
        with self._lock:
            previous = self._entity.last_modified_ts or DEFAULT_LAST_MODIFIED
            modified = max(previous + 1, int(time.time()))
            self._entity = self._build(data, modified)

    def _build(self, data: bytes, modified: int) -> _Entity:
        etag, weak_etag, last_modified = self._validators
        return _Entity.build(data, modified=modified, etag=etag, weak_etag=weak_etag,
                             last_modified=last_modified, content_type=self.content_type)

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        fault = self.next_fault()
        handler.serve_entity(record, self._entity, fault if fault is not None else query_fault, self.auth)


class _FileRoute(_BaseRoute):
    """A file under the server's root, read whole and cached until its mtime or size changes."""

    def __init__(self, path: str, filename: str, cache: dict[str, tuple[tuple[int, int], _Entity]],
                 cache_lock: threading.Lock) -> None:
        super().__init__()
        self.path = path
        self._filename = filename
        self._cache = cache
        self._cache_lock = cache_lock

    def entity(self) -> _Entity:
        stat = os.stat(self._filename)
        key = (stat.st_mtime_ns, stat.st_size)
        with self._cache_lock:
            cached = self._cache.get(self._filename)
            if cached is not None and cached[0] == key:
                return cached[1]
        with open(self._filename, "rb") as f:
            data = f.read()
        entity = _Entity.build(data, modified=int(stat.st_mtime))
        with self._cache_lock:
            self._cache[self._filename] = (key, entity)
        return entity

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        handler.serve_entity(record, self.entity(), query_fault, None)


class _QueryBlobRoute(_BaseRoute):
    """``/blob/<size>?seed=…&<fault>=…``: blob_bytes(size, seed) with the query's faults."""

    def __init__(self, path: str, entity: _Entity) -> None:
        super().__init__()
        self.path = path
        self._entity = entity

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        handler.serve_entity(record, self._entity, query_fault, None)


class _RedirectRoute(_BaseRoute):
    def __init__(self, path: str, location: str, status: int) -> None:
        super().__init__()
        self.path = path
        self.location = location
        self.status = status

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        handler.drain_request_body()
        body = b"redirect to %s\n" % self.location.encode("utf-8", "replace")
        handler.send_plan(record, _plan_fixed(self.status, body, [("Location", self.location)]))


class _StatusRoute(_BaseRoute):
    def __init__(self, path: str, status: int, body: bytes, headers: Mapping[str, str] | None) -> None:
        super().__init__()
        self.path = path
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        handler.drain_request_body()
        html = self.body.lstrip().startswith(b"<")
        content_type = "text/html; charset=utf-8" if html else "text/plain; charset=utf-8"
        handler.send_plan(record, _plan_fixed(self.status, self.body, self.headers.items(), content_type))


class _UploadRoute(_BaseRoute):
    watches_received = True

    def __init__(self, path: str, status: int, auth: BasicAuth | DigestAuth | None,
                 faults: Sequence[Fault | None] | None, default_fault: Fault | None) -> None:
        super().__init__(faults, default_fault)
        self.path = path
        self.status = status
        self.auth = auth
        self.bodies: list[bytes] = []

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        fault = self.next_fault()
        if fault is None:
            fault = query_fault
        body = handler.receive_upload(record, fault, self.auth)
        if body is None:
            return
        digest = hashlib.sha256(body).hexdigest()
        record.upload_sha256 = digest
        status = self.status
        if fault is not None and fault.status is not None:
            handler.send_plan(record, _apply_common(_plan_status_fault(fault), handler.command, fault))
            return
        with self._lock:
            self.bodies.append(body)
        payload = json.dumps({"size": len(body), "sha256": digest}).encode()
        handler.send_plan(record, _plan_fixed(status, payload, content_type="application/json"))


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, fake: FakeServer, address: tuple[str, int]) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer's getfqdn(), which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        number = self.fake._connection_opened(request)
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"fake_server-conn-{number}", daemon=True)
        self.fake._track_thread(thread)
        thread.start()

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.fake.tls is not None:  # the handshake runs in the connection's thread
            sock = self.fake.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            # a failed handshake (e.g. the client refused our certificate) is an OSError: handle_error
            # ignores it and the connection is shut down like any other
            request.settimeout(10.0)
            request.do_handshake()
            request.settimeout(None)
        super().finish_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.fake._connection_closed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (_Aborted, OSError)) or self.fake._stopping.is_set():
            return
        super().handle_error(request, client_address)


_R = TypeVar("_R", bound=_BaseRoute)


class FakeServer:
    """A threaded HTTP/1.1 test server with routes, faults, counters and byte boundaries.

    Use as ``with FakeServer() as srv: ...`` or call ``start()`` and ``stop()``.
    Paths are matched exactly (query strings aside); unknown paths get 404.
    With ``root``, files under it are served at ``/files/<relpath>``; ``/blob/<size>``
    always serves ``blob_bytes(size, seed)`` with faults from the query string.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, host: str = "127.0.0.1",
                 port: int = 0, *, verbose: bool = False, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: a server-side SSLContext (with its certificate loaded) to serve HTTPS."""
        self.tls = tls
        self.root = os.path.realpath(os.fspath(root)) if root is not None else None
        self.host = host
        self.verbose = verbose
        self._requested_port = port
        self._port: int | None = None
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._routes: dict[str, _BaseRoute] = {}
        self._served: dict[str, int] = collections.defaultdict(int)
        self._received: dict[str, int] = collections.defaultdict(int)
        self._records: list[RequestRecord] = []
        self._watches: dict[str, list[_Watch]] = collections.defaultdict(list)
        self._holds: list[Hold] = []
        self._connections_accepted = 0
        self._open_sockets: dict[Any, int] = {}  # socket -> connection number
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._stall_cond = threading.Condition(self._lock)
        self._stall_generation = 0
        self._stalled = 0
        self._file_cache: dict[str, tuple[tuple[int, int], _Entity]] = {}
        self._file_cache_lock = threading.Lock()
        self._blob_cache: collections.OrderedDict[tuple[int, int, bool], _Entity] = collections.OrderedDict()

    # -- lifecycle --------------------------------------------------------

    def start(self) -> FakeServer:
        """Bind and serve in a background thread.  Returns self.

        A server started again after stop() binds the same port as before, so URLs stay
        valid across a simulated outage.
        """
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _HTTPServer(self, (self.host, self._port or self._requested_port))
        self._port = self._httpd.server_address[1]
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever,
                                              kwargs={"poll_interval": ACCEPT_POLL_INTERVAL},
                                              name="fake_server-accept", daemon=True)
        self._serve_thread.start()
        return self

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop serving: release holds and stalls, close connections, join threads (bounded)."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        self.release_stalls()
        with self._lock:
            holds = list(self._holds)
        for hold in holds:
            hold.release()
        httpd.shutdown()
        with self._lock:
            sockets = list(self._open_sockets)
            threads = list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        httpd.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
        self._httpd = None
        self._serve_thread = None

    def __enter__(self) -> FakeServer:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (available after the first start(); kept after stop())."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (``https://`` when serving TLS)."""
        host = self.host if ":" not in self.host else "[%s]" % self.host
        return "%s://%s:%d" % ("https" if self.tls is not None else "http", host, self.port)

    def url(self, path: str) -> str:
        """``base_url + path``; ``path`` starts with "/"."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', not {path!r}")
        return self.base_url + path

    # -- routes -----------------------------------------------------------

    def add_blob(self, path: str, data: bytes | None = None, *, size: int | None = None, seed: int = 0,
                 etag: bool = True, last_modified: bool = True, weak_etag: bool = False,
                 content_type: str = "application/octet-stream", faults: Sequence[Fault | None] | None = None,
                 default_fault: Fault | None = None, auth: BasicAuth | DigestAuth | None = None) -> Route:
        """Serve ``data`` (or ``blob_bytes(size, seed)``) at ``path``; returns the Route."""
        if (data is None) == (size is None):
            raise ValueError("give exactly one of data and size")
        body = data if data is not None else blob_bytes(size or 0, seed)
        route = Route(_check_path(path), body, etag=etag, last_modified=last_modified, weak_etag=weak_etag,
                      content_type=content_type, faults=faults, default_fault=default_fault, auth=auth)
        return self.add_route(route)

    def add_redirect(self, path: str, location: str, status: int = 302) -> _BaseRoute:
        """Answer every request to ``path`` with ``status`` and ``Location: location`` (sent as given)."""
        return self.add_route(_RedirectRoute(_check_path(path), location, status))

    def add_upload(self, path: str, *, status: int = 201, auth: BasicAuth | DigestAuth | None = None,
                   faults: Sequence[Fault | None] | None = None, default_fault: Fault | None = None) -> _BaseRoute:
        """Accept PUT/POST bodies at ``path`` (Content-Length or chunked) and answer JSON size/sha256."""
        return self.add_route(_UploadRoute(_check_path(path), status, auth, faults, default_fault))

    def add_status(self, path: str, status: int, body: bytes = b"",
                   headers: Mapping[str, str] | None = None) -> _BaseRoute:
        """Answer every request to ``path`` with a fixed status, body and headers."""
        return self.add_route(_StatusRoute(_check_path(path), status, body, headers))

    def remove(self, path: str) -> None:
        """Forget the route at ``path`` (it then answers 404)."""
        with self._lock:
            self._routes.pop(path, None)

    def route(self, path: str) -> _BaseRoute | None:
        """The route added at ``path``, or None."""
        with self._lock:
            return self._routes.get(path)

    def uploads(self, path: str) -> list[bytes]:
        """Complete upload bodies received at ``path`` and answered with success, in order."""
        route = self.route(path)
        if not isinstance(route, _UploadRoute):
            raise KeyError(f"no upload route at {path!r}")
        with route._lock:
            return list(route.bodies)

    def add_route(self, route: _R) -> _R:
        """Serve *route* at ``route.path`` (replacing what was there): for a Route subclass of
        a test's own; the ``add_*`` methods cover the usual cases."""
        with self._lock:
            self._routes[route.path] = route
        return route

    def _resolve(self, path: str, query: Mapping[str, str]) -> _BaseRoute | None:
        with self._lock:
            route = self._routes.get(path) or self._routes.get(urllib.parse.unquote(path))
        if route is not None:
            return route
        if self.root is not None and path.startswith("/files/"):
            relpath = urllib.parse.unquote(path[len("/files/"):])
            filename = os.path.realpath(os.path.join(self.root, relpath))
            if filename.startswith(self.root + os.sep) and os.path.isfile(filename):
                return _FileRoute(path, filename, self._file_cache, self._file_cache_lock)
            return None
        match = _BLOB_PATH.match(path)
        if match:
            size = int(match.group(1))
            if size > MAX_QUERY_BLOB:
                raise ValueError(f"blob size {size} is above {MAX_QUERY_BLOB}")
            seed = int(query.get("seed", "0"))
            weak = _parse_bool(query["weak_etag"]) if "weak_etag" in query else False
            return _QueryBlobRoute(path, self._query_blob(size, seed, weak))
        return None

    def _query_blob(self, size: int, seed: int, weak: bool) -> _Entity:
        key = (size, seed, weak)
        with self._lock:
            entity = self._blob_cache.get(key)
            if entity is not None:
                self._blob_cache.move_to_end(key)
                return entity
        entity = _Entity.build(blob_bytes(size, seed), modified=DEFAULT_LAST_MODIFIED, weak_etag=weak)
        with self._lock:
            self._blob_cache[key] = entity
            while len(self._blob_cache) > QUERY_BLOB_CACHE_ENTRIES:
                self._blob_cache.popitem(last=False)
        return entity

    # -- counters and records ----------------------------------------------

    def bytes_served(self, path: str) -> int:
        """Response body bytes written to sockets for ``path`` (cumulative since reset_counters())."""
        with self._lock:
            return self._served.get(_strip_query(path), 0)

    def bytes_received(self, path: str) -> int:
        """Request body bytes read for ``path`` (uploads)."""
        with self._lock:
            return self._received.get(_strip_query(path), 0)

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """Snapshots of the requests seen (all, or those to ``path``), oldest first."""
        with self._lock:
            records = list(self._records)
        if path is not None:
            wanted = _strip_query(path)
            records = [r for r in records if r.path == wanted]
        return [dataclasses.replace(r, headers=dict(r.headers)) for r in records]

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start (or reset_counters())."""
        with self._lock:
            return self._connections_accepted

    def reset_counters(self) -> None:
        """Zero bytes served/received, forget request records and the connection count.

        Fault positions of routes and armed watches are kept (watches then count from zero).
        """
        with self._lock:
            self._served.clear()
            self._received.clear()
            self._records.clear()
            self._connections_accepted = 0

    def on_bytes(self, path: str, nbytes: int, callback: Callable[[str, int], Any]) -> None:
        """Call ``callback(path, served)`` once, in the handler thread, when ``path`` reaches ``nbytes``.

        The handler sends exactly up to the boundary, calls the callback, then goes on
        (quietly failing if the client is gone).  For an upload route the count is of
        bytes received.
        """
        self._arm(_Watch(_strip_query(path), nbytes, callback=callback))

    def hold_at(self, path: str, nbytes: int) -> Hold:
        """Stop the handler at ``nbytes`` on ``path`` until ``hold.release()`` (or stop())."""
        return self._hold(path, nbytes)

    def release_stalls(self) -> None:
        """End every stall in progress (timed ones too); later stalls are not affected."""
        with self._stall_cond:
            self._stall_generation += 1
            self._stall_cond.notify_all()

    def wait_stalled(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until at least ``count`` handlers are inside a stall; False on timeout.

        Call it before ``release_stalls()``: a release only ends stalls already begun.
        """
        with self._stall_cond:
            return self._stall_cond.wait_for(lambda: self._stalled >= count, timeout)

    def _hold(self, path: str, nbytes: int, action: Callable[[], Any] | None = None,
              auto_release: bool = False) -> Hold:
        hold = Hold(_strip_query(path), nbytes, action=action, auto_release=auto_release)
        with self._lock:
            self._holds.append(hold)
        if self._stopping.is_set():
            hold.release()
        self._arm(_Watch(hold.path, nbytes, hold=hold))
        return hold

    def _arm(self, watch: _Watch) -> None:
        if watch.nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {watch.nbytes}")
        with self._lock:
            self._watches[watch.path].append(watch)
            self._watches[watch.path].sort(key=lambda w: w.nbytes)

    def _counter(self, received: bool) -> dict[str, int]:
        return self._received if received else self._served

    def _room(self, path: str, received: bool) -> int:
        """Bytes that may be moved on ``path`` before the next armed watch."""
        with self._lock:
            count = self._counter(received)[path]
            room = [w.nbytes - count for w in self._watches.get(path, ()) if not w.fired and w.nbytes > count]
        return min(room) if room else CHUNK_SIZE

    def _advance(self, path: str, n: int, received: bool) -> None:
        with self._lock:
            self._counter(received)[path] += n

    def _fire_due(self, path: str, received: bool) -> None:
        with self._lock:
            route = self._routes.get(path)
            if route is not None and route.watches_received != received:
                return
            count = self._counter(received)[path]
            due = [w for w in self._watches.get(path, ()) if not w.fired and w.nbytes <= count]
            for watch in due:
                watch.fired = True
        for watch in due:
            if watch.callback is not None:
                try:
                    watch.callback(path, count)
                except Exception:  # noqa: BLE001 - a test callback's failure must not kill the handler
                    traceback.print_exc()
            if watch.hold is not None:
                watch.hold._arrive(count)

    def _wait_stall(self, seconds: float | None) -> bool:
        """Wait out a stall; False if the server is stopping."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with self._stall_cond:
            generation = self._stall_generation
            self._stalled += 1
            self._stall_cond.notify_all()
            try:
                while self._stall_generation == generation and not self._stopping.is_set():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._stall_cond.wait(remaining)
            finally:
                self._stalled -= 1
        return not self._stopping.is_set()

    def _begin_record(self, handler: _Handler, path: str, query: str) -> RequestRecord:
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            headers[key] = headers[key] + ", " + value if key in headers else value
        with self._lock:
            record = RequestRecord(method=handler.command, path=path, query=query, headers=headers,
                                   client_port=handler.client_address[1],
                                   connection=self._open_sockets.get(handler.request, 0),
                                   range_header=headers.get("range"))
            self._records.append(record)
        return record

    def _connection_opened(self, sock: Any) -> int:
        with self._lock:
            self._connections_accepted += 1
            number = self._connections_accepted
            self._open_sockets[sock] = number
        if self._stopping.is_set():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return number

    def _connection_closed(self, sock: Any) -> None:
        with self._lock:
            self._open_sockets.pop(sock, None)
            self._threads.discard(threading.current_thread())

    def _track_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.add(thread)


def _check_path(path: str) -> str:
    if not path.startswith("/") or "?" in path:
        raise ValueError(f"a route path starts with '/' and has no query: {path!r}")
    return path


def _strip_query(path: str) -> str:
    return path.split("?", 1)[0]


# ---------------------------------------------------------------------------
# The process controller
# ---------------------------------------------------------------------------

@dataclass
class _Launch:
    process: subprocess.Popen  # type: ignore[type-arg]
    background: bool


class AppController:
    """Launches an "app" as a real subprocess, SIGKILLs it, relaunches it in the background.

    ``env`` holds variables laid over ``os.environ`` (a value of None removes one).
    A background launch adds ``BGSESSION_BACKGROUND_EVENTS=<identifier>``; a normal
    launch removes that variable.  ``output`` is a file path that collects the app's
    stdout and stderr (appended, every launch), or None to inherit this process's.
    Only the app process is killed, not processes it started (a daemon it spawned
    survives, as nsurlsessiond survives the app on iOS).
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str | None] | None = None,
                 cwd: str | os.PathLike[str] | None = None, identifier: str | None = None,
                 output: str | os.PathLike[str] | None = None) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.identifier = identifier
        self.output = output
        self._lock = threading.Lock()
        self._launches: list[_Launch] = []

    @property
    def process(self) -> subprocess.Popen | None:  # type: ignore[type-arg]
        """The most recently launched process, or None."""
        with self._lock:
            return self._launches[-1].process if self._launches else None

    @property
    def launches(self) -> list[tuple[int, bool, int | None]]:
        """(pid, background, returncode or None while running) per launch, oldest first."""
        with self._lock:
            launches = list(self._launches)
        for launch in launches:
            launch.process.poll()
        return [(x.process.pid, x.background, x.process.returncode) for x in launches]

    def launch(self, background: bool = False) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start the app; ``background=True`` marks it a background launch for ``identifier``."""
        if background and not self.identifier:
            raise ValueError("a background launch needs an identifier")
        env = dict(os.environ)
        env.pop(BACKGROUND_EVENTS_ENV, None)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        if background:
            env[BACKGROUND_EVENTS_ENV] = str(self.identifier)
        out = None
        if self.output is not None:
            out = open(self.output, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            process = subprocess.Popen(self.argv, env=env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT if out is not None else None)
        finally:
            if out is not None:
                out.close()
        with self._lock:
            self._launches.append(_Launch(process, background))
        return process

    def kill_when(self, server: FakeServer, path: str, nbytes: int) -> Hold:
        """When ``path`` reaches ``nbytes`` on ``server``, SIGKILL and reap the current app, then go on.

        Returns the Hold; its ``reached`` is set after the kill and reap.
        """
        return server._hold(path, nbytes, action=self.kill, auto_release=True)

    def kill(self) -> int | None:
        """SIGKILL the current app (if running) and reap it; returns its return code."""
        process = self.process
        if process is None:
            return None
        return _kill_and_reap(process)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the current app to exit and return its code; TimeoutError after ``timeout``."""
        process = self.process
        if process is None:
            raise RuntimeError("no app launched")
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"app pid {process.pid} still running after {timeout} s") from err

    def close(self) -> None:
        """SIGKILL and reap every launched process still running."""
        with self._lock:
            launches = list(self._launches)
        for launch in launches:
            _kill_and_reap(launch.process)

    def __enter__(self) -> AppController:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _kill_and_reap(process: subprocess.Popen) -> int:  # type: ignore[type-arg]
    if process.poll() is None:
        try:
            if _SIGKILL is not None:
                os.kill(process.pid, _SIGKILL)
            else:
                process.kill()
        except ProcessLookupError:
            pass
    return process.wait()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fake_server.py",
        description="Serve files and deterministic blobs with injectable faults (bgsession's test server).",
        epilog="Routes: /files/<relpath> (with --root) and /blob/<size>?seed=N&<fault>=<value>, "
               "where <fault> is any Fault field, e.g. cut_after=1000, status=503&retry_after=1, "
               "ignore_range=1, chunked=1, throttle=100000.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind, 0 for any free port (default 8000)")
    parser.add_argument("--root", help="directory served under /files/")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)
    if args.root is not None and not os.path.isdir(args.root):
        parser.error(f"--root {args.root!r} is not a directory")

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server = FakeServer(root=args.root, host=args.host, port=args.port, verbose=not args.quiet)
    try:
        server.start()
    except OSError as err:
        print(f"fake_server.py: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    try:
        print(f"serving on {server.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
