"""Kill and relaunch tests: a fake HTTP server kills the app process mid-download (real SIGKILL),
the app is relaunched in the background, and the session-level hooks and the saved completion
handler are checked against the app's own fsynced ledger.

The app, the driver and the contract check are soakkit's (shared with test_soak.py): the app is
``python soakkit.py app``, an ``appdelegate`` app whose hooks append ``started``/``returned`` lines
to a ledger; ``soakkit.check`` reads that ledger, the files and the journal (the reasoning is in
soakkit's docstring). Here the kills land at random byte offsets of the downloads
(``Driver.kill_at``) and inside hooks, on both hosts.

The long randomized loop is marked ``soak`` (``python -m pytest -m soak test_relaunch.py``);
``BGSESSION_SOAK_SEED`` and ``BGSESSION_SOAK_BATCHES`` change it.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import appdelegate
import bgsession
import fake_server
import soakkit
from soakkit import SIGKILLED, Driver, File, Launch
from testkit import *  # the host (both hosts) and server fixtures
from testkit import HERE, stop_daemon

IDENTIFIER = "com.example.relaunch-test"
#: Longest wait for one app launch to end (or for one expected line).
LAUNCH_TIMEOUT = soakkit.LAUNCH_TIMEOUT
#: Background time granted to the app's downloads in one launch (generous: tests must not expire it).
BACKGROUND_TIME = "60"
#: SIGKILLs in the default (short) kill loop; the soak test makes many more.
KILLS = 5
#: Launches after which a run that has not completed every download fails.
MAX_LAUNCHES = 40
#: Bytes per second of the bigger files: slow enough that the client keeps up with the server (a kill at
#: server byte N then finds about N bytes in the client's file), fast enough for a short test.
THROTTLE = 8 << 20


def _driver(root: Any, server: fake_server.FakeServer, files: list[File], host: str) -> Driver:
    return Driver(str(root), server, files, host=host, identifier=IDENTIFIER,
                  env={appdelegate.BACKGROUND_TIME_ENV: BACKGROUND_TIME})


def _check(driver: Driver) -> None:
    """Every rule of the exactly-once and nothing-lost contract (soakkit.RULES) holds."""
    problems = soakkit.check(driver)
    assert problems == [], "\n".join(problems) + f"\n--- app log ---\n{driver.app_log()}"


def _kill_loop(driver: Driver, rng: random.Random, kills: int) -> list[Launch]:
    """Launch, kill at random byte offsets, relaunch; until every download completed.

    Returns the launches a kill was armed for: with the in-process host each of those kills is
    certain to land mid-download (while a file still has bytes the server never sent).
    """
    armed: list[Launch] = []
    killable = [f for f in driver.files if f.size is not None and not f.auth and f.size >= 2]
    for n in range(MAX_LAUNCHES):
        targets = [f for f in killable if f.size is not None and f.size - driver.served_end(f) >= 2]
        kill = n < kills and bool(targets)
        if kill:
            f = rng.choice(targets)
            assert f.size is not None
            # The next request for f sends at least size - served_end bytes: this offset is reached.
            driver.kill_at(f.path, driver.server.bytes_served(f.path)
                           + rng.randint(1, f.size - driver.served_end(f) - 1))
        launch = driver.relaunch() if driver.launches else driver.launch(background=False)
        if kill:
            armed.append(launch)
        rc = driver.wait(launch)
        assert rc in (0, SIGKILLED), f"launch {n} exited with {rc}:\n{driver.app_log()}"
        if rc == 0 and driver.delivered() >= {f.desc for f in driver.files}:
            return armed
    raise AssertionError(f"downloads not completed after {MAX_LAUNCHES} launches:\n{driver.app_log()}")


def _mixed_files(rng: random.Random, *, big: int) -> list[File]:
    """Mixed sizes (tiny to *big*), one 404, one behind Basic auth."""
    return [
        File("tiny.bin", 1, seed=1),
        File("small.bin", rng.randint(1000, 9000), seed=2),
        File("medium.bin", rng.randint(200_000, 400_000), seed=3, pacing=THROTTLE),
        File("large.bin", big + rng.randint(0, 4096), seed=4, pacing=THROTTLE // 2),
        File("private.bin", rng.randint(50_000, 150_000), seed=5, auth=True),
        File("missing.bin", None),
    ]


# ============================================================================
# Tests
# ============================================================================


@pytest.mark.timeout(120)
def test_kills_mid_download_then_background_relaunch(tmp_path: Any, server: Any, host: str) -> None:
    """Seeded SIGKILLs at random byte offsets; every hook completes once, every file is byte-exact."""
    rng = random.Random(20240611)
    files = _mixed_files(rng, big=2 << 20)
    large = next(f for f in files if f.name == "large.bin")
    assert large.size is not None
    driver = _driver(tmp_path, server, files, host)
    try:
        # First kill: in the normal launch, half way or more into the large download (its response is
        # long journaled by then, so the relaunch must resume it with Range).
        driver.kill_at(large.path, rng.randint(large.size * 5 // 10, large.size * 9 // 10))
        assert driver.wait(driver.launch(background=False)) == SIGKILLED
        armed = _kill_loop(driver, rng, kills=KILLS - 1)  # then more, anywhere, in background launches
        killed = [launch for launch in driver.launches if launch.rc == SIGKILLED]
        assert all(launch.killed_at is not None for launch in killed)
        if host == "inprocess":  # the app is the transfer host: every armed kill lands mid-download
            assert armed and all(launch.rc == SIGKILLED for launch in armed)
            ranged = [r.range_header for r in server.requests(large.path) if r.status == 206]
            assert ranged and not ranged[0].startswith("bytes=0-"), "a killed download resumes with Range"
        assert any(launch.background and launch.rc == 0 for launch in driver.launches)
        _check(driver)
    finally:
        driver.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("event", ["finish", "complete"])
def test_kill_inside_hook_redelivers_once(tmp_path: Any, server: Any, host: str, event: str) -> None:
    """A SIGKILL inside a hook: the event is delivered again at the relaunch, then never again."""
    files = [File("a.bin", 300_000, seed=11), File("b.bin", 5_000, seed=12)]
    driver = _driver(tmp_path, server, files, host)
    try:
        first = driver.launch(background=False, block=f"{event}:file:a.bin")
        assert driver.wait_line(first, "blocked")["hook"] == event
        driver.kill(first)
        assert first.rc == SIGKILLED
        started = [e for e in driver.records if e["event"] == event and e["desc"] == "file:a.bin"]
        assert [e["phase"] for e in started] == ["started"]
        second = driver.relaunch()
        assert driver.wait(second) == 0, driver.app_log()
        entries = [e for e in driver.records if e.get("desc") == "file:a.bin" and "phase" in e]
        phases = [(e["event"], e["phase"], e["proc"] == second.key) for e in entries]
        if event == "finish":
            assert phases == [("finish", "started", False),
                              ("finish", "started", True), ("finish", "returned", True),
                              ("complete", "started", True), ("complete", "returned", True)]
        else:
            assert phases == [("finish", "started", False), ("finish", "returned", False),
                              ("complete", "started", False),
                              ("complete", "started", True), ("complete", "returned", True)]
        _check(driver)
    finally:
        driver.close()


@pytest.mark.timeout(120)
def test_demo_story_passes(tmp_path: Any, host: str) -> None:
    """python demo_photo_app.py tells the whole story (launch, SIGKILL mid-download, background relaunch) and passes."""
    env = dict(os.environ)
    env.pop(bgsession.BACKGROUND_EVENTS_ENV, None)
    try:
        done = subprocess.run([sys.executable, "-W", "error", os.path.join(HERE, "demo_photo_app.py"), "--host",
                               host, "--workdir", str(tmp_path), "--seed", "3"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=LAUNCH_TIMEOUT * 2)
    finally:
        if host == "daemon":
            stop_daemon(str(tmp_path / "app" / "session"))
    out = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, out
    assert "All checks passed." in out and "exit status -9" in out and out.count("SHA-256 ok") == 5, out


# ============================================================================
# The contract check can fail
# ============================================================================

A, B, MISSING = "file:a.bin", "file:b.bin", "file:missing.bin"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: Any) -> Any:
    """One run on the in-process host that keeps the contract (no kills), and a copy of its state."""
    root = tmp_path_factory.mktemp("clean-run")
    files = [File("a.bin", 100_000, seed=21), File("b.bin", 3_000, seed=22, auth=True), File("missing.bin", None)]
    with fake_server.FakeServer() as server:
        driver = _driver(root, server, files, "inprocess")
        try:
            assert driver.wait(driver.launch()) == 0, driver.app_log()
            assert soakkit.check(driver, settled=True) == []
            shutil.copytree(driver.state, root / "pristine")
            yield driver, root / "pristine", [(x.rc, x.ended, x.acked, x.app.killed) for x in driver.launches]
        finally:
            driver.close()


def _edit(driver: Driver, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Rewrite the app's ledger through *edit*."""
    lines = edit(driver.records)
    with open(driver.ledger.path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    driver.ledger = soakkit.LedgerReader(driver.ledger.path)


def _at(lines: list[dict[str, Any]], desc: str, event: str, phase: str) -> int:
    return next(i for i, x in enumerate(lines) if (x.get("desc"), x["event"], x.get("phase")) == (desc, event, phase))


def _set(desc: str, event: str, phase: str, **fields: Any) -> Callable[[Driver], None]:
    def mutate(driver: Driver) -> None:
        _edit(driver, lambda ls: [{**x, **fields} if i == _at(ls, desc, event, phase) else x for i, x in enumerate(ls)])
    return mutate


def _drop(desc: str, event: str, phase: str) -> Callable[[Driver], None]:
    return lambda driver: _edit(driver, lambda ls: [x for i, x in enumerate(ls) if i != _at(ls, desc, event, phase)])


def _append(**line: Any) -> Callable[[Driver], None]:
    return lambda driver: _edit(driver, lambda ls: ls + [{"proc": driver.launches[0].key, **line}])


def _called_again(driver: Driver) -> None:
    _edit(driver, lambda ls: ls + [x for x in ls if x.get("desc") == A and x["event"] == "finish"])


def _complete_first(driver: Driver) -> None:
    def edit(ls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        complete = ls.pop(_at(ls, A, "complete", "started"))
        ls.insert(_at(ls, A, "finish", "returned"), complete)
        return ls
    _edit(driver, edit)


def _killed_after_last_complete(driver: Driver) -> None:
    """The process was SIGKILLed right after the last complete hook returned, with no sign of its ack."""
    launch = driver.launches[0]
    launch.rc, launch.acked, launch.app.killed = SIGKILLED, frozenset(), True

    def edit(ls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        last = max(i for i, x in enumerate(ls) if (x["event"], x.get("phase")) == ("complete", "returned"))
        return ls[:last + 1]
    _edit(driver, edit)


def _exit_code(rc: int) -> Callable[[Driver], None]:
    def mutate(driver: Driver) -> None:
        driver.launches[0].rc = rc
    return mutate


def _write(relpath: str, data: bytes) -> Callable[[Driver], None]:
    def mutate(driver: Driver) -> None:
        path = os.path.join(driver.state, relpath)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return mutate


def _range_without_if_range(driver: Driver) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", driver.server.port, timeout=LAUNCH_TIMEOUT)
    try:
        conn.request("GET", "/files/a.bin", headers={"Range": "bytes=10-"})
        assert conn.getresponse().read()
    finally:
        conn.close()


#: (what goes wrong, how the run is changed, the rule that must report it, a phrase of the report)
VIOLATIONS: list[tuple[str, Callable[[Driver], None], str, str]] = [
    ("launch crashed", _exit_code(1), "_rule_exits", "ended with 1"),
    ("SIGKILL from elsewhere", _exit_code(SIGKILLED), "_rule_exits", "did not send"),
    ("hooks overlap", _append(event="violation", what="complete ran while another hook was running"),
     "_rule_app_saw_nothing_wrong", "another hook"),
    ("two tasks for a file", _set(A, "complete", "started", id=99), "_rule_one_task_per_file", "task ids"),
    ("hook called after its ack", _called_again, "_rule_hooks_exactly_once", "called again"),
    ("complete never returned", _drop(A, "complete", "returned"), "_rule_hooks_exactly_once", "never returned"),
    ("hook unfinished, not killed", _drop(B, "finish", "returned"), "_rule_hooks_exactly_once",
     "though that process was not killed"),
    ("last complete unacknowledged", _killed_after_last_complete, "_rule_hooks_exactly_once",
     "never acknowledged"),
    ("finish saw other bytes", _set(A, "finish", "started", sha256="0" * 64), "_rule_finish_saw_the_file",
     "other bytes"),
    ("404 kept", _set(MISSING, "finish", "returned", dest="/tmp/missing.bin"), "_rule_finish_saw_the_file",
     "404 page was kept"),
    ("complete before finish", _complete_first, "_rule_complete_after_finish", "before the finish hook returned"),
    ("completed with an error", _set(A, "complete", "started", error="TIMED_OUT: x"),
     "_rule_complete_after_finish", "with an error"),
    ("accepted task lost", _append(event="recreated", desc=A), "_rule_no_task_lost", "accepted by resume()"),
    ("saved file corrupt", _write("Documents/a.bin", b"not the photo"), "_rule_documents_exact", "differs"),
    ("completion handler called by a normal launch", _append(event="handler_called"),
     "_rule_completion_handler_once", "1 times"),
    ("resume not validated", _range_without_if_range, "_rule_resume_validated", "without If-Range"),
    ("tmp/ not empty", _write("session/tmp/left.part", b"x"), "_rule_journal_clean", "tmp/ not empty"),
    ("journal file mode", lambda d: os.chmod(os.path.join(d.session_dir, "journal.jsonl"), 0o644),
     "_rule_journal_clean", "journal:"),
    ("daemon pid file left", _write("session/daemon.pid", b"1 1\n"), "_rule_daemon_gone", "daemon.pid"),
]


@pytest.mark.parametrize("mutate, rule, phrase", [pytest.param(*row[1:], id=row[0]) for row in VIOLATIONS])
def test_contract_check_reports_violation(clean_run: Any, mutate: Callable[[Driver], None], rule: str,
                                          phrase: str) -> None:
    """The contract check reports each kind of violation, under the rule that states it."""
    driver, pristine, launches = clean_run
    try:
        mutate(driver)
        found = soakkit.check_by_rule(driver, settled=True)[rule]
        assert any(phrase in problem for problem in found), found
    finally:
        shutil.rmtree(driver.state)
        shutil.copytree(pristine, driver.state)
        driver.ledger = soakkit.LedgerReader(driver.ledger.path)
        for launch, (rc, ended, acked, killed) in zip(driver.launches, launches):
            launch.rc, launch.ended, launch.acked, launch.app.killed = rc, ended, acked, killed
        driver.server.reset_counters()
    assert soakkit.check(driver, settled=True) == []


def test_every_contract_rule_can_fail() -> None:
    """Every rule of the contract check has a violation above that it reports."""
    rules = {rule.__name__ for rule in soakkit.RULES + soakkit.SETTLED_RULES}
    assert rules == {row[2] for row in VIOLATIONS}


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_random_kills(tmp_path: Any, host: str) -> None:
    """Many batches of random files, each killed many times at random offsets: the contract holds every time."""

    seed = int(os.environ.get("BGSESSION_SOAK_SEED", "1"))
    batches = int(os.environ.get("BGSESSION_SOAK_BATCHES", "12"))
    rng = random.Random(seed)
    for batch in range(batches):
        sizes = [0, 1, rng.randint(2, 100), rng.randint(60_000, 70_000), rng.randint(100_000, 1 << 20),
                 rng.randint(1 << 20, 6 << 20), rng.randint(1 << 20, 6 << 20)]
        files = [File(f"f{i}.bin", size, seed=batch * 100 + i,
                      pacing=rng.choice([None, THROTTLE // 2, THROTTLE * 2]) if size > 50_000 else None)
                 for i, size in enumerate(sizes)]
        files += [File("private.bin", rng.randint(1000, 300_000), seed=batch * 100 + 50, auth=True),
                  File("missing.bin", None)]
        rng.shuffle(files)
        with fake_server.FakeServer() as server:
            driver = _driver(tmp_path / f"batch{batch}", server, files, host)
            try:
                armed = _kill_loop(driver, rng, kills=rng.randint(3, 10))
                if host == "inprocess":
                    assert all(launch.rc == SIGKILLED for launch in armed), "an armed kill did not land"
                _check(driver)
            except AssertionError as err:
                raise AssertionError(f"soak seed {seed}, batch {batch}: {err}") from err
            finally:
                driver.close()

