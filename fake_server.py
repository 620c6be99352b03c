"""A fake HTTP/1.1 server and app-process controller for bgsession's tests and demo.

``FakeServer`` is a threaded standard-library HTTP/1.1 server (keep-alive, daemon
threads, ``127.0.0.1`` on a free port by default) that serves deterministic blobs
with strong validators and exact ``Range``/``If-Range``/``416`` semantics, accepts
uploads, answers Basic, Digest and Bearer challenges and presigned URLs that expire
(``SignedURLs``: a 403), redirects, and misbehaves on demand: a *fault matrix*
(``Fault``) chosen per route and per request cuts, resets, stalls, throttles, drips
its head, lies about ranges, totals and lengths, ignores ``If-Range``, or answers
with an error status.  Made with ``proxy=True`` it is also a forward proxy:
absolute-form requests are forwarded, ``CONNECT`` opens a tunnel, ``proxy_auth``
asks for credentials with a 407, ``map_host`` resolves names no DNS knows, and
``stop()`` cuts what it relays (a proxy that dies).

It also *observes*: body bytes served per path, every request (with the port it came
to and when), TCP connections accepted, the most connections and requests there were
at once (``peak_connections``, ``peak_requests``), and byte boundaries on a path at
which a callback runs or the serving thread holds still (``on_bytes``, ``hold_at``),
so a test can kill a client at an exact offset.  ``add_ports`` makes one server many
hosts: more ports, the same routes and counters.  ``AppController`` launches an app as a real subprocess, SIGKILLs it
at such a boundary and relaunches it as a "background launch"; it also adopts the
app processes that bgsession's daemon launches and kills them, or the daemon, by
pid and start token (``ProcessRef``), never hitting a recycled pid.

Sections, each using only what is above it: blobs and entities; faults and the
response plan (pure: request headers + entity + fault -> status, headers, body
span); authentication; observation (request records, holds, the traffic counters,
byte boundaries, stalls); the forward proxy's state; the HTTP handler (I/O); routes and the route table; the
server (its lifecycle in ``_Listener``, ``FakeServer`` a facade over the parts);
processes and ``AppController``; the test kit; the command line.

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

**The test kit for an app** (README, "Testing your app"): ``FakeServer`` and ``Fault``, ``AppController``
(launch, SIGKILL at a byte offset, ``wait_relaunch()`` for the daemon's background relaunch, ``stop_daemon()``),
``app_sandbox()`` (an app with its own home and working directory), ``Ledger`` (an app's fsynced record of its
hooks), and two pytest fixtures, ``bg_server`` and ``bg_app``, defined when pytest imports this module
(``pytest_plugins = ["fake_server"]``).

Standard library only; Python 3.9+.  Run ``python fake_server.py --help`` for the
command line (``/files/`` from a directory, ``/blob/<size>?faults…``).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import email.utils
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import secrets
import select
import selectors
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
import typing
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, TypeVar

__version__ = "0.1.0"

__all__ = [
    "BACKGROUND_EVENTS_ENV",
    "CHUNK_SIZE",
    "DEFAULT_LAST_MODIFIED",
    "FAULT_STAGES",
    "AppController",
    "AppProcess",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "DigestAuth",
    "FakeServer",
    "Fault",
    "Hold",
    "Ledger",
    "ProcessRef",
    "RequestRecord",
    "Route",
    "SignedURLs",
    "app_sandbox",
    "blob_bytes",
    "process_start_token",
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
#: How often a process is checked for its exit where the OS gives no pidfd to wait on.
PROCESS_POLL_INTERVAL = 0.01
#: How long a SIGKILLed process may take to exit before a kill gives up waiting (TimeoutError).
DEFAULT_KILL_TIMEOUT = 10.0

_BLOB_PATH = re.compile(r"^/blob/([0-9]+)$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$", re.IGNORECASE)
_AUTH_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_NC = re.compile(r"^[0-9a-fA-F]{8}$")
_SIGKILL: int | None = getattr(signal, "SIGKILL", None)


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

#: The stages of a request that read a ``Fault``, and the functions that make up each.  Every
#: field of ``Fault`` names its stages in its ``#: Stages:`` comment; test_fake_server.py checks
#: those comments against the attribute reads of these functions (a new reader belongs to a stage).
FAULT_STAGES: dict[str, tuple[str, ...]] = {
    # deciding status, headers and which body bytes to send (pure: no I/O)
    "planning": ("_plan_response", "_plan_status_fault", "_apply_common"),
    # before any byte of the response: resets, delays, whether to challenge for credentials
    "pre-response": ("_Handler._pre_response_faults", "_Handler.serve_entity"),
    # writing the planned body (the plan carries the fields it needs)
    "body sending": ("_Handler.send_plan", "_Handler._send_body"),
    # reading an upload's request body
    "upload reading": ("_Handler._read_body",),
    # answering an upload whose body was read
    "upload answer": ("_UploadRoute.serve",),
}


@dataclass(frozen=True)
class Fault:
    """How one response misbehaves.  Every field defaults to "behave normally".

    Body faults count *body* bytes of this response (chunk framing excluded).  On an
    upload route, ``cut_after``/``stall_*``/``throttle`` apply to reading the request
    body instead, and ``status`` is sent after the body was read.  ``reset`` without
    ``cut_after`` resets the connection before any response.  ``wrong_total``,
    ``malformed_range`` and ``early_206`` only change a response that is a 206.
    Each field's comment names the stages (``FAULT_STAGES``) that read it.
    """

    #: Stages: planning, pre-response, upload reading.
    #: Send only this many body bytes, then close (reset, with ``reset``); an upload is read up to
    #: here, then the connection closes.  Pre-response only checks it is unset (``reset`` alone).
    cut_after: int | None = None
    #: Stages: planning, pre-response, upload reading.
    #: End with RST instead of FIN: at ``cut_after``, or before any response when ``cut_after`` is unset.
    reset: bool = False
    #: Stages: planning, body sending, upload reading.
    #: Stop after this many body bytes (sent, or read on an upload) for ``stall_seconds`` or until
    #: ``release_stalls()``.
    stall_after: int | None = None
    #: Stages: planning, body sending, upload reading.
    #: How long a stall lasts (None: until ``release_stalls()`` or stop()).
    stall_seconds: float | None = None
    #: Stages: planning, body sending, upload reading.
    #: Pace the body (sent, or read on an upload) to this many bytes per second.
    throttle: int | None = None
    #: Stages: planning, pre-response, upload answer.
    #: Answer this status with a small body instead of the entity (a GET or HEAD is not asked for
    #: credentials first); an upload's body is read, and credentials checked, first.
    status: int | None = None
    #: Stages: planning.
    #: The Retry-After value sent with ``status``.
    retry_after: str | None = None
    #: Stages: planning.
    #: Answer 200 with the whole entity whatever the Range header asks.
    ignore_range: bool = False
    #: Stages: planning.
    #: A 206 starts this many bytes before the requested first byte (Content-Range says so).
    early_206: int | None = None
    #: Stages: planning.
    #: A 206's Content-Range claims a total 1000 bytes larger than the entity.
    wrong_total: bool = False
    #: Stages: planning.
    #: A 206's Content-Range is not parseable.
    malformed_range: bool = False
    #: Stages: planning, body sending.
    #: Send the body with chunked transfer coding instead of Content-Length.
    chunked: bool = False
    #: Stages: planning.
    #: Announce the full length but send this many bytes less, then close.
    short_body: int | None = None
    #: Stages: planning.
    #: Add an ``X-Huge-Header`` of this many bytes.
    huge_header: int | None = None
    #: Stages: planning.
    #: Send neither ETag nor Last-Modified.
    drop_validators: bool = False
    #: Stages: planning.
    #: Send this ETag instead of the entity's (If-Range is still checked against the entity's own: a server that
    #: labels one entity with another's validator).
    etag: str | None = None
    #: Stages: planning.
    #: Send no ``Accept-Ranges`` header (Range requests are still honoured).
    no_accept_ranges: bool = False
    #: Stages: pre-response.
    #: Wait this many seconds before answering (after the request was read).
    delay: float | None = None
    #: Stages: planning, body sending.
    #: Send the status line and headers one byte every this many seconds (a slowloris server).
    drip: float | None = None
    #: Stages: planning.
    #: Serve the Range even when If-Range does not match (a cache that ignores If-Range: another entity's bytes).
    ignore_if_range: bool = False
    #: Stages: planning.
    #: Announce this Content-Length whatever the body; send at most that many bytes, then close.
    claim_length: int | None = None
    #: Stages: planning.
    #: A 206 ends at this byte (inclusive) whatever was asked (with ``early_206``: one that ends before the offset).
    range_end: int | None = None
    #: Stages: planning.
    #: A 206 keeps its Content-Range but announces Content-Length 0 and sends no body.
    empty_206: bool = False


    def __post_init__(self) -> None:
        for name in ("cut_after", "stall_after", "early_206", "short_body", "huge_header", "claim_length",
                     "range_end"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Fault.{name} must be >= 0, not {value}")
        if self.throttle is not None and self.throttle <= 0:
            raise ValueError(f"Fault.throttle must be > 0 bytes per second, not {self.throttle}")
        for name in ("stall_seconds", "delay", "drip"):
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
            elif f.name in ("stall_seconds", "delay", "drip"):
                kwargs[f.name] = float(raw)
            elif f.name in ("retry_after", "etag"):
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
    drip: float | None = None

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
    headers: list[tuple[str, str]] = [("Accept-Ranges", "bytes")] if not fault.no_accept_ranges else []
    headers.append(("Content-Type", entity.content_type))
    if not fault.drop_validators:
        if fault.etag or entity.etag:
            headers.append(("ETag", fault.etag or entity.etag or ""))
        if entity.last_modified:
            headers.append(("Last-Modified", entity.last_modified))

    requested = None if fault.ignore_range else _parse_range(_get(request_headers, "range"))
    if requested is not None:
        if_range = _get(request_headers, "if-range")
        if if_range is not None and not _if_range_matches(if_range, entity) and not fault.ignore_if_range:
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
    if fault.range_end is not None:
        last = max(first, min(last, fault.range_end))
    total = size + 1000 if fault.wrong_total else size
    if fault.malformed_range:
        content_range = "bytes garbage-%d/unknown" % first
    else:
        content_range = "bytes %d-%d/%d" % (first, last, total)
    headers.append(("Content-Range", content_range))
    plan = _Plan(status=206, headers=tuple(headers), span=(first, last + 1),
                 send=last + 1 - first, watched=True)
    if fault.empty_206:
        plan = dataclasses.replace(plan, span=(first, first), send=0)
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
    if fault.claim_length is not None:
        send = min(send, fault.claim_length)
        abort = abort or "close"
    if fault.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        headers.append(("Content-Length", str(length if fault.claim_length is None else fault.claim_length)))
    return dataclasses.replace(
        plan, headers=tuple(headers), send=send, abort=abort, chunked=fault.chunked,
        stall_after=fault.stall_after, stall_seconds=fault.stall_seconds, throttle=fault.throttle, drip=fault.drip)


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


class BearerAuth:
    """A bearer token (RFC 6750): ``Authorization: Bearer <token>``, else a 401 with
    ``WWW-Authenticate: Bearer``.  Set ``token`` to rotate it: the old one is refused from then on."""

    scheme = "Bearer"

    def __init__(self, token: str, realm: str = "fake") -> None:
        self.token = token
        self.realm = realm

    def challenge(self) -> str:
        """The WWW-Authenticate value sent with a 401."""
        return 'Bearer realm="%s"' % self.realm

    def check(self, method: str, target: str, authorization: str | None) -> bool | str:
        """True when ``authorization`` carries the current token."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token.encode())


