"""Tests for fake_server.py: the test server's own behaviour, over real sockets."""
from __future__ import annotations

import ast
import dataclasses
import email.message
import email.utils
import hashlib
import http.client
import inspect
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import fake_server as fs

try:  # bound every test when pytest-timeout is there; waits below are bounded anyway
    import pytest_timeout  # noqa: F401
    pytestmark = pytest.mark.timeout(60)
except ImportError:
    pytestmark = []

#: A wait that should succeed at once on a healthy machine.
SHORT = 5.0
#: A wait that includes starting a Python subprocess.
LONG = 20.0
#: How long a read must stay silent to count as "nothing more is coming" (not synchronisation).
QUIET = 0.2
HERE = Path(__file__).resolve().parent


@pytest.fixture
def srv():
    with fs.FakeServer() as server:
        yield server


# --- helpers ---------------------------------------------------------------

def fetch(srv, path, headers=None, method="GET", body=None):
    """One request on a fresh connection: (status, headers dict lower-cased, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


class Raw:
    """A raw HTTP exchange: the request is written, bytes are read as they come."""

    def __init__(self, srv, target, headers=None, method="GET"):
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=SHORT)
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        self.head = None
        self.eof = False
        self.error = None

    def _recv(self):
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError as err:
            self.error = err
            data = b""
        if not data:
            self.eof = True
        self.buffer += data
        return data

    def read_head(self):
        """Read up to the blank line; returns (status, headers dict lower-cased)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._recv():
                raise AssertionError(f"connection ended before headers: {self.buffer!r} {self.error!r}")
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.head = int(lines[0].split()[1]), headers
        return self.head

    def read_body(self, n):
        """Exactly n body bytes (fails if the connection ends first)."""
        while len(self.buffer) < n:
            if not self._recv():
                raise AssertionError(f"only {len(self.buffer)} of {n} bytes before the end")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_to_end(self):
        """Everything until EOF or reset."""
        while not self.eof:
            self._recv()
        data, self.buffer = self.buffer, b""
        return data

    def silent_for(self, seconds=QUIET):
        """True if nothing arrives for `seconds` (proves a stall or hold, never used to wait for one)."""
        if self.buffer or self.eof:
            return False
        self.sock.settimeout(seconds)
        try:
            self._recv()
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(SHORT)
        return False

    def close(self):
        self.sock.close()


@pytest.fixture
def raw(srv):
    opened = []

    def open_raw(target, headers=None, method="GET"):
        r = Raw(srv, target, headers, method)
        opened.append(r)
        return r

    yield open_raw
    for r in opened:
        r.close()


