"""Scheduling a long queue: priority order over all hosts, the global cap of transfers and connections, the earliest
begin date (a scheduled task survives kills of the app and the daemon), bandwidth limits (a token bucket that a
cancel never waits for), and the journal format that keeps these options from an older bgsession.

Speed is measured by bench/limits.py, never here: the bandwidth tests below assert upper bounds only (a slow machine
moves fewer bytes, never more)."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, SHORT, FakeClock, MiB, Recorder, download, read_pid_file, received, sha, wait_until

KiB = 1 << 10
UTC = datetime.timezone.utc


# ---------------------------------------------------------------------------
# the decisions, as tables
# ---------------------------------------------------------------------------


def q(task_id: int, origin: str, priority: float, seq: int) -> bg._Queued:
    return bg._Queued.of(task_id, origin, priority, seq)


@pytest.mark.parametrize("queued, active, running, cap, per_host, expect", [
    ([], {}, 0, 2, 6, None),  # nothing queued
    ([q(1, "a", 0.5, 0), q(2, "b", 0.9, 1)], {}, 0, 2, 6, 2),  # the higher priority, whatever its host
    ([q(1, "a", 0.5, 0), q(2, "b", 0.5, 1)], {}, 0, 2, 6, 1),  # equal: first in
    ([q(2, "a", 0.5, 5), q(1, "b", 0.5, 3)], {}, 0, 2, 6, 1),  # first in by arrival, not by id
    ([q(1, "a", 0.9, 0), q(2, "b", 0.1, 1)], {}, 2, 2, 6, None),  # the cap is full: nothing starts
    ([q(1, "a", 0.9, 0), q(2, "b", 0.1, 1)], {"a": 2}, 2, 3, 2, 2),  # "a" is at its limit: "b" goes
    ([q(1, "a", 0.9, 0)], {"a": 2}, 2, 3, 2, None),  # only "a" has work and it is at its limit
    ([q(1, "a", 1.0, 0), q(2, "a", 0.0, 1)], {}, 0, 1, 1, 1),  # 1.0 and 0.0 are valid priorities
])
def test_next_to_start_table(queued, active, running, cap, per_host, expect):
    """The highest-priority queued task whose origin is under its limit takes a free slot; ties: first in."""
    chosen = bg.next_to_start(queued, active, running=running, max_concurrent=cap, per_host=per_host)
    assert (chosen.task_id if chosen else None) == expect


@pytest.mark.parametrize("configured, override, expect", [
    (None, None, None),
    (1000, None, 1000),  # the configuration's
    (None, (500, None), 500),  # set while running, over the configuration it replaced
    (1000, (None, 1000), None),  # lifted while running
    (2000, (500, 1000), 2000),  # an app configured another limit since: the newer decision wins
])
def test_session_rate_table(configured, override, expect):
    """The session's limit in force: a limit set while running holds until the configured one changes."""
    assert bg.session_rate(configured, override) == expect