class SignedURLs:
    """Presigned URLs, as object stores issue them: a request passes when its query carries a
    signature issued here (``?sig=…``) that has not expired; anything else gets a 403, the way S3
    answers an expired presigned URL.  ``sign(url)`` issues one; ``expire()`` ends them all."""

    scheme = None
    #: The status of a request whose signature is missing, unknown or expired.
    failure_status = 403

    def __init__(self, param: str = "sig") -> None:
        self.param = param
        self._lock = threading.Lock()
        self._valid: set[str] = set()

    def sign(self, url: str) -> str:
        """``url`` with a new valid signature in its query."""
        token = secrets.token_hex(8)
        with self._lock:
            self._valid.add(token)
        return "%s%s%s=%s" % (url, "&" if "?" in url else "?", self.param, token)

    def expire(self) -> None:
        """Every signature issued so far stops working (new ones from ``sign`` work)."""
        with self._lock:
            self._valid.clear()

    def challenge(self) -> str | None:
        """No WWW-Authenticate: a 403 is not a challenge."""
        return None

    def check(self, method: str, target: str, authorization: str | None) -> bool | str:
        """True when the request target's query carries a valid signature."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        with self._lock:
            return any(sig in self._valid for sig in query.get(self.param, []))


#: What a route's ``auth`` may be: credentials checked on every request to it.
Auth = typing.Union[BasicAuth, DigestAuth, BearerAuth, SignedURLs]


def _parse_auth_params(text: str) -> dict[str, str]:
    params = {}
    for match in _AUTH_PARAM.finditer(text):
        key, value = match.group(1).lower(), match.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key] = value
    return params


# ---------------------------------------------------------------------------
# Observation: request records, holds, traffic counters, byte boundaries, stalls
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
    #: The server port it came in on (see ``FakeServer.add_ports``).
    port: int = 0
    #: When it arrived (wall clock, ``time.time()``).
    time: float = 0.0
    #: The entity's offset of the first body byte of the answer (0 for a 200, the first byte of a 206's range), or
    #: None for an answer that is not the entity: the entity's bytes ``[first_byte, first_byte + bytes_sent)`` went out.
    first_byte: int | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup."""
        return self.headers.get(name.lower(), default)


class Hold:
    """A byte boundary on a path at which the serving thread stops until ``release()``.

    ``reached`` is set when the boundary is reached (after the action, if any, for
    ``AppController.kill_when``); ``served`` is the path's byte count at that moment.
    """

    def __init__(self, path: str, nbytes: int, action: Callable[[Hold], Any] | None = None,
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
                self._action(self)
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


def _check_path(path: str) -> str:
    if not path.startswith("/") or "?" in path:
        raise ValueError(f"a route path starts with '/' and has no query: {path!r}")
    return path


def _strip_query(path: str) -> str:
    return path.split("?", 1)[0]


#: How long a new peak of open connections waits for a connection's end already on its way (seconds).
PEAK_GRACE = 0.1


def _closes_arrive(socks: list[Any], timeout: float) -> bool:
    """Wait up to *timeout* for any of *socks* to be closed by the client (Linux: POLLRDHUP; elsewhere False at
    once); whether one was."""
    rdhup = getattr(select, "POLLRDHUP", None)
    if rdhup is None or not hasattr(select, "poll") or not socks:
        return False
    poller = select.poll()
    for sock in socks:
        with contextlib.suppress(ValueError, OSError):
            poller.register(sock.fileno(), rdhup)
    return bool(poller.poll(timeout * 1000))


def _peer_closed(sock: Any) -> bool:
    """Whether the client has closed the connection (or shut down its sending side) as far as the kernel knows,
    though the handler may not have read the end yet.  Linux only (POLLRDHUP); elsewhere always False."""
    rdhup = getattr(select, "POLLRDHUP", None)
    if rdhup is None or not hasattr(select, "poll"):
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), rdhup)
    except (ValueError, OSError):
        return True  # already closed here
    return bool(poller.poll(0))