def digest_authorization(challenge, method, uri, user, password, nc="00000001", cnonce="0a4f113b"):
    """Compute a Digest Authorization header from a WWW-Authenticate challenge (RFC 7616)."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.split(" ", 1)[1]))
    algorithm = params.get("algorithm", "MD5")
    h = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[algorithm]

    def H(text):
        return h(text.encode()).hexdigest()

    ha1 = H(f"{user}:{params['realm']}:{password}")
    ha2 = H(f"{method}:{uri}")
    if "qop" in params:
        response = H(f"{ha1}:{params['nonce']}:{nc}:{cnonce}:auth:{ha2}")
        extra = f', qop=auth, nc={nc}, cnonce="{cnonce}"'
    else:
        response = H(f"{ha1}:{params['nonce']}:{ha2}")
        extra = ""
    return (f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
            f'uri="{uri}", algorithm={algorithm}, response="{response}", opaque="{params["opaque"]}"{extra}')


# --- blobs -------------------------------------------------------------------

def test_blob_bytes_is_deterministic_per_size_and_seed():
    """Same (size, seed) gives the same bytes; another seed gives other bytes."""
    assert fs.blob_bytes(5000, seed=1) == fs.blob_bytes(5000, seed=1)
    assert fs.blob_bytes(5000, seed=1) != fs.blob_bytes(5000, seed=2)
    assert len(fs.blob_bytes(12345)) == 12345
    assert fs.blob_bytes(0) == b""


def test_blob_bytes_shorter_is_prefix_of_longer():
    """blob_bytes(n, s) is a prefix of blob_bytes(m, s) for n < m (use another seed for other content)."""
    assert fs.blob_bytes(3000, seed=4) == fs.blob_bytes(9000, seed=4)[:3000]


def test_blob_bytes_is_fast_for_large_sizes():
    """64 MiB are generated without a per-byte Python loop."""
    start = time.monotonic()
    data = fs.blob_bytes(64 * 1024 * 1024, seed=7)
    assert len(data) == 64 * 1024 * 1024
    assert time.monotonic() - start < 5.0


# --- the response plan (no I/O) ---------------------------------------------------
#
# The planner is pure: (method, request headers, entity, fault) -> status, headers, which body
# bytes, how the connection ends. These tables drive it without sockets.

_ENTITY = fs._Entity.build(b"0123456789", modified=fs.DEFAULT_LAST_MODIFIED)
_WEAK = fs._Entity.build(b"0123456789", modified=fs.DEFAULT_LAST_MODIFIED, weak_etag=True)
_BARE = fs._Entity.build(b"0123456789", modified=fs.DEFAULT_LAST_MODIFIED, etag=False, last_modified=False)
_EMPTY = fs._Entity.build(b"", modified=fs.DEFAULT_LAST_MODIFIED)
_LM = email.utils.formatdate(fs.DEFAULT_LAST_MODIFIED, usegmt=True)
_LATER = email.utils.formatdate(fs.DEFAULT_LAST_MODIFIED + 1, usegmt=True)
_FULL = {"Content-Range": None, "Content-Length": "10"}
_NO_VALIDATORS = {"ETag": None, "Last-Modified": None}


def _planned_body(plan, entity):
    """The body bytes a plan writes before it ends the connection (if it does)."""
    data = entity.data[plan.span[0]:plan.span[1]] if plan.span is not None else plan.body
    return data[:plan.send]


def _message(**headers):
    """Request headers as the HTTP handler holds them (an email.message.Message: names in any case)."""
    message = email.message.Message()
    for name, value in headers.items():
        message[name] = value
    return message


def _row(id, headers=None, entity=_ENTITY, fault=fs.NO_FAULT, method="GET", *, status, sent=None, body=b"",
         **plan_fields):
    """One planner row: the request and fault, then the status, the headers that must (value) or must
    not (None) be sent, the body bytes written, and other plan fields (abort, chunked, ...)."""
    return pytest.param(method, headers or {}, entity, fault, status, sent or {}, body, plan_fields, id=id)


PLAN_TABLE = [
    # ranges
    _row("no range", status=200, body=b"0123456789", abort=None, watched=True, chunked=False,
         sent={"Accept-Ranges": "bytes", "ETag": _ENTITY.etag, "Last-Modified": _LM, **_FULL,
               "Content-Type": "application/octet-stream", "Transfer-Encoding": None}),
    _row("open range", {"range": "bytes=3-"}, status=206, body=b"3456789",
         sent={"Content-Range": "bytes 3-9/10", "Content-Length": "7", "ETag": _ENTITY.etag}),
    _row("closed range", {"range": "bytes=3-4"}, status=206, body=b"34",
         sent={"Content-Range": "bytes 3-4/10", "Content-Length": "2"}),
    _row("range past the end is clamped", {"range": "bytes=3-100"}, status=206, body=b"3456789",
         sent={"Content-Range": "bytes 3-9/10"}),
    _row("suffix range", {"range": "bytes=-4"}, status=206, body=b"6789", sent={"Content-Range": "bytes 6-9/10"}),
    _row("suffix longer than the entity", {"range": "bytes=-40"}, status=206, body=b"0123456789",
         sent={"Content-Range": "bytes 0-9/10"}),
    _row("first byte past the end", {"range": "bytes=10-"}, status=416, body=b"",
         sent={"Content-Range": "bytes */10", "Content-Length": "0"}),
    _row("empty suffix", {"range": "bytes=-0"}, status=416, sent={"Content-Range": "bytes */10"}),
    _row("any range of an empty entity", {"range": "bytes=0-"}, _EMPTY, status=416,
         sent={"Content-Range": "bytes */0"}),
    _row("last before first", {"range": "bytes=5-2"}, status=200, body=b"0123456789", sent=_FULL),
    _row("several ranges", {"range": "bytes=0-1,3-4"}, status=200, body=b"0123456789", sent=_FULL),
    _row("other unit", {"range": "items=0-1"}, status=200, body=b"0123456789", sent=_FULL),
    _row("headers as the handler has them (any case)", _message(Range="bytes=8-", **{"IF-RANGE": _LM}), status=206,
         body=b"89"),
    # If-Range
    _row("If-Range: current ETag", {"range": "bytes=3-", "if-range": _ENTITY.etag}, status=206, body=b"3456789"),
    _row("If-Range: other ETag", {"range": "bytes=3-", "if-range": '"nope"'}, status=200, body=b"0123456789"),
    _row("If-Range: weak form of the ETag", {"range": "bytes=3-", "if-range": "W/" + _ENTITY.etag}, status=200,
         body=b"0123456789"),
    _row("If-Range: a weak entity's own ETag", {"range": "bytes=3-", "if-range": _WEAK.etag}, _WEAK,
         status=200, body=b"0123456789", sent={"ETag": _WEAK.etag}),
    _row("If-Range: exact Last-Modified", {"range": "bytes=3-", "if-range": _LM}, status=206, body=b"3456789"),
    _row("If-Range: other date", {"range": "bytes=3-", "if-range": _LATER}, status=200, body=b"0123456789"),
    _row("If-Range: not a validator", {"range": "bytes=3-", "if-range": "garbage"}, status=200,
         body=b"0123456789"),
    _row("If-Range: entity without validators", {"range": "bytes=3-", "if-range": _LM}, _BARE, status=200,
         body=b"0123456789", sent=_NO_VALIDATORS),
    # faults of the planning stage
    _row("status fault", fault=fs.Fault(status=503, retry_after="1"), status=503, body=b"fault: status 503\n",
         watched=False, sent={"Retry-After": "1", "Content-Length": "18", "Content-Type": "text/plain; charset=utf-8",
                              **_NO_VALIDATORS, "Accept-Ranges": None}),
    _row("status fault wins over a range", {"range": "bytes=3-"}, fault=fs.Fault(status=500), status=500,
         body=b"fault: status 500\n", sent={"Retry-After": None, "Content-Range": None}),
    _row("ignore_range", {"range": "bytes=3-"}, fault=fs.Fault(ignore_range=True), status=200,
         body=b"0123456789", sent=_FULL),
    _row("early_206", {"range": "bytes=5-"}, fault=fs.Fault(early_206=2), status=206, body=b"3456789",
         sent={"Content-Range": "bytes 3-9/10", "Content-Length": "7"}),
    _row("early_206 stops at byte 0", {"range": "bytes=1-"}, fault=fs.Fault(early_206=5), status=206,
         body=b"0123456789", sent={"Content-Range": "bytes 0-9/10"}),
    _row("wrong_total", {"range": "bytes=3-"}, fault=fs.Fault(wrong_total=True), status=206, body=b"3456789",
         sent={"Content-Range": "bytes 3-9/1010"}),
    _row("malformed_range", {"range": "bytes=3-"}, fault=fs.Fault(malformed_range=True), status=206,
         body=b"3456789", sent={"Content-Range": "bytes garbage-3/unknown"}),
    _row("range faults leave a 200 alone", fault=fs.Fault(wrong_total=True, malformed_range=True, early_206=3),
         status=200, body=b"0123456789", sent=_FULL),
    _row("drop_validators", fault=fs.Fault(drop_validators=True), status=200, body=b"0123456789",
         sent=_NO_VALIDATORS),
    _row("drop_validators: If-Range still judged on the entity", {"range": "bytes=3-", "if-range": _ENTITY.etag},
         fault=fs.Fault(drop_validators=True), status=206, body=b"3456789", sent=_NO_VALIDATORS),
    _row("etag: another ETag is sent", fault=fs.Fault(etag='"other"'), status=200, body=b"0123456789",
         sent={"ETag": '"other"', "Last-Modified": _LM}),
    _row("etag: If-Range still judged on the entity's own", {"range": "bytes=3-", "if-range": _ENTITY.etag},
         fault=fs.Fault(etag='"other"'), status=206, body=b"3456789", sent={"ETag": '"other"'}),
    _row("no_accept_ranges", {"range": "bytes=3-"}, fault=fs.Fault(no_accept_ranges=True), status=206,
         body=b"3456789", sent={"Accept-Ranges": None, "Content-Range": "bytes 3-9/10"}),
    _row("chunked", fault=fs.Fault(chunked=True), status=200, body=b"0123456789", chunked=True,
         sent={"Transfer-Encoding": "chunked", "Content-Length": None}),
    _row("short_body", fault=fs.Fault(short_body=3), status=200, body=b"0123456", abort="close",
         sent={"Content-Length": "10"}),
    _row("short_body longer than the body", fault=fs.Fault(short_body=40), status=200, body=b"", abort="close"),
    _row("cut_after", fault=fs.Fault(cut_after=4), status=200, body=b"0123", abort="close",
         sent={"Content-Length": "10"}),
    _row("cut_after with reset", fault=fs.Fault(cut_after=4, reset=True), status=200, body=b"0123", abort="reset"),
    _row("cut_after counts the range's bytes", {"range": "bytes=3-"}, fault=fs.Fault(cut_after=2), status=206,
         body=b"34", abort="close", sent={"Content-Length": "7"}),
    _row("cut_after past the body still closes", fault=fs.Fault(cut_after=40), status=200, body=b"0123456789",
         abort="close"),
    _row("cut_after and short_body: the shorter", fault=fs.Fault(cut_after=5, short_body=2), status=200,
         body=b"01234", abort="close"),
    _row("reset alone is no body fault", fault=fs.Fault(reset=True), status=200, body=b"0123456789", abort=None),
    _row("cut a status fault", fault=fs.Fault(status=503, cut_after=4), status=503, body=b"faul", abort="close"),
    _row("huge_header", fault=fs.Fault(huge_header=50), status=200, body=b"0123456789",
         sent={"X-Huge-Header": "h" * 50}),
    _row("pacing faults ride in the plan", fault=fs.Fault(stall_after=3, stall_seconds=0.5, throttle=1000),
         status=200, body=b"0123456789", stall_after=3, stall_seconds=0.5, throttle=1000, abort=None),
    _row("delay is not the planner's", fault=fs.Fault(delay=1.0), status=200, body=b"0123456789", abort=None),
    # HEAD
    _row("HEAD", method="HEAD", status=200, body=b"", span=None, watched=False, sent=_FULL),
    _row("HEAD of a range", {"range": "bytes=3-"}, method="HEAD", status=206, body=b"",
         sent={"Content-Range": "bytes 3-9/10", "Content-Length": "7"}),
    _row("HEAD chunked", method="HEAD", fault=fs.Fault(chunked=True), status=200, body=b"",
         sent={"Transfer-Encoding": "chunked", "Content-Length": None}),
    _row("HEAD ignores body faults", method="HEAD", fault=fs.Fault(cut_after=2, short_body=1), status=200,
         body=b"", abort=None, sent={"Content-Length": "10"}),
]


@pytest.mark.parametrize("method, headers, entity, fault, status, sent, body, plan_fields", PLAN_TABLE)
def test_plan_table(method, headers, entity, fault, status, sent, body, plan_fields):
    """The pure planner turns request headers, entity and fault into status, headers and body bytes."""
    plan = fs._plan_response(method, headers, entity, fault)
    got = dict(plan.headers)
    assert len(got) == len(plan.headers), f"a header sent twice: {plan.headers}"
    assert plan.status == status
    assert {name: got.get(name) for name in sent} == sent
    assert _planned_body(plan, entity) == body
    assert {name: getattr(plan, name) for name in plan_fields} == plan_fields


@pytest.mark.parametrize("value, parsed", [
    ("bytes=0-", (0, None)), ("bytes=3-7", (3, 7)), ("bytes=-5", (None, 5)), ("BYTES = 3 - 7", (3, 7)),
    ("bytes=7-3", None), ("bytes=-", None), ("bytes=1-2,4-5", None), ("items=1-2", None), ("bytes=a-b", None),
    ("", None), (None, None),
])
def test_parse_range_table(value, parsed):
    """A Range header parses to (first, last), (first, None) or (None, suffix); anything else to None."""
    assert fs._parse_range(value) == parsed


@pytest.mark.parametrize("requested, size, resolved", [
    ((0, None), 10, (0, 9)), ((3, 4), 10, (3, 4)), ((3, 100), 10, (3, 9)), ((9, None), 10, (9, 9)),
    ((10, None), 10, None), ((None, 4), 10, (6, 9)), ((None, 40), 10, (0, 9)), ((None, 0), 10, None),
    ((None, 4), 0, None), ((0, None), 0, None),
])
def test_resolve_range_table(requested, size, resolved):
    """A parsed range becomes an inclusive (first, last) inside the entity, or None (416)."""
    assert fs._resolve_range(requested, size) == resolved


@pytest.mark.parametrize("value, entity, matches", [
    (_ENTITY.etag, _ENTITY, True), (" " + _ENTITY.etag + " ", _ENTITY, True), ('"other"', _ENTITY, False),
    ("W/" + _ENTITY.etag, _ENTITY, False), (_WEAK.etag, _WEAK, False), (_LM, _ENTITY, True),
    (_LATER, _ENTITY, False), (_LM, _BARE, False), ("garbage", _ENTITY, False),
])
def test_if_range_table(value, entity, matches):
    """If-Range holds for the current strong ETag or the exact Last-Modified date, and nothing else."""
    assert fs._if_range_matches(value, entity) is matches


@pytest.mark.parametrize("fault, status, retry_after", [
    (fs.Fault(status=503), 503, None), (fs.Fault(status=429, retry_after="2"), 429, "2"),
    (fs.Fault(status=500, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"), 500, "Wed, 21 Oct 2015 07:28:00 GMT"),
])
def test_plan_status_fault_table(fault, status, retry_after):
    """A status fault answers that status with a small body and its Retry-After, if any."""
    plan = fs._plan_status_fault(fault)
    assert (plan.status, dict(plan.headers).get("Retry-After"), plan.body) == (
        status, retry_after, b"fault: status %d\n" % status)


def _declared_fault_stages():
    """Each Fault field's stages, as its ``#: Stages: a, b.`` comment states them."""
    declared, comment = {}, []
    for line in inspect.getsource(fs.Fault).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            comment.append(text[2:].strip())
            continue
        field = re.match(r"(\w+): ", text)
        if field and comment:
            match = re.fullmatch(r"Stages: (.+)\.", comment[0])
            assert match, f"Fault.{field.group(1)}: the comment does not start with 'Stages: ...': {comment[0]!r}"
            declared[field.group(1)] = {stage.strip() for stage in match.group(1).split(",")}
        comment = []
    return declared