class Ticks:
    """A clock for _RateLimit: seconds that pass only when the test says."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_is_a_token_bucket_with_a_small_burst():
    """Reservations wait at the rate; an idle bucket fills to a quarter second's worth only; unused bytes go back;
    a changed or removed rate applies to the next wait."""
    t = Ticks()
    limit = bg._RateLimit(1000, clock=t)
    assert limit.chunk(1 << 20) == 50  # 50 ms worth
    limit.reserve(500)
    assert limit.delay() == pytest.approx(0.5)  # starts empty: no burst at the start
    t.now += 0.5
    assert limit.delay() == 0.0
    t.now += 60.0  # idle for a minute
    limit.reserve(250)
    assert limit.delay() == 0.0  # a quarter second's worth was kept ...
    limit.reserve(100)
    assert limit.delay() == pytest.approx(0.1)  # ... and no more
    limit.give_back(100)
    assert limit.delay() == 0.0
    limit.reserve(1000)
    limit.set_rate(4000)
    assert limit.delay() == pytest.approx(0.25)
    limit.set_rate(None)
    assert limit.delay() == 0.0 and limit.chunk(1 << 20) == 1 << 20


# ---------------------------------------------------------------------------
# priority and the global cap (both hosts)
# ---------------------------------------------------------------------------


def test_start_order_is_priority_order_across_hosts(server, sessions):
    """50 tasks on 5 hosts with random priorities and a cap of 2: the server sees them start in priority order
    (ties: creation order); a priority raised while the task is queued takes effect."""
    rng = random.Random(14)
    ports = [server.port, *server.add_ports(4)]
    for i in range(50):
        server.add_blob(f"/t{i}", size=1000, seed=i)
    plugs = []
    for i in range(2):  # two transfers that hold both slots while the 50 are queued behind them
        server.add_blob(f"/plug{i}", size=1000)
        plugs.append(server.hold_at(f"/plug{i}", 0))
    rec = Recorder()
    rec.expect = 51
    s = sessions.open(rec, max_concurrent_transfers=2)
    for i in range(2):
        download(s, server.url(f"/plug{i}"))
    assert plugs[0].wait(LONG) and plugs[1].wait(LONG)
    priorities = [rng.choice([0.1, 0.25, 0.5, 0.75, 0.9]) for _ in range(50)]
    tasks = [s.download_task(bg.Request(server.url(f"/t{i}", port=ports[i % 5]), priority=p))
             for i, p in enumerate(priorities)]
    s.resume_all(tasks)
    raised = max(i for i in range(50) if priorities[i] == min(priorities))  # the last of the lowest
    tasks[raised].priority = 1.0
    priorities[raised] = 1.0
    assert tasks[raised].priority == 1.0
    plugs[0].release()  # one slot: the queue drains one task at a time, in the order the scheduler picks
    assert rec.completed.wait(LONG)
    plugs[1].release()
    assert s.wait(LONG)
    started = [int(r.path[2:]) for r in server.requests() if r.path.startswith("/t")]
    assert started == sorted(range(50), key=lambda i: (-priorities[i], i))
    assert started[0] == raised
    assert [r.port for r in server.requests() if r.path.startswith("/t")] == [ports[i % 5] for i in started]


class Observer(Recorder):
    """A Recorder that also counts the transfer threads each time a hook runs (in-process host)."""

    def __init__(self) -> None:
        super().__init__()
        self.most_workers = 0

    def download_task_did_finish_downloading(self, session, task, location):
        workers = sum(1 for t in threading.enumerate() if t.name == "bgsession-worker")
        self.most_workers = max(self.most_workers, workers)
        super().download_task_did_finish_downloading(session, task, location)


def test_a_thousand_tasks_on_a_hundred_hosts_stay_within_the_cap(server, sessions):
    """1,000 tasks on 100 hosts with max_concurrent_transfers=5: the server never sees more than 5 connections (or
    requests) at once -- and sees 5; in-process, never more than 5 transfer threads."""
    ports = [server.port, *server.add_ports(99)]
    for i in range(1000):
        server.add_blob(f"/f{i}", size=2000, seed=i)
    rec = Observer()
    rec.expect = 1000
    s = sessions.open(rec, max_concurrent_transfers=5)
    s.resume_all([s.download_task(server.url(f"/f{i}", port=ports[i % 100])) for i in range(1000)])
    assert s.wait(LONG)
    assert len(rec.files) == 1000 and all(rec.errors[i] is None for i in rec.errors)
    assert server.peak_connections == 5 and server.peak_requests <= 5
    assert len({r.port for r in server.requests()}) == 100
    if sessions.host == "inprocess":
        assert 1 <= rec.most_workers <= 5


# ---------------------------------------------------------------------------
# earliest begin date
# ---------------------------------------------------------------------------


SCHEDULING_APP = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {here!r})
    import bgsession as bg
    directory, host, url, ahead = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    config = bg.Configuration.background("test.sched", directory=directory, host=host, daemon_idle_timeout=0.5)
    session = bg.Session(config)
    begin = time.time() + ahead
    session.download_task(bg.Request(url, earliest_begin_date=begin), description="later").resume()
    print("resumed", repr(begin), flush=True)
    sys.stdin.read()  # the app lives until the test kills it
''')


def test_a_scheduled_task_waits_for_its_date_across_kills(server, sessions, tmp_path):
    """A task scheduled 3 s ahead is 'scheduled' in the journal; the app (and the daemon) are SIGKILLed; the session
    opened again does not start it before its date, then does."""
    data = fs.blob_bytes(300_000, seed=3)
    server.add_blob("/later.bin", data)
    hold = server.hold_at("/later.bin", 0)
    script = tmp_path / "app.py"
    script.write_text(SCHEDULING_APP.format(here=HERE))
    directory = sessions.config("sched").directory
    argv = [sys.executable, "-W", "error", str(script), directory, sessions.host, server.url("/later.bin"), "3.0"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as app:
        try:
            word, begin_text = app.stdout.readline().split()
            assert word == b"resumed"  # resume() returned: the task is durable
            begin = float(begin_text)
            (task,) = bg.Journal(directory).tasks()
            assert (task["phase"], task["begin"]) == ("scheduled", begin)
        finally:
            app.kill()
    if sessions.host == "daemon":
        daemon = read_pid_file(directory)
        assert daemon is not None and daemon.kill()
    assert [t["phase"] for t in bg.Journal(directory).tasks()] == ["scheduled"]
    assert server.requests("/later.bin") == []
    rec = Recorder()
    s = sessions.open(rec, name="sched")
    (later,) = s.get_tasks()
    assert later.state is bg.TaskState.RUNNING and later.description == "later"
    assert later.earliest_begin_date == datetime.datetime.fromtimestamp(begin, UTC)
    assert hold.wait(LONG)
    (request,) = server.requests("/later.bin")
    assert request.time >= begin  # not before its date, though two processes died and a third recovered it
    hold.release()
    assert s.wait(LONG)
    assert sha(rec.files[later.identifier]) == sha(data)


def test_begin_date_in_virtual_time_and_the_resource_timeout_counts_from_it(server, tmp_path):
    """Virtual time: a task resumed an hour before its date starts at its date (the wall clock is read again at
    least every minute), although timeout_for_resource (10 min) has long passed since resume()."""
    data = fs.blob_bytes(10_000, seed=4)
    server.add_blob("/d.bin", data)
    clock = FakeClock()
    rec = Recorder()
    cfg = bg.Configuration.background("test.vt", directory=str(tmp_path / "s"), host="inprocess",
                                      timeout_for_resource=600.0)
    s = bg.Session(cfg, rec, _clock=clock)
    try:
        begin = clock.time() + 3600.0
        task = download(s, bg.Request(server.url("/d.bin"), earliest_begin_date=begin))
        assert s.wait(LONG)
        assert clock.time() >= begin
    finally:
        s.close()
    assert rec.errors[task.identifier] is None and sha(rec.files[task.identifier]) == sha(data)
    assert sum(clock.waits) >= 3600.0 and max(clock.waits) <= bg.BEGIN_DATE_RECHECK
    assert bg.Journal(str(tmp_path / "s")).check() == []


def test_a_scheduled_task_can_be_suspended_moved_and_cancelled(server, sessions):
    """A scheduled task is RUNNING; suspend makes it SUSPENDED, resume schedules it again; a date set to the past
    starts it; a date cannot be set once it has begun, a priority can; cancel ends a scheduled task with CANCELLED."""
    server.add_blob("/m.bin", size=1000)
    hold = server.hold_at("/m.bin", 0)
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec)
    far = datetime.datetime.now(UTC).replace(microsecond=0) + datetime.timedelta(days=30)
    task = download(s, bg.Request(server.url("/m.bin"), earliest_begin_date=far))
    other = download(s, bg.Request(server.url("/m.bin"), earliest_begin_date=far.timestamp()))
    assert task.state is bg.TaskState.RUNNING and task.earliest_begin_date == far
    task.suspend()
    assert task.state is bg.TaskState.SUSPENDED
    task.resume()
    assert [t["phase"] for t in bg.Journal(sessions.config().directory).tasks()] == ["scheduled", "scheduled"]
    task.earliest_begin_date = time.time() - 1
    assert hold.wait(LONG)
    with pytest.raises(bg.InvalidArgumentError, match="transferring"):
        task.earliest_begin_date = far
    task.priority = 0.1  # a running transfer takes a new priority (for its next time in the queue) and goes on
    assert task.priority == 0.1 and task.state is bg.TaskState.RUNNING
    other.cancel()
    hold.release()
    assert s.wait(LONG)
    assert rec.errors[task.identifier] is None
    assert rec.errors[other.identifier].code is bg.ErrorCode.CANCELLED
    assert len(server.requests("/m.bin")) == 1


# ---------------------------------------------------------------------------
# bandwidth limits (upper bounds only: bench/limits.py measures the accuracy)
# ---------------------------------------------------------------------------

LIMIT = 64 * KiB
#: What a limited transfer may move beyond rate x time: the bucket's burst and one chunk, with room to spare.
SLACK = 0.5


@pytest.mark.parametrize("which", ["task", "session"])
def test_a_limit_bounds_a_download_and_lifting_it_applies_at_once(server, sessions, which):
    """Under a 64 KiB/s limit (the task's or the session's) a download moves no more than that; lifting the limit
    while it runs lets it finish (at 64 KiB/s its 6 MiB would take 96 s, longer than the test waits)."""
    data = fs.blob_bytes(6 * MiB, seed=8)
    server.add_blob("/big.bin", data)
    rec = Recorder()
    s = sessions.open(rec, max_bytes_per_second=LIMIT if which == "session" else None)
    task = s.download_task(server.url("/big.bin"))
    if which == "task":
        task.max_bytes_per_second = LIMIT
    assert (task.max_bytes_per_second, s.max_bytes_per_second) == ((LIMIT, None) if which == "task" else
                                                                   (None, LIMIT))
    started = time.monotonic()
    task.resume()
    wait_until(received(task, 96 * KiB), what="some bytes")
    got = task.count_of_bytes_received
    assert got <= LIMIT * (time.monotonic() - started + SLACK)
    if which == "task":
        task.max_bytes_per_second = None
    else:
        s.max_bytes_per_second = None
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)


def test_a_limit_bounds_an_upload(server, sessions, tmp_path):
    """An upload under its task's 64 KiB/s limit sends no more than that (counted by the server); lifted, it ends."""
    source = tmp_path / "up.bin"
    source.write_bytes(fs.blob_bytes(4 * MiB, seed=9))
    server.add_upload("/up")
    rec = Recorder()
    s = sessions.open(rec)
    task = s.upload_task(bg.Request(server.url("/up"), method="PUT"), from_file=str(source))
    task.max_bytes_per_second = LIMIT
    started = time.monotonic()
    task.resume()
    wait_until(lambda: server.bytes_received("/up") >= 96 * KiB, what="some bytes at the server")
    assert server.bytes_received("/up") <= LIMIT * (time.monotonic() - started + SLACK)
    task.max_bytes_per_second = None
    assert s.wait(LONG)
    assert [sha(b) for b in server.uploads("/up")] == [sha(source.read_bytes())]