class _Traffic:
    """What the server has seen: body bytes per path each way, the requests, the connections, and the most
    connections and requests there were at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: dict[str, int] = collections.defaultdict(int)
        self._received: dict[str, int] = collections.defaultdict(int)
        self._records: list[RequestRecord] = []
        self._accepted = 0
        self._open: dict[Any, int] = {}  # socket -> connection number
        self._in_flight: dict[int, tuple[RequestRecord, Any]] = {}  # id(record) -> (record, its socket)
        self.peak_connections = 0
        self.peak_requests = 0

    def count(self, path: str, received: bool) -> int:
        """Body bytes moved on ``path`` so far: received (uploads) or served."""
        with self._lock:
            return (self._received if received else self._served).get(_strip_query(path), 0)

    def advance(self, path: str, n: int, received: bool) -> None:
        """Count ``n`` more body bytes on ``path`` (negative: take back bytes a failed write did not send)."""
        with self._lock:
            (self._received if received else self._served)[path] += n

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        with self._lock:
            records = list(self._records)
        if path is not None:
            wanted = _strip_query(path)
            records = [r for r in records if r.path == wanted]
        return [dataclasses.replace(r, headers=dict(r.headers)) for r in records]

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return self._accepted

    def reset(self) -> None:
        with self._lock:
            self._served.clear()
            self._received.clear()
            self._records.clear()
            self._accepted = 0
            self.peak_connections = self.peak_requests = 0

    @contextlib.contextmanager
    def request(self, method: str, path: str, query: str, headers: Iterable[tuple[str, str]], client_port: int,
                sock: Any) -> Iterator[RequestRecord]:
        """Record a request as it arrives (its status and byte counts are filled in as it is answered); it counts
        as in flight until the ``with`` block ends, however it ends."""
        record = self._begin_record(method, path, query, headers, client_port, sock)
        try:
            yield record
        finally:
            with self._lock:
                self._in_flight.pop(id(record), None)

    def _begin_record(self, method: str, path: str, query: str, headers: Iterable[tuple[str, str]],
                      client_port: int, sock: Any) -> RequestRecord:
        folded: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            folded[key] = folded[key] + ", " + value if key in folded else value
        try:
            port = int(sock.getsockname()[1])
        except (OSError, IndexError, TypeError):
            port = 0
        with self._lock:
            record = RequestRecord(method=method, path=path, query=query, headers=folded, client_port=client_port,
                                   connection=self._open.get(sock, 0), range_header=folded.get("range"), port=port,
                                   time=time.time())
            self._records.append(record)
            others = [other for _, other in self._in_flight.values()]
            self._in_flight[id(record)] = (record, sock)
            self.peak_requests = max(self.peak_requests, 1 + self._still_open(others, self.peak_requests))
        return record

    def _still_open(self, socks: list[Any], peak: int) -> int:
        """How many of *socks* the client has not closed.  Whether a request is over is up to the client, who may
        have read a whole response, closed that connection and sent the next request on another before the handler
        that wrote the response has run again: a request whose connection the client has closed is over.  Where
        the count would make a new peak, an end already on its way gets a moment (``PEAK_GRACE``) to arrive."""
        live = [sock for sock in socks if not _peer_closed(sock)]
        if len(live) + 1 > peak and _closes_arrive(live, PEAK_GRACE):
            live = [sock for sock in live if not _peer_closed(sock)]
        return len(live)

    def connection_opened(self, sock: Any) -> int:
        """Number a new connection (1, 2, ... since start or reset); count the connections open with it (those the
        client has closed count as closed, though their handler may not have seen it yet)."""
        with self._lock:
            self._accepted += 1
            self.peak_connections = max(self.peak_connections, 1 + self._still_open(list(self._open),
                                                                                     self.peak_connections))
            self._open[sock] = self._accepted
            return self._accepted

    def connection_closed(self, sock: Any) -> None:
        with self._lock:
            self._open.pop(sock, None)

    def open_sockets(self) -> list[Any]:
        with self._lock:
            return list(self._open)


class _Boundaries:
    """Byte boundaries armed on paths: callbacks (``on_bytes``) and holds (``hold_at``).

    A handler asks ``room()`` how far it may go before the next boundary and calls ``fire_due()``
    with the path's count after every move; the callbacks and holds then run in that handler's thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[str, list[_Watch]] = collections.defaultdict(list)
        self._holds: list[Hold] = []

    def arm(self, watch: _Watch) -> None:
        if watch.nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {watch.nbytes}")
        with self._lock:
            self._watches[watch.path].append(watch)
            self._watches[watch.path].sort(key=lambda w: w.nbytes)

    def hold(self, path: str, nbytes: int, action: Callable[[Hold], Any] | None = None,
             auto_release: bool = False) -> Hold:
        hold = Hold(_strip_query(path), nbytes, action=action, auto_release=auto_release)
        with self._lock:
            self._holds.append(hold)
        self.arm(_Watch(hold.path, nbytes, hold=hold))
        return hold

    def release_holds(self) -> None:
        """Release every hold armed so far (reached or not)."""
        with self._lock:
            holds = list(self._holds)
        for hold in holds:
            hold.release()

    def room(self, path: str, count: int) -> int:
        """Bytes that may be moved on ``path``, now at ``count``, before its next armed boundary."""
        with self._lock:
            room = [w.nbytes - count for w in self._watches.get(path, ()) if not w.fired and w.nbytes > count]
        return min(room) if room else CHUNK_SIZE

    def fire_due(self, path: str, count: int) -> None:
        """Fire every boundary on ``path`` at or below ``count``, once each (callbacks, then holds wait)."""
        with self._lock:
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


