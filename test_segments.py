"""Segmented downloads: one download fetched on parallel connections (``max_connections_per_task``), each segment
resumed and validated on its own, never a splice; anything a segment's answer does not allow falls back to one
connection. The decisions as tables, then behaviour on both hosts (the split, its fall-backs, the caps, limits,
suspend, cancel with resume data, progress, the journal format), then SIGKILLs at random points that must end
byte-exact without fetching again a byte that was in a segment's file.

Speed is measured by bench/run.py (row 7), never here."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, MiB, Recorder, download, received, sha, stop_daemon, wait_until

KiB = 1 << 10
SEG = bg.MIN_SEGMENT_SIZE
ETAG = '"abc"'
LM = "Wed, 01 Jan 2020 00:00:00 GMT"


# ---------------------------------------------------------------------------
# the decisions, as tables
# ---------------------------------------------------------------------------


def split(connections: int, status: int, headers: dict[str, str], offset: int = 0, asked: bool = False):
    """plan_split of a response, with plan_response's plan of it (as the transfer asks them)."""
    h = bg.Headers(tuple(headers.items()))
    return bg.plan_split(connections, status, h, bg.plan_response(offset, asked, status, h, None)).segments


WHOLE = {"Content-Length": str(4 * SEG), "Accept-Ranges": "bytes", "ETag": ETAG}
QUARTERS = ((0, SEG), (SEG, 2 * SEG), (2 * SEG, 3 * SEG), (3 * SEG, 4 * SEG))