def _fault_reads_by_function():
    """{qualified function name: Fault fields it reads} in fake_server.py: ``fault.<field>``, or
    ``plan.<field>`` for a field the planner carries into the plan (``replace(plan, <field>=fault.<field>)``)."""
    tree = ast.parse(Path(fs.__file__).read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(fs.Fault)}
    carried = {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
               if isinstance(kw.value, ast.Attribute) and isinstance(kw.value.value, ast.Name)
               and kw.value.value.id == "fault" and kw.value.attr == kw.arg}
    assert carried, "the planner carries no Fault field into the plan?"
    found = {}

    def reads(n):
        if not (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and isinstance(n.value, ast.Name)):
            return False
        return (n.value.id == "fault" and n.attr in fields) or (n.value.id == "plan" and n.attr in carried)

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[prefix + child.name] = {n.attr for n in ast.walk(child) if reads(n)}

    visit(tree, "")
    return found


def test_each_fault_field_states_the_stages_that_read_it():
    """Every Fault field's comment names exactly the stages (FAULT_STAGES) whose functions read it."""
    reads = _fault_reads_by_function()
    stage_of = {name: stage for stage, names in fs.FAULT_STAGES.items() for name in names}
    assert set(stage_of) <= set(reads), f"FAULT_STAGES names no such function: {set(stage_of) - set(reads)}"
    unstaged = [name for name, fields in reads.items() if fields and name not in stage_of]
    assert unstaged == [], f"these functions read Fault fields but belong to no stage in FAULT_STAGES: {unstaged}"
    actual = {f.name: set() for f in dataclasses.fields(fs.Fault)}
    for name, fields in reads.items():
        for field in fields:
            actual[field].add(stage_of[name])
    assert _declared_fault_stages() == actual


# --- full GET, ranges, validators -------------------------------------------------

def test_full_get_has_strong_validators_and_accept_ranges(srv):
    """A plain GET returns 200, the bytes, a strong content ETag, Last-Modified and Accept-Ranges."""
    data = fs.blob_bytes(100_000, seed=1)
    route = srv.add_blob("/a.bin", data)
    status, headers, body = fetch(srv, "/a.bin")
    assert status == 200 and body == data
    assert headers["etag"] == route.etag == '"%s"' % hashlib.sha256(data).hexdigest()[:16]
    assert headers["last-modified"] == route.last_modified
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-length"] == "100000"


def test_head_sends_headers_without_body(srv):
    """HEAD answers the GET headers and no body, and the connection stays usable."""
    srv.add_blob("/a", size=1000)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    try:
        conn.request("HEAD", "/a")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"" and resp.getheader("Content-Length") == "1000"
        conn.request("GET", "/a")
        assert len(conn.getresponse().read()) == 1000
    finally:
        conn.close()


def test_range_open_ended_gives_206_with_content_range(srv):
    """Range: bytes=N- gives 206, the tail, and Content-Range: bytes N-LAST/TOTAL."""
    data = fs.blob_bytes(10_000, seed=2)
    srv.add_blob("/a", data)
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=4000-"})
    assert status == 206 and body == data[4000:]
    assert headers["content-range"] == "bytes 4000-9999/10000"
    assert headers["content-length"] == "6000"


def test_range_closed_and_clamped(srv):
    """Range: bytes=N-M gives exactly N..M, and M past the end is clamped."""
    data = fs.blob_bytes(1000)
    srv.add_blob("/a", data)
    assert fetch(srv, "/a", {"Range": "bytes=10-19"})[2] == data[10:20]
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=990-5000"})
    assert status == 206 and body == data[990:] and headers["content-range"] == "bytes 990-999/1000"


def test_suffix_range(srv):
    """Range: bytes=-S gives the last S bytes."""
    data = fs.blob_bytes(1000)
    srv.add_blob("/a", data)
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:] and headers["content-range"] == "bytes 990-999/1000"


def test_multiple_ranges_answer_full_body(srv):
    """Several ranges in one header are not supported: 200 with the whole body."""
    data = fs.blob_bytes(1000)
    srv.add_blob("/a", data)
    status, _, body = fetch(srv, "/a", {"Range": "bytes=0-9,20-29"})
    assert status == 200 and body == data


def test_range_past_end_is_416_with_size(srv):
    """A range starting at or after the size gives 416 and Content-Range: bytes */SIZE."""
    srv.add_blob("/a", size=1000)
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=1000-"})
    assert status == 416 and headers["content-range"] == "bytes */1000" and body == b""


def test_if_range_matching_etag_honours_range(srv):
    """If-Range with the current strong ETag gives 206."""
    data = fs.blob_bytes(1000)
    route = srv.add_blob("/a", data)
    status, _, body = fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": route.etag})
    assert status == 206 and body == data[500:]


def test_if_range_other_etag_gives_full_body(srv):
    """If-Range with another ETag gives 200 and the whole current body."""
    data = fs.blob_bytes(1000)
    srv.add_blob("/a", data)
    status, _, body = fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": '"other"'})
    assert status == 200 and body == data


def test_if_range_weak_etag_never_matches(srv):
    """If-Range with a weak ETag (even the route's own) gives 200."""
    route = srv.add_blob("/a", size=1000, weak_etag=True)
    assert route.etag.startswith('W/"')
    status, headers, _ = fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": route.etag})
    assert status == 200 and headers["etag"] == route.etag


def test_if_range_last_modified_exact_match_and_mismatch(srv):
    """If-Range with the exact Last-Modified gives 206; another date gives 200."""
    route = srv.add_blob("/a", size=1000)
    assert fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": route.last_modified})[0] == 206
    other = email.utils.formatdate(fs.DEFAULT_LAST_MODIFIED + 5, usegmt=True)
    assert fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": other})[0] == 200


def test_route_without_validators(srv):
    """etag=False, last_modified=False: neither header, and no If-Range can match."""
    srv.add_blob("/a", size=1000, etag=False, last_modified=False)
    status, headers, _ = fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": '"x"'})
    assert status == 200 and "etag" not in headers and "last-modified" not in headers
    assert fetch(srv, "/a", {"Range": "bytes=500-"})[0] == 206


def test_update_changes_entity_etag_and_last_modified(srv):
    """route.update serves new bytes with a new ETag and a later Last-Modified; old If-Range gives 200."""
    route = srv.add_blob("/a", fs.blob_bytes(1000, seed=1))
    old_etag, old_lm = route.etag, route.last_modified
    new = fs.blob_bytes(1000, seed=2)
    route.update(new)
    assert route.data == new and route.etag != old_etag
    assert email.utils.parsedate_to_datetime(route.last_modified) > email.utils.parsedate_to_datetime(old_lm)
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=500-", "If-Range": old_etag})
    assert status == 200 and body == new and headers["etag"] == route.etag


def test_update_twice_keeps_last_modified_strictly_increasing(srv):
    """Two updates within one second still give strictly later Last-Modified dates."""
    route = srv.add_blob("/a", b"one")
    route.update(b"two")
    first = email.utils.parsedate_to_datetime(route.last_modified)
    route.update(b"three!")
    assert email.utils.parsedate_to_datetime(route.last_modified) > first
    assert fetch(srv, "/a")[2] == b"three!"


# --- faults ------------------------------------------------------------------

def test_fault_cut_after_closes_after_n_bytes(srv, raw):
    """cut_after=N sends the full Content-Length header, N body bytes, then a clean close."""
    srv.add_blob("/a", size=10_000, faults=[fs.Fault(cut_after=3000)])
    r = raw("/a")
    status, headers = r.read_head()
    assert status == 200 and headers["content-length"] == "10000"
    assert len(r.read_to_end()) == 3000 and r.error is None
    assert srv.bytes_served("/a") == 3000


