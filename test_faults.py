"""The server fault matrix, on both hosts: every fault ends in a byte-exact file or a clear
TransferError, never a splice. ``python test_faults.py`` prints the table of docs/reliability.md
(requests and bytes each scenario cost, per host)."""

from __future__ import annotations

import dataclasses
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


def run_scenario(scenario: Scenario, sessions: Sessions) -> dict[str, Any]:
    """Run one scenario; assert its outcome; return what it cost."""
    with fs.FakeServer() as srv:
        url = scenario.setup(srv)
        rec = Recorder()
        s = sessions.open(rec, retry=scenario.retry, timeout_for_request=scenario.timeout_for_request,
                          timeout_for_resource=scenario.timeout_for_resource)
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
        path = scenario.path
        return {"outcome": outcome, "requests": len(srv.requests(path)), "served": srv.bytes_served(path)}


@pytest.mark.parametrize("scenario", SCENARIOS + HOSTILE, ids=[s.name for s in SCENARIOS + HOSTILE])
def test_fault_ends_in_exact_file_or_clear_error(scenario, sessions):
    """Each server fault ends in the exact file, or the documented response or error, never a splice."""
    run_scenario(scenario, sessions)


def main() -> int:
    """Print the fault table (Markdown) for docs/reliability.md."""
    rows: list[str] = ["| fault | outcome | requests (in-process / daemon) | bytes served for a 1 MiB file |",
                       "|---|---|---|---|"]

    for scenario in SCENARIOS + HOSTILE:
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
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
