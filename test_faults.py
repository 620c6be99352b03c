"""The server fault matrix, on both hosts: every fault ends in a byte-exact file or a clear
TransferError, never a splice. ``python test_faults.py`` prints the tables of docs/reliability.md
(requests and bytes each scenario cost, per host): one-connection downloads, then segmented ones
(``max_connections_per_task=4``, a 4 MiB file in four segments), whose rows also say which way the
download went on (every segment resumed, or one connection from the bytes held, or from zero)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
from typing import Any, Callable

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import LONG, Recorder, Sessions, download, sha

SIZE = 1 << 20
HALF = SIZE // 2
DATA = fs.blob_bytes(SIZE, seed=71)
NEW = fs.blob_bytes(SIZE, seed=72)
NEW_LONGER = fs.blob_bytes(SIZE + 777, seed=73)
#: The segmented rows: four segments of MIN_SEGMENT_SIZE.
SPLIT = 4 * bg.MIN_SEGMENT_SIZE
SPLIT_DATA = fs.blob_bytes(SPLIT, seed=74)
SPLIT_NEW = fs.blob_bytes(SPLIT, seed=75)


#: Retries in milliseconds, Retry-After clamped to 50 ms: the matrix is about outcomes, not waiting.
FAST_RETRY = bg.Retry(total=3, backoff_factor=0.001, backoff_max=0.01, retry_after_max=0.05)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    setup: Callable[[fs.FakeServer], str]  # returns the URL to download
    expect: Any  # bytes the file must equal, or an ErrorCode
    retry: bg.Retry = FAST_RETRY
    timeout_for_request: float = 60.0
    timeout_for_resource: float = 7 * 24 * 3600.0
    path: str = "/f"  # the path whose requests and bytes the table counts
    connections: int = 1  # max_connections_per_task
    #: A segmented row: how the download must go on -- "resumed" (no fall-back), "one connection" (from the bytes
    #: held contiguously from the start), "from zero" (the entity changed: restarted on one connection).
    way: str | None = None


def cut_then(second: fs.Fault | None, **kw: Any) -> Callable[[fs.FakeServer], str]:
    def setup(srv: fs.FakeServer) -> str:
        srv.add_blob("/f", DATA, faults=[fs.Fault(cut_after=HALF), second], **kw)
        return srv.url("/f")
    return setup


def faults(*fl: fs.Fault | None, default: fs.Fault | None = None, data: bytes = DATA, **kw: Any):
    def setup(srv: fs.FakeServer) -> str:
        srv.add_blob("/f", data, faults=list(fl), default_fault=default, **kw)
        return srv.url("/f")
    return setup


def ignored_if_range(srv: fs.FakeServer) -> str:
    """The entity changes at the cut; the next request's If-Range no longer matches, and the server sends the new
    entity's range anyway (with the new ETag): appending it would splice two entities."""
    route = srv.add_blob("/f", DATA, faults=[fs.Fault(cut_after=HALF), fs.Fault(ignore_if_range=True)])
    srv.on_bytes("/f", HALF, lambda path, served: route.update(NEW))
    return srv.url("/f")


def entity_changes(new: bytes) -> Callable[[fs.FakeServer], str]:
    def setup(srv: fs.FakeServer) -> str:
        route = srv.add_blob("/f", DATA, faults=[fs.Fault(cut_after=HALF)])
        srv.on_bytes("/f", HALF, lambda path, served: route.update(new))
        return srv.url("/f")
    return setup


def redirect_loop(srv: fs.FakeServer) -> str:
    srv.add_redirect("/f", "/f")
    return srv.url("/f")


def dripping_redirect(srv: fs.FakeServer) -> str:
    srv.add_blob("/f", DATA)
    srv.add_redirect("/r", "/f", body=b"x" * 10_000, default_fault=fs.Fault(throttle=20))  # 500 s to read
    return srv.url("/r")


def non_ascii(srv: fs.FakeServer) -> str:
    srv.add_blob("/f", DATA)
    srv.add_redirect("/ünï/😀 sent.bin", "/f")  # the URL percent-encoded (IRI to URI), the route by its text
    return srv.url("/ünï/😀%20sent.bin")


def non_ascii_redirect(srv: fs.FakeServer) -> str:
    srv.add_blob("/f/ünï😀.bin", DATA)  # the Location is sent as UTF-8 bytes
    srv.add_redirect("/f", "/f/ünï😀.bin")
    return srv.url("/f")