def test_fault_reset_after_n_bytes_resets(srv, raw):
    """cut_after with reset=True ends the connection with a TCP reset."""
    srv.add_blob("/a", size=10_000, faults=[fs.Fault(cut_after=0, reset=True)])
    r = raw("/a")
    r.read_to_end()
    assert isinstance(r.error, ConnectionResetError)


def test_fault_reset_alone_resets_before_any_response(srv):
    """reset=True without cut_after resets the connection instead of answering."""
    srv.add_blob("/a", size=100, faults=[fs.Fault(reset=True)])
    with pytest.raises(ConnectionResetError):
        fetch(srv, "/a")
    assert srv.requests("/a")[0].status is None


def test_fault_stall_until_released(srv, raw):
    """stall_after=N with no stall_seconds stops after N bytes until release_stalls()."""
    data = fs.blob_bytes(5000)
    srv.add_blob("/a", data, faults=[fs.Fault(stall_after=1000)])
    r = raw("/a")
    r.read_head()
    assert r.read_body(1000) == data[:1000]
    assert srv.wait_stalled(1, SHORT)
    assert r.silent_for()
    srv.release_stalls()
    assert r.read_to_end() == data[1000:]


def test_fault_stall_for_seconds_then_continue(srv):
    """stall_seconds pauses the body for that long and then completes it."""
    data = fs.blob_bytes(5000)
    srv.add_blob("/a", data, faults=[fs.Fault(stall_after=100, stall_seconds=0.3)])
    start = time.monotonic()
    assert fetch(srv, "/a")[2] == data
    assert time.monotonic() - start >= 0.3


def test_fault_throttle_limits_rate(srv):
    """throttle=B sends at most about B bytes per second."""
    data = fs.blob_bytes(50_000)
    srv.add_blob("/a", data, faults=[fs.Fault(throttle=200_000)])
    start = time.monotonic()
    assert fetch(srv, "/a")[2] == data
    assert time.monotonic() - start >= 0.2


def test_fault_status_with_retry_after(srv):
    """status=503 with retry_after answers 503 and the Retry-After header."""
    srv.add_blob("/a", size=100, faults=[fs.Fault(status=503, retry_after="2")])
    status, headers, body = fetch(srv, "/a")
    assert status == 503 and headers["retry-after"] == "2" and b"503" in body


def test_fault_ignore_range(srv):
    """ignore_range answers 200 with the full body although Range was sent."""
    data = fs.blob_bytes(1000)
    srv.add_blob("/a", data, faults=[fs.Fault(ignore_range=True)])
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=500-"})
    assert status == 200 and body == data and "content-range" not in headers


def test_fault_early_206(srv):
    """early_206=K starts the 206 K bytes before the asked offset, with a matching Content-Range."""
    data = fs.blob_bytes(1000)
    srv.add_blob("/a", data, faults=[fs.Fault(early_206=100)])
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=500-"})
    assert status == 206 and headers["content-range"] == "bytes 400-999/1000" and body == data[400:]


def test_fault_wrong_total(srv):
    """wrong_total gives a 206 whose Content-Range total is not the size."""
    srv.add_blob("/a", size=1000, faults=[fs.Fault(wrong_total=True)])
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=500-"})
    assert status == 206 and headers["content-range"] == "bytes 500-999/2000" and len(body) == 500


def test_fault_malformed_range(srv):
    """malformed_range gives a 206 whose Content-Range does not parse."""
    srv.add_blob("/a", size=1000, faults=[fs.Fault(malformed_range=True)])
    status, headers, body = fetch(srv, "/a", {"Range": "bytes=500-"})
    assert status == 206 and len(body) == 500
    assert not re.fullmatch(r"bytes \d+-\d+/\d+", headers["content-range"])


def test_fault_chunked(srv):
    """chunked sends Transfer-Encoding: chunked and no Content-Length; the decoded body is whole."""
    data = fs.blob_bytes(150_000)
    srv.add_blob("/a", data, faults=[fs.Fault(chunked=True)])
    status, headers, body = fetch(srv, "/a")
    assert status == 200 and body == data
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers


def test_fault_short_body(srv, raw):
    """short_body=K declares the full length, sends K bytes fewer, then closes."""
    srv.add_blob("/a", size=1000, faults=[fs.Fault(short_body=10)])
    r = raw("/a")
    assert r.read_head()[1]["content-length"] == "1000"
    assert len(r.read_to_end()) == 990


def test_fault_short_body_is_incomplete_read_for_http_client(srv):
    """A short body is reported by http.client as IncompleteRead."""
    srv.add_blob("/a", size=1000, faults=[fs.Fault(short_body=1)])
    with pytest.raises(http.client.IncompleteRead):
        fetch(srv, "/a")


def test_fault_huge_header(srv, raw):
    """huge_header=N adds one header line of at least N bytes, which http.client refuses."""
    srv.add_blob("/a", size=10, default_fault=fs.Fault(huge_header=128 * 1024))
    r = raw("/a")
    r.read_head()
    r.read_to_end()
    with pytest.raises(http.client.HTTPException):
        fetch(srv, "/a")


def test_fault_drop_validators(srv):
    """drop_validators omits ETag and Last-Modified from that response only."""
    srv.add_blob("/a", size=10, faults=[fs.Fault(drop_validators=True)])
    assert "etag" not in fetch(srv, "/a")[1]
    assert "etag" in fetch(srv, "/a")[1]


def test_fault_delay(srv):
    """delay waits that long before the headers."""
    srv.add_blob("/a", size=10, faults=[fs.Fault(delay=0.3)])
    start = time.monotonic()
    assert fetch(srv, "/a")[0] == 200
    assert time.monotonic() - start >= 0.3


def test_fault_rejects_negative_values():
    """A Fault with a negative count is refused."""
    with pytest.raises(ValueError):
        fs.Fault(cut_after=-1)
    with pytest.raises(ValueError):
        fs.Fault(throttle=0)


def test_per_request_fault_list_then_default(srv):
    """faults[i] applies to the i-th request; afterwards default_fault applies."""
    srv.add_blob("/a", size=100, faults=[fs.Fault(status=503), None, fs.Fault(status=500)],
                 default_fault=fs.Fault(status=429))
    assert [fetch(srv, "/a")[0] for _ in range(5)] == [503, 200, 500, 429, 429]


def test_faults_apply_to_resumed_request(srv):
    """A cut first request and a resumed second request together give the whole body."""
    data = fs.blob_bytes(100_000)
    route = srv.add_blob("/a", data, faults=[fs.Fault(cut_after=40_000)])
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    try:
        conn.request("GET", "/a")
        resp = conn.getresponse()
        first = resp.read(40_000)
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()
    status, _, rest = fetch(srv, "/a", {"Range": "bytes=40000-", "If-Range": route.etag})
    assert status == 206 and first + rest == data


# --- uploads -----------------------------------------------------------------

def test_put_upload_recorded_with_sha256(srv):
    """PUT with Content-Length is stored, answered with JSON size/sha256, and recorded."""
    srv.add_upload("/up")
    body = fs.blob_bytes(200_000, seed=9)
    status, _, answer = fetch(srv, "/up", method="PUT", body=body)
    digest = hashlib.sha256(body).hexdigest()
    assert status == 201 and json.loads(answer) == {"size": 200_000, "sha256": digest}
    assert srv.uploads("/up") == [body]
    assert srv.requests("/up")[0].upload_sha256 == digest
    assert srv.bytes_received("/up") == 200_000