def test_a_limit_never_holds_up_suspend_or_cancel(server, sessions):
    """Under a limit, a suspended attempt ends at once (its task, resumed, sends its next request), and so does a
    cancelled one after the limit fell to 1 byte a second -- though the bytes it had reserved at 64 KiB/s would then
    take it up to an hour to pay for, if it slept through its wait."""
    server.add_blob("/slow.bin", size=4 * MiB)
    rec = Recorder()
    s = sessions.open(rec)
    task = s.download_task(server.url("/slow.bin"))
    task.max_bytes_per_second = LIMIT
    task.resume()
    wait_until(received(task, 16 * KiB), timeout=SHORT, what="some bytes")
    task.suspend()
    task.resume()  # queued again once the suspended attempt has ended
    wait_until(lambda: len(server.requests("/slow.bin")) == 2, timeout=SHORT, what="the resumed request")
    task.max_bytes_per_second = 1
    task.cancel()
    assert s.wait(SHORT)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANCELLED


def test_a_limit_never_holds_up_the_resource_timeout(server, sessions):
    """Under a session limit of 1 byte a second, timeout_for_resource still ends the task with TIMED_OUT."""
    server.add_blob("/slow.bin", size=1 * MiB)
    rec = Recorder()
    s = sessions.open(rec, max_bytes_per_second=1, timeout_for_resource=2.0)
    task = download(s, server.url("/slow.bin"))
    assert s.wait(SHORT)
    assert rec.errors[task.identifier].code is bg.ErrorCode.TIMED_OUT