class _Stalls:
    """Handlers inside a ``Fault.stall_*`` stall: counted, and ended together by ``release()``."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._cond = threading.Condition()
        self._generation = 0
        self._stalled = 0

    def release(self) -> None:
        """End every stall in progress; later stalls are not affected."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait_stalled(self, count: int, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stalled >= count, timeout)

    def stall(self, seconds: float | None) -> bool:
        """Wait out a stall of ``seconds`` (None: until released); False if the server is stopping."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with self._cond:
            generation = self._generation
            self._stalled += 1
            self._cond.notify_all()
            try:
                while self._generation == generation and not self._stopping.is_set():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
            finally:
                self._stalled -= 1
        return not self._stopping.is_set()


class _Meter:
    """One body's bytes on its path, in one direction: counted, and stopped at the path's boundaries.

    ``watched`` is False for bodies that boundaries do not watch (error pages, the other direction
    of the route): they are counted but never held.
    """

    def __init__(self, traffic: _Traffic, boundaries: _Boundaries, path: str, received: bool,
                 watched: bool) -> None:
        self._traffic = traffic
        self._boundaries = boundaries
        self._path = path
        self._received = received
        self.watched = watched

    def room(self) -> int:
        if not self.watched:
            return CHUNK_SIZE
        return self._boundaries.room(self._path, self._traffic.count(self._path, self._received))

    def add(self, n: int) -> None:
        self._traffic.advance(self._path, n, self._received)

    def fire(self) -> None:
        if self.watched:
            self._boundaries.fire_due(self._path, self._traffic.count(self._path, self._received))


# ---------------------------------------------------------------------------
# The forward proxy (a FakeServer made with proxy=True)
# ---------------------------------------------------------------------------

#: Headers a proxy does not pass on (hop-by-hop, and the proxy's own credentials).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
#: Seconds the proxy waits to connect to an upstream server.
PROXY_CONNECT_TIMEOUT = 10.0


class _ProxyState:
    """Proxy mode: the credentials the proxy asks for (``auth``: a 407 without them), host names it
    resolves itself (``hosts``: name -> address, so that a test can use names no DNS knows), and the
    upstream sockets it holds, which ``cut()`` shuts down when the server stops (a proxy that dies)."""

    def __init__(self) -> None:
        self.auth: BasicAuth | None = None
        self.hosts: dict[str, str] = {}
        self._lock = threading.Lock()
        self._upstreams: set[socket.socket] = set()

    def connect(self, host: str, port: int) -> socket.socket:
        """A connection to ``host:port`` (``hosts`` first, then the system's resolver)."""
        with self._lock:
            address = self.hosts.get(host.lower(), host)
        sock = socket.create_connection((address, port), PROXY_CONNECT_TIMEOUT)
        with self._lock:
            self._upstreams.add(sock)
        return sock

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self._upstreams.discard(sock)
        sock.close()

    def cut(self) -> None:
        with self._lock:
            upstreams = list(self._upstreams)
        for sock in upstreams:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


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
    #: The route answering the current request (set by _dispatch).
    _route: _BaseRoute | None = None

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
        if self.server.parts.verbose:
            sys.stderr.write("%s - - [%s] %s\n" % (self.address_string(), self.log_date_time_string(),
                                                   format % args))

    def _dispatch(self) -> None:
        parts = self.server.parts
        if parts.proxy is not None and not self.path.startswith("/"):
            self._proxy_forward()  # an absolute-form target: this server is the client's proxy
            return
        split = urllib.parse.urlsplit(self.path)
        path = split.path or "/"
        with parts.traffic.request(self.command, path, split.query, self.headers.items(), self.client_address[1],
                                   self.request) as record:
            self._answer(record, path, split.query)

    def _answer(self, record: RequestRecord, path: str, query_text: str) -> None:
        query = dict(urllib.parse.parse_qsl(query_text, keep_blank_values=True))
        self._route = None
        try:
            route = self.server.parts.routes.resolve(path, query)
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
        self._route = route
        route.serve(self, record, query_fault)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # -- proxy mode -------------------------------------------------------

    def do_CONNECT(self) -> None:
        """Open a tunnel to ``host:port`` and relay bytes both ways until either side closes."""
        with self.server.parts.traffic.request("CONNECT", self.path, "", self.headers.items(),
                                               self.client_address[1], self.request) as record:
            self._tunnel(record)

    def _tunnel(self, record: RequestRecord) -> None:
        parts = self.server.parts
        if parts.proxy is None:
            self.send_plan(record, _plan_fixed(405, b"not a proxy\n"))
            return
        if not self._proxy_authorized(record):
            return
        host, _, port = self.path.rpartition(":")
        try:
            upstream = parts.proxy.connect(host.strip("[]"), int(port))
        except (OSError, ValueError):
            self.send_plan(record, _plan_fixed(502, b"cannot connect upstream\n"))
            return
        try:
            record.status = 200
            self.send_response_only(200, "Connection established")
            self.end_headers()
            self.close_connection = True
            self._relay(record, upstream)
        finally:
            parts.proxy.release(upstream)

    def _relay(self, record: RequestRecord, upstream: socket.socket) -> None:
        client, stopping = self.connection, self.server.parts.stopping
        while not stopping.is_set():
            readable, _, _ = select.select([client, upstream], [], [], 0.2)
            for sock in readable:
                try:
                    data = sock.recv(CHUNK_SIZE)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
                except OSError:
                    return
                if sock is upstream:
                    record.bytes_sent += len(data)

    def _proxy_forward(self) -> None:
        """Forward an absolute-form request upstream and relay the response (its body as it comes;
        an upstream that stops early cuts the client's connection too)."""
        split = urllib.parse.urlsplit(self.path)
        with self.server.parts.traffic.request(self.command,
                                               "%s://%s%s" % (split.scheme, split.netloc, split.path or "/"),
                                               split.query, self.headers.items(), self.client_address[1],
                                               self.request) as record:
            self._forward(record, split)

    def _forward(self, record: RequestRecord, split: urllib.parse.SplitResult) -> None:
        parts = self.server.parts
        assert parts.proxy is not None
        if not self._proxy_authorized(record):
            return
        try:
            sock = parts.proxy.connect(split.hostname or "", split.port or 80)
        except OSError:
            self.drain_request_body()
            self.send_plan(record, _plan_fixed(502, b"cannot connect upstream\n"))
            return
        upstream = http.client.HTTPConnection(split.hostname or "", split.port or 80)
        upstream.sock = sock
        try:
            upstream.putrequest(self.command, (split.path or "/") + ("?" + split.query if split.query else ""),
                                skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders()
            reader = self._body_reader()
            for piece in iter(lambda: reader.read(CHUNK_SIZE), b""):
                upstream.send(piece)
            self._relay_response(record, upstream.getresponse())
        except (OSError, http.client.HTTPException):
            if record.status is None:
                self.send_plan(record, _plan_fixed(502, b"upstream failed\n"))
            else:
                self._abort("close")
        finally:
            upstream.close()
            parts.proxy.release(sock)

    def _relay_response(self, record: RequestRecord, resp: http.client.HTTPResponse) -> None:
        record.status = resp.status
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if resp.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif resp.length is None and self.command != "HEAD":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        for data in iter(lambda: resp.read1(CHUNK_SIZE), b""):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if resp.chunked else data)
            record.bytes_sent += len(data)
        if resp.length:  # the upstream stopped early: so does this response
            self._abort("close")
        if resp.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _proxy_authorized(self, record: RequestRecord) -> bool:
        proxy = self.server.parts.proxy
        assert proxy is not None
        auth = proxy.auth
        if auth is None or auth.check(self.command, self.path, self.headers.get("Proxy-Authorization")) is True:
            return True
        headers = [("Proxy-Authenticate", auth.challenge())]
        if self.command != "CONNECT" and not self._drain_if_small():
            headers.append(("Connection", "close"))
        self.send_plan(record, _plan_fixed(407, b"proxy authentication required\n", headers))
        return False

    # -- responses --------------------------------------------------------

    def serve_entity(self, record: RequestRecord, entity: _Entity, fault: Fault | None,
                     auth: Auth | None, headers: Iterable[tuple[str, str]] = ()) -> None:
        """GET/HEAD of a blob: pre-response faults, auth, then the planned response (with *headers* added)."""
        fault = fault or NO_FAULT
        record.fault = fault if fault != NO_FAULT else None
        self.drain_request_body()
        self._pre_response_faults(fault)
        if self.command not in ("GET", "HEAD"):
            self.send_plan(record, _plan_fixed(405, b"method not allowed\n", [("Allow", "GET, HEAD")]))
            return
        if fault.status is None and auth is not None and not self._authorized(record, auth):
            return
        plan = _plan_response(self.command, self.headers, entity, fault)
        self.send_plan(record, dataclasses.replace(plan, headers=plan.headers + tuple(headers)), entity)

    def receive_upload(self, record: RequestRecord, fault: Fault | None,
                       auth: Auth | None) -> bytes | None:
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
            if self.server.parts.stopping.wait(fault.delay):
                self._abort("close")

    def _authorized(self, record: RequestRecord, auth: Auth, draining: bool = False) -> bool:
        verdict = auth.check(self.command, self.path, self.headers.get("Authorization"))
        if verdict is True:
            return True
        if isinstance(auth, DigestAuth):
            challenge: str | None = auth.challenge(stale=verdict == "stale")
        else:
            challenge = auth.challenge()
        headers = [("WWW-Authenticate", challenge)] if challenge else []
        if draining and not self._drain_if_small():
            headers.append(("Connection", "close"))
        status = getattr(auth, "failure_status", 401)
        body = b"authentication required\n" if status == 401 else b"request has expired\n"
        self.send_plan(record, _plan_fixed(status, body, headers))
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
        if plan.drip is not None:
            self._drip_head(plan.drip)
        else:
            self.end_headers()
        if self.command == "HEAD":
            return
        if plan.span is not None:
            if entity is None:
                raise RuntimeError("a plan with a span needs its entity")
            record.first_byte = plan.span[0]
            view = memoryview(entity.data)[plan.span[0]:plan.span[1]]
        else:
            view = memoryview(plan.body)
        self._send_body(record, view[:plan.send], plan)
        if plan.abort:
            self._abort(plan.abort)
        if plan.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _drip_head(self, seconds: float) -> None:
        """Send the buffered status line and headers one byte every *seconds* (ends early if the server stops)."""
        buffered: list[bytes] = getattr(self, "_headers_buffer", [])  # what send_header() collected
        head = b"".join(buffered) + b"\r\n"
        buffered.clear()
        for i in range(len(head)):
            self.wfile.write(head[i:i + 1])
            if self.server.parts.stopping.wait(seconds):
                self._abort("close")

    def _meter(self, path: str, received: bool, watched: bool) -> _Meter:
        """Count this body's bytes on ``path``; stop at its boundaries if ``watched`` and the route's
        boundaries count this direction (an upload route's count bytes received)."""
        parts = self.server.parts
        route = self._route
        counts_received = route.watches_received if route is not None else received
        return _Meter(parts.traffic, parts.boundaries, path, received, watched and counts_received == received)

    def _send_body(self, record: RequestRecord, view: memoryview, plan: _Plan) -> None:
        meter = self._meter(record.path, received=False, watched=plan.watched)
        total = len(view)
        stall_at = None if plan.stall_after is None else min(plan.stall_after, total)
        pos = 0
        paced_from, paced_bytes = time.monotonic(), 0
        while True:
            meter.fire()
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
            n = min(n, meter.room())
            piece = view[pos:pos + n]
            # Counted before the write so a client that has the bytes sees them counted;
            # taken back if the write fails.
            record.bytes_sent += n
            meter.add(n)
            try:
                if plan.chunked:
                    self.wfile.write(b"".join((b"%x\r\n" % n, piece, b"\r\n")))
                else:
                    self.wfile.write(piece)
            except BaseException:
                record.bytes_sent -= n
                meter.add(-n)
                raise
            pos += n
            paced_bytes += n
            meter.fire()

    def _stall(self, seconds: float | None) -> None:
        if not self.server.parts.stalls.stall(seconds):
            self._abort("close")

    def _pace(self, since: float, sent: int, rate: int) -> None:
        due = since + sent / rate - time.monotonic()
        if due > 0 and self.server.parts.stopping.wait(due):
            self._abort("close")

    def _abort(self, how: str) -> None:
        """Close the connection now: FIN ("close") or RST ("reset", SO_LINGER 0)."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        try:
            self.rfile.close()
        finally:
            sock.close()
        if self.server.parts.verbose:
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
        meter = self._meter(record.path, received=True, watched=True)
        reader = self._body_reader()
        parts: list[bytes] = []
        pos = 0
        stall_at = fault.stall_after
        paced_from, paced_bytes = time.monotonic(), 0
        while True:
            meter.fire()
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
            n = min(n, meter.room())
            piece = reader.read(n)
            if not piece:
                break
            parts.append(piece)
            pos += len(piece)
            paced_bytes += len(piece)
            record.bytes_received = pos
            meter.add(len(piece))
            meter.fire()
        if reader.incomplete:
            self._abort("close")
        return b"".join(parts)


# ---------------------------------------------------------------------------
# Routes and the route table
# ---------------------------------------------------------------------------

class _BaseRoute:
    path = ""
    auth: Auth | None = None
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
                 auth: Auth | None = None, modified: int = DEFAULT_LAST_MODIFIED,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(faults, default_fault)
        self.path = path
        self.auth = auth
        self.content_type = content_type
        self.headers = dict(headers or {})  # sent with every response (Set-Cookie, ...)
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
        handler.serve_entity(record, self._entity, fault if fault is not None else query_fault, self.auth,
                             self.headers.items())


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
    def __init__(self, path: str, location: str, status: int, body: bytes | None = None,
                 faults: Sequence[Fault | None] | None = None, default_fault: Fault | None = None) -> None:
        super().__init__(faults, default_fault)
        self.path = path
        self.location = location
        self.status = status
        self.body = body

    def serve(self, handler: _Handler, record: RequestRecord, query_fault: Fault | None) -> None:
        fault = self.next_fault()
        handler.drain_request_body()
        body = self.body if self.body is not None else b"redirect to %s\n" % self.location.encode("utf-8", "replace")
        # a non-ASCII Location goes out as UTF-8 bytes, as servers send it (http.server would encode Latin-1)
        location = self.location.encode("utf-8").decode("latin-1")
        plan = _plan_fixed(self.status, body, [("Location", location)])
        handler.send_plan(record, _apply_common(plan, handler.command, fault or query_fault or NO_FAULT))


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

    def __init__(self, path: str, status: int, auth: Auth | None,
                 faults: Sequence[Fault | None] | None, default_fault: Fault | None) -> None:
        super().__init__(faults, default_fault)
        self.path = path
        self.status = status
        self.auth = auth
        self.bodies: list[bytes] = []

    def received_bodies(self) -> list[bytes]:
        """The bodies stored so far (complete and answered with success), in order."""
        with self._lock:
            return list(self.bodies)

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


_R = TypeVar("_R", bound=_BaseRoute)


class _RouteTable:
    """Which route answers a path: routes added by exact path, else ``/files/<relpath>`` under
    ``root`` (when given), else ``/blob/<size>?seed=…``; None for anything else (404)."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._routes: dict[str, _BaseRoute] = {}
        self._file_cache: dict[str, tuple[tuple[int, int], _Entity]] = {}
        self._file_cache_lock = threading.Lock()
        self._blob_cache: collections.OrderedDict[tuple[int, int, bool], _Entity] = collections.OrderedDict()

    def add(self, route: _R) -> _R:
        with self._lock:
            self._routes[route.path] = route
        return route

    def remove(self, path: str) -> None:
        with self._lock:
            self._routes.pop(path, None)

    def get(self, path: str) -> _BaseRoute | None:
        with self._lock:
            return self._routes.get(path)

    def resolve(self, path: str, query: Mapping[str, str]) -> _BaseRoute | None:
        """The route for a request to ``path`` (ValueError for a bad ``/blob/`` request)."""
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


# ---------------------------------------------------------------------------
# The server: parts, lifecycle, facade
# ---------------------------------------------------------------------------

@dataclass
class _Parts:
    """What a connection's handler works with: one FakeServer's routes, counters, boundaries and stalls."""

    routes: _RouteTable
    traffic: _Traffic
    boundaries: _Boundaries
    stalls: _Stalls
    stopping: threading.Event
    verbose: bool
    tls: ssl.SSLContext | None
    proxy: _ProxyState | None = None


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, parts: _Parts, listener: _Listener, address: tuple[str, int]) -> None:
        self.parts = parts
        self.listener = listener
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer's getfqdn(), which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        number = self.parts.traffic.connection_opened(request)
        if self.parts.stopping.is_set():
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        self.listener.start_thread(self.process_request_thread, (request, client_address),
                                   name=f"fake_server-conn-{number}")

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.parts.tls is not None:  # the handshake runs in the connection's thread
            sock = self.parts.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
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
            self.parts.traffic.connection_closed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (_Aborted, OSError)) or self.parts.stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Listener:
    """The server's lifecycle: the listening sockets (its port, and any ``add_ports``), one accept thread for all of
    them, and one thread per connection.

    It owns every thread it starts and joins them in ``stop()`` (within its timeout).  Started
    again after ``stop()``, it binds the ports it had, so URLs stay valid across an outage.
    """

    def __init__(self, parts: _Parts, host: str, port: int) -> None:
        self._parts = parts
        self.host = host
        self._requested_port = port
        self.ports: list[int] = []  # bound ports, the first one the server's own; kept after stop()
        self._lock = threading.Lock()
        self._httpds: list[_HTTPServer] = []
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()

    @property
    def port(self) -> int | None:
        return self.ports[0] if self.ports else None

    @property
    def running(self) -> bool:
        return bool(self._httpds)

    def start(self) -> None:
        if self._httpds:
            raise RuntimeError("server already started")
        self._parts.stopping.clear()
        self._stop.clear()
        httpds: list[_HTTPServer] = []
        try:
            for port in self.ports or [self._requested_port]:
                httpds.append(_HTTPServer(self._parts, self, (self.host, port)))
        except BaseException:
            for httpd in httpds:
                httpd.server_close()
            raise
        with self._lock:
            self._httpds = httpds
        self.ports = [httpd.server_address[1] for httpd in httpds]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="fake_server-accept", daemon=True)
        self._accept_thread.start()

    def add_ports(self, count: int) -> list[int]:
        """Listen on ``count`` more free ports of the same host (served by the same accept thread)."""
        if not self._httpds:
            raise RuntimeError("start the server before adding ports")
        added = [_HTTPServer(self._parts, self, (self.host, 0)) for _ in range(count)]
        with self._lock:
            self._httpds.extend(added)
        ports = [httpd.server_address[1] for httpd in added]
        self.ports.extend(ports)
        return ports

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            registered = 0
            while not self._stop.is_set():
                with self._lock:
                    fresh = self._httpds[registered:]
                for httpd in fresh:
                    selector.register(httpd, selectors.EVENT_READ)
                registered += len(fresh)
                for key, _ in selector.select(ACCEPT_POLL_INTERVAL):
                    self._accept(key.fileobj)  # type: ignore[arg-type]

    @staticmethod
    def _accept(httpd: _HTTPServer) -> None:
        """One connection of a listening socket that is ready (what serve_forever does for one request)."""
        try:
            request, address = httpd.get_request()
        except OSError:
            return
        if not httpd.verify_request(request, address):
            httpd.shutdown_request(request)
            return
        try:
            httpd.process_request(request, address)
        except Exception:  # noqa: BLE001 - as socketserver does: report, close, serve on
            httpd.handle_error(request, address)
            httpd.shutdown_request(request)

    def start_thread(self, target: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        """Start a connection's thread; it is joined by stop() (finished ones are forgotten here)."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()

    def stop(self, timeout: float, wake: Callable[[], None]) -> None:
        """Stop accepting (the accept thread ends and the listening sockets close first, so that a client
        retrying the moment its connection is cut finds nothing listening), ``wake()`` the handlers that wait
        (holds, stalls), cut every connection, then join the connection threads, all within ``timeout``."""
        with self._lock:
            httpds = list(self._httpds)
        if not httpds:
            return
        self._parts.stopping.set()
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for httpd in httpds:
            httpd.server_close()
        wake()
        for sock in self._parts.traffic.open_sockets():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._httpds = []
        self._accept_thread = None


class FakeServer:
    """A threaded HTTP/1.1 test server with routes, faults, counters and byte boundaries.

    Use as ``with FakeServer() as srv: ...`` or call ``start()`` and ``stop()``.
    Paths are matched exactly (query strings aside); unknown paths get 404.
    With ``root``, files under it are served at ``/files/<relpath>``; ``/blob/<size>``
    always serves ``blob_bytes(size, seed)`` with faults from the query string.

    A facade: the route table, the traffic counters, the byte boundaries, the stalls and the
    listener each do one job; this class wires them together and keeps the public methods.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, host: str = "127.0.0.1",
                 port: int = 0, *, verbose: bool = False, tls: ssl.SSLContext | None = None,
                 proxy: bool = False) -> None:
        """``tls``: a server-side SSLContext (with its certificate loaded) to serve HTTPS.  ``proxy``:
        also be a forward HTTP proxy: absolute-form requests are forwarded, ``CONNECT`` opens a
        tunnel (see ``proxy_auth``, ``map_host``); requests for its own paths are served as always."""
        stopping = threading.Event()
        self._parts = _Parts(
            routes=_RouteTable(os.path.realpath(os.fspath(root)) if root is not None else None),
            traffic=_Traffic(), boundaries=_Boundaries(), stalls=_Stalls(stopping), stopping=stopping,
            verbose=verbose, tls=tls, proxy=_ProxyState() if proxy else None)
        self._listener = _Listener(self._parts, host, port)

    @property
    def root(self) -> str | None:
        """The directory served under ``/files/`` (resolved), or None."""
        return self._parts.routes.root

    @property
    def host(self) -> str:
        return self._listener.host

    @property
    def tls(self) -> ssl.SSLContext | None:
        return self._parts.tls

    @property
    def verbose(self) -> bool:
        """Whether requests are logged to stderr."""
        return self._parts.verbose

    @verbose.setter
    def verbose(self, value: bool) -> None:
        self._parts.verbose = value

    # -- lifecycle --------------------------------------------------------

    def start(self) -> FakeServer:
        """Bind and serve in a background thread.  Returns self.

        A server started again after stop() binds the same port as before, so URLs stay
        valid across a simulated outage.
        """
        self._listener.start()
        return self

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop serving: release holds and stalls, close connections, join threads (bounded)."""
        self._listener.stop(timeout, wake=self._wake_handlers)

    def _wake_handlers(self) -> None:
        self._parts.stalls.release()
        self._parts.boundaries.release_holds()
        if self._parts.proxy is not None:
            self._parts.proxy.cut()

    # -- proxy mode -------------------------------------------------------

    @property
    def proxy_auth(self) -> BasicAuth | None:
        """Proxy mode: the credentials the proxy requires (a 407 with ``Proxy-Authenticate`` without them)."""
        return self._proxy_state().auth

    @proxy_auth.setter
    def proxy_auth(self, auth: BasicAuth | None) -> None:
        self._proxy_state().auth = auth

    def map_host(self, name: str, address: str = "127.0.0.1") -> None:
        """Proxy mode: resolve ``name`` to ``address`` (a name no DNS knows works through this proxy only)."""
        self._proxy_state().hosts[name.lower()] = address

    def proxy_url(self, user: str | None = None, password: str | None = None) -> str:
        """Proxy mode: this proxy's URL for a client, with credentials if given."""
        self._proxy_state()
        credentials = ""
        if user is not None:
            credentials = urllib.parse.quote(user, safe="") + (
                ":" + urllib.parse.quote(password, safe="") if password is not None else "") + "@"
        return "http://%s%s:%d" % (credentials, self.host, self.port)

    def _proxy_state(self) -> _ProxyState:
        if self._parts.proxy is None:
            raise RuntimeError("not a proxy: make the server with FakeServer(proxy=True)")
        return self._parts.proxy

    def __enter__(self) -> FakeServer:
        if not self._listener.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (available after the first start(); kept after stop())."""
        if self._listener.port is None:
            raise RuntimeError("server not started")
        return self._listener.port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (``https://`` when serving TLS)."""
        host = self.host if ":" not in self.host else "[%s]" % self.host
        return "%s://%s:%d" % ("https" if self.tls is not None else "http", host, self.port)

    def url(self, path: str, port: int | None = None) -> str:
        """``base_url + path`` (with ``port``: that one of ``ports`` instead); ``path`` starts with "/"."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', not {path!r}")
        if port is None:
            return self.base_url + path
        if port not in self.ports:
            raise ValueError(f"port {port} is not one of this server's ports {self.ports}")
        return self.base_url.rsplit(":", 1)[0] + ":%d" % port + path

    @property
    def ports(self) -> list[int]:
        """Every port the server listens on: ``port`` first, then those of ``add_ports``."""
        return list(self._listener.ports)

    def add_ports(self, count: int) -> list[int]:
        """Also listen on ``count`` more free ports: the same routes, counters and boundaries, seen by a client
        as ``count`` more hosts (origins).  The server must be running; it keeps them across stop() and start().
        Returns the new ports (``url(path, port=p)``; ``RequestRecord.port`` says which one a request came to)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        return self._listener.add_ports(count)

    # -- routes -----------------------------------------------------------

    def add_blob(self, path: str, data: bytes | None = None, *, size: int | None = None, seed: int = 0,
                 etag: bool = True, last_modified: bool = True, weak_etag: bool = False,
                 content_type: str = "application/octet-stream", faults: Sequence[Fault | None] | None = None,
                 default_fault: Fault | None = None, auth: Auth | None = None,
                 headers: Mapping[str, str] | None = None) -> Route:
        """Serve ``data`` (or ``blob_bytes(size, seed)``) at ``path``; returns the Route. *headers* are added to
        every response of the route (``Set-Cookie``, ...)."""
        if (data is None) == (size is None):
            raise ValueError("give exactly one of data and size")
        body = data if data is not None else blob_bytes(size or 0, seed)
        route = Route(_check_path(path), body, etag=etag, last_modified=last_modified, weak_etag=weak_etag,
                      content_type=content_type, faults=faults, default_fault=default_fault, auth=auth,
                      headers=headers)
        return self.add_route(route)

    def add_redirect(self, path: str, location: str, status: int = 302, *, body: bytes | None = None,
                     faults: Sequence[Fault | None] | None = None, default_fault: Fault | None = None) -> _BaseRoute:
        """Answer every request to ``path`` with ``status`` and ``Location: location`` (sent as given, non-ASCII as
        UTF-8), with *body* (default: a short line) under the route's faults (``throttle`` drips it)."""
        return self.add_route(_RedirectRoute(_check_path(path), location, status, body, faults, default_fault))

    def add_upload(self, path: str, *, status: int = 201, auth: Auth | None = None,
                   faults: Sequence[Fault | None] | None = None, default_fault: Fault | None = None) -> _BaseRoute:
        """Accept PUT/POST bodies at ``path`` (Content-Length or chunked) and answer JSON size/sha256."""
        return self.add_route(_UploadRoute(_check_path(path), status, auth, faults, default_fault))

    def add_status(self, path: str, status: int, body: bytes = b"",
                   headers: Mapping[str, str] | None = None) -> _BaseRoute:
        """Answer every request to ``path`` with a fixed status, body and headers."""
        return self.add_route(_StatusRoute(_check_path(path), status, body, headers))

    def remove(self, path: str) -> None:
        """Forget the route at ``path`` (it then answers 404)."""
        self._parts.routes.remove(path)

    def route(self, path: str) -> _BaseRoute | None:
        """The route added at ``path``, or None."""
        return self._parts.routes.get(path)

    def uploads(self, path: str) -> list[bytes]:
        """Complete upload bodies received at ``path`` and answered with success, in order."""
        route = self.route(path)
        if not isinstance(route, _UploadRoute):
            raise KeyError(f"no upload route at {path!r}")
        return route.received_bodies()

    def add_route(self, route: _R) -> _R:
        """Serve *route* at ``route.path`` (replacing what was there): for a Route subclass of
        a test's own; the ``add_*`` methods cover the usual cases."""
        return self._parts.routes.add(route)

    # -- counters and records ----------------------------------------------

    def bytes_served(self, path: str) -> int:
        """Response body bytes written to sockets for ``path`` (cumulative since reset_counters())."""
        return self._parts.traffic.count(path, received=False)

    def bytes_received(self, path: str) -> int:
        """Request body bytes read for ``path`` (uploads)."""
        return self._parts.traffic.count(path, received=True)

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """Snapshots of the requests seen (all, or those to ``path``), oldest first."""
        return self._parts.traffic.requests(path)

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start (or reset_counters())."""
        return self._parts.traffic.connections_accepted

    @property
    def peak_connections(self) -> int:
        """The most TCP connections open at once, on all ports, since start (or reset_counters()).  Counted at
        each accept; a connection its client has closed no longer counts, even if its handler has not read the
        end yet (on Linux; elsewhere it counts until the handler has)."""
        return self._parts.traffic.peak_connections

    @property
    def peak_requests(self) -> int:
        """The most requests being answered at once (from the request line to the last byte of the answer)."""
        return self._parts.traffic.peak_requests

    def reset_counters(self) -> None:
        """Zero bytes served/received, forget request records, the connection count and the peaks.

        Fault positions of routes and armed watches are kept (watches then count from zero).
        """
        self._parts.traffic.reset()

    # -- byte boundaries and stalls ----------------------------------------

    def on_bytes(self, path: str, nbytes: int, callback: Callable[[str, int], Any]) -> None:
        """Call ``callback(path, served)`` once, in the handler thread, when ``path`` reaches ``nbytes``.

        The handler sends exactly up to the boundary, calls the callback, then goes on
        (quietly failing if the client is gone).  For an upload route the count is of
        bytes received.
        """
        self._parts.boundaries.arm(_Watch(_strip_query(path), nbytes, callback=callback))

    def hold_at(self, path: str, nbytes: int) -> Hold:
        """Stop the handler at ``nbytes`` on ``path`` until ``hold.release()`` (or stop())."""
        return self._hold(path, nbytes)

    def release_stalls(self) -> None:
        """End every stall in progress (timed ones too); later stalls are not affected."""
        self._parts.stalls.release()

    def wait_stalled(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until at least ``count`` handlers are inside a stall; False on timeout.

        Call it before ``release_stalls()``: a release only ends stalls already begun.
        """
        return self._parts.stalls.wait_stalled(count, timeout)

    def _hold(self, path: str, nbytes: int, action: Callable[[Hold], Any] | None = None,
              auto_release: bool = False) -> Hold:
        """A hold; ``action`` runs in the handler thread when it is reached (AppController.kill_when)."""
        hold = self._parts.boundaries.hold(path, nbytes, action=action, auto_release=auto_release)
        if self._parts.stopping.is_set():  # stop() released the holds already; this one would wait forever
            hold.release()
        return hold