def test_chunked_post_upload(srv):
    """POST with Transfer-Encoding: chunked is decoded and stored."""
    srv.add_upload("/up", status=200)
    parts = [b"hello ", b"chunked ", b"world" * 1000]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    try:
        conn.request("POST", "/up", body=iter(parts), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["size"] == len(b"".join(parts))
    finally:
        conn.close()
    assert srv.uploads("/up") == [b"".join(parts)]
    assert srv.requests("/up")[0].header("Transfer-Encoding") == "chunked"


def test_upload_cut_is_not_stored(srv):
    """An upload cut by the server is not in uploads(); the client sees the connection end."""
    srv.add_upload("/up", faults=[fs.Fault(cut_after=1000)])
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        fetch(srv, "/up", method="PUT", body=fs.blob_bytes(500_000))
    assert srv.uploads("/up") == []
    assert srv.bytes_received("/up") == 1000


def test_upload_status_fault_reads_body_but_does_not_store(srv):
    """A status fault on an upload answers that status after reading the body, and stores nothing."""
    srv.add_upload("/up", faults=[fs.Fault(status=500)])
    assert fetch(srv, "/up", method="PUT", body=b"x" * 100)[0] == 500
    assert fetch(srv, "/up", method="PUT", body=b"y" * 100)[0] == 201
    assert srv.uploads("/up") == [b"y" * 100]


def test_get_on_upload_route_is_405(srv):
    """An upload route refuses GET with 405 and Allow."""
    srv.add_upload("/up")
    status, headers, _ = fetch(srv, "/up")
    assert status == 405 and "PUT" in headers["allow"]


# --- authentication ------------------------------------------------------------

def test_basic_auth_rejects_then_accepts(srv):
    """Basic: no or wrong credentials get 401 with a Basic challenge; right ones get the body."""
    srv.add_blob("/a", b"secret", auth=fs.BasicAuth("alice", "pw"))
    status, headers, _ = fetch(srv, "/a")
    assert status == 401 and headers["www-authenticate"].startswith('Basic realm="fake"')
    import base64
    bad = base64.b64encode(b"alice:nope").decode()
    assert fetch(srv, "/a", {"Authorization": "Basic " + bad})[0] == 401
    good = base64.b64encode(b"alice:pw").decode()
    assert fetch(srv, "/a", {"Authorization": "Basic " + good})[2] == b"secret"


def test_bearer_auth_accepts_the_current_token_only(srv):
    """Bearer: no token or an old one gets a 401 with a Bearer challenge; the current token gets the body."""
    auth = fs.BearerAuth("t1")
    srv.add_blob("/b", b"bearer!", auth=auth)
    status, headers, _ = fetch(srv, "/b")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert fetch(srv, "/b", {"Authorization": "Bearer t1"})[2] == b"bearer!"
    auth.token = "t2"
    assert fetch(srv, "/b", {"Authorization": "Bearer t1"})[0] == 401
    assert fetch(srv, "/b", {"Authorization": "Bearer t2"})[2] == b"bearer!"


def test_signed_urls_answer_403_once_expired(srv):
    """A presigned URL works until its signatures expire (then 403, no challenge); a new signature works."""
    signer = fs.SignedURLs()
    srv.add_blob("/s", b"signed!", auth=signer)
    first = signer.sign("/s")
    assert fetch(srv, first)[2] == b"signed!"
    assert fetch(srv, "/s")[0] == 403
    signer.expire()
    status, headers, _ = fetch(srv, first)
    assert status == 403 and "www-authenticate" not in headers
    assert fetch(srv, signer.sign("/s"))[2] == b"signed!"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_digest_auth_accepts_correct_response(srv, algorithm):
    """Digest: the response computed from the challenge is accepted."""
    srv.add_blob("/d", b"digest!", auth=fs.DigestAuth("bob", "pw", algorithm=algorithm))
    status, headers, _ = fetch(srv, "/d")
    challenge = headers["www-authenticate"]
    assert status == 401 and challenge.startswith("Digest ") and f"algorithm={algorithm}" in challenge
    auth = digest_authorization(challenge, "GET", "/d", "bob", "pw")
    assert fetch(srv, "/d", {"Authorization": auth})[2] == b"digest!"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_digest_auth_rejects_wrong_password(srv, algorithm):
    """Digest: a response computed with the wrong password gets 401."""
    srv.add_blob("/d", b"x", auth=fs.DigestAuth("bob", "pw", algorithm=algorithm))
    challenge = fetch(srv, "/d")[1]["www-authenticate"]
    auth = digest_authorization(challenge, "GET", "/d", "bob", "wrong")
    assert fetch(srv, "/d", {"Authorization": auth})[0] == 401


def test_digest_auth_rejects_other_uri(srv):
    """Digest: a response for another uri is refused."""
    srv.add_blob("/d", b"x", auth=fs.DigestAuth("bob", "pw"))
    challenge = fetch(srv, "/d")[1]["www-authenticate"]
    auth = digest_authorization(challenge, "GET", "/other", "bob", "pw")
    assert fetch(srv, "/d", {"Authorization": auth})[0] == 401


def test_digest_auth_rejects_bad_nc(srv):
    """Digest: nc must be 8 hex digits."""
    srv.add_blob("/d", b"x", auth=fs.DigestAuth("bob", "pw"))
    challenge = fetch(srv, "/d")[1]["www-authenticate"]
    auth = digest_authorization(challenge, "GET", "/d", "bob", "pw", nc="1")
    assert fetch(srv, "/d", {"Authorization": auth})[0] == 401


def test_digest_auth_without_qop(srv):
    """Digest with qop=None uses the RFC 2069 response and is accepted."""
    srv.add_blob("/d", b"old style", auth=fs.DigestAuth("bob", "pw", qop=None))
    challenge = fetch(srv, "/d")[1]["www-authenticate"]
    assert "qop" not in challenge
    auth = digest_authorization(challenge, "GET", "/d", "bob", "pw")
    assert fetch(srv, "/d", {"Authorization": auth})[2] == b"old style"


def test_digest_auth_stale_nonce(srv):
    """Digest: after rotate_nonce, the old nonce gets 401 with stale=true and the new one works."""
    auth_policy = fs.DigestAuth("bob", "pw")
    srv.add_blob("/d", b"x", auth=auth_policy)
    old = fetch(srv, "/d")[1]["www-authenticate"]
    auth_policy.rotate_nonce()
    status, headers, _ = fetch(srv, "/d", {"Authorization": digest_authorization(old, "GET", "/d", "bob", "pw")})
    assert status == 401 and "stale=true" in headers["www-authenticate"]
    fresh = digest_authorization(headers["www-authenticate"], "GET", "/d", "bob", "pw")
    assert fetch(srv, "/d", {"Authorization": fresh})[0] == 200


def test_urllib_digest_handler_works_against_server(srv):
    """The stdlib's own Digest client authenticates (interoperability)."""
    srv.add_blob("/d", b"interop", auth=fs.DigestAuth("bob", "pw"))
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, srv.base_url, "bob", "pw")
    opener = urllib.request.build_opener(urllib.request.HTTPDigestAuthHandler(manager))
    with opener.open(srv.url("/d"), timeout=SHORT) as resp:
        assert resp.read() == b"interop"


def test_upload_with_basic_auth(srv):
    """An upload route with auth refuses without credentials and stores with them."""
    import base64
    srv.add_upload("/up", auth=fs.BasicAuth("u", "p"))
    assert fetch(srv, "/up", method="PUT", body=b"abc")[0] == 401
    token = base64.b64encode(b"u:p").decode()
    assert fetch(srv, "/up", method="PUT", body=b"abc", headers={"Authorization": "Basic " + token})[0] == 201
    assert srv.uploads("/up") == [b"abc"]


def test_expect_100_continue_refused_before_body_without_credentials(srv, raw):
    """With Expect: 100-continue, a failed auth answers 401 without asking for the body."""
    srv.add_upload("/up", auth=fs.BasicAuth("u", "p"))
    r = raw("/up", {"Content-Length": "1000000", "Expect": "100-continue"}, method="PUT")
    status, headers = r.read_head()
    assert status == 401 and headers["connection"] == "close"
    assert srv.bytes_received("/up") == 0


def test_expect_100_continue_accepted_with_credentials(srv, raw):
    """With Expect: 100-continue and good credentials, 100 Continue comes first, then 201 after the body."""
    import base64
    srv.add_upload("/up", auth=fs.BasicAuth("u", "p"))
    token = base64.b64encode(b"u:p").decode()
    r = raw("/up", {"Content-Length": "5", "Expect": "100-continue", "Authorization": "Basic " + token},
            method="PUT")
    assert r.read_head()[0] == 100
    r.sock.sendall(b"hello")
    assert r.read_head()[0] == 201
    assert srv.uploads("/up") == [b"hello"]


# --- redirects and fixed statuses ---------------------------------------------------

def test_redirect_to_path_followed_by_urllib(srv):
    """A redirect to a path is followed to the blob."""
    srv.add_blob("/real", b"target")
    srv.add_redirect("/go", "/real")
    status, headers, _ = fetch(srv, "/go")
    assert status == 302 and headers["location"] == "/real"
    with urllib.request.urlopen(srv.url("/go"), timeout=SHORT) as resp:
        assert resp.read() == b"target"


def test_redirect_to_other_server(srv):
    """A redirect may point at another server (absolute URL)."""
    with fs.FakeServer() as other:
        other.add_blob("/x", b"over there")
        srv.add_redirect("/go", other.url("/x"), status=307)
        with urllib.request.urlopen(srv.url("/go"), timeout=SHORT) as resp:
            assert resp.read() == b"over there"
        assert other.requests("/x")[0].method == "GET"


def test_redirect_loop(srv):
    """A path redirecting to itself is a loop (urllib gives up)."""
    srv.add_redirect("/loop", "/loop", status=301)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(srv.url("/loop"), timeout=SHORT)
    info.value.close()
    assert len(srv.requests("/loop")) > 1


def test_status_route(srv):
    """add_status answers its fixed status, body and headers."""
    srv.add_status("/missing", 404, b"<h1>gone</h1>", headers={"X-Why": "test"})
    status, headers, body = fetch(srv, "/missing")
    assert status == 404 and body == b"<h1>gone</h1>" and headers["x-why"] == "test"
    assert headers["content-type"].startswith("text/html")


def test_unknown_path_is_404(srv):
    """A path with no route gets 404."""
    assert fetch(srv, "/nothing")[0] == 404


# --- keep-alive, records, counters ---------------------------------------------------

