"""Behaviour tests for bgsession's core: downloads, validated resume, retries, the journal,
exactly-once delivery across SIGKILL, one session per identifier, permissions.

Most behaviours run against both hosts (``inprocess`` and ``daemon``) through the
``host`` fixture; engine-only policies run in-process. Every session a test opens
is closed at teardown and its directory must pass ``Journal.check()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from typing import Callable

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, SHORT, FakeClock, MiB, Recorder, download, file_sha, sha, stop_daemon

# ---------------------------------------------------------------------------
# downloads and delivery
# ---------------------------------------------------------------------------


def test_download_reaches_finish_then_complete(server, sessions):
    """A download hands the exact bytes to the finish hook, then completes without error."""
    data = fs.blob_bytes(3 * MiB + 17, seed=1)
    server.add_blob("/a.bin", data)
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/a.bin"), "photo:1")
    assert s.wait(LONG)
    assert rec.calls == [("finish", task.identifier), ("complete", task.identifier)]
    assert sha(rec.files[task.identifier]) == sha(data)
    assert rec.errors[task.identifier] is None
    assert task.state is bg.TaskState.COMPLETED
    assert task.response.status == 200
    assert task.count_of_bytes_received == len(data)


def test_404_body_reaches_finish_hook_with_status(server, sessions):
    """HTTP status is not a transport error: a 404 body reaches the finish hook with status 404."""
    server.add_status("/missing.jpg", 404, b"<h1>not here</h1>")
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/missing.jpg"))
    assert s.wait(LONG)
    assert rec.statuses[task.identifier] == 404
    assert rec.files[task.identifier] == b"<h1>not here</h1>"
    assert rec.errors[task.identifier] is None


def test_progress_is_monotonic_and_ends_at_size(server, sessions):
    """download_task_did_write_data totals grow, sum up, and end at the size with the expected total."""
    data = fs.blob_bytes(2 * MiB, seed=2)
    server.add_blob("/p.bin", data, default_fault=fs.Fault(throttle=8 * MiB))
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/p.bin"))
    assert s.wait(LONG)
    progress = rec.progress[task.identifier]
    totals = [p[1] for p in progress]
    assert totals == sorted(totals) and totals[-1] == len(data)
    assert sum(p[0] for p in progress) == len(data)
    assert all(p[2] == len(data) for p in progress)


def test_description_and_identifier_survive_reopen(server, sessions):
    """A suspended task keeps its identifier and description when the session is re-created."""
    server.add_blob("/d.bin", size=1000)
    s = sessions.open()
    task = s.download_task(server.url("/d.bin"), description="photo:7")
    task.description = "photo:8"
    other = s.download_task(server.url("/d.bin"))
    ids = (task.identifier, other.identifier)
    sessions.close_all()
    s2 = sessions.open()
    tasks = {t.identifier: t for t in s2.get_tasks()}
    assert set(tasks) == set(ids)
    assert tasks[ids[0]].description == "photo:8"
    assert tasks[ids[1]].description is None
    assert tasks[ids[0]].state is bg.TaskState.SUSPENDED
    for t in tasks.values():
        t.cancel()
    assert s2.wait(LONG)


def test_backlog_then_did_finish_events_once(server, sessions):
    """Events that waited while no delegate was attached arrive in order, then did_finish_events once."""
    for i in range(3):
        server.add_blob(f"/b{i}.bin", size=10_000 + i, seed=i)
    s = bg.Session(sessions.config(), None, _deferred=True)  # no delivery: a backlog builds up
    sessions.opened.append(s)
    tasks = [download(s, server.url(f"/b{i}.bin")) for i in range(3)]
    deadline = time.monotonic() + LONG
    while [t.state for t in s.get_tasks()] != [bg.TaskState.COMPLETED] * 3:  # finished, nothing delivered
        assert time.monotonic() < deadline
        time.sleep(0.01)  # waiting for engine state with no delegate attached by design
    sessions.close_all()
    rec = Recorder()
    rec.expect = 3
    s2 = sessions.open(rec)
    assert s2.wait(LONG)
    ids = [t.identifier for t in tasks]
    per_task = {i: [c[0] for c in rec.calls if len(c) > 1 and c[1] == i] for i in ids}
    assert all(v == ["finish", "complete"] for v in per_task.values())
    assert rec.calls[-1] == ("did_finish_events",)
    assert rec.finished_events == 1


def test_hooks_run_serially(server, sessions):
    """Hooks never run concurrently, even with many parallel transfers."""
    for i in range(12):
        server.add_blob(f"/c{i}.bin", size=50_000, seed=i)
    active = []
    overlap = []

    class Serial(bg.SessionDelegate):
        def download_task_did_finish_downloading(self, session, task, location):
            active.append(1)
            if len(active) > 1:
                overlap.append(task.identifier)
            time.sleep(0.002)  # widen a would-be race window; not synchronisation
            active.pop()

        task_did_complete = download_task_did_finish_downloading

    s = sessions.open(Serial())
    for i in range(12):
        download(s, server.url(f"/c{i}.bin"))
    assert s.wait(LONG)
    assert overlap == []


def test_session_manager_subclass_blocks_set_in_init_get_every_event(server, sessions):
    """Delivery starts only after a SessionManager subclass's __init__ returned (its blocks are set)."""
    server.add_blob("/m.bin", size=5000)
    s = bg.Session(sessions.config(), None, _deferred=True)
    sessions.opened.append(s)
    download(s, server.url("/m.bin"), "photo:1")
    deadline = time.monotonic() + LONG
    while s.get_tasks()[0].state is not bg.TaskState.COMPLETED:  # finished, nothing delivered
        assert time.monotonic() < deadline
        time.sleep(0.01)  # waiting for engine state with no delegate attached by design
    sessions.close_all()
    seen: list[str] = []
    started_during_init: list[bool] = []

    class Manager(bg.SessionManager):
        def __init__(self, config):
            super().__init__(config)
            started_during_init.append(self.session._started)
            self.set_download_task_did_finish_downloading(lambda s, t, loc: seen.append("finish"))
            self.set_task_did_complete(lambda s, t, e: seen.append("complete"))
            self.set_did_finish_events_for_background_session(lambda s: seen.append("events"))

    m = Manager(sessions.config())
    sessions.opened.append(m.session)
    assert m.session.wait(LONG)
    assert started_during_init == [False]
    assert seen == ["finish", "complete", "events"]