# ---------------------------------------------------------------------------
# Processes and the app controller
# ---------------------------------------------------------------------------

def _read_proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None (no such pid, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def process_start_token(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (Linux /proc), or None where that is unknown.

    A pid and its start token name one process for good: pids are recycled, start times are not
    (bgsession's daemon.pid file holds the same token).
    """
    fields = _read_proc_stat(pid)
    return fields[19].decode("ascii") if fields is not None and len(fields) > 19 else None


def _children_of(ppid: int) -> list[int]:
    """Pids whose parent is ``ppid`` (Linux /proc; empty elsewhere)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for name in names:
        if name.isdigit():
            fields = _read_proc_stat(int(name))
            if fields is not None and len(fields) > 1 and int(fields[1]) == ppid:
                found.append(int(name))
    return found


#: How long a process in the middle of execve may show an empty command line (seconds).
EXEC_SETTLE = 2.0


def _cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty if it is gone or a zombie).

    A process that its parent has just started may still be inside execve -- the parent's fork/exec returns at
    the exec's point of no return, before the new program's arguments are in place -- and reads as an empty
    command line for a moment: that is waited for (up to ``EXEC_SETTLE``), not taken as the answer."""
    deadline = time.monotonic() + EXEC_SETTLE
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return []
        fields = _read_proc_stat(pid)
        if argv or fields is None or fields[0] in (b"Z", b"X") or time.monotonic() >= deadline:
            return argv
        time.sleep(0.001)  # polling the kernel's view of an exec in progress: there is nothing to wait on


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (pins the process: no recycled pid behind it); None where unsupported.

    ProcessLookupError if there is no such process.
    """
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class ProcessRef:
    """One process for good: its pid and start token (``process_start_token``), so that a recycled
    pid is never mistaken for it.  A None token matches whatever runs under the pid."""

    pid: int
    token: str | None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """The process running under ``pid`` now."""
        return cls(pid, process_start_token(pid))

    @property
    def key(self) -> str:
        """``"<pid>-<token>"``: a name that stays unique when pids are recycled."""
        return f"{self.pid}-{self.token}"

    def alive(self) -> bool:
        """The process exists, has not exited (a zombie whose other threads still run has not), and is
        the one that started at ``token`` (where /proc tells)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process: /proc still tells whether it is the one
        fields = _read_proc_stat(self.pid)
        if fields is None:
            return True
        if fields[0] == b"Z":
            try:
                if len(os.listdir(f"/proc/{self.pid}/task")) <= 1:
                    return False
            except OSError:
                return False
        return self.token is None or len(fields) <= 19 or fields[19].decode("ascii") == self.token

    def send(self, signum: int) -> bool:
        """Send ``signum`` if this process still runs; True if it was sent.

        Through a pidfd where there is one, so the check and the signal cannot hit a recycled pid.
        """
        try:
            pidfd = _pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if not self.alive():
                return False
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait until this process has exited; False if it still runs after ``timeout`` seconds.

        A pidfd becomes readable when the process exits (even one that is not our child), so this
        waits on an event; without pidfds it checks every PROCESS_POLL_INTERVAL.
        """
        try:
            pidfd = _pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if not self.alive():
                return True
            if pidfd is not None:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
            while self.alive():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(PROCESS_POLL_INTERVAL)  # no pidfd: polling is all there is
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def kill(self, timeout: float = DEFAULT_KILL_TIMEOUT) -> bool:
        """SIGKILL this process if it still runs and wait (up to ``timeout``) until it has exited.

        True if this call killed it.  Its exit status goes to its parent (which must reap it).
        """
        if not self.send(_SIGKILL if _SIGKILL is not None else signal.SIGTERM):
            return False
        if not self.wait_exit(timeout):
            raise TimeoutError(f"pid {self.pid} still running {timeout} s after SIGKILL")
        return True


class AppProcess:
    """One run of the app: launched by an AppController (``popen`` is set) or adopted, that is,
    started by someone else, such as bgsession's daemon relaunching the app in the background.

    ``killed`` is True once the controller's SIGKILL ended it; ``killed_at`` is the (path, bytes)
    boundary of the ``kill_when`` that did.
    """

    def __init__(self, ref: ProcessRef, background: bool,
                 popen: subprocess.Popen[bytes] | None = None,
                 exit_status: Callable[[], int | None] | None = None) -> None:
        self.ref = ref
        self.background = background
        self.popen = popen
        self.killed = False
        self.killed_at: tuple[str, int] | None = None
        #: For an adopted process: its exit status as its parent recorded it (bgsession's daemon.log), or None.
        self.exit_status = exit_status

    @property
    def pid(self) -> int:
        return self.ref.pid

    @property
    def key(self) -> str:
        return self.ref.key

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        if self.exit_status is not None and self.exit_status() is not None:
            return False  # its parent reaped it: the pid may belong to another process by now
        return self.ref.alive()

    @property
    def returncode(self) -> int | None:
        """The exit status once it ended, as subprocess gives it; for an adopted process only a
        kill by the controller is known (-SIGKILL), anything else is None (its parent reaps it)."""
        if self.popen is not None:
            return self.popen.poll()
        if self.killed and _SIGKILL is not None:
            return -_SIGKILL
        return self.exit_status() if self.exit_status is not None else None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until it has exited and return ``returncode``; TimeoutError after ``timeout`` seconds."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired as err:
                raise TimeoutError(f"app pid {self.pid} still running after {timeout} s") from err
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.ref.wait_exit(timeout):
            raise TimeoutError(f"app pid {self.pid} still running after {timeout} s")
        while self.exit_status is not None and self.returncode is None:  # its parent logs the status when it reaps
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no exit status of app pid {self.pid} within {timeout} s")
            time.sleep(PROCESS_POLL_INTERVAL)  # written to a log file: nothing to wait on
        return self.returncode

    def kill(self) -> bool:
        """SIGKILL it if it still runs and wait until it has exited (reaping it if launched); True if
        this call killed it."""
        if self.popen is not None:
            hit = False
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if _SIGKILL is not None:
                        os.kill(self.pid, _SIGKILL)
                    else:
                        self.popen.kill()
                hit = self.popen.wait() != 0 if _SIGKILL is None else self.popen.wait() == -_SIGKILL
        else:
            hit = self.ref.kill()
        if hit:
            self.killed = True
        return hit

    def __repr__(self) -> str:
        how = "launched" if self.popen is not None else "adopted"
        return f"<AppProcess {self.key} {how}{' background' if self.background else ''}>"


class AppController:
    """Launches an "app" as a real subprocess, SIGKILLs it, relaunches it in the background.

    ``env`` holds variables laid over ``os.environ`` (a value of None removes one).
    A background launch adds ``BGSESSION_BACKGROUND_EVENTS=<identifier>``; a normal
    launch removes that variable.  ``output`` is a file path that collects the app's
    stdout and stderr (appended, every launch), or None to inherit this process's.
    Only the app process is killed, not processes it started (a daemon it spawned
    survives, as nsurlsessiond survives the app on iOS).

    Besides the processes it launches, the controller can *adopt* app processes that someone
    else started -- ``discover()`` finds the children of bgsession's daemon, which relaunches
    the app -- so that ``kill_all()``, ``kill_when()`` and ``close()`` reach them too.  Every
    process is named by pid and start token: a recycled pid is never killed.

    With ``session_directory`` (the app's bgsession session directory) it also follows the
    daemon: ``wait_relaunch()`` returns the next app the daemon relaunched (from the daemon's
    log, which records each relaunch and its exit status), and ``stop_daemon()`` ends it.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str | None] | None = None,
                 cwd: str | os.PathLike[str] | None = None, identifier: str | None = None,
                 output: str | os.PathLike[str] | None = None,
                 session_directory: str | os.PathLike[str] | None = None) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.identifier = identifier
        self.output = output
        self.session_directory = None if session_directory is None else os.fspath(session_directory)
        self._lock = threading.Lock()
        self._apps: list[AppProcess] = []
        self._relaunches_seen = 0

    @property
    def process(self) -> subprocess.Popen | None:  # type: ignore[type-arg]
        """The most recently launched process, or None."""
        launched = self._launched()
        return launched[-1].popen if launched else None

    @property
    def launches(self) -> list[tuple[int, bool, int | None]]:
        """(pid, background, returncode or None while running) per launch, oldest first."""
        return [(x.pid, x.background, x.returncode) for x in self._launched()]

    @property
    def apps(self) -> list[AppProcess]:
        """Every app process known, launched or adopted, in the order they became known."""
        with self._lock:
            return list(self._apps)

    def running(self) -> list[AppProcess]:
        """The known app processes that still run."""
        return [app for app in self.apps if app.running()]

    def _launched(self) -> list[AppProcess]:
        with self._lock:
            return [app for app in self._apps if app.popen is not None]

    def launch(self, background: bool = False, *,
               extra_args: Sequence[str] = ()) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start the app (``argv`` + ``extra_args``); ``background=True`` marks it a background launch
        for ``identifier``."""
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
            process = subprocess.Popen(self.argv + list(extra_args), env=env, cwd=self.cwd,
                                       stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT if out is not None else None)
        finally:
            if out is not None:
                out.close()
        with self._lock:
            self._apps.append(AppProcess(ProcessRef.of(process.pid), background, process))
        return process

    def adopt(self, pid: int, *, token: str | None = None, background: bool = True) -> AppProcess:
        """Know the app process ``pid`` (started at ``token``; now, if None) that someone else launched.

        Returns the AppProcess, the one already known if the process was adopted or launched before.
        """
        ref = ProcessRef(pid, token if token is not None else process_start_token(pid))
        with self._lock:
            for app in self._apps:
                if app.key == ref.key:
                    return app
            app = AppProcess(ref, background)
            self._apps.append(app)
            return app

    def discover(self, parent: int, *argv_items: str) -> list[AppProcess]:
        """Adopt the children of ``parent`` whose command line has every one of ``argv_items``
        (as whole arguments) as background launches; returns those not known before."""
        known = {app.key for app in self.apps}
        found = []
        for pid in _children_of(parent):
            argv = _cmdline(pid)
            if argv and all(item in argv for item in argv_items):
                app = self.adopt(pid, background=True)
                if app.key not in known:
                    found.append(app)
        return found

    def kill_when(self, server: FakeServer, path: str, nbytes: int, *, app_number: int | None = None,
                  keep_held: bool = False) -> Hold:
        """When ``path`` reaches ``nbytes`` on ``server``, SIGKILL the current app (and reap it), then go on.

        The current app is the most recently launched one; with ``app_number``, it is app number
        ``app_number`` of ``apps`` (from 0), if that is still the newest known, launched or adopted.
        With ``keep_held`` the handler stays held after a kill (until released or stop()), so that no
        byte is written into the dead app's connection.  Returns the Hold; its ``reached`` is set after
        the kill, and the killed AppProcess has ``killed_at = (path, bytes)``.
        """
        def act(hold: Hold) -> None:
            killed = False
            try:
                app = self._target(app_number)
                killed = app is not None and app.kill()
                if app is not None and killed:
                    app.killed_at = (hold.path, hold.served if hold.served is not None else nbytes)
            finally:
                if not (killed and keep_held):
                    hold.release()

        return server._hold(path, nbytes, action=act)

    def _target(self, app_number: int | None) -> AppProcess | None:
        if app_number is None:
            launched = self._launched()
            return launched[-1] if launched else None
        with self._lock:
            return self._apps[app_number] if len(self._apps) == app_number + 1 else None

    def kill(self) -> int | None:
        """SIGKILL the current app (if running) and reap it; returns its return code."""
        launched = self._launched()
        if not launched:
            return None
        launched[-1].kill()
        return launched[-1].returncode

    def kill_all(self) -> list[AppProcess]:
        """SIGKILL every known app process that runs (launched or adopted); returns those it killed."""
        return [app for app in self.running() if app.kill()]

    @staticmethod
    def kill_pid(pid: int, token: str | None = None, timeout: float = DEFAULT_KILL_TIMEOUT) -> bool:
        """SIGKILL the process ``pid`` if it is still the one started at ``token`` (a daemon, say) and wait
        until it has exited; True if this call killed it."""
        return ProcessRef(pid, token).kill(timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the current app to exit and return its code; TimeoutError after ``timeout``."""
        process = self.process
        if process is None:
            raise RuntimeError("no app launched")
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"app pid {process.pid} still running after {timeout} s") from err

    def path(self, *parts: str) -> str:
        """A path in the app's working directory (where a relaunch by the daemon runs too)."""
        return os.path.join(os.fspath(self.cwd or os.getcwd()), *parts)

    def read_output(self) -> str:
        """What the launched apps wrote to ``output`` (the daemon's relaunches write to its daemon.log)."""
        if self.output is None:
            raise RuntimeError("no output file was given")
        try:
            with open(self.output, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- following bgsession's daemon (session_directory) -------------------------------------

    def _daemon_log(self) -> str:
        if self.session_directory is None:
            raise RuntimeError("AppController(session_directory=...) is needed to follow the daemon")
        try:
            with open(os.path.join(self.session_directory, "daemon.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _relaunch_status(self, pid: int) -> int | None:
        m = re.search(rf"relaunched app \(pid {pid}\) exited with (-?\d+)", self._daemon_log())
        return int(m.group(1)) if m else None

    def relaunches(self) -> list[AppProcess]:
        """The apps bgsession's daemon relaunched so far (adopted, oldest first), from its daemon.log."""
        found = []
        for pid in map(int, re.findall(r"relaunched the app for background events: pid (\d+)", self._daemon_log())):
            app = self.adopt(pid, token=None if self._relaunch_status(pid) is not None else process_start_token(pid))
            if app.exit_status is None:
                app.exit_status = lambda pid=pid: self._relaunch_status(pid)
            found.append(app)
        return found

    def wait_relaunch(self, timeout: float | None = None) -> AppProcess:
        """Wait for the daemon's next relaunch of the app (after those this method returned before); its
        ``wait()`` gives the exit status the daemon recorded. TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self.relaunches()
            if len(found) > self._relaunches_seen:
                self._relaunches_seen += 1
                return found[self._relaunches_seen - 1]
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the daemon did not relaunch the app within {timeout} s")
            time.sleep(PROCESS_POLL_INTERVAL)  # the daemon tells only its log: nothing to wait on

    def stop_daemon(self, timeout: float = DEFAULT_KILL_TIMEOUT) -> bool:
        """SIGTERM the session's daemon (named by daemon.pid with its start token) and wait for it to exit, SIGKILL
        after ``timeout``; True if one ran. It stops its transfers; they resume when a session starts it again."""
        if self.session_directory is None:
            return False
        try:
            with open(os.path.join(self.session_directory, "daemon.pid"), encoding="ascii") as f:
                parts = f.read().split()
            daemon = ProcessRef(int(parts[0]), parts[1] if len(parts) > 1 and parts[1] != "-" else None)
        except (OSError, ValueError, IndexError):
            return False
        if daemon.send(signal.SIGTERM) and not daemon.wait_exit(timeout):
            daemon.kill()
        return True

    def close(self) -> None:
        """SIGKILL every known app process still running, and reap those launched."""
        for app in self.apps:
            app.kill()

    def __enter__(self) -> AppController:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# The test kit for an app: a ledger, pytest fixtures
# ---------------------------------------------------------------------------

class Ledger:
    """An app's own record of what its hooks did, for crash tests: append-only JSON lines, each fsynced before
    ``append`` returns, so it survives a SIGKILL of the writer (and a power loss). Every line carries ``stamp``
    (which process wrote it, say). ``read`` returns complete lines only: a killed writer may leave half a line."""

    def __init__(self, path: str | os.PathLike[str], **stamp: Any) -> None:
        self.path = os.fspath(path)
        self.stamp = stamp
        self._lock = threading.Lock()

    def append(self, **record: Any) -> None:
        line = json.dumps({**record, **self.stamp}, sort_keys=True).encode("utf-8") + b"\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                return [json.loads(line) for line in f if line.endswith(b"\n")]
        except FileNotFoundError:
            return []


def app_sandbox(root: str | os.PathLike[str], argv: Sequence[str], identifier: str,
                env: Mapping[str, str | None] | None = None) -> AppController:
    """An AppController for a bgsession app in a sandbox under ``root``: its own home (``HOME``,
    ``XDG_STATE_HOME``: the default session directory lands in the sandbox), working directory ``root/app``,
    output ``root/app.log``, and ``session_directory`` set so that it follows the daemon. Close it with
    ``close()`` and ``stop_daemon()`` (the ``bg_app`` fixture does both)."""
    root = os.path.abspath(os.fspath(root))
    home, cwd = os.path.join(root, "home"), os.path.join(root, "app")
    os.makedirs(cwd, exist_ok=True)
    state = os.path.join(home, ".local", "state")
    sandbox = {"HOME": home, "XDG_STATE_HOME": state, **(env or {})}
    if sys.platform == "darwin":
        session_directory = os.path.join(home, "Library", "Application Support", "bgsession", identifier)
    else:
        session_directory = os.path.join(str(sandbox["XDG_STATE_HOME"]), "bgsession", identifier)
    return AppController(argv, env=sandbox, cwd=cwd, identifier=identifier, output=os.path.join(root, "app.log"),
                         session_directory=session_directory)


#: pytest, when it is the one importing this module (the module itself imports nothing outside the standard
#: library): then the kit's fixtures below exist. Use them with ``pytest_plugins = ["fake_server"]``.
_pytest: Any = sys.modules.get("pytest")

if _pytest is not None:
    _fixture: Callable[[Callable[..., Any]], Callable[..., Any]] = _pytest.fixture

    @_fixture
    def bg_server() -> Iterator[FakeServer]:
        """A started FakeServer on 127.0.0.1 (add routes and faults to it), stopped after the test."""
        with FakeServer() as server:
            yield server

    @_fixture
    def bg_app(tmp_path: Any) -> Iterator[Callable[..., AppController]]:
        """``bg_app(argv, identifier=...)``: an AppController for your app in a sandbox under the test's
        tmp_path (see :func:`app_sandbox`). After the test every app process it knows is killed and the session's
        daemon stopped."""
        made: list[AppController] = []

        def make(argv: Sequence[str], identifier: str, env: Mapping[str, str | None] | None = None
                 ) -> AppController:
            controller = app_sandbox(tmp_path / f"sandbox{len(made)}", argv, identifier, env)
            made.append(controller)
            return controller

        try:
            yield make
        finally:
            for controller in made:
                with contextlib.suppress(RuntimeError):
                    controller.relaunches()  # adopt what the daemon launched, so that close() reaches it
                controller.close()
                controller.stop_daemon()


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
    parser.add_argument("--proxy", action="store_true",
                        help="also be a forward HTTP proxy (absolute-form requests and CONNECT tunnels)")
    args = parser.parse_args(argv)
    if args.root is not None and not os.path.isdir(args.root):
        parser.error(f"--root {args.root!r} is not a directory")

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server = FakeServer(root=args.root, host=args.host, port=args.port, verbose=not args.quiet, proxy=args.proxy)
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