def test_keep_alive_reuses_one_connection(srv):
    """Several requests on one client connection are one accepted TCP connection."""
    srv.add_blob("/a", size=10_000)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    try:
        for _ in range(3):
            conn.request("GET", "/a")
            assert len(conn.getresponse().read()) == 10_000
    finally:
        conn.close()
    records = srv.requests("/a")
    assert srv.connections_accepted == 1
    assert len({r.client_port for r in records}) == 1 and len({r.connection for r in records}) == 1


def test_keep_alive_survives_every_non_fault_answer(srv):
    """200, 206, 416, 404, 401, 302, 405 and an upload all leave the connection reusable."""
    srv.add_blob("/a", size=1000)
    srv.add_blob("/secret", b"x", auth=fs.BasicAuth("u", "p"))
    srv.add_redirect("/go", "/a")
    srv.add_upload("/up")
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    statuses = []
    try:
        for method, path, headers, body in [
                ("GET", "/a", {}, None), ("GET", "/a", {"Range": "bytes=10-"}, None),
                ("GET", "/a", {"Range": "bytes=5000-"}, None), ("GET", "/none", {}, None),
                ("GET", "/secret", {}, None), ("GET", "/go", {}, None), ("POST", "/a", {}, b"zz"),
                ("PUT", "/up", {}, b"data"), ("GET", "/a", {}, None)]:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
    finally:
        conn.close()
    assert statuses == [200, 206, 416, 404, 401, 302, 405, 201, 200]
    assert srv.connections_accepted == 1


def test_separate_connections_are_counted(srv):
    """Requests on separate connections are counted, and recorded with distinct connection numbers."""
    srv.add_blob("/a", size=10)
    for _ in range(3):
        fetch(srv, "/a")
    assert srv.connections_accepted == 3
    assert sorted(r.connection for r in srv.requests("/a")) == [1, 2, 3]


def test_request_records(srv):
    """Each request is recorded with method, path, query, lower-cased headers, status, range and bytes."""
    srv.add_blob("/a", size=1000)
    fetch(srv, "/a?x=1", {"Range": "bytes=100-", "X-Test": "yes"})
    (record,) = srv.requests("/a")
    assert (record.method, record.path, record.query, record.status) == ("GET", "/a", "x=1", 206)
    assert record.range_header == "bytes=100-" and record.bytes_sent == 900 and record.first_byte == 100
    assert record.headers["x-test"] == "yes" and record.header("X-TEST") == "yes"
    assert record.client_port > 0
    fetch(srv, "/a")
    fetch(srv, "/missing")
    assert [r.first_byte for r in srv.requests()] == [100, 0, None]  # (None: an answer that is not the entity)


def test_reset_counters(srv):
    """reset_counters zeroes bytes, records and the connection count."""
    srv.add_blob("/a", size=100)
    fetch(srv, "/a")
    srv.reset_counters()
    assert (srv.bytes_served("/a"), srv.requests(), srv.connections_accepted) == (0, [], 0)


def test_added_ports_serve_the_same_routes_and_are_recorded(srv):
    """add_ports: more ports (origins) with the same routes and counters; each record names its port."""
    srv.add_blob("/a", b"same")
    extra = srv.add_ports(3)
    assert srv.ports == [srv.port, *extra] and len(set(srv.ports)) == 4
    for port in srv.ports:
        with urllib.request.urlopen(srv.url("/a", port=port), timeout=SHORT) as resp:
            assert resp.read() == b"same"
    assert [r.port for r in srv.requests("/a")] == srv.ports
    assert srv.bytes_served("/a") == 16 and srv.connections_accepted == 4
    with pytest.raises(ValueError):
        srv.url("/a", port=1)


def test_added_ports_come_back_after_a_restart(srv):
    """Ports added are bound again, the same numbers, when the server is started again."""
    srv.add_blob("/a", b"x")
    (extra,) = srv.add_ports(1)
    srv.stop()
    srv.start()
    assert srv.ports[1] == extra
    with urllib.request.urlopen(srv.url("/a", port=extra), timeout=SHORT) as resp:
        assert resp.read() == b"x"


def test_peaks_count_connections_and_requests_open_at_once(srv):
    """peak_connections and peak_requests: the most at once, held open by the test; closed ones stop counting."""
    srv.add_blob("/h", size=1000, faults=[fs.Fault(stall_after=0)] * 3)
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=SHORT) for port in [srv.port, *srv.add_ports(2)]]
    try:
        for conn in conns:
            conn.request("GET", "/h")
        assert srv.wait_stalled(3, SHORT)
        assert (srv.peak_connections, srv.peak_requests) == (3, 3)
        srv.release_stalls()
        for conn in conns:
            assert len(conn.getresponse().read()) == 1000
    finally:
        for conn in conns:
            conn.close()
    for _ in range(4):  # one at a time: the closed ones no longer count
        fetch(srv, "/h")
    assert (srv.peak_connections, srv.peak_requests) == (3, 3)
    srv.reset_counters()
    fetch(srv, "/h")
    assert (srv.peak_connections, srv.peak_requests) == (1, 1)



def test_a_request_the_client_has_read_and_closed_no_longer_counts(srv):
    """A request is over when the client has read its whole response and closed the connection, though the handler
    that wrote it has not returned yet: the next request, on a new connection, makes the peak 1, not 2."""
    srv.add_blob("/a", size=1000)
    srv.add_blob("/b", size=10)
    written, go_on = threading.Event(), threading.Event()
    srv.on_bytes("/a", 1000, lambda path, served: (written.set(), go_on.wait(SHORT)))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
        conn.request("GET", "/a")
        assert len(conn.getresponse().read()) == 1000
        conn.close()
        assert written.wait(SHORT)  # the handler of /a is in the callback now, and stays there
        assert len(fetch(srv, "/b")[2]) == 10
        assert (srv.peak_connections, srv.peak_requests) == (1, 1)
    finally:
        go_on.set()

# --- byte boundaries ----------------------------------------------------------------

def test_on_bytes_fires_at_exact_boundary(srv):
    """on_bytes calls back once, in the handler, when exactly N bytes of the path have been sent."""
    srv.add_blob("/a", size=300_000)
    seen = []
    srv.on_bytes("/a", 100_001, lambda path, served: seen.append((path, served, srv.bytes_served(path))))
    srv.on_bytes("/a", 7, lambda path, served: seen.append((path, served, srv.bytes_served(path))))
    assert len(fetch(srv, "/a")[2]) == 300_000
    fetch(srv, "/a")
    assert seen == [("/a", 7, 7), ("/a", 100_001, 100_001)]


def test_on_bytes_counts_cumulatively_across_requests(srv):
    """The boundary is on the path's cumulative count, across requests."""
    srv.add_blob("/a", size=1000)
    seen = []
    srv.on_bytes("/a", 1500, lambda path, served: seen.append(served))
    fetch(srv, "/a")
    assert seen == []
    fetch(srv, "/a", {"Range": "bytes=0-"})
    assert seen == [1500]


def test_hold_at_stops_at_exact_offset_until_released(srv, raw):
    """hold_at(N) sends exactly N bytes, holds (reached set), and continues after release()."""
    data = fs.blob_bytes(200_000)
    srv.add_blob("/a", data)
    hold = srv.hold_at("/a", 70_000)
    r = raw("/a")
    r.read_head()
    assert r.read_body(70_000) == data[:70_000]
    assert hold.wait(SHORT) and hold.served == 70_000
    assert srv.bytes_served("/a") == 70_000 and r.silent_for()
    hold.release()
    assert r.read_to_end() == data[70_000:]


def test_hold_at_zero_holds_after_headers(srv, raw):
    """hold_at(0) holds after the headers, before the first body byte."""
    srv.add_blob("/a", size=1000)
    hold = srv.hold_at("/a", 0)
    r = raw("/a")
    assert r.read_head()[0] == 200
    assert hold.wait(SHORT) and r.silent_for()
    hold.release()
    assert len(r.read_to_end()) == 1000


def test_hold_on_upload_counts_received_bytes(srv):
    """On an upload route, hold_at counts request body bytes received."""
    srv.add_upload("/up")
    hold = srv.hold_at("/up", 5000)
    result = {}
    body = fs.blob_bytes(50_000)
    thread = threading.Thread(target=lambda: result.update(r=fetch(srv, "/up", method="PUT", body=body)))
    thread.start()
    try:
        assert hold.wait(SHORT)
        assert srv.bytes_received("/up") == 5000
    finally:
        hold.release()
        thread.join(SHORT)
    assert result["r"][0] == 201 and srv.uploads("/up") == [body]


def test_stop_does_not_hang_on_held_or_stalled_handlers():
    """stop() returns promptly while one handler is held and another is stalled."""
    server = fs.FakeServer().start()
    clients = []
    try:
        server.add_blob("/held", size=100_000)
        server.add_blob("/stalled", size=100_000, default_fault=fs.Fault(stall_after=10))
        hold = server.hold_at("/held", 1000)
        clients += [Raw(server, "/held"), Raw(server, "/stalled")]
        assert hold.wait(SHORT) and server.wait_stalled(1, SHORT)
    finally:
        start = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - start
        for c in clients:
            c.close()
    assert elapsed < 3.0