# ---------------------------------------------------------------------------
# persistence, bad input, the journal format
# ---------------------------------------------------------------------------


def test_scheduling_options_survive_a_reopen_and_a_newer_configuration_wins(server, sessions):
    """Priority, date and limits are persisted; a session limit set while running outlives a reopen with the same
    configuration, and gives way to a configuration with another limit."""
    s = sessions.open()
    far = datetime.datetime(2099, 1, 1, tzinfo=UTC)
    task = s.download_task(bg.Request(server.url("/x"), priority=0.9, earliest_begin_date=far))
    task.max_bytes_per_second = 1000
    task.resume()
    s.max_bytes_per_second = 5000
    sessions.close_all()
    stop_daemon(sessions.config().directory)  # (daemon host: the next open recovers from the journal)
    s = sessions.open()
    (task,) = s.get_tasks()
    assert (task.priority, task.earliest_begin_date, task.max_bytes_per_second) == (0.9, far, 1000)
    assert task.state is bg.TaskState.RUNNING and s.max_bytes_per_second == 5000
    task.priority = 0.2
    sessions.close_all()
    stop_daemon(sessions.config().directory)
    s = sessions.open(max_bytes_per_second=7000)
    assert s.max_bytes_per_second == 7000 and s.get_tasks()[0].priority == 0.2
    s.get_tasks()[0].cancel()
    assert s.wait(LONG)