@pytest.mark.parametrize("connections, status, headers, offset, expect", [
    (4, 200, WHOLE, 0, QUARTERS),  # a strong ETag, a length, Accept-Ranges: equal segments
    (1, 200, WHOLE, 0, ()),  # one connection per task (the default)
    (2, 200, WHOLE, 0, ((0, 2 * SEG), (2 * SEG, 4 * SEG))),
    (16, 200, WHOLE, 0, QUARTERS),  # never a segment shorter than MIN_SEGMENT_SIZE
    (4, 200, {**WHOLE, "Content-Length": str(SEG + SEG // 2)}, 0, ()),  # fewer than two segments' worth
    (4, 200, {**WHOLE, "Content-Length": str(3 * SEG + 1)}, 0,
     ((0, SEG), (SEG, 2 * SEG), (2 * SEG, 3 * SEG + 1))),
    (4, 200, {**WHOLE, "ETag": 'W/"weak"'}, 0, ()),  # a weak ETag is no validator for If-Range
    (4, 200, {**WHOLE, "ETag": 'W/"weak"', "Last-Modified": LM}, 0, QUARTERS),  # ... Last-Modified is
    (4, 200, {"Content-Length": str(4 * SEG), "Accept-Ranges": "bytes", "Last-Modified": LM}, 0, QUARTERS),
    (4, 200, {"Content-Length": str(4 * SEG), "Accept-Ranges": "bytes"}, 0, ()),  # no validator
    (4, 200, {**WHOLE, "Content-Length": "", "Transfer-Encoding": "chunked"}, 0, ()),  # unknown length
    (4, 200, {"Content-Length": str(4 * SEG), "ETag": ETAG}, 0, ()),  # no Accept-Ranges
    (4, 200, {**WHOLE, "Accept-Ranges": "none"}, 0, ()),
    (4, 206, {"Content-Range": f"bytes {SEG}-{4 * SEG - 1}/{4 * SEG}", "ETag": ETAG}, SEG, (
        (0, 2 * SEG), (2 * SEG, 3 * SEG), (3 * SEG, 4 * SEG))),  # a resume: the rest is split, the first from 0
    (4, 206, {"Content-Range": f"bytes {2 * SEG}-{4 * SEG - 1}/{4 * SEG}", "ETag": ETAG}, 2 * SEG, (
        (0, 3 * SEG), (3 * SEG, 4 * SEG))),  # (a 206 shows Range support: no Accept-Ranges needed)
    (4, 404, WHOLE, 0, ()),
    (4, 416, {"Content-Range": f"bytes */{4 * SEG}", "ETag": ETAG}, 4 * SEG, ()),
])
def test_plan_split_table(connections, status, headers, offset, expect):
    """A download is split only if its response has a strong validator, a known length and Range support, into
    equal segments of at least MIN_SEGMENT_SIZE; the first segment starts at 0 (the bytes held)."""
    asked = offset > 0
    assert split(connections, status, headers, offset, asked) == expect


def seg_plan(status: int, headers: dict[str, str], position: int = 2 * SEG, validator: Any = None):
    h = bg.Headers(tuple(headers.items()))
    plan = bg.plan_segment(position, (SEG, 3 * SEG), status, h, validator or {"etag": ETAG}, 4 * SEG)
    return plan.action, plan.start


def cr(first: int, last: int = 3 * SEG - 1, total: int = 4 * SEG) -> str:
    return f"bytes {first}-{last}/{total}"


@pytest.mark.parametrize("status, headers, validator, expect", [
    (206, {"Content-Range": cr(2 * SEG), "ETag": ETAG}, None, ("write", 2 * SEG)),
    (206, {"Content-Range": cr(2 * SEG)}, None, ("write", 2 * SEG)),  # no validator sent: its If-Range held
    (206, {"Content-Range": cr(2 * SEG, 4 * SEG - 1), "ETag": ETAG}, None, ("write", 2 * SEG)),  # longer: cut
    (206, {"Content-Range": cr(SEG + 5), "ETag": ETAG}, None, ("write", SEG + 5)),  # early, within the segment
    (206, {"Content-Range": cr(SEG - 5), "ETag": ETAG}, None, ("unsplit", 0)),  # starts in the previous one
    (206, {"Content-Range": cr(2 * SEG + 1), "ETag": ETAG}, None, ("unsplit", 0)),  # after the bytes held
    (206, {"Content-Range": "bytes garbage"}, None, ("unsplit", 0)),
    (206, {"Content-Range": f"bytes {2 * SEG}-{3 * SEG - 1}/*"}, None, ("unsplit", 0)),
    (206, {"Content-Range": cr(2 * SEG, total=4 * SEG + 1)}, None, ("restart", 0)),  # another length
    (206, {"Content-Range": cr(2 * SEG), "ETag": '"other"'}, None, ("restart", 0)),  # another entity
    (206, {"Content-Range": cr(2 * SEG), "ETag": "W/" + ETAG}, None, ("restart", 0)),
    (206, {"Content-Range": cr(2 * SEG), "Last-Modified": "Thu, 02 Jan 2020 00:00:00 GMT"},
     {"last_modified": LM}, ("restart", 0)),
    (206, {"Content-Range": cr(2 * SEG), "Last-Modified": LM, "ETag": '"new"'}, {"last_modified": LM},
     ("write", 2 * SEG)),  # (a Last-Modified validator is compared with Last-Modified only)
    (200, {"Content-Length": str(4 * SEG), "ETag": ETAG}, None, ("unsplit", 0)),  # Range ignored
    (200, {"Content-Length": str(4 * SEG)}, None, ("unsplit", 0)),
    (200, {"Content-Length": str(4 * SEG), "ETag": '"other"'}, None, ("restart", 0)),  # If-Range failed
    (200, {"Content-Length": str(5 * SEG)}, None, ("restart", 0)),
    (416, {"Content-Range": f"bytes */{4 * SEG}"}, None, ("restart", 0)),
    (404, {"Content-Length": "9"}, None, ("unsplit", 0)),  # one connection sees what the status means
])
def test_plan_segment_table(status, headers, validator, expect):
    """A segment's answer is written only if it is a 206 of the same entity (total, validators) starting within the
    segment at or before its position; another entity restarts the whole download on one connection, never a
    splice; anything else falls back to one connection keeping the bytes held contiguously from the start."""
    action, start = seg_plan(status, headers, validator=validator)
    assert (action, start if action == "write" else 0) == expect


@pytest.mark.parametrize("wanted, running, cap, origin, per_host, waiting, expect", [
    (3, 1, 16, 1, 6, False, 3),
    (3, 1, 16, 1, 6, True, 0),  # a queued task could take a slot: it gets it, not a segment
    (3, 15, 16, 1, 6, False, 1),  # the session's cap
    (3, 4, 16, 5, 6, False, 1),  # the origin's cap
    (3, 16, 16, 1, 6, False, 0),
    (0, 1, 16, 1, 6, False, 0),
])
def test_extra_connections_table(wanted, running, cap, origin, per_host, waiting, expect):
    """A split download takes extra connections only from free slots no queued task could use, within both caps."""
    assert bg.extra_connections(wanted, running=running, max_concurrent=cap, origin_running=origin,
                                per_host=per_host, waiting=waiting) == expect


@pytest.mark.parametrize("value", [0, 17, 2.5, True, "4", None])
def test_bad_max_connections_per_task_is_refused(value, tmp_path):
    """max_connections_per_task must be an int from 1 to 16: anything else is a clear InvalidArgumentError."""
    with pytest.raises(bg.InvalidArgumentError, match="max_connections_per_task must be an int from 1 to 16"):
        bg.Configuration.background("test.bad", directory=str(tmp_path), max_connections_per_task=value)
    with pytest.raises(ValueError):
        bg.Configuration.default(max_connections_per_task=value)
    assert not os.listdir(tmp_path)  # nothing was created


# ---------------------------------------------------------------------------
# behaviour, on both hosts
# ---------------------------------------------------------------------------


def ranges(server: fs.FakeServer, path: str, since: int = 0) -> list[tuple[int, int]]:
    """The entity's bytes [first, first + sent) each answer sent, in order."""
    return [(r.first_byte, r.first_byte + r.bytes_sent) for r in server.requests(path)[since:]
            if r.first_byte is not None]


#: Every answer stops after its first 32 KiB until the test releases it: the split's connections all at once.
STALL = fs.Fault(stall_after=32 * KiB)


def test_a_download_is_split_across_parallel_connections(server, sessions):
    """With max_connections_per_task=4 a 4-segment file is fetched on 4 connections at once: the first request
    asks the whole entity, then 3 Range requests with If-Range ask the other segments, which the answers cover
    exactly once; the file is byte-exact (the daemon host: the setting reached the daemon)."""
    data = fs.blob_bytes(4 * SEG, seed=1)
    server.add_blob("/f", data, default_fault=STALL)
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    assert server.wait_stalled(4, LONG)
    server.release_stalls()
    assert s.wait(LONG)
    assert rec.errors[task.identifier] is None and sha(rec.files[task.identifier]) == sha(data)
    first, *rest = server.requests("/f")
    assert first.range_header is None and first.status == 200
    assert sorted(r.range_header for r in rest) == [f"bytes={a}-{b - 1}" for a, b in QUARTERS[1:]]
    assert all(r.status == 206 and r.header("if-range") == server.route("/f").etag for r in rest)
    assert len({r.connection for r in server.requests("/f")}) == 4 and server.peak_requests == 4
    assert sorted(ranges(server, "/f")[1:]) == list(QUARTERS[1:])
    assert task.count_of_bytes_received == len(data) and task.response.status == 200
    assert task.response.headers["Content-Length"] == str(len(data))


def test_one_connection_is_the_default(server, sessions):
    """Without max_connections_per_task a download keeps to one connection (as before), whatever its size."""
    server.add_blob("/f", size=4 * SEG)
    rec = Recorder()
    s = sessions.open(rec)
    download(s, server.url("/f"))
    assert s.wait(LONG)
    assert len(server.requests("/f")) == 1


@pytest.mark.parametrize("what, kwargs, size", [
    ("weak ETag", {"weak_etag": True, "last_modified": False}, 4 * SEG),
    ("no validators", {"etag": False, "last_modified": False}, 4 * SEG),
    ("no Accept-Ranges", {"default_fault": fs.Fault(no_accept_ranges=True)}, 4 * SEG),
    ("unknown length", {"default_fault": fs.Fault(chunked=True)}, 4 * SEG),
    ("too small", {}, SEG + SEG // 2),
])
def test_a_response_that_does_not_allow_a_split_stays_on_one_connection(server, inproc, what, kwargs, size):
    """A weak or missing validator, no Accept-Ranges, an unknown length or a small file: one connection, exact."""
    data = fs.blob_bytes(size, seed=2)
    server.add_blob("/f", data, **kwargs)
    rec = Recorder()
    s = inproc.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    assert [r.range_header for r in server.requests("/f")] == [None]


def test_segments_count_against_the_session_cap(server, sessions):
    """max_concurrent_transfers=2 with one slot held by another download: a split download gets no extra
    connection (it never preempts a transfer nor goes beyond the cap) and fetches its two segments one after the
    other on its own; never more than 2 connections at once; both files exact."""
    a, b = fs.blob_bytes(4 * SEG, seed=3), fs.blob_bytes(4 * SEG, seed=4)
    server.add_blob("/a", a)
    server.add_blob("/b", b)
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec, max_concurrent_transfers=2, max_connections_per_task=4)
    hold = server.hold_at("/b", 0)
    tb = download(s, server.url("/b"))
    assert hold.wait(LONG)  # /b holds one of the two slots
    ta = download(s, server.url("/a"))
    wait_until(lambda: ta.state is bg.TaskState.COMPLETED, what="/a to complete")
    hold.release()
    assert s.wait(LONG)
    assert sha(rec.files[ta.identifier]) == sha(a) and sha(rec.files[tb.identifier]) == sha(b)
    # (split in two: never more segments than the caps allow connections; the second fetched after the first)
    assert [r.range_header for r in server.requests("/a")] == [None, f"bytes={2 * SEG}-{4 * SEG - 1}"]
    assert server.peak_connections <= 2  # (requests in flight may count an answer still written into a closed one)


def test_segments_count_against_the_per_host_cap(server, inproc):
    """max_connections_per_host=2 with max_connections_per_task=4: two segments, two connections at most."""
    data = fs.blob_bytes(4 * SEG, seed=5)
    server.add_blob("/f", data)
    rec = Recorder()
    s = inproc.open(rec, max_connections_per_host=2, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    assert [r.range_header for r in server.requests("/f")] == [None, f"bytes={2 * SEG}-{4 * SEG - 1}"]
    assert server.peak_requests <= 2


LIMIT = 256 * KiB
#: What a limited transfer may move beyond rate x time: the bucket's burst and a chunk per connection, and room.
SLACK = 1.0


def test_the_task_limit_applies_to_the_sum_of_its_segments(server, sessions):
    """Under a task limit of 256 KiB/s, the 4 connections of a split download together move no more than that;
    lifting the limit lets the download finish byte-exact."""
    data = fs.blob_bytes(4 * SEG, seed=6)
    server.add_blob("/f", data)
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4)
    task = s.download_task(server.url("/f"))
    task.max_bytes_per_second = LIMIT
    started = time.monotonic()
    task.resume()
    wait_until(lambda: len(server.requests("/f")) == 4 and task.count_of_bytes_received >= 512 * KiB,
               what="4 connections and 512 KiB")
    assert task.count_of_bytes_received <= LIMIT * (time.monotonic() - started + SLACK)
    task.max_bytes_per_second = None
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)


def test_suspend_then_resume_continues_every_segment_where_it_stopped(server, sessions):
    """A split download suspended mid-way keeps every segment's bytes; resumed, each segment continues inside
    itself with a Range request (none starts over), and the file is byte-exact."""
    data = fs.blob_bytes(4 * SEG, seed=7)
    server.add_blob("/f", data, default_fault=fs.Fault(throttle=2 * MiB))
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    directory = sessions.config().directory
    wait_until(lambda: task.count_of_bytes_received >= 2 * SEG and every_segment_holds(directory, data),
               what="2 MiB, and bytes in each of the 4 segments' files")
    task.suspend()
    assert task.state is bg.TaskState.SUSPENDED
    before = len(server.requests("/f"))
    task.resume()
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    asked = sorted(tuple(int(x) for x in r.range_header[len("bytes="):].split("-"))
                   for r in server.requests("/f")[before:] if r.range_header)
    assert len(asked) == len(server.requests("/f")) - before <= 4
    for first, last in asked:
        start, end = next((a, b) for a, b in QUARTERS if a <= first < b)
        assert start < first and last == end - 1  # inside its segment, after what it held, to its end
    assert server.bytes_served("/f") <= len(data) + 4 * 512 * KiB  # (what was in flight at the suspend)


def test_cancel_producing_resume_data_of_a_split_download(server, sessions):
    """Cancelling a split download with resume data keeps the bytes held contiguously from the start (the first
    segment's at least); a task made from the resume data continues there with a Range request, byte-exact."""
    data = fs.blob_bytes(4 * SEG, seed=8)
    server.add_blob("/f", data, default_fault=fs.Fault(throttle=2 * MiB))
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    directory = sessions.config().directory
    wait_until(lambda: task.count_of_bytes_received >= SEG and every_segment_holds(directory, data, first=64 * KiB),
               what="1 MiB, 64 KiB in the first segment's file and bytes in the others'")
    resume_data = task.cancel_producing_resume_data()
    assert resume_data is not None
    before = len(server.requests("/f"))
    new = s.download_task_with_resume_data(resume_data)
    new.resume()
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANCELLED
    assert sha(rec.files[new.identifier]) == sha(data)
    first = server.requests("/f")[before]
    assert first.range_header is not None and first.header("if-range") == server.route("/f").etag
    assert int(first.range_header[len("bytes="):].split("-")[0]) >= 64 * KiB


def test_cancel_of_a_split_download(server, sessions):
    """cancel() ends a split download's connections at once: CANCELLED, no file, nothing left in tmp/."""
    server.add_blob("/f", size=4 * SEG, default_fault=fs.Fault(throttle=1 * MiB))
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    wait_until(lambda: len(server.requests("/f")) == 4, what="4 connections")
    task.cancel()
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANCELLED and task.identifier not in rec.files
    assert os.listdir(os.path.join(sessions.config().directory, "tmp")) == []


def test_progress_is_one_total_per_task(server, sessions):
    """The progress hook sees one running total for the whole task, whatever connection the bytes came on:
    increasing, its increments adding up to the file, ending at its size."""
    data = fs.blob_bytes(4 * SEG, seed=9)
    server.add_blob("/f", data, default_fault=fs.Fault(throttle=8 * MiB))
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    assert s.wait(LONG)
    progress = rec.progress[task.identifier]
    totals = [total for _, total, _ in progress]
    assert len(server.requests("/f")) == 4
    assert totals == sorted(totals) and totals[-1] == len(data)
    assert sum(written for written, _, _ in progress) == len(data)
    assert {expected for _, _, expected in progress} == {len(data)}


def test_timeout_for_resource_ends_a_split_download(server, sessions):
    """timeout_for_resource ends a split download that cannot finish in time with TIMED_OUT and its resume data,
    as it ends a one-connection download."""
    server.add_blob("/f", size=4 * SEG, default_fault=fs.Fault(throttle=256 * KiB))  # 4 s a segment
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4, timeout_for_resource=1.5)
    task = download(s, server.url("/f"))
    assert s.wait(LONG)
    error = rec.errors[task.identifier]
    assert error is not None and error.code is bg.ErrorCode.TIMED_OUT and error.resume_data
    assert len(server.requests("/f")) == 4 and task.identifier not in rec.files


def test_a_stalled_segment_is_retried_and_resumed(server, inproc):
    """A segment whose connection stalls past timeout_for_request ends the attempt; the next one resumes every
    segment where it stopped, and the file is exact."""
    data = fs.blob_bytes(4 * SEG, seed=10)
    server.add_blob("/f", data, faults=[None, fs.Fault(stall_after=SEG // 2, stall_seconds=10.0)])
    rec = Recorder()
    s = inproc.open(rec, max_connections_per_task=4, timeout_for_request=0.5)
    task = download(s, server.url("/f"))
    try:
        assert s.wait(LONG)
    finally:
        server.release_stalls()
    assert sha(rec.files[task.identifier]) == sha(data)
    assert all(r.range_header is not None for r in server.requests("/f")[4:])


def held(directory: str, data: bytes) -> list[tuple[int, int]]:
    """The entity's bytes the session's files hold now, checked against the entity: each segment's file from its
    start (a split download), or the partial file from 0."""
    tmp = os.path.join(directory, "tmp")
    task = bg.Journal(directory).state().tasks.get(1)
    if task is None or not os.path.isdir(tmp):
        return []
    spans = [(start, os.path.join(tmp, task.segment_name(k))) for k, (start, _, _) in
             enumerate(task.segments or [])] or [(0, os.path.join(tmp, task.partial_name))]
    out = []
    for start, path in spans:
        if os.path.exists(path):
            with open(path, "rb") as f:
                got = f.read()
            assert data[start:start + len(got)] == got, f"{path} holds bytes that are not the entity's"
            out.append((start, start + len(got)))
    return out


def every_segment_holds(directory: str, data: bytes, segments: int = 4, first: int = 1) -> bool:
    """Whether the split download's *segments* files each hold bytes now (the first at least *first*): what a test
    must wait for before it stops the download and looks at each segment. The server having seen every segment's
    request, or a total count of bytes, does not say that each connection has written any yet."""
    spans = held(directory, data)
    return len(spans) == segments and spans[0][1] >= first and all(b > a for a, b in spans)


def fetched_again(server: fs.FakeServer, path: str, since: int, spans: list[tuple[int, int]]) -> list[tuple]:
    """Overlaps of the bytes the answers to requests since the *since*-th sent with *spans*."""
    later = [(r.first_byte, r.first_byte + r.bytes_sent) for r in server.requests(path)[since:]
             if r.first_byte is not None]
    return [(a, b, c, d) for a, b in later for c, d in spans if max(a, c) < min(b, d)]


def test_a_split_survives_a_reopen(server, inproc):
    """A session closed in the middle of a split download resumes each segment from its own file when opened
    again (in-process host): byte-exact, and no answer after the reopen sends a byte a segment's file held."""
    data = fs.blob_bytes(4 * SEG, seed=11)
    server.add_blob("/f", data, default_fault=fs.Fault(throttle=2 * MiB))
    rec = Recorder()
    s = inproc.open(rec, max_connections_per_task=4)
    task = download(s, server.url("/f"))
    directory = inproc.config().directory
    wait_until(lambda: task.count_of_bytes_received >= SEG and every_segment_holds(directory, data),
               what="1 MiB, and bytes in each of the 4 segments' files")
    s.close()
    before, spans = len(server.requests("/f")), held(directory, data)
    assert len(spans) == 4 and all(b > a for a, b in spans)
    rec2 = Recorder()
    s2 = inproc.open(rec2, max_connections_per_task=4)
    assert s2.wait(LONG)
    assert sha(rec2.files[task.identifier]) == sha(data)
    assert fetched_again(server, "/f", before, spans) == []


# ---------------------------------------------------------------------------
# the journal format
# ---------------------------------------------------------------------------


def formats(directory: str) -> list[int]:
    with open(os.path.join(directory, "journal.jsonl"), "rb") as f:
        journal = [json.loads(line)["v"] for line in f]
    with open(os.path.join(directory, "snapshot.json"), "rb") as f:
        return journal + [json.load(f)["v"]]


def test_a_split_download_is_format_3_which_an_older_bgsession_refuses(server, tmp_path, monkeypatch):
    """The records of a split download are journal format 3 (and so is a snapshot holding one); a bgsession that
    reads format 2 refuses the journal with its error and leaves the files as they were."""
    server.add_blob("/f", size=4 * SEG, default_fault=fs.Fault(throttle=2 * MiB))
    cfg = bg.Configuration.background("test.v3", directory=str(tmp_path / "s"), host="inprocess",
                                      max_connections_per_task=4)
    s = bg.Session(cfg)
    task = download(s, server.url("/f"))
    wait_until(received(task, SEG), what="1 MiB")
    s.close()
    assert 3 in formats(cfg.directory)
    files = {name: (tmp_path / "s" / name).read_bytes() for name in ("journal.jsonl", "snapshot.json")}
    with monkeypatch.context() as older:
        older.setattr(bg, "JOURNAL_VERSION", 2)  # what the bgsession before segmented downloads reads
        with pytest.raises(bg.JournalError, match="newer than this bgsession"):
            bg.Session(cfg)
    assert {name: (tmp_path / "s" / name).read_bytes() for name in files} == files
    bg.Session(cfg).close()  # folds the journal into the snapshot, which holds the task's segments
    assert formats(cfg.directory)[-1] == 3
    with monkeypatch.context() as older:
        older.setattr(bg, "JOURNAL_VERSION", 2)
        with pytest.raises(bg.JournalError, match="newer bgsession"):
            bg.Session(cfg)


def test_a_session_that_splits_nothing_writes_no_format_3(server, sessions):
    """max_connections_per_task set, but nothing splits (a small file): the journal is as an older bgsession
    wrote it (format 1 here), so it still reads it."""
    server.add_blob("/small", size=1000)
    rec = Recorder()
    s = sessions.open(rec, max_connections_per_task=4)
    download(s, server.url("/small"))
    assert rec.completed.wait(LONG)
    sessions.close_all()
    stop_daemon(sessions.config().directory)
    assert set(formats(sessions.config().directory)) == {1}


def test_split_records_that_do_not_fit_are_refused_and_change_nothing():
    """The reducer validates split, unsplit and a segment's progress before applying them."""
    state = bg._SessionState()
    state.apply({"t": "task", "id": 1, "kind": "download", "request": {"url": "http://x/"}})
    state.apply({"t": "response", "id": 1, "response": {"url": "http://x/", "status": 200}, "start": 0,
                 "total": 300, "validator": {"etag": ETAG}})
    task = state.tasks[1]
    for bad in ({"t": "split", "id": 1, "segments": [[0, 100], [150, 300]]},  # a gap
                {"t": "split", "id": 1, "segments": [[0, 100], [100, 299]]},  # short of the length
                {"t": "split", "id": 1, "segments": [[0, 300]]},  # one segment
                {"t": "split", "id": 1, "segments": "nonsense"},
                {"t": "progress", "id": 1, "offset": 50, "segment": 0}):  # not split
        with pytest.raises(bg.JournalError):
            state.apply(bad)
        assert task.segments is None
    state.apply({"t": "split", "id": 1, "segments": [[0, 100], [100, 300]]})
    assert task.segments == [[0, 100, 0], [100, 300, 100]]
    with pytest.raises(bg.JournalError):
        state.apply({"t": "progress", "id": 1, "offset": 301, "segment": 1})
    state.apply({"t": "progress", "id": 1, "offset": 250, "segment": 1})
    assert task.segments == [[0, 100, 0], [100, 300, 250]]
    state.apply({"t": "unsplit", "id": 1, "offset": 60})
    assert (task.segments, task.durable_offset) == ([], 60)
    with pytest.raises(bg.JournalError):  # never split again
        state.apply({"t": "split", "id": 1, "segments": [[0, 100], [100, 300]]})


# ---------------------------------------------------------------------------
# SIGKILL at random points
# ---------------------------------------------------------------------------

KILL_APP = textwrap.dedent('''
    import hashlib, json, os, sys
    sys.path.insert(0, {here!r})
    import bgsession as bg
    directory, host, url, ledger, create = sys.argv[1:6]

    class App(bg.SessionDelegate):
        def download_task_did_finish_downloading(self, session, task, location):
            with open(location, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            with open(ledger, "a") as f:
                f.write(json.dumps({{"sha": digest}}) + "\\n")
                f.flush()
                os.fsync(f.fileno())

    config = bg.Configuration.background("test.segkill", directory=directory, host=host, daemon_idle_timeout=0.5,
                                         max_connections_per_task=4, retry=bg.Retry(backoff_factor=0.01))
    session = bg.Session(config, App())
    if create == "create":
        session.download_task(url).resume()
    session.wait()
    session.close()
''')

#: Kills per host in the default run; the file and the pace of the server make each land mid-download.
KILLS = 3


class Killer:
    """Runs the app as real processes, SIGKILLs it (and the daemon, which transfers with the daemon host) when the
    server has sent a given byte count, and notes what each segment's file held after each kill."""

    def __init__(self, tmp_path: Any, server: fs.FakeServer, host: str, data: bytes) -> None:
        self.server, self.host, self.data = server, host, data
        self.script = tmp_path / "app.py"
        self.script.write_text(KILL_APP.format(here=HERE))
        self.directory = str(tmp_path / "session")
        self.ledger = str(tmp_path / "ledger.jsonl")
        self.proc: subprocess.Popen | None = None
        #: After each kill: (requests the server had seen, the entity's byte ranges the files held).
        self.kills: list[tuple[int, list[tuple[int, int]]]] = []

    def launch(self, create: bool = False) -> subprocess.Popen:
        self.proc = subprocess.Popen([sys.executable, "-W", "error", str(self.script), self.directory, self.host,
                                      self.server.url("/big"), self.ledger, "create" if create else "-"])
        return self.proc

    def kill_at(self, nbytes: int) -> threading.Event:
        killed = threading.Event()

        def kill(path: str, served: int) -> None:  # in the server's handler thread, at that byte
            proc = self.proc
            assert proc is not None
            proc.kill()
            proc.wait()
            daemon = read_pid_file(self.directory)
            if self.host == "daemon" and daemon is not None:
                daemon.kill()
            killed.set()
        self.server.on_bytes("/big", nbytes, kill)
        return killed

    def held(self) -> list[tuple[int, int]]:
        return held(self.directory, self.data)

    def after_kill(self) -> None:
        self.kills.append((len(self.server.requests("/big")), self.held()))

    def finishes(self) -> list[str]:
        with open(self.ledger) as f:
            return [json.loads(line)["sha"] for line in f]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        stop_daemon(self.directory)


@pytest.mark.timeout(180)
def test_sigkill_at_random_points_refetches_no_byte_a_segment_held(server, tmp_path, host):
    """SIGKILLs at random byte counts of a split download (the app, and the daemon that transfers with the daemon
    host), each relaunch recovering and resuming every segment from its own file: the file handed to the finish
    hook is byte-exact, and no answer after a kill sent a byte that a segment's file held at that kill."""
    rng = random.Random(16 + len(host))
    data = fs.blob_bytes(8 * SEG + rng.randint(0, 4096), seed=12)
    server.add_blob("/big", data, default_fault=fs.Fault(throttle=4 * MiB))  # per connection: 2 s on one
    killer = Killer(tmp_path, server, host, data)
    try:
        for n in range(KILLS):
            held = sum(b - a for a, b in killer.held())
            served = server.bytes_served("/big")
            # the next launch must fetch len(data) - held more bytes: a kill at fewer lands mid-download
            killed = killer.kill_at(served + rng.randint(128 * KiB, (len(data) - held) * 3 // 4))
            killer.launch(create=n == 0)
            assert killed.wait(LONG), "the kill point was never reached"
            killer.after_kill()
        assert killer.launch().wait(LONG) == 0
        assert killer.finishes() == [sha(data)]
    finally:
        killer.close()
    assert any(len(spans) > 1 for _, spans in killer.kills), "no kill found the download split"
    for count, spans in killer.kills:
        again = fetched_again(server, "/big", count, spans)
        assert again == [], f"bytes fetched again after a kill although a segment's file held them: {again}"
    assert bg.Journal(killer.directory).check() == []