def test_manager_moves_file_to_destination_and_calls_task_blocks(server, sessions, tmp_path, caplog):
    """The destination returned by the finish block receives the file; task-level blocks fire (with a warning)."""
    data = fs.blob_bytes(300_000, seed=5)
    server.add_blob("/photos/cat.jpg", data)
    docs = tmp_path / "Documents"
    m = bg.SessionManager(sessions.config())
    sessions.opened.append(m.session)
    m.set_download_task_did_finish_downloading(
        lambda s, t, loc: str(docs / t.response.suggested_filename) if t.response.status == 200 else None)
    got = []
    with caplog.at_level(logging.WARNING, logger="bgsession"):
        task = m.download_task(server.url("/photos/cat.jpg"), progress=lambda done, total: None,
                               completion_handler=lambda resp, path, err: got.append((resp.status, path, err)))
    assert any("live in this process only" in r.message for r in caplog.records)
    task.resume()
    assert m.session.wait(LONG)
    assert file_sha(str(docs / "cat.jpg")) == sha(data)
    assert got == [(200, str(docs / "cat.jpg"), None)]


# ---------------------------------------------------------------------------
# validated resume (DESIGN §4.5): the policy as a table, then against the server
# ---------------------------------------------------------------------------

H = bg.Headers


@pytest.mark.parametrize("offset, asked, status, headers, known, expect", [
    (100, True, 206, H([("Content-Range", "bytes 100-999/1000")]), 1000, ("write", 100, 1000)),
    (100, True, 206, H([("Content-Range", "bytes 40-999/1000")]), 1000, ("write", 40, 1000)),
    (100, True, 206, H([("Content-Range", "bytes 150-999/1000")]), 1000, ("rerequest", 0, None)),
    (100, True, 206, H([("Content-Range", "bytes 100-1999/2000")]), 1000, ("rerequest", 0, None)),
    (100, True, 206, H([("Content-Range", "bytes garbage")]), 1000, ("rerequest", 0, None)),
    (100, True, 206, H([("Content-Range", "bytes 100-50/1000")]), 1000, ("rerequest", 0, None)),
    (100, True, 206, H([]), 1000, ("rerequest", 0, None)),
    (100, True, 200, H([("Content-Length", "1000")]), 1000, ("write", 0, 1000)),
    (0, False, 200, H([("Content-Length", "1000")]), None, ("write", 0, 1000)),
    (0, False, 200, H([("Transfer-Encoding", "chunked")]), None, ("write", 0, None)),
    (1000, True, 416, H([("Content-Range", "bytes */1000")]), 1000, ("complete", 1000, 1000)),
    (1000, True, 416, H([("Content-Range", "bytes */1000")]), None, ("complete", 1000, 1000)),
    (900, True, 416, H([("Content-Range", "bytes */1000")]), 1000, ("rerequest", 0, None)),
    (1000, True, 416, H([]), 1000, ("rerequest", 0, None)),
    (100, True, 404, H([("Content-Length", "9")]), 1000, ("write", 0, 9)),
])
def test_plan_response_table(offset, asked, status, headers, known, expect):
    """Each row of the validated-resume table maps to one action (append, restart, complete, re-request)."""
    plan = bg.plan_response(offset, asked, status, headers, known)
    assert (plan.action, plan.start if plan.action != "rerequest" else 0, plan.total) == expect


def test_resume_validator_prefers_strong_etag():
    """If-Range uses a strong ETag, else Last-Modified; a weak ETag alone gives no validator."""
    assert bg.resume_validator(H([("ETag", '"x"'), ("Last-Modified", "d")])) == {"etag": '"x"'}
    assert bg.resume_validator(H([("ETag", 'W/"x"'), ("Last-Modified", "d")])) == {"last_modified": "d"}
    assert bg.resume_validator(H([("ETag", 'W/"x"')])) is None