#: The server faults issue 18's probe found: a 206 that never advances, a clean close in a huge body, a cache that
#: ignores If-Range, heads and redirect bodies that drip, non-ASCII URLs and redirect targets.
HOSTILE = [
    Scenario("206 ending before the offset, always", faults(fs.Fault(cut_after=HALF),
                                                            default=fs.Fault(early_206=HALF, range_end=4095)), DATA),
    Scenario("206 without a body, always", faults(fs.Fault(cut_after=HALF), default=fs.Fault(empty_206=True)), DATA),
    Scenario("206 cut before its first byte, always", faults(fs.Fault(cut_after=HALF),
                                                             default=fs.Fault(cut_after=0)),
             bg.ErrorCode.NETWORK_CONNECTION_LOST),
    Scenario("clean close in a 32 GiB body", faults(fs.Fault(claim_length=32 << 30, cut_after=HALF)), DATA),
    Scenario("If-Range ignored, entity changed", lambda srv: ignored_if_range(srv), NEW),
    Scenario("head dripping 20 bytes/s", faults(default=fs.Fault(drip=0.05, huge_header=10_000)),
             bg.ErrorCode.TIMED_OUT, timeout_for_resource=1.0),
    Scenario("head dripping, timeout_for_request", faults(fs.Fault(drip=0.05, huge_header=10_000)), DATA,
             timeout_for_request=1.0),
    Scenario("redirect body dripping 20 bytes/s", dripping_redirect, bg.ErrorCode.TIMED_OUT,
             timeout_for_resource=1.0, path="/r"),
    Scenario("body dripping 20 bytes/s", faults(default=fs.Fault(throttle=20)), bg.ErrorCode.TIMED_OUT,
             timeout_for_resource=1.0),
    Scenario("non-ASCII URL", non_ascii, DATA, path="/f"),
    Scenario("non-ASCII redirect target", non_ascii_redirect, DATA, path="/f/ünï😀.bin"),
]


def split_faults(*fl: fs.Fault | None, default: fs.Fault | None = None) -> Callable[[fs.FakeServer], str]:
    return faults(*fl, default=default, data=SPLIT_DATA)


def split_entity_changes(srv: fs.FakeServer) -> str:
    route = srv.add_blob("/f", SPLIT_DATA)
    srv.on_bytes("/f", 64 << 10, lambda path, served: route.update(SPLIT_NEW))  # once the first answer has come
    return srv.url("/f")


SCENARIOS = [
    Scenario("connection reset mid-body", faults(fs.Fault(cut_after=HALF, reset=True)), DATA),
    Scenario("connection closed mid-body", cut_then(None), DATA),
    Scenario("stall longer than timeout_for_request", faults(fs.Fault(stall_after=HALF, stall_seconds=5.0)), DATA,
             timeout_for_request=0.3),
    Scenario("500 without Retry-After", faults(fs.Fault(status=500), fs.Fault(status=500)), DATA),
    Scenario("503 with Retry-After", faults(fs.Fault(status=503, retry_after="1")), DATA),
    Scenario("429 with Retry-After", faults(fs.Fault(status=429, retry_after="1")), DATA),
    Scenario("503 forever (retries exhausted)", faults(default=fs.Fault(status=503)), "status 503"),
    Scenario("Range ignored (200)", cut_then(fs.Fault(ignore_range=True)), DATA),
    Scenario("206 starting early", cut_then(fs.Fault(early_206=4096)), DATA),
    Scenario("wrong Content-Range total", cut_then(fs.Fault(wrong_total=True)), DATA),
    Scenario("malformed Content-Range", cut_then(fs.Fault(malformed_range=True)), DATA),
    Scenario("entity changed, same length", entity_changes(NEW), NEW),
    Scenario("entity changed, other length", entity_changes(NEW_LONGER), NEW_LONGER),
    Scenario("weak ETag only", cut_then(None, weak_etag=True, last_modified=False), DATA),
    Scenario("no validators", cut_then(None, etag=False, last_modified=False), DATA),
    Scenario("chunked without length", faults(default=fs.Fault(chunked=True)), DATA),
    Scenario("chunked, cut mid-body", faults(fs.Fault(chunked=True, cut_after=HALF)), DATA),
    Scenario("short body (Content-Length larger)", faults(fs.Fault(short_body=1000)), DATA),
    Scenario("416 on a complete file", faults(fs.Fault(chunked=True, cut_after=SIZE)), DATA),
    Scenario("redirect loop", redirect_loop, bg.ErrorCode.HTTP_TOO_MANY_REDIRECTS),
    Scenario("huge header, once", faults(fs.Fault(huge_header=200_000)), DATA),
    Scenario("huge header, always", faults(default=fs.Fault(huge_header=200_000)), bg.ErrorCode.BAD_SERVER_RESPONSE),
    Scenario("25 interruptions of 1 byte", faults(*[fs.Fault(cut_after=1)] * 25, data=DATA[:65536]), DATA[:65536],
             retry=bg.Retry(total=2, backoff_factor=0.001)),
]