def test_restart_keeps_port(srv):
    """A stopped server refuses connections; started again it serves on the same port."""
    srv.add_blob("/a", b"back")
    port = srv.port
    srv.stop()
    with pytest.raises(ConnectionRefusedError):
        fetch(srv, "/a")
    srv.start()
    assert srv.port == port and fetch(srv, "/a")[2] == b"back"


# --- query-string faults and /files -------------------------------------------------------

def test_query_blob_serves_seeded_bytes_with_stable_etag(srv):
    """/blob/<size>?seed=S serves blob_bytes(size, S) with the same strong ETag every time."""
    data = fs.blob_bytes(5000, seed=3)
    status, headers, body = fetch(srv, "/blob/5000?seed=3")
    assert status == 200 and body == data
    assert headers["etag"] == '"%s"' % hashlib.sha256(data).hexdigest()[:16]
    assert fetch(srv, "/blob/5000?seed=3")[1]["etag"] == headers["etag"]


def test_query_faults_cut_and_status(srv, raw):
    """Query parameters apply faults: cut_after cuts, status+retry_after answers that status."""
    r = raw("/blob/5000?cut_after=1000")
    r.read_head()
    assert len(r.read_to_end()) == 1000
    status, headers, _ = fetch(srv, "/blob/5000?status=503&retry_after=1")
    assert status == 503 and headers["retry-after"] == "1"
    assert srv.bytes_served("/blob/5000") == 1000 + len(b"fault: status 503\n")


def test_query_faults_ignore_range_and_chunked(srv):
    """ignore_range=1 and chunked=1 from the query string."""
    data = fs.blob_bytes(3000)
    status, headers, body = fetch(srv, "/blob/3000?ignore_range=1&chunked=1", {"Range": "bytes=10-"})
    assert status == 200 and body == data and headers["transfer-encoding"] == "chunked"


def test_query_fault_bad_value_is_400(srv):
    """A malformed query fault value gets 400."""
    assert fetch(srv, "/blob/10?cut_after=lots")[0] == 400


def test_files_under_root(tmp_path):
    """With root, files are served under /files/ with ranges; paths outside root are 404."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_bytes(b"0123456789")
    (tmp_path.parent / "outside.txt").write_bytes(b"no")
    with fs.FakeServer(root=tmp_path) as server:
        assert fetch(server, "/files/sub/f.txt")[2] == b"0123456789"
        assert fetch(server, "/files/sub/f.txt", {"Range": "bytes=5-"})[2] == b"56789"
        assert fetch(server, "/files/../outside.txt")[0] == 404
        assert fetch(server, "/files/sub")[0] == 404


# --- command line ------------------------------------------------------------------------

def test_cli_help():
    """--help prints usage and exits 0."""
    done = subprocess.run([sys.executable, str(HERE / "fake_server.py"), "--help"],
                          capture_output=True, text=True, timeout=LONG)
    assert done.returncode == 0 and "--root" in done.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_on_signal(tmp_path, signum):
    """The CLI prints 'serving on URL', serves /files/ and /blob/, and exits 0 on the signal."""
    (tmp_path / "hello.txt").write_bytes(b"hello")
    proc = subprocess.Popen([sys.executable, "-W", "error", str(HERE / "fake_server.py"), "--port", "0",
                             "--root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        with urllib.request.urlopen(match.group(1) + "/files/hello.txt", timeout=SHORT) as resp:
            assert resp.read() == b"hello"
        with urllib.request.urlopen(match.group(1) + "/blob/10?seed=2", timeout=SHORT) as resp:
            assert resp.read() == fs.blob_bytes(10, seed=2)
        proc.send_signal(signum)
        assert proc.wait(LONG) == 0
        assert "GET /files/hello.txt" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --- AppController -------------------------------------------------------------------------

CHILD_FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as resp:
    while resp.read(8192):
        pass
print("finished")
"""

CHILD_ENV = """
import os
print("BG=" + os.environ.get("BGSESSION_BACKGROUND_EVENTS", "-"), "X=" + os.environ.get("X_TEST", "-"))
"""


def test_app_controller_kills_child_at_byte_boundary(srv, tmp_path):
    """kill_when SIGKILLs the child when the path reaches N bytes (return code -SIGKILL)."""
    out = tmp_path / "out.txt"
    path = "/blob/2000000"
    with fs.AppController([sys.executable, "-c", CHILD_FETCH, srv.url(path + "?throttle=4000000")],
                          output=out) as ctl:
        hold = ctl.kill_when(srv, path, 300_000)
        ctl.launch()
        assert hold.wait(LONG) and hold.error is None and hold.served == 300_000
        assert ctl.wait(SHORT) == -signal.SIGKILL
    assert ctl.launches[0][1:] == (False, -signal.SIGKILL)
    assert "finished" not in out.read_text()


def test_app_controller_relaunch_after_kill_is_background(srv, tmp_path):
    """After a kill at a boundary, a background relaunch runs to the end and both launches are listed."""
    out = tmp_path / "out.txt"
    path = "/blob/1000000"
    with fs.AppController([sys.executable, "-c", CHILD_FETCH, srv.url(path)], identifier="app.id",
                          output=out) as ctl:
        hold = ctl.kill_when(srv, path, 100_000)
        ctl.launch()
        assert hold.wait(LONG) and hold.released.is_set()
        ctl.launch(background=True)
        assert ctl.wait(LONG) == 0
    assert [(bg, rc) for _, bg, rc in ctl.launches] == [(False, -signal.SIGKILL), (True, 0)]
    assert out.read_text().count("finished") == 1


def test_app_controller_background_launch_sets_environment(tmp_path):
    """launch(background=True) sets BGSESSION_BACKGROUND_EVENTS=<identifier>; a normal launch does not."""
    out = tmp_path / "out.txt"
    with fs.AppController([sys.executable, "-c", CHILD_ENV], env={"X_TEST": "1"},
                          identifier="com.example.photos", output=out) as ctl:
        ctl.launch()
        assert ctl.wait(LONG) == 0
        ctl.launch(background=True)
        assert ctl.wait(LONG) == 0
    assert out.read_text().split("\n")[:2] == ["BG=- X=1", "BG=com.example.photos X=1"]
    assert [(bg, rc) for _, bg, rc in ctl.launches] == [(False, 0), (True, 0)]


def test_app_controller_wait_timeout_and_close():
    """wait() raises TimeoutError while the app runs; close() SIGKILLs and reaps it."""
    ctl = fs.AppController([sys.executable, "-c", "import threading; threading.Event().wait()"])
    try:
        process = ctl.launch()
        with pytest.raises(TimeoutError):
            ctl.wait(QUIET)
    finally:
        ctl.close()
    assert process.returncode == -signal.SIGKILL


def test_app_controller_background_needs_identifier():
    """A background launch without an identifier is refused."""
    with pytest.raises(ValueError):
        fs.AppController([sys.executable, "-c", "pass"]).launch(background=True)


CHILD_WAIT = "import threading; threading.Event().wait()"

#: A parent that starts a child with a marker argument, prints its pid, and reports how it ended
#: (the child is the parent's, not ours: like an app relaunched by bgsession's daemon).
PARENT_OF_ONE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], "marker-arg"])
print(child.pid, flush=True)
print("child ended", child.wait(), flush=True)
"""


def _spawn_parent():
    """A parent process with one child; returns (parent Popen, child pid)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT_OF_ONE, CHILD_WAIT], stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


def _close_parent(parent):
    if parent.poll() is None:
        parent.kill()
    parent.wait()
    parent.stdout.close()


def test_process_ref_names_one_process_for_good():
    """A ProcessRef is alive for its own process only: another start token is another process."""
    me = fs.ProcessRef.of(os.getpid())
    assert me.token == fs.process_start_token(os.getpid()) and me.key == f"{os.getpid()}-{me.token}"
    assert me.alive()
    assert not fs.ProcessRef(os.getpid(), "1").alive()  # a recycled pid: not the process named


def test_process_ref_kill_waits_for_the_exit_and_spares_a_recycled_pid():
    """kill() SIGKILLs the named process and returns once it has exited; a wrong token kills nothing."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_WAIT])
    try:
        assert not fs.ProcessRef(child.pid, "1").kill()
        assert child.poll() is None
        ref = fs.ProcessRef.of(child.pid)
        assert ref.kill(LONG)
        assert not ref.alive() and ref.wait_exit(0)  # exited (a zombie until we reap it)
        assert not ref.kill()
    finally:
        if child.poll() is None:
            child.kill()
        assert child.wait(LONG) == -signal.SIGKILL


def test_process_ref_wait_exit_times_out_while_running():
    """wait_exit() returns False while the process still runs after the timeout."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_WAIT])
    try:
        assert not fs.ProcessRef.of(child.pid).wait_exit(QUIET)
    finally:
        child.kill()
        child.wait()