def _cut_then(server, path, data, second, **kw):
    """A route whose first response is cut mid-body and whose second has fault *second*."""
    return server.add_blob(path, data, faults=[fs.Fault(cut_after=len(data) // 2), second], **kw)


def _run_one(sessions, server, path, **cfg):
    rec = Recorder()
    s = sessions.open(rec, **cfg)
    task = download(s, server.url(path))
    assert s.wait(LONG)
    return rec, task


def test_resume_appends_validated_206(server, sessions):
    """A cut transfer resumes with Range + If-Range (strong ETag) and identity encoding; nothing is re-sent."""
    data = fs.blob_bytes(2 * MiB, seed=3)
    route = _cut_then(server, "/r.bin", data, None)
    rec, task = _run_one(sessions, server, "/r.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    second = server.requests("/r.bin")[1]
    assert second.header("range") == f"bytes={len(data) // 2}-"
    assert second.header("if-range") == route.etag
    assert second.header("accept-encoding") == "identity"
    assert second.status == 206
    assert server.bytes_served("/r.bin") == len(data)
    assert task.response.status == 200  # a resumed download reports the entity's 200


def test_resume_uses_last_modified_without_strong_etag(server, inproc):
    """With only a weak ETag, If-Range carries Last-Modified and the resume still appends."""
    data = fs.blob_bytes(1 * MiB, seed=4)
    route = _cut_then(server, "/lm.bin", data, None, weak_etag=True)
    rec, task = _run_one(inproc, server, "/lm.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/lm.bin")[1].header("if-range") == route.last_modified


def test_range_ignored_restarts_from_zero(server, inproc):
    """A 200 to a Range request replaces the partial data: the file is the new body, not a splice."""
    data = fs.blob_bytes(1 * MiB, seed=5)
    _cut_then(server, "/ign.bin", data, fs.Fault(ignore_range=True))
    rec, task = _run_one(inproc, server, "/ign.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/ign.bin")[1].status == 200


def test_206_starting_early_truncates_to_its_start(server, inproc):
    """A 206 that starts before the asked offset is written from its own start."""
    data = fs.blob_bytes(1 * MiB, seed=6)
    _cut_then(server, "/early.bin", data, fs.Fault(early_206=1000))
    rec, task = _run_one(inproc, server, "/early.bin")
    assert sha(rec.files[task.identifier]) == sha(data)


@pytest.mark.parametrize("fault", [fs.Fault(wrong_total=True), fs.Fault(malformed_range=True)],
                         ids=["wrong_total", "malformed_range"])
def test_unusable_206_is_rerequested_whole(server, inproc, fault):
    """A 206 with a changed total or a malformed Content-Range is discarded; the entity is fetched whole."""
    data = fs.blob_bytes(1 * MiB, seed=7)
    _cut_then(server, "/bad206.bin", data, fault)
    rec, task = _run_one(inproc, server, "/bad206.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    third = server.requests("/bad206.bin")[2]
    assert third.header("range") is None and third.status == 200


@pytest.mark.parametrize("new_size", [1 * MiB, 1 * MiB + 4321], ids=["same_length", "other_length"])
def test_changed_entity_restarts_not_splices(server, sessions, new_size):
    """If the entity changes between requests, If-Range fails and the file is the new entity only."""
    old = fs.blob_bytes(1 * MiB, seed=8)
    new = fs.blob_bytes(new_size, seed=9)
    route = server.add_blob("/chg.bin", old, faults=[fs.Fault(cut_after=len(old) // 2)])
    server.on_bytes("/chg.bin", len(old) // 2, lambda path, served: route.update(new))
    rec, task = _run_one(sessions, server, "/chg.bin")
    assert sha(rec.files[task.identifier]) == sha(new)
    assert server.requests("/chg.bin")[1].status == 200


@pytest.mark.parametrize("opts", [dict(weak_etag=True, last_modified=False), dict(etag=False, last_modified=False)],
                         ids=["weak_etag_only", "no_validators"])
def test_no_validator_restarts_from_zero(server, inproc, opts):
    """Without a usable validator the resume asks for the whole entity (no Range)."""
    data = fs.blob_bytes(1 * MiB, seed=10)
    _cut_then(server, "/nv.bin", data, None, **opts)
    rec, task = _run_one(inproc, server, "/nv.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/nv.bin")[1].header("range") is None


def test_416_on_complete_local_file_completes(server, inproc):
    """All bytes arrived but the end was cut (chunked): 416 */N equal to the local size completes the task."""
    data = fs.blob_bytes(200_000, seed=11)
    server.add_blob("/416.bin", data, faults=[fs.Fault(chunked=True, cut_after=len(data))])
    rec, task = _run_one(inproc, server, "/416.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    assert [r.status for r in server.requests("/416.bin")] == [200, 416]


def test_chunked_without_length_completes(server, inproc):
    """A chunked body with no Content-Length is saved whole."""
    data = fs.blob_bytes(700_000, seed=12)
    server.add_blob("/ch.bin", data, default_fault=fs.Fault(chunked=True))
    rec, task = _run_one(inproc, server, "/ch.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    assert task.count_of_bytes_expected_to_receive in (-1, len(data))


def test_short_body_is_resumed(server, inproc):
    """A body shorter than its Content-Length counts as a lost connection and is resumed exactly."""
    data = fs.blob_bytes(900_000, seed=13)
    server.add_blob("/short.bin", data, faults=[fs.Fault(short_body=300_000)])
    rec, task = _run_one(inproc, server, "/short.bin")
    assert sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/short.bin")[1].header("range") == "bytes=600000-"


def test_stall_longer_than_timeout_for_request_is_retried(server, inproc):
    """A stall longer than timeout_for_request fails the attempt, which resumes with Range."""
    data = fs.blob_bytes(600_000, seed=14)
    server.add_blob("/stall.bin", data, faults=[fs.Fault(stall_after=100_000)])
    try:
        rec, task = _run_one(inproc, server, "/stall.bin", timeout_for_request=0.3)
    finally:
        server.release_stalls()
    assert sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/stall.bin")[1].header("range") == "bytes=100000-"


def test_many_one_byte_interruptions(server, inproc):
    """Twenty interruptions of a few bytes each still end in the exact file (AOSP testManyInterruptions)."""
    data = fs.blob_bytes(100_000, seed=15)
    server.add_blob("/many.bin", data, faults=[fs.Fault(cut_after=1)] * 20)
    rec, task = _run_one(inproc, server, "/many.bin", retry=bg.Retry(total=3, backoff_factor=0.001))
    assert sha(rec.files[task.identifier]) == sha(data)
    assert len(server.requests("/many.bin")) == 21


def test_connection_reset_before_response_is_retried(server, inproc):
    """A reset before any response byte is a retryable connection loss."""
    data = fs.blob_bytes(50_000, seed=16)
    server.add_blob("/reset.bin", data, faults=[fs.Fault(reset=True)])
    rec, task = _run_one(inproc, server, "/reset.bin")
    assert sha(rec.files[task.identifier]) == sha(data)


def test_keep_alive_connection_is_reused(server, inproc):
    """Sequential downloads from one host share one keep-alive connection."""
    for i in range(20):
        server.add_blob(f"/k{i}", size=1000, seed=i)
    rec = Recorder()
    s = inproc.open(rec, max_connections_per_host=1)
    for i in range(20):
        download(s, server.url(f"/k{i}"))
    assert s.wait(LONG)
    assert len(rec.files) == 20
    assert server.connections_accepted == 1


# ---------------------------------------------------------------------------
# retries: the policy object, then the engine with a fake clock (no sleeps)
# ---------------------------------------------------------------------------


def test_retry_increment_returns_new_policy():
    """Retry is immutable: increment() returns a new object and leaves the old one alone."""
    r = bg.Retry()
    r2 = r.increment()
    assert r.attempts == 0 and r2.attempts == 1 and r2 is not r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.attempts = 5  # type: ignore[misc]


def test_retry_backoff_doubles_to_cap_without_jitter():
    """Backoff is factor * 2**(n-1), capped at backoff_max (rng=0 removes jitter)."""
    r = bg.Retry(backoff_factor=0.5, backoff_max=60.0)
    delays = []
    for _ in range(10):
        r = r.increment()
        delays.append(r.backoff(lambda: 0.0))
    assert delays == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_retry_jitter_only_shortens():
    """Jitter shortens a delay by at most backoff_jitter of it, never lengthens it past the cap."""
    r = bg.Retry(backoff_factor=1.0, backoff_max=8.0, backoff_jitter=0.25).increment().increment().increment()
    assert r.backoff(lambda: 0.0) == 4.0
    assert r.backoff(lambda: 0.999999) == pytest.approx(3.0, abs=1e-4)
    r = r.increment().increment().increment()
    assert r.backoff(lambda: 0.0) == 8.0


def test_retry_after_seconds_and_date_are_clamped():
    """Retry-After in seconds or as an HTTP date is honoured and clamped to retry_after_max."""
    r = bg.Retry(retry_after_max=100.0).increment()
    assert r.delay("30", rng=lambda: 0.0) == 30.0
    assert r.delay("100000", rng=lambda: 0.0) == 100.0
    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 42))
    assert r.delay(date, rng=lambda: 0.0, now=now) == pytest.approx(42.0)
    assert r.delay("garbage", rng=lambda: 0.0) == r.backoff(lambda: 0.0)
    assert bg.Retry(respect_retry_after=False).increment().delay("50", rng=lambda: 0.0) == 0.5


def test_retry_exhaustion_and_progress_reset():
    """total bounds consecutive failures; an attempt with progress resets the count to one."""
    r = bg.Retry(total=2)
    r = r.increment().increment()
    assert not r.is_exhausted()
    assert r.increment().is_exhausted()
    assert r.increment(progressed=True).attempts == 1


def test_engine_honours_retry_after_with_fake_clock(server, tmp_path):
    """503 with Retry-After: 120 waits 120 s of (virtual) time, then succeeds; no real sleep."""
    data = fs.blob_bytes(10_000, seed=17)
    server.add_blob("/ra.bin", data, faults=[fs.Fault(status=503, retry_after="120"), fs.Fault(status=429)])
    clock = FakeClock()
    rec = Recorder()
    cfg = bg.Configuration.background("test.ra", directory=str(tmp_path / "s"), host="inprocess",
                                      retry=bg.Retry(backoff_factor=2.0, backoff_jitter=0.0))
    s = bg.Session(cfg, rec, _clock=clock)
    try:
        download(s, server.url("/ra.bin"))
        assert s.wait(LONG)
    finally:
        s.close()
    assert sha(rec.files[1]) == sha(data)
    assert clock.waits == [120.0, 4.0]  # Retry-After, then backoff 2 * 2**1 for the second failure
    assert bg.Journal(str(tmp_path / "s")).check() == []


def test_retries_exhausted_hand_through_the_last_response(server, inproc):
    """When retries run out on a 503, the 503 response is the task's result (status, not error)."""
    server.add_blob("/busy.bin", size=100, default_fault=fs.Fault(status=503))
    rec, task = _run_one(inproc, server, "/busy.bin", retry=bg.Retry(total=2, backoff_factor=0.001))
    assert rec.statuses[task.identifier] == 503
    assert len(server.requests("/busy.bin")) == 3


def test_unreachable_host_fails_with_cannot_connect(inproc):
    """Without waits_for_connectivity, a refused connection is retried, then fails with CANNOT_CONNECT_TO_HOST."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rec = Recorder()
    s = inproc.open(rec, retry=bg.Retry(total=2, backoff_factor=0.001), waits_for_connectivity=False)
    task = download(s, f"http://127.0.0.1:{port}/x")
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANNOT_CONNECT_TO_HOST
    assert task.identifier not in rec.files


def test_timeout_for_resource_fails_with_timed_out(server, tmp_path):
    """A task older than timeout_for_resource fails with TIMED_OUT (virtual time)."""
    server.add_blob("/slow.bin", size=100, default_fault=fs.Fault(status=503, retry_after="3600"))
    clock = FakeClock()
    rec = Recorder()
    cfg = bg.Configuration.background("test.tr", directory=str(tmp_path / "s"), host="inprocess",
                                      timeout_for_resource=600.0, retry=bg.Retry(total=None))
    s = bg.Session(cfg, rec, _clock=clock)
    try:
        task = download(s, server.url("/slow.bin"))
        assert s.wait(LONG)
    finally:
        s.close()
    assert rec.errors[task.identifier].code is bg.ErrorCode.TIMED_OUT


# ---------------------------------------------------------------------------
# the journal
# ---------------------------------------------------------------------------


def _journal_session(tmp_path, name="j"):
    return bg.Configuration.background(f"test.{name}", directory=str(tmp_path / name), host="inprocess")


def test_torn_last_line_is_ignored_and_appends_continue(tmp_path):
    """A half-written last journal line is ignored on recovery and cut off before new appends."""
    cfg = _journal_session(tmp_path)
    s = bg.Session(cfg)
    t = s.download_task("http://127.0.0.1:9/a", description="keep")
    s.close()
    path = os.path.join(cfg.directory, "journal.jsonl")
    with open(path, "ab") as f:
        f.write(b'{"v":1,"t":"describe","id":1,"descr')  # the writer died here
    s = bg.Session(cfg)
    assert [x.description for x in s.get_tasks()] == ["keep"]
    s.get_tasks()[0].description = "after"
    s.close()
    assert bg.Journal(cfg.directory).check() == []
    s = bg.Session(cfg)
    assert s.get_tasks()[0].description == "after"
    s.get_tasks()[0].cancel()
    assert s.wait(SHORT)
    s.close()
    del t


def test_recovery_from_snapshot_plus_log(tmp_path):
    """State = snapshot + replayed log: records after the last compaction are not lost."""
    cfg = _journal_session(tmp_path)
    s = bg.Session(cfg)
    for i in range(5):
        s.download_task(f"http://127.0.0.1:9/{i}", description=f"d{i}")
    s.close()  # reopen compacts: the 5 tasks are in the snapshot
    s = bg.Session(cfg)
    s.get_tasks()[0].description = "changed"  # in the log only
    s.download_task("http://127.0.0.1:9/new", description="d5")
    s.close()
    with open(os.path.join(cfg.directory, "snapshot.json")) as f:
        assert len(json.load(f)["tasks"]) == 5
    state = bg.Journal(cfg.directory).state()
    assert sorted(t.description for t in state.tasks.values()) == ["changed", "d1", "d2", "d3", "d4", "d5"]


def test_an_open_with_a_short_journal_keeps_the_snapshot_and_a_long_one_compacts(tmp_path):
    """An open rewrites the snapshot only for a journal that is long next to it (issue 16: 100,000 queued tasks
    and a dozen records); what a short journal holds is replayed at every open until a compaction folds it."""
    cfg = _journal_session(tmp_path)
    snapshot = os.path.join(cfg.directory, "snapshot.json")
    s = bg.Session(cfg)
    for i in range(40):
        s.download_task(f"http://127.0.0.1:9/{i}", description=f"d{i}")
    s.close()
    bg.Session(cfg).close()  # 40 task records and more for 40 tasks: this open compacts
    with open(snapshot, "rb") as f:
        folded = f.read()
    assert len(json.loads(folded)["tasks"]) == 40
    s = bg.Session(cfg)
    first, second = sorted(s.get_tasks(), key=lambda t: t.identifier)[:2]
    first.description = "changed"  # 2 records: short next to 40 tasks
    second.description = "changed too"
    s.close()
    for _ in range(2):
        s = bg.Session(cfg)
        assert sorted(t.description for t in s.get_tasks())[:2] == ["changed", "changed too"]
        s.close()
        with open(snapshot, "rb") as f:
            assert f.read() == folded  # not rewritten
    s = bg.Session(cfg)
    for task in sorted(s.get_tasks(), key=lambda t: t.identifier)[2:14]:  # 12 more records: 14 > 40 // 4
        task.description = "long"
    s.close()
    bg.Session(cfg).close()
    with open(snapshot, "rb") as f:
        tasks = json.loads(f.read())["tasks"]
    assert sorted(t["description"] for t in tasks)[:2] == ["changed", "changed too"]
    assert [t["description"] for t in tasks].count("long") == 12
    with open(os.path.join(cfg.directory, "journal.jsonl"), "rb") as f:
        assert len(f.read().splitlines()) == 1  # the header of the new generation


def test_a_snapshot_is_a_task_a_line_read_whole_or_a_task_at_a_time(tmp_path):
    """A snapshot is one JSON value (any reader, every older bgsession, reads it whole) laid out a task a line, so that
    a compaction in the background reads and writes it a task at a time; both readings are the same value."""
    cfg = _journal_session(tmp_path)
    s = bg.Session(cfg)
    for i in range(3):
        s.download_task(f"http://127.0.0.1:9/{i}", description=f"two\nlines {i}")  # (escaped in JSON: one line)
    s.close()
    bg.Session(cfg).close()  # compacts
    with open(os.path.join(cfg.directory, "snapshot.json"), "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    assert lines[0].startswith(b'{"v":1,"t":"snapshot",') and lines[0].endswith(b',"tasks":[')
    assert len(lines) == 1 + 3 + 2 and lines[-2:] == [b"]}", b""]
    assert bg._parse_snapshot(data, by_task=True) == json.loads(data)
    assert sorted(t["description"] for t in json.loads(data)["tasks"]) == [f"two\nlines {i}" for i in range(3)]


def _hold_the_fold(monkeypatch):
    """Make a background compaction stop before it writes its snapshot: (folding, go_on) events."""
    folding, go_on = threading.Event(), threading.Event()
    real = bg._SessionState.to_snapshot

    def to_snapshot(state):
        if threading.current_thread().name == "bgsession-compact":
            folding.set()
            go_on.wait(LONG)
        return real(state)
    monkeypatch.setattr(bg._SessionState, "to_snapshot", to_snapshot)
    return folding, go_on


def _journal_header(directory):
    with open(os.path.join(directory, "journal.jsonl"), "rb") as f:
        return json.loads(f.readline())


def test_a_running_compaction_folds_without_the_engines_lock(server, inproc, monkeypatch):
    """A running session's compaction holds the engine's lock only to switch to a new journal: while it folds the
    previous journal into the next snapshot (held here), tasks are made, transferred and delivered, and a reader of the
    directory gets the whole state (the snapshot, the previous journal, the new one). close() lets the fold end."""
    monkeypatch.setattr(bg, "DEFAULT_COMPACT_RECORDS", 20)
    folding, go_on = _hold_the_fold(monkeypatch)
    for i in range(14):
        server.add_blob(f"/c{i}", size=1000 + i, seed=i)
    rec = Recorder()
    s = inproc.open(rec)
    directory = s.configuration.directory
    previous = os.path.join(directory, "journal.prev.jsonl")
    try:
        first = [download(s, server.url(f"/c{i}")) for i in range(10)]
        assert folding.wait(LONG)  # more than 20 records: a compaction started, and is held
        header = _journal_header(directory)
        assert header["v"] == 4 and header["generation"] == header["after"] + 1 and os.path.exists(previous)
        later = [download(s, server.url(f"/c{i}")) for i in range(10, 14)]  # (the lock is free to make them)
        assert s.wait(LONG)
        assert all(("complete", t.identifier) in rec.calls for t in first + later)
        assert all(rec.files[t.identifier] == fs.blob_bytes(1000 + i, seed=i) for i, t in enumerate(first + later))
        assert os.path.exists(previous)  # still folding
        assert bg.Journal(directory).check() == []
        assert bg.Journal(directory).tasks() == []  # every task acknowledged, read across both journals
    finally:
        go_on.set()
    s.close()
    assert not os.path.exists(previous)
    with open(os.path.join(directory, "snapshot.json"), "rb") as f:
        assert json.loads(f.read())["generation"] == _journal_header(directory)["generation"]


def test_a_reader_that_meets_a_compaction_finishing_reads_again(server, inproc, monkeypatch):
    """A reader without the session's lock (Journal, the CLI's status) that read the snapshot just before a background
    compaction replaced it and removed the previous journal reads again, instead of reporting the records lost."""
    monkeypatch.setattr(bg, "DEFAULT_COMPACT_RECORDS", 20)
    folding, go_on = _hold_the_fold(monkeypatch)
    for i in range(10):
        server.add_blob(f"/r{i}", size=500, seed=i)
    s = inproc.open(Recorder())
    previous = os.path.join(s.configuration.directory, "journal.prev.jsonl")
    try:
        for i in range(10):
            download(s, server.url(f"/r{i}"))
        assert folding.wait(LONG) and s.wait(LONG)
        real_read, reads = bg._read_snapshot, []

        def read_then_let_the_compaction_finish(path, readonly, by_task=False):
            state = real_read(path, readonly, by_task)
            reads.append(path)
            if len(reads) == 1:
                go_on.set()
                wait_until(lambda: not os.path.exists(previous), what="the compaction to finish")
            return state
        monkeypatch.setattr(bg, "_read_snapshot", read_then_let_the_compaction_finish)
        assert bg.Journal(s.configuration.directory).check() == []
        assert len(reads) == 2  # read again, once
    finally:
        go_on.set()


FOLD_KILLED = textwrap.dedent("""
    import os, shutil, sys, threading
    import bgsession as bg
    bg.DEFAULT_COMPACT_RECORDS = 20
    real = bg._SessionState.to_snapshot
    def to_snapshot(state):
        if threading.current_thread().name == "bgsession-compact":
            print("folding", flush=True)
            threading.Event().wait()  # held until the SIGKILL
        return real(state)
    bg._SessionState.to_snapshot = to_snapshot
    directory, documents, *urls = sys.argv[1:]
    class App(bg.SessionDelegate):
        def download_task_did_finish_downloading(self, session, task, location):
            shutil.move(location, os.path.join(documents, os.path.basename(task.original_request.url)))
    s = bg.Session(bg.Configuration.background("test.fold", directory=directory, host="inprocess"), App())
    for url in urls[:-1]:
        s.download_task(url).resume()
    assert s.wait(60)
    s.download_task(urls[-1], description="after the switch").resume()  # (returns once it is on disk)
    print("ready", flush=True)
    threading.Event().wait()
""")


def test_a_kill_while_a_compaction_folds_loses_nothing_and_repeats_no_hook(server, tmp_path, monkeypatch):
    """SIGKILL while the background compaction folds (the snapshot not yet written): the next open replays the
    snapshot, the previous journal, then the new one -- the tasks made after the switch are there, no hook whose
    acknowledgement was on disk is called again, the files are the servers' (SHA-256) -- and folds it all into a
    new snapshot. A bgsession that reads format 3 refuses the directory in that state instead of misreading it."""
    import shutil
    urls = []
    for i in range(9):
        server.add_blob(f"/k{i}.bin", size=2000 + i, seed=50 + i)
        urls.append(server.url(f"/k{i}.bin"))
    server.hold_at("/k8.bin", 0)  # the task made after the switch: running, no byte yet
    directory, documents = str(tmp_path / "fold"), str(tmp_path / "Documents")
    os.makedirs(documents)
    app = subprocess.Popen([sys.executable, "-c", FOLD_KILLED, directory, documents, *urls], cwd=HERE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sorted([app.stdout.readline(), app.stdout.readline()]) == ["folding\n", "ready\n"]
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait()
        app.stdout.close()
    assert os.path.exists(os.path.join(directory, "journal.prev.jsonl")) and "after" in _journal_header(directory)
    for i in range(len(urls) - 1):
        assert file_sha(os.path.join(documents, f"k{i}.bin")) == sha(fs.blob_bytes(2000 + i, seed=50 + i))
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy, ignore=shutil.ignore_patterns("lock"))
    rec = Recorder()
    s = bg.Session(bg.Configuration.background("test.fold", directory=directory, host="inprocess"), rec)
    try:
        (task,) = s.get_tasks()
        assert (task.description, task.state) == ("after the switch", bg.TaskState.RUNNING)
        assert task.identifier == len(urls)  # (identifiers go on: none handed out twice)
        task.cancel()
        assert s.wait(LONG)
        assert [c for c in rec.calls if c[0] != "did_finish_events"] == [("complete", task.identifier)]
    finally:
        s.close()
    assert not os.path.exists(os.path.join(directory, "journal.prev.jsonl"))
    assert bg.Journal(directory).check() == []
    monkeypatch.setattr(bg, "JOURNAL_VERSION", 3)  # what the bgsession before background compaction reads
    with pytest.raises(bg.JournalError, match="newer bgsession"):
        bg.Session(bg.Configuration.background("test.fold", directory=copy, host="inprocess"))


def test_a_snapshot_leaves_default_fields_out_and_reads_them_back(tmp_path):
    """A compacted task without options, errors or files is written without the fields that hold their default (a
    snapshot of 100,000 queued tasks is half the size); it reads back as the same task, in the full form."""
    cfg = _journal_session(tmp_path)
    s = bg.Session(cfg)
    s.download_task("http://127.0.0.1:9/plain", description="plain")
    s.download_task("http://127.0.0.1:9/options", description=None).priority = 0.75
    s.close()
    before = bg.Journal(cfg.directory).tasks()
    bg.Session(cfg).close()  # compacts
    with open(os.path.join(cfg.directory, "snapshot.json"), "rb") as f:
        written = json.loads(f.read())["tasks"]
    assert sorted(written[0]) == ["created", "description", "id", "kind", "phase", "request"]
    assert sorted(written[1]) == ["created", "id", "kind", "phase", "priority", "request"]
    after = bg.Journal(cfg.directory).tasks()
    assert after == before and after[0]["acked"] == [] and after[0]["current_url"] == "http://127.0.0.1:9/plain"


def test_an_open_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    """An open pauses the cyclic garbage collector while it builds the tasks' objects, and restores the host's
    setting: on stays on, off stays off."""
    import gc
    cfg = _journal_session(tmp_path)
    s = bg.Session(cfg)
    s.download_task("http://127.0.0.1:9/a")
    s.close()
    assert gc.isenabled()
    s = bg.Session(cfg)
    s.get_tasks()
    assert gc.isenabled()
    s.close()
    gc.disable()
    try:
        s = bg.Session(cfg)
        s.get_tasks()
        s.close()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_journal_from_future_version_is_refused_and_kept(tmp_path):
    """A journal written by a newer bgsession raises JournalError naming the file and is left untouched."""
    cfg = _journal_session(tmp_path)
    bg.Session(cfg).close()
    path = os.path.join(cfg.directory, "journal.jsonl")
    with open(path, "wb") as f:
        f.write(b'{"v":99,"t":"header","generation":1}\n')
    with pytest.raises(bg.JournalError, match=r"journal\.jsonl"):
        bg.Session(cfg)
    with open(path, "rb") as f:
        assert f.read().startswith(b'{"v":99')


def test_corrupt_snapshot_is_kept_aside_then_recovery_continues(tmp_path):
    """A corrupt snapshot raises once (naming it), is renamed aside, and the next open works."""
    cfg = _journal_session(tmp_path)
    bg.Session(cfg).close()
    path = os.path.join(cfg.directory, "snapshot.json")
    with open(path, "wb") as f:
        f.write(b"{not json")
    with pytest.raises(bg.JournalError, match=r"snapshot\.json"):
        bg.Session(cfg)
    assert any(n.startswith("snapshot.json.corrupt-") for n in os.listdir(cfg.directory))
    bg.Session(cfg).close()


def test_illegal_transitions_raise_and_change_nothing():
    """Every (phase, event) pair outside the table raises IllegalTransition; the state is unchanged."""
    events = {e for row in bg._TRANSITIONS.values() for e in row} | {"ack", "bogus"}
    for phase in bg.Phase:
        for event in events:
            state = bg._SessionState()
            state.apply({"t": "task", "id": 1, "request": {"url": "http://x/"}})
            task = state.tasks[1]
            task.phase = phase
            if event in bg._TRANSITIONS[phase]:
                continue
            if event == "ack":
                continue  # ack has its own rules (tested below)
            with pytest.raises((bg.IllegalTransition, bg.JournalError)):
                state.apply({"t": event, "id": 1})
            assert task.phase is phase


def test_ack_of_an_event_not_owed_is_refused():
    """An ack for an event the task does not owe is refused by the reducer."""
    state = bg._SessionState()
    state.apply({"t": "task", "id": 1, "request": {"url": "http://x/"}})
    with pytest.raises(bg.JournalError):
        state.apply({"t": "ack", "id": 1, "event": "complete"})
    for rec in ({"t": "resume", "id": 1}, {"t": "start", "id": 1},
                {"t": "finish", "id": 1, "file": "1.done", "error": None}):
        state.apply(rec)
    assert state.tasks[1].events() == ["finish", "complete"]
    with pytest.raises(bg.JournalError):
        state.apply({"t": "ack", "id": 1, "event": "complete"})  # finish first
    state.apply({"t": "ack", "id": 1, "event": "finish"})
    state.apply({"t": "ack", "id": 1, "event": "complete"})
    assert state.tasks[1].phase is bg.Phase.ACKNOWLEDGED


def test_recovered_offset_rules():
    """Same boot: the whole partial file is kept; another boot: only the fsynced offset."""
    assert bg.recovered_offset(1000, 400, "b1", "b1") == 1000
    assert bg.recovered_offset(1000, 400, "b1", "b2") == 400
    assert bg.recovered_offset(1000, 400, None, None) == 400
    assert bg.recovered_offset(300, 400, "b1", "b2") == 300
    assert bg.recovered_offset(None, 400, "b1", "b1") == 0


# ---------------------------------------------------------------------------
# real processes and SIGKILL
# ---------------------------------------------------------------------------

CHILD = textwrap.dedent('''
    import hashlib, json, os, sys, threading
    sys.path.insert(0, {here!r})
    import bgsession as bg

    directory, host, ledger_path, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    urls = sys.argv[5:]

    def ledger(**rec):
        with open(ledger_path, "a") as f:
            f.write(json.dumps(rec) + "\\n")
            f.flush()
            os.fsync(f.fileno())

    class App(bg.SessionDelegate):
        def download_task_did_finish_downloading(self, session, task, location):
            ledger(event="finish-start", id=task.identifier, desc=task.description)
            if mode == "block-in-finish":
                threading.Event().wait()  # killed here by the parent
            with open(location, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            ledger(event="finish-return", id=task.identifier, desc=task.description, sha=digest)

        def download_task_did_write_data(self, session, task, written, total, expected):
            ledger(event="progress", id=task.identifier, total=total)

        def task_did_complete(self, session, task, error):
            ledger(event="complete", id=task.identifier, error=str(error) if error else None,
                   status=task.response.status if task.response else None)

    config = bg.Configuration.background("test.crash", directory=directory, host=host,
                                         daemon_idle_timeout=0.5)
    session = bg.Session(config, App())
    if urls:
        for i, url in enumerate(urls):
            session.download_task(url, description="file:%d" % i).resume()
        ledger(event="resumed")
    session.wait()
    ledger(event="idle")
    session.close()
''')


class Child:
    """Runs the crash-test app as a real process; always reaped."""

    def __init__(self, tmp_path, host: str) -> None:
        self.script = tmp_path / "child.py"
        self.script.write_text(CHILD.format(here=HERE))
        self.directory = str(tmp_path / "session")
        self.ledger = str(tmp_path / "ledger.jsonl")
        self.host = host
        self.procs: list[subprocess.Popen] = []

    def start(self, mode: str = "normal", *urls: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-W", "error", str(self.script), self.directory, self.host,
                                 self.ledger, mode, *urls])
        self.procs.append(proc)
        return proc

    def entries(self) -> list[dict]:
        if not os.path.exists(self.ledger):
            return []
        with open(self.ledger) as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_for(self, predicate: Callable[[list[dict]], bool], proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + LONG
        while not predicate(self.entries()):
            assert proc.poll() is None or predicate(self.entries()), f"child exited with {proc.returncode}"
            assert time.monotonic() < deadline, "child did not get there"
            time.sleep(0.01)  # polling the child's fsynced ledger file

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        stop_daemon(self.directory)


@pytest.fixture
def child(tmp_path, host):
    c = Child(tmp_path, host)
    try:
        yield c
    finally:
        c.close()


def test_sigkill_mid_download_resumes_with_range(server, child):
    """An app SIGKILLed mid-download resumes on relaunch with a Range request; the SHA-256 matches."""
    data = fs.blob_bytes(4 * MiB, seed=21)
    server.add_blob("/big.bin", data, default_fault=fs.Fault(throttle=8 * MiB))
    hold = server.hold_at("/big.bin", 1 * MiB)
    p = child.start("normal", server.url("/big.bin"))
    assert hold.wait(LONG)
    part = os.path.join(child.directory, "tmp", "1.part")
    child.wait_for(lambda e: os.path.exists(part) and os.path.getsize(part) >= 1 * MiB, p)
    p.kill()
    p.wait()
    hold.release()
    if child.host == "daemon":
        stop_daemon_hard(child.directory)  # inprocess semantics for this test: nobody downloads meanwhile
    p2 = child.start("normal")
    assert p2.wait(LONG) == 0
    entries = child.entries()
    finishes = [x for x in entries if x["event"] == "finish-return"]
    assert [x["sha"] for x in finishes] == [sha(data)]
    ranges = [r.header("range") for r in server.requests("/big.bin")]
    assert ranges[0] is None and ranges[-1] is not None and int(ranges[-1][6:-1]) >= 1 * MiB
    assert server.bytes_served("/big.bin") - len(data) <= 1 * MiB  # nothing before the kill point twice
    assert bg.Journal(child.directory).check() == []


def stop_daemon_hard(directory: str) -> None:
    pid, _ = bg._read_pid_file(directory)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + SHORT
        while time.monotonic() < deadline and bg._pid_alive(pid):
            time.sleep(0.01)  # waiting for a process that is not our child to vanish


def test_sigkill_inside_finish_hook_redelivers_then_exactly_once(server, child):
    """Killed inside the finish hook: the event comes again; once a hook returned it never comes back."""
    data = fs.blob_bytes(300_000, seed=22)
    server.add_blob("/f.bin", data)
    p = child.start("block-in-finish", server.url("/f.bin"))
    child.wait_for(lambda e: any(x["event"] == "finish-start" for x in e), p)
    p.kill()
    p.wait()
    p2 = child.start("normal")
    assert p2.wait(LONG) == 0
    p3 = child.start("normal")
    assert p3.wait(LONG) == 0
    events = [(x["event"], x.get("id")) for x in child.entries() if x["event"] not in ("progress",)]
    assert events.count(("finish-start", 1)) == 2
    assert events.count(("finish-return", 1)) == 1
    assert events.count(("complete", 1)) == 1
    assert [x["sha"] for x in child.entries() if x["event"] == "finish-return"] == [sha(data)]
    assert bg.Journal(child.directory).check() == []
    assert os.listdir(os.path.join(child.directory, "tmp")) == []


def test_resume_returning_means_the_task_survives_a_kill(server, child):
    """A task whose resume() returned is in the journal even if the app dies at once."""
    server.add_blob("/s.bin", size=1000)
    hold = server.hold_at("/s.bin", 0)
    p = child.start("normal", server.url("/s.bin"))
    child.wait_for(lambda e: any(x["event"] == "resumed" for x in e), p)
    p.kill()
    p.wait()
    hold.release()
    p2 = child.start("normal")
    assert p2.wait(LONG) == 0
    assert [x["desc"] for x in child.entries() if x["event"] == "finish-return"] == ["file:0"]


LOCKER = textwrap.dedent('''
    import sys
    sys.path.insert(0, {here!r})
    import bgsession as bg
    cfg = bg.Configuration.background("test.lock", directory=sys.argv[1], host=sys.argv[2], daemon_idle_timeout=0.5)
    s = bg.Session(cfg)
    print("ready", flush=True)
    sys.stdin.read()
''')


def test_one_session_per_identifier_across_processes(tmp_path, host):
    """A second live session for an identifier raises BACKGROUND_SESSION_IN_USE; a dead owner's lock is taken over."""
    script = tmp_path / "locker.py"
    script.write_text(LOCKER.format(here=HERE))
    directory = str(tmp_path / "s")
    cfg = bg.Configuration.background("test.lock", directory=directory, host=host, daemon_idle_timeout=0.5)
    p = subprocess.Popen([sys.executable, str(script), directory, host], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(bg.TransferError) as info:
            bg.Session(cfg)
        assert info.value.code is bg.ErrorCode.BACKGROUND_SESSION_IN_USE
        p.kill()
        p.wait()
        s = bg.Session(cfg)
        s.close()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()
        stop_daemon(directory)


def test_one_session_per_identifier_in_one_process(sessions):
    """Two sessions for one identifier in one process: the second raises until the first is closed."""
    s = sessions.open()
    with pytest.raises(bg.TransferError) as info:
        bg.Session(sessions.config())
    assert info.value.code is bg.ErrorCode.BACKGROUND_SESSION_IN_USE
    s.close()
    sessions.open()


def test_session_directory_is_private(server, sessions):
    """The session directory and everything in it is 0700 (dirs) / 0600 (files), the socket included."""
    server.add_blob("/perm.bin", size=20_000)
    rec = Recorder()
    s = sessions.open(rec)
    download(s, server.url("/perm.bin"))
    assert s.wait(LONG)
    d = s.configuration.directory
    seen = 0
    for root, dirs, files in os.walk(d):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o700, name
        for name in files:
            assert stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode) == 0o600, name
            seen += 1
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert seen >= 3


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("identifier", ["a/b", "..", ".", "", "x" * 201, "a b", "a\nb", None])
def test_bad_identifier_is_rejected(identifier, tmp_path):
    """Identifiers name a directory: separators, dot-only names and odd characters are refused."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.Configuration.background(identifier, directory=str(tmp_path))


@pytest.mark.parametrize("kwargs", [
    dict(directory="relative/dir"),
    dict(timeout_for_request=-1), dict(timeout_for_request=0), dict(timeout_for_request=float("nan")),
    dict(timeout_for_request=10 ** 9), dict(timeout_for_resource=10 ** 12),
    dict(max_connections_per_host=0), dict(max_connections_per_host=1000),
    dict(host="cloud"), dict(relaunch_command="python app.py"), dict(headers={"X-A": "1\r\nInjected: 1"}),
    dict(retry="3"),
])
def test_bad_configuration_is_rejected(kwargs, tmp_path):
    """Relative directories, absurd timeouts, shell-string relaunch commands and header injection are refused."""
    kwargs.setdefault("directory", str(tmp_path / "s"))
    with pytest.raises(bg.InvalidArgumentError):
        bg.Configuration.background("ok", **kwargs)


@pytest.mark.parametrize("url, code", [
    ("ftp://host/file", bg.ErrorCode.UNSUPPORTED_URL),
    ("file:///etc/passwd", bg.ErrorCode.UNSUPPORTED_URL),
    ("http:///nohost", bg.ErrorCode.BAD_URL),
    ("http://host:99999/", bg.ErrorCode.BAD_URL),
])
def test_bad_url_is_rejected(url, code):
    """Only http and https URLs with a host are accepted."""
    with pytest.raises(bg.TransferError) as info:
        bg.Request(url)
    assert info.value.code is code


@pytest.mark.parametrize("url", ["http://h/a\r\nX: y", "http://h/a b", "http://h/\x00"])
def test_control_characters_in_url_are_rejected(url):
    """CR, LF, NUL and spaces in a URL are refused (header injection)."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.Request(url)


def test_upload_from_bytes_is_refused(inproc, tmp_path):
    """Background uploads come from a file: bytes and streams are refused with the reason."""
    s = inproc.open()
    with pytest.raises(bg.InvalidArgumentError, match="cannot survive a relaunch"):
        s.upload_task("http://127.0.0.1:9/u", b"data")
    with pytest.raises(bg.TransferError) as info:
        s.upload_task("http://127.0.0.1:9/u", str(tmp_path / "missing"))
    assert info.value.code is bg.ErrorCode.FILE_DOES_NOT_EXIST


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"), ("a/b/c.jpg", "c.jpg"), ("..", "download"), ("", "download"),
    ("a\x00b.jpg", "a_b.jpg"), ("CON", "_CON"), ("...hidden", "hidden"), ("x%2F..%2Fy.png", "y.png"),
    ("bad\nname.txt", "bad_name.txt"), ("a\\b.txt", "b.txt"),
])
def test_sanitize_filename(name, expected):
    """Names from URLs or Content-Disposition lose directories, dot-dot, NUL and control characters."""
    assert bg.sanitize_filename(name) == expected


def test_task_identifiers_are_never_reused_after_a_kill(tmp_path):
    """A task lost to a kill right after download_task() leaves a gap: its identifier is never handed out again."""
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f'''
        import os, signal, sys
        sys.path.insert(0, {HERE!r})
        import bgsession as bg
        s = bg.Session(bg.Configuration.background("test.ids", directory=sys.argv[1], host="inprocess"))
        t = s.download_task("http://127.0.0.1:9/x", description=sys.argv[2])
        print(t.identifier, flush=True)
        if sys.argv[3] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        s.close()
    '''))
    d = str(tmp_path / "s")
    run = [sys.executable, str(script), d]
    first = subprocess.run(run + ["A", "die"], capture_output=True, text=True, timeout=LONG)
    second = subprocess.run(run + ["B", "live"], capture_output=True, text=True, timeout=LONG)
    first_id, second_id = int(first.stdout), int(second.stdout)
    assert first_id != second_id
    described = {t["id"]: t["description"] for t in bg.Journal(d).tasks()}
    assert described.get(second_id) == "B" and described.get(first_id) in (None, "A")


def test_recovery_skips_reserved_identifiers(tmp_path):
    """Recovery resumes numbering after the durable reservation, not after the last task that reached the disk."""
    d = tmp_path / "s"
    d.mkdir()
    records = [{"v": 1, "t": "header", "generation": 0}, {"v": 1, "t": "reserve", "upto": 1025},
               {"v": 1, "t": "task", "id": 1, "request": {"url": "http://h/1"}}]  # tasks 2.. were lost
    (d / "journal.jsonl").write_bytes(b"".join(bg._dumps(r) for r in records))
    state, _, problems = bg._load_state(str(d))
    assert problems == [] and state.next_id == 1025


def test_close_joins_every_thread_the_session_started(server, sessions):
    """Every thread a session starts (journal, timers, workers, delegate, daemon client) is joined by close()."""
    before = set(threading.enumerate())
    server.add_blob("/j.bin", size=300_000)
    rec = Recorder()
    s = sessions.open(rec)
    download(s, server.url("/j.bin"))
    assert s.wait(LONG)
    assert any(t.name.startswith("bgsession-") for t in set(threading.enumerate()) - before)
    sessions.close_all()
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("bgsession-")]
    assert left == []