#: Segmented downloads (max_connections_per_task=4, a 4 MiB file): the first request is answered normally and
#: splits the download; the faults hit the segments' requests (the second request is one, whichever comes first).
SEGMENTED = [
    Scenario("a segment's connection reset mid-way", split_faults(None, fs.Fault(cut_after=HALF, reset=True)),
             SPLIT_DATA, way="resumed"),
    Scenario("a segment stalls longer than timeout_for_request",
             split_faults(None, fs.Fault(stall_after=HALF, stall_seconds=5.0)), SPLIT_DATA, timeout_for_request=0.3,
             way="resumed"),
    Scenario("a slow segment (512 KiB/s)", split_faults(None, fs.Fault(throttle=512 << 10)), SPLIT_DATA,
             way="resumed"),
    Scenario("503 to a segment", split_faults(None, fs.Fault(status=503, retry_after="1")), SPLIT_DATA,
             way="resumed"),
    Scenario("a segment answered 200 instead of 206", split_faults(None, fs.Fault(ignore_range=True)), SPLIT_DATA,
             way="one connection"),
    Scenario("Range ignored after the first request", split_faults(None, default=fs.Fault(ignore_range=True)),
             SPLIT_DATA, way="one connection"),
    Scenario("a segment's 206 with another ETag", split_faults(None, fs.Fault(etag='"other"')), SPLIT_DATA,
             way="from zero"),
    Scenario("a segment's 206 with another total", split_faults(None, fs.Fault(wrong_total=True)), SPLIT_DATA,
             way="from zero"),
    Scenario("416 to a segment", split_faults(None, fs.Fault(status=416)), SPLIT_DATA, way="from zero"),
    Scenario("malformed Content-Range of a segment", split_faults(None, fs.Fault(malformed_range=True)), SPLIT_DATA,
             way="one connection"),
    Scenario("entity changed between segments", split_entity_changes, SPLIT_NEW, way="from zero"),
]
for _row in SEGMENTED:
    object.__setattr__(_row, "connections", 4)


def journal(directory: str, record_type: str) -> list[dict[str, Any]]:
    """The session's journal records of one type, in order."""
    with open(os.path.join(directory, "journal.jsonl"), "rb") as f:
        return [r for r in map(json.loads, f) if r.get("t") == record_type]


def run_scenario(scenario: Scenario, sessions: Sessions) -> dict[str, Any]:
    """Run one scenario; assert its outcome; return what it cost."""
    with fs.FakeServer() as srv:
        url = scenario.setup(srv)
        rec = Recorder()
        s = sessions.open(rec, retry=scenario.retry, timeout_for_request=scenario.timeout_for_request,
                          timeout_for_resource=scenario.timeout_for_resource,
                          max_connections_per_task=scenario.connections)
        task = download(s, url)
        try:
            assert s.wait(LONG)
        finally:
            srv.release_stalls()
        err = rec.errors[task.identifier]
        if isinstance(scenario.expect, bytes):
            assert err is None, err
            assert sha(rec.files[task.identifier]) == sha(scenario.expect)
            outcome = "exact file"
        elif isinstance(scenario.expect, str):
            assert err is None and f"status {rec.statuses[task.identifier]}" == scenario.expect
            outcome = f"response, {scenario.expect}"
        else:
            assert err is not None and err.code is scenario.expect, err
            assert task.identifier not in rec.files
            outcome = scenario.expect.name
        if scenario.way is not None:  # which way the split download went on
            assert len(journal(sessions.config().directory, "split")) == 1
            unsplit = [r["offset"] for r in journal(sessions.config().directory, "unsplit")]
            way = "resumed" if not unsplit else "from zero" if unsplit[0] == 0 else "one connection"
            assert way == scenario.way, unsplit
            outcome += f", {way}"
        path = scenario.path
        return {"outcome": outcome, "requests": len(srv.requests(path)), "served": srv.bytes_served(path)}


@pytest.mark.parametrize("scenario", SCENARIOS + HOSTILE, ids=[s.name for s in SCENARIOS + HOSTILE])
def test_fault_ends_in_exact_file_or_clear_error(scenario, sessions):
    """Each server fault ends in the exact file, or the documented response or error, never a splice."""
    run_scenario(scenario, sessions)


@pytest.mark.parametrize("scenario", SEGMENTED, ids=[s.name for s in SEGMENTED])
def test_fault_of_a_segment_ends_in_exact_file(scenario, sessions):
    """Each fault of a segmented download's segment ends in the exact file, the documented way: every segment
    resumed on its own, or one connection from the bytes held contiguously, or -- the entity changed -- from zero;
    never a splice of two entities."""
    run_scenario(scenario, sessions)


def main() -> int:
    """Print the fault tables (Markdown) for docs/reliability.md."""
    print(table(SCENARIOS + HOSTILE, "bytes served for a 1 MiB file"))
    print()
    print(table(SEGMENTED, "bytes served for a 4 MiB file"))
    return 0


def table(scenarios: list[Scenario], served: str) -> str:
    rows: list[str] = [f"| fault | outcome | requests (in-process / daemon) | {served} |", "|---|---|---|---|"]
    for scenario in scenarios:
        results = {}
        for host in ("inprocess", "daemon"):
            with tempfile.TemporaryDirectory() as tmp:
                sessions = Sessions(pathlib.Path(tmp), host)
                try:
                    results[host] = run_scenario(scenario, sessions)
                finally:
                    sessions.teardown()  # stops the daemons too
        a, b = results["inprocess"], results["daemon"]
        rows.append(f"| {scenario.name} | {a['outcome']} | {a['requests']} / {b['requests']} | "
                    f"{a['served']:,} / {b['served']:,} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