@pytest.mark.parametrize("name, value", [
    ("priority", 1.5), ("priority", -0.1), ("priority", True), ("priority", "high"), ("priority", None),
    ("earliest_begin_date", datetime.datetime(2030, 1, 1)),  # no time zone: ambiguous
    ("earliest_begin_date", 1.7e12),  # milliseconds
    ("earliest_begin_date", float("nan")), ("earliest_begin_date", "tonight"),
    ("max_bytes_per_second", 0), ("max_bytes_per_second", -5), ("max_bytes_per_second", True),
    ("max_bytes_per_second", "2M"),
])
def test_bad_scheduling_options_are_refused_and_change_nothing(sessions, name, value):
    """A bad priority, date or limit raises InvalidArgumentError (a ValueError) and leaves the task as it was."""
    s = sessions.open()
    task = s.download_task("http://127.0.0.1:9/x")
    with pytest.raises(bg.InvalidArgumentError):
        setattr(task, name, value)
    assert (task.priority, task.earliest_begin_date, task.max_bytes_per_second) == (0.5, None, None)
    with pytest.raises(ValueError):
        s.max_bytes_per_second = 0
    if name != "max_bytes_per_second" and value is not None:
        with pytest.raises(bg.InvalidArgumentError):
            bg.Request("http://127.0.0.1:9/x", **{name: value})
    task.cancel()