def test_app_controller_discovers_and_kills_an_app_it_did_not_launch():
    """discover() adopts another process's child by its command line; kill_all() SIGKILLs it."""
    parent, child_pid = _spawn_parent()
    try:
        with fs.AppController([sys.executable, "-c", "pass"]) as ctl:
            assert ctl.discover(parent.pid, "not-there") == []
            (app,) = ctl.discover(parent.pid, "marker-arg")
            assert (app.pid, app.background, app.popen, app.running()) == (child_pid, True, None, True)
            assert ctl.discover(parent.pid, "marker-arg") == []  # known already
            assert ctl.kill_all() == [app]
            assert app.killed and not app.running() and app.returncode == -signal.SIGKILL
            assert ctl.launches == []  # launches lists what the controller launched
        assert parent.stdout.readline() == f"child ended {-signal.SIGKILL}\n"
    finally:
        _close_parent(parent)



def test_a_child_caught_inside_execve_is_waited_for(monkeypatch):
    """A process its parent has just started can read as an empty command line (it is inside execve): discover()
    waits for the arguments instead of passing the child over (it did, 15 times in 150 under CPU load)."""
    parent, child_pid = _spawn_parent()
    reads = []
    real_open = open

    def mid_exec_open(path, *args, **kwargs):  # the first two reads of the child's command line come back empty
        if path == f"/proc/{child_pid}/cmdline" and len(reads) < 2:
            reads.append(path)
            return io.BytesIO(b"")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fs, "open", mid_exec_open, raising=False)
    try:
        with fs.AppController([sys.executable, "-c", "pass"]) as ctl:
            (app,) = ctl.discover(parent.pid, "marker-arg")
            assert app.pid == child_pid and len(reads) == 2
    finally:
        _close_parent(parent)

def test_app_controller_close_kills_adopted_apps():
    """close() SIGKILLs adopted processes too (by pid and start token)."""
    parent, child_pid = _spawn_parent()
    try:
        with fs.AppController([sys.executable, "-c", "pass"]) as ctl:
            app = ctl.adopt(child_pid)
            assert ctl.adopt(child_pid) is app and ctl.apps == [app]
        assert parent.stdout.readline() == f"child ended {-signal.SIGKILL}\n"
    finally:
        _close_parent(parent)


def test_app_controller_kill_pid_checks_the_start_token():
    """kill_pid() kills a process only if it is still the one started at the token given."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_WAIT])
    try:
        assert not fs.AppController.kill_pid(child.pid, "1")
        assert fs.AppController.kill_pid(child.pid, fs.process_start_token(child.pid))
        assert child.wait(LONG) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_app_controller_kill_when_keeps_the_handler_held(srv, tmp_path):
    """kill_when(app_number=..., keep_held=True): the app is killed at the boundary and the handler
    stays held (no byte goes into the dead app's connection) until released."""
    out = tmp_path / "out.txt"
    path = "/blob/2000000"
    with fs.AppController([sys.executable, "-c", CHILD_FETCH, srv.url(path + "?throttle=4000000")],
                          output=out) as ctl:
        hold = ctl.kill_when(srv, path, 300_000, app_number=0, keep_held=True)
        ctl.launch()
        assert hold.wait(LONG) and hold.error is None
        assert ctl.wait(SHORT) == -signal.SIGKILL
        (app,) = ctl.apps
        assert app.killed and app.killed_at == (path, 300_000)
        assert not hold.released.is_set() and srv.bytes_served(path) == 300_000
        hold.release()


def test_app_controller_kill_when_spares_another_launch(srv, tmp_path):
    """kill_when(app_number=N) kills nothing when the newest app is not number N: the handler goes on."""
    out = tmp_path / "out.txt"
    path = "/blob/200000"
    with fs.AppController([sys.executable, "-c", CHILD_FETCH, srv.url(path)], output=out) as ctl:
        hold = ctl.kill_when(srv, path, 100_000, app_number=1, keep_held=True)
        ctl.launch()
        assert hold.wait(LONG) and hold.released.is_set()
        assert ctl.wait(LONG) == 0
        assert not ctl.apps[0].killed and ctl.apps[0].killed_at is None
    assert "finished" in out.read_text()


def test_stop_joins_every_thread_the_server_started(srv, raw):
    """stop() joins the accept thread and every connection thread, idle, held or stalled."""
    srv.add_blob("/held", size=100_000)
    srv.add_blob("/stalled", size=100_000, default_fault=fs.Fault(stall_after=10))
    srv.add_blob("/idle", size=10)
    hold = srv.hold_at("/held", 1000)
    raw("/held"), raw("/stalled")
    idle = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=SHORT)
    try:
        idle.request("GET", "/idle")
        idle.getresponse().read()  # the keep-alive connection's thread now waits for a next request
        assert hold.wait(SHORT) and srv.wait_stalled(1, SHORT)
        assert [t for t in threading.enumerate() if t.name.startswith("fake_server-")]
        srv.stop()
        assert [t.name for t in threading.enumerate() if t.name.startswith("fake_server-")] == []
    finally:
        idle.close()


# --- proxy mode ----------------------------------------------------------------


@pytest.fixture
def proxy():
    with fs.FakeServer(proxy=True) as server:
        yield server


def test_proxy_forwards_absolute_form_requests(srv, proxy):
    """An absolute-form GET is forwarded upstream (Range included) and answered with the upstream's response."""
    data = fs.blob_bytes(200_000, seed=3)
    srv.add_blob("/p", data)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.proxy_url()}))
    with opener.open(srv.url("/p"), timeout=SHORT) as resp:
        assert resp.read() == data
    req = urllib.request.Request(srv.url("/p"), headers={"Range": "bytes=100000-"})
    with opener.open(req, timeout=SHORT) as resp:
        assert resp.status == 206 and resp.read() == data[100_000:]
    forwarded = proxy.requests()
    assert [r.path for r in forwarded] == [srv.url("/p")] * 2 and forwarded[1].header("range") == "bytes=100000-"
    assert [r.header("range") for r in srv.requests("/p")] == [None, "bytes=100000-"]


def test_proxy_forwards_uploads(srv, proxy):
    """A PUT through the proxy reaches the upstream whole."""
    srv.add_upload("/up")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=SHORT)
    try:
        conn.request("PUT", srv.url("/up"), body=b"x" * 70_000)
        assert conn.getresponse().status == 201
    finally:
        conn.close()
    assert srv.uploads("/up") == [b"x" * 70_000]


def test_proxy_asks_for_credentials_with_407(srv, proxy):
    """With proxy_auth, a request without Proxy-Authorization gets a 407 with a Basic Proxy-Authenticate."""
    srv.add_blob("/p", b"ok")
    proxy.proxy_auth = fs.BasicAuth("pa", "pw", realm="proxy")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=SHORT)
    try:
        conn.request("GET", srv.url("/p"))
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 407 and resp.getheader("Proxy-Authenticate").startswith('Basic realm="proxy"')
        import base64
        token = base64.b64encode(b"pa:pw").decode()
        conn.request("GET", srv.url("/p"), headers={"Proxy-Authorization": "Basic " + token})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok")
    finally:
        conn.close()
    assert "proxy-authorization" not in srv.requests("/p")[0].headers  # the proxy's own credential stays there


def test_proxy_connect_tunnels_to_a_mapped_name(srv, proxy):
    """CONNECT opens a tunnel; a name mapped by map_host (unknown to DNS) reaches the upstream through it."""
    srv.add_blob("/t", b"tunnelled")
    proxy.map_host("photos.invalid")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=SHORT)
    conn.set_tunnel("photos.invalid", srv.port)
    try:
        conn.request("GET", "/t")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"tunnelled")
    finally:
        conn.close()
    assert [r.method for r in proxy.requests()] == ["CONNECT"]
    assert proxy.requests()[0].path == f"photos.invalid:{srv.port}"



def test_proxy_requests_stop_counting_when_answered(srv, proxy):
    """Every request a proxy answers -- forwarded, tunnelled, refused with 407 -- ends as in flight: one after
    another, the peak stays 1."""
    srv.add_blob("/t", b"ok")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.proxy_url()}))
    for _ in range(2):
        with opener.open(srv.url("/t"), timeout=SHORT) as resp:
            assert resp.read() == b"ok"
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=SHORT)
        conn.set_tunnel("127.0.0.1", srv.port)
        try:
            conn.request("GET", "/t")
            assert conn.getresponse().read() == b"ok"
        finally:
            conn.close()
    assert proxy.peak_requests == 1

def test_proxy_stop_cuts_the_transfers_it_relays(srv, proxy):
    """A proxy that stops cuts the client's response mid-body (the upstream is held mid-transfer)."""
    srv.add_blob("/big", size=1_000_000)
    hold = srv.hold_at("/big", 300_000)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=SHORT)
    try:
        conn.request("GET", srv.url("/big"))
        resp = conn.getresponse()
        assert hold.wait(SHORT)
        proxy.stop()
        with pytest.raises((http.client.IncompleteRead, OSError)):
            resp.read()
    finally:
        conn.close()
        hold.release()