@pytest.mark.parametrize("kwargs", [dict(max_concurrent_transfers=0), dict(max_concurrent_transfers=1000),
                                    dict(max_concurrent_transfers=2.0), dict(max_bytes_per_second=0)])
def test_bad_scheduling_configuration_is_refused(kwargs, tmp_path):
    """The cap and the session limit are checked when the configuration is made."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.Configuration.background("test.bad", directory=str(tmp_path / "b"), **kwargs)


def _formats(directory: str) -> list:
    with open(os.path.join(directory, "journal.jsonl"), "rb") as f:
        journal = [json.loads(line)["v"] for line in f]
    with open(os.path.join(directory, "snapshot.json"), "rb") as f:
        return journal + [json.load(f)["v"]]


def test_a_journal_without_scheduling_options_stays_format_1(server, sessions):
    """A session that sets no scheduling option writes only format 1 records: an older bgsession still reads it."""
    server.add_blob("/a", size=1000)
    rec = Recorder()
    s = sessions.open(rec)
    s.download_task(server.url("/a"), description="left suspended")
    download(s, server.url("/a"))
    assert rec.completed.wait(LONG)
    sessions.close_all()
    stop_daemon(sessions.config().directory)
    assert set(_formats(sessions.config().directory)) == {1}


def test_scheduling_options_are_format_2_which_an_older_bgsession_refuses(tmp_path, monkeypatch):
    """A journal (and its snapshot) with a scheduling option is format 2; a bgsession that reads format 1 refuses it
    with its error and leaves the files as they were."""
    cfg = bg.Configuration.background("test.v2", directory=str(tmp_path / "s"), host="inprocess")
    s = bg.Session(cfg)
    s.download_task("http://127.0.0.1:9/x").priority = 0.75
    s.close()
    assert 2 in _formats(cfg.directory)
    with monkeypatch.context() as older:
        older.setattr(bg, "JOURNAL_VERSION", 1)  # what an older bgsession reads
        assert "newer than this bgsession" in " ".join(bg.Journal(cfg.directory).check())
    bg.Session(cfg).close()  # folds the journal into the snapshot
    assert _formats(cfg.directory)[-1] == 2
    files = {name: (tmp_path / "s" / name).read_bytes() for name in ("journal.jsonl", "snapshot.json")}
    monkeypatch.setattr(bg, "JOURNAL_VERSION", 1)  # what an older bgsession reads
    with pytest.raises(bg.JournalError, match="newer bgsession"):
        bg.Session(cfg)
    assert {name: (tmp_path / "s" / name).read_bytes() for name in files} == files


def test_a_format_1_journal_opens_unchanged(server, tmp_path):
    """A journal written before the scheduling options (format 1) opens as it was: its task runs with the default
    priority, no date and no limit."""
    data = fs.blob_bytes(5000, seed=5)
    server.add_blob("/old.bin", data)
    directory = tmp_path / "old"
    directory.mkdir(mode=0o700)
    now = time.time()
    records = [{"v": 1, "t": "header", "generation": 0}, {"v": 1, "t": "reserve", "upto": 1025},
               {"v": 1, "t": "task", "id": 1, "kind": "download", "description": "from 0.2",
                "request": {"url": server.url("/old.bin"), "method": "GET", "headers": [], "sha256": None},
                "created": now, "upload": None},
               {"v": 1, "t": "resume", "id": 1, "at": now, "upload": None}]
    (directory / "journal.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    rec = Recorder()
    s = bg.Session(bg.Configuration.background("test.old", directory=str(directory), host="inprocess"), rec)
    try:
        (task,) = s.get_tasks()
        assert (task.description, task.priority, task.earliest_begin_date, task.max_bytes_per_second) == (
            "from 0.2", 0.5, None, None)
        assert s.wait(LONG)
    finally:
        s.close()
    assert sha(rec.files[1]) == sha(data)
    assert bg.Journal(str(directory)).check() == [] and set(_formats(str(directory))) == {1}
