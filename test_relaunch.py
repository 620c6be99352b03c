"""Kill and relaunch tests: a fake HTTP server kills the app process mid-download (real SIGKILL),
the app is relaunched in the background, and the session-level hooks and the saved completion
handler are checked against the app's own fsynced ledger.

This file is also the app (``python test_relaunch.py app --state DIR``): an ``appdelegate`` app
with a ``bgsession.SessionManager`` subclass, wired like the seed, that appends one JSON line per
hook call to ``<state>/ledger.jsonl`` — ``started`` when a hook begins, ``returned`` just before it
returns — so a kill inside a hook is visible, and a redelivery can be told from a second call.

Reading the ledger: bgsession acknowledges an event after its hook returned and before it calls
the next hook (hooks run serially on one delegate thread). A ``returned`` line is known to be
*acknowledged* when the process exited normally, or wrote a later hook line, or (after a kill) the
journal as the dead process left it holds the acknowledgement. Any other ``returned`` line belongs
to a process killed between the hook's return and its acknowledgement: that event may rightly be
delivered again. DESIGN §4.2 then reads: every (task, event) returned at least once, no hook ran for
it after an acknowledged return, and the last ``complete`` return is acknowledged.

The long randomized loop is marked ``soak`` (``python -m pytest -m soak test_relaunch.py``);
``BGSESSION_SOAK_SEED`` and ``BGSESSION_SOAK_BATCHES`` change it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

import appdelegate
import bgsession
import fake_server
from testkit import *  # the host (both hosts) and server fixtures
from testkit import HERE, Ledger, file_sha, sha, stop_daemon

IDENTIFIER = "com.example.relaunch-test"
#: Longest wait for one app launch to end (or for one expected line).
LAUNCH_TIMEOUT = 60.0
#: Background time granted to the app's downloads in one launch (generous: tests must not expire it).
BACKGROUND_TIME = "60"
#: SIGKILLs in the default (short) kill loop; the soak test makes many more.
KILLS = 5
#: Launches after which a run that has not completed every download fails.
MAX_LAUNCHES = 40
USER, PASSWORD = "alice", "wonderland"
#: Polling interval for processes this test cannot wait on (the daemon's children).
POLL = 0.05
#: Bytes per second of the bigger files: slow enough that the client keeps up with the server (a kill at
#: server byte N then finds about N bytes in the client's file), fast enough for a short test.
THROTTLE = 8 << 20
SIGKILLED = -signal.SIGKILL


# ============================================================================
# The app (child process)
# ============================================================================


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class LedgerManager(bgsession.SessionManager):
    """The app's background session manager: session-level blocks set in __init__, as in the seed."""

    def __init__(self, state: str, manifest: str, host: str, block: tuple[str, str] | None) -> None:
        super().__init__(bgsession.Configuration.background(
            IDENTIFIER, directory=os.path.join(state, "session"), host=host,
            relaunch_command=_app_argv(state, manifest, host) if host == "daemon" else None))
        self.documents = os.path.join(state, "Documents")
        self.ledger = Ledger(os.path.join(state, "ledger.jsonl"), pid=os.getpid())
        self.block = block  # (event, description): that hook blocks forever (the parent kills us there)
        self.saved_completion_handler: appdelegate.CompletionHandler | None = None
        self.set_download_task_did_finish_downloading(self._finish)
        self.set_task_did_complete(self._complete)
        self.set_did_finish_events_for_background_session(self._events)
        self.set_task_did_receive_authentication_challenge(self._challenge)

    def _maybe_block(self, event: str, description: str) -> None:
        if self.block == (event, description):
            _say(f"blocked in {event} {description}")
            threading.Event().wait()

    def _finish(self, session: bgsession.Session, task: bgsession.DownloadTask, location: str) -> str | None:
        status = task.response.status if task.response is not None else None
        self.ledger.append(event="finish", phase="started", desc=task.description, status=status,
                           sha256=file_sha(location))
        self._maybe_block("finish", task.description)
        dest = None
        if status == 200:  # the seed's check: a 404 page is no photo
            os.makedirs(self.documents, exist_ok=True)
            dest = os.path.join(self.documents, bgsession.sanitize_filename(
                urllib.parse.urlsplit(task.original_request.url).path.rsplit("/", 1)[-1]))
        self.ledger.append(event="finish", phase="returned", desc=task.description, dest=dest)
        return dest

    def _complete(self, session: bgsession.Session, task: bgsession.Task,
                  error: bgsession.TransferError | None) -> None:
        status = task.response.status if task.response is not None else None
        self.ledger.append(event="complete", phase="started", desc=task.description, status=status,
                           error=None if error is None else error.code.name)
        self._maybe_block("complete", task.description)
        self.ledger.append(event="complete", phase="returned", desc=task.description)

    def _events(self, session: bgsession.Session) -> None:
        self.ledger.append(event="events")
        handler, self.saved_completion_handler = self.saved_completion_handler, None
        if handler is not None:
            self.ledger.append(event="handler_called")
            handler()

    def _challenge(self, session: bgsession.Session, task: bgsession.Task, challenge: bgsession.AuthChallenge
                   ) -> tuple[bgsession.AuthChallengeDisposition, bgsession.Credential | None]:
        if challenge.previous_failure_count == 0:
            return bgsession.AuthChallengeDisposition.USE_CREDENTIAL, bgsession.Credential(
                USER, PASSWORD, bgsession.CredentialPersistence.FOR_SESSION)
        return bgsession.AuthChallengeDisposition.CANCEL_AUTHENTICATION_CHALLENGE, None


class LedgerApp(appdelegate.AppDelegate):
    """Submits the manifest's downloads once; every launch re-creates the manager and resumes them."""

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        args = _app_parser().parse_args(app.argv[2:])
        block = tuple(args.block.split(":", 1)) if args.block else None
        self.manager = manager = LedgerManager(args.state, args.manifest, args.host, block)  # type: ignore[arg-type]
        ledger = manager.ledger
        ledger.append(event="launch", background=app.is_background_launch)
        with open(args.manifest, "rb") as f:
            manifest = json.load(f)
        records = ledger.read()
        live = {t.description: t for t in manager.session.get_tasks()}
        if not any(r["event"] == "submitted" for r in records):
            # Create every task (suspended: no byte flows, so no kill can land), note it, then resume.
            for item in manifest:
                if item["desc"] not in live:
                    live[item["desc"]] = manager.session.download_task(item["url"], description=item["desc"])
            ledger.append(event="submitted")
        else:
            done = {r["desc"] for r in records if r["event"] == "complete" and r["phase"] == "returned"}
            for item in manifest:  # a task whose creation never reached the journal: create it again
                if item["desc"] not in live and item["desc"] not in done:
                    ledger.append(event="recreated", desc=item["desc"])
                    live[item["desc"]] = manager.session.download_task(item["url"], description=item["desc"])
        for task in live.values():
            if task.state is bgsession.TaskState.SUSPENDED:
                task.resume()
                ledger.append(event="resumed", desc=task.description)  # accepted: bgsession must not lose it
        if args.host == "inprocess" and live:
            # This process hosts the transfers: ask for time to finish them before exiting.
            task_id = app.begin_background_task(lambda: app.end_background_task(task_id), name="downloads")

            def finish_then_end() -> None:
                manager.session.wait()
                app.end_background_task(task_id)

            threading.Thread(target=finish_then_end, daemon=True).start()

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.manager.saved_completion_handler = completion_handler
        self.manager.ledger.append(event="handler_saved", identifier=identifier)

    def run(self, app: appdelegate.Application) -> None:
        self.manager.session.wait()

    def will_terminate(self, app: appdelegate.Application) -> None:
        self.manager.session.close()
        self.manager.ledger.append(event="exit")


def _app_argv(state: str, manifest: str, host: str) -> list[str]:
    """The app's command line (also the daemon host's relaunch_command)."""
    return [sys.executable, "-W", "error", os.path.abspath(__file__), "app", "--state", state,
            "--manifest", manifest, "--host", host]


def _app_main() -> int:
    args, _ = _app_parser().parse_known_args(sys.argv[2:])
    code = appdelegate.main(LedgerApp)
    Ledger(os.path.join(args.state, "ledger.jsonl"), pid=os.getpid()).append(event="exit_code", code=code)
    return code


def _app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test_relaunch.py app")
    parser.add_argument("--state", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--host", default="inprocess")
    parser.add_argument("--block", help="EVENT:DESCRIPTION — that hook blocks forever")
    return parser


# ============================================================================
# The parent: files, launches, kills
# ============================================================================


@dataclasses.dataclass(frozen=True)
class File:
    name: str
    size: int | None  # None: the server answers 404
    seed: int = 0
    auth: bool = False
    throttle: int | None = None  # bytes/s: the client keeps up, so a kill lands where the client is

    @property
    def desc(self) -> str:
        return f"file:{self.name}"

    @property
    def path(self) -> str:
        return f"/files/{self.name}"

    @property
    def sha256(self) -> str:
        assert self.size is not None
        return sha(fake_server.blob_bytes(self.size, self.seed))


@dataclasses.dataclass
class Launch:
    """One run of the app. ``proc`` is None when the daemon, not this test, launched it."""

    pid: int
    background: bool
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]
    lines: queue.Queue[str | None] = dataclasses.field(default_factory=queue.Queue)
    rc: int | None = None
    killed_at: tuple[str, int] | None = None
    #: After a kill: the (description, event) pairs the journal had acknowledged when the process died.
    acked: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    def expect(self, prefix: str, timeout: float = LAUNCH_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"app pid {self.pid} ended before printing {prefix!r}")
            if line.startswith(prefix):
                return line


class Driver:
    """Plays the system for one app: launches it, kills it at byte offsets, relaunches it.

    With the in-process host the driver relaunches the app itself (as iOS would); with the
    daemon host the bgsession daemon does, and the driver watches the app's ledger for it.
    """

    def __init__(self, root: str, server: Any, files: Sequence[File], host: str) -> None:
        self.server, self.files, self.host = server, list(files), host
        self.state = os.path.join(root, "app")
        os.makedirs(self.state, mode=0o700)
        self.manifest = os.path.join(root, "manifest.json")
        with open(self.manifest, "w", encoding="utf-8") as f:
            json.dump([{"desc": x.desc, "url": server.url(x.path)} for x in files], f)
        self.log = os.path.join(root, "app.log")
        self.launches: list[Launch] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        for f in files:
            if f.size is None:
                server.add_status(f.path, 404, b"no such photo\n")
            else:
                server.add_blob(f.path, size=f.size, seed=f.seed, auth=_basic_auth() if f.auth else None,
                                default_fault=_throttled(f.throttle))

    @property
    def ledger(self) -> Ledger:
        return Ledger(os.path.join(self.state, "ledger.jsonl"), pid=os.getpid())

    @property
    def session_directory(self) -> str:
        return os.path.join(self.state, "session")

    def launch(self, background: bool, block: str | None = None) -> Launch:
        env = dict(os.environ)
        env.pop(bgsession.BACKGROUND_EVENTS_ENV, None)
        if background:
            env[bgsession.BACKGROUND_EVENTS_ENV] = IDENTIFIER
        env[appdelegate.BACKGROUND_TIME_ENV] = BACKGROUND_TIME
        env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
        argv = _app_argv(self.state, self.manifest, self.host) + (["--block", block] if block else [])
        with open(self.log, "ab") as err:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        launch = Launch(proc.pid, background, proc)

        def read() -> None:
            assert proc.stdout is not None
            with proc.stdout:
                for raw in proc.stdout:
                    launch.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            launch.lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        with self._lock:
            self.launches.append(launch)
        return launch

    def relaunch(self) -> Launch:
        """The next background launch: made here (in-process host) or by the daemon (daemon host)."""
        if self.host == "inprocess":
            return self.launch(background=True)
        known = {launch.pid for launch in self.launches}
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while time.monotonic() < deadline:
            for record in self.ledger.read():
                if record["event"] == "launch" and record["background"] and record["pid"] not in known:
                    launch = Launch(record["pid"], True)
                    with self._lock:
                        self.launches.append(launch)
                    return launch
            time.sleep(POLL)  # the daemon's child: not ours to wait for; its fsynced ledger tells
        raise AssertionError(f"the daemon did not relaunch the app within {LAUNCH_TIMEOUT} s:\n{self.app_log()}")

    def kill_at(self, path: str, nbytes: int) -> None:
        """SIGKILL the *next* launch when *path* has served *nbytes* in total (if it runs then).

        The server's handler stops at the boundary and, after the kill, stays stopped (until the
        server stops): a write into the dead connection would count bytes no client received.
        With the daemon host the connection belongs to the daemon, which goes on: the hold is released.
        """
        token = len(self.launches)
        hold = self.server.hold_at(path, nbytes)

        def kill() -> None:
            while not hold.wait(POLL):
                if self._closed.is_set():
                    return
            with self._lock:
                launch = self.launches[token] if len(self.launches) == token + 1 else None
            if launch is not None and launch.rc is None and _alive(launch):
                launch.killed_at = (path, hold.served or nbytes)
                self._kill_now(launch)
                if self.host == "daemon":
                    hold.release()  # the daemon, not the dead app, is downloading: let it go on
            else:
                hold.release()  # armed for a launch that has ended, or (daemon host) none runs now

        threading.Thread(target=kill, daemon=True, name=f"kill-at-{nbytes}").start()

    def _kill_now(self, launch: Launch) -> None:
        try:
            os.kill(launch.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if launch.proc is not None:
            launch.proc.wait()
        else:
            launch.rc = SIGKILLED  # the daemon reaps it

    def wait(self, launch: Launch) -> int:
        if launch.proc is not None:
            launch.rc = launch.proc.wait(LAUNCH_TIMEOUT)
        else:
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while launch.rc is None:
                codes = [r["code"] for r in self.ledger.read() if r["event"] == "exit_code" and r["pid"] == launch.pid]
                if codes:
                    launch.rc = codes[0]
                elif not _alive(launch):
                    launch.rc = SIGKILLED if launch.killed_at else -1
                elif time.monotonic() > deadline:
                    raise AssertionError(f"app pid {launch.pid} still running after {LAUNCH_TIMEOUT} s")
                else:
                    time.sleep(POLL)
        if launch.rc == SIGKILLED:
            self._note_acks(launch)
        return launch.rc

    def kill(self, launch: Launch) -> None:
        if launch.rc is None:
            self._kill_now(launch)
        self.wait(launch)

    def _note_acks(self, launch: Launch) -> None:
        """Read the journal as the killed process left it: which hook returns had reached it."""
        state = bgsession.Journal(self.session_directory).state()
        launch.acked = {(t.description, event) for t in state.tasks.values() for event in t.acked}

    def close(self) -> None:
        """Kill and reap every launch still running (and stop the daemon)."""
        self._closed.set()
        for launch in self.launches:
            if launch.proc is not None:
                if launch.proc.poll() is None:
                    launch.proc.kill()
                launch.proc.wait()
            elif launch.rc is None and _alive(launch):
                os.kill(launch.pid, signal.SIGKILL)
        if self.host == "daemon":
            stop_daemon(self.session_directory)

    def served_end(self, f: File) -> int:
        """How far into the entity the server has sent bytes (a client has at most this much of it)."""
        end = 0
        for r in self.server.requests(f.path):
            if r.status in (200, 206):
                start = int(r.range_header.split("=")[1].split("-")[0]) if r.status == 206 and r.range_header else 0
                end = max(end, start + r.bytes_sent)
        return end

    def app_log(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]


def _alive(launch: Launch) -> bool:
    if launch.proc is not None:
        return launch.proc.poll() is None
    try:
        with open(f"/proc/{launch.pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited
    except OSError:
        return False


def _basic_auth() -> Any:
    return fake_server.BasicAuth(USER, PASSWORD, realm="photos")


def _throttled(rate: int | None) -> Any:
    return fake_server.Fault(throttle=rate) if rate else None


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
        if rc == 0 and _all_completed(driver):
            return armed
    raise AssertionError(f"downloads not completed after {MAX_LAUNCHES} launches:\n{driver.app_log()}")


def _all_completed(driver: Driver) -> bool:
    done = {r["desc"] for r in driver.ledger.read() if r["event"] == "complete" and r["phase"] == "returned"}
    return all(f.desc in done for f in driver.files)


def _check(driver: Driver) -> None:
    """Every assertion of the exactly-once and nothing-lost contract, from the ledger and the files."""
    ledger = driver.ledger.read()
    launches = {launch.pid: launch for launch in driver.launches}
    assert all(launch.rc in (0, SIGKILLED) for launch in launches.values())

    def acknowledged(index: int, entry: Mapping[str, Any]) -> bool:
        """Known to be acknowledged: a clean exit, a later hook in that process, or the journal at the kill."""
        launch = launches[entry["pid"]]
        if launch.rc == 0 or (entry["desc"], entry["event"]) in launch.acked:
            return True
        return any(later["pid"] == entry["pid"] and later["event"] in ("finish", "complete", "events")
                   for later in ledger[index + 1:])

    for f in driver.files:
        for event in ("finish", "complete"):
            entries = [(i, e) for i, e in enumerate(ledger) if e["event"] == event and e.get("desc") == f.desc]
            returns = [i for i, e in entries if e["phase"] == "returned"]
            assert returns, f"{f.desc}: the {event} hook never returned: {entries}"
            acked = [i for i in returns if acknowledged(i, ledger[i])]
            if acked:
                assert [i for i, _ in entries if i > acked[0]] == [], \
                    f"{f.desc}: {event} hook called again after it returned and was acknowledged: {entries}"
            if event == "complete":
                assert acked and acked[-1] == returns[-1], f"{f.desc}: last complete never acknowledged: {entries}"
            first = returns[0] if not acked else acked[0]
            started = [e for i, e in entries if e["phase"] == "started"]
            for i, e in entries:  # a hook that started but did not return: its process was killed
                if e["phase"] == "started" and not any(j > i and x["phase"] == "returned" and x["pid"] == e["pid"]
                                                       for j, x in entries):
                    assert launches[e["pid"]].rc == SIGKILLED
            last = started[-1]
            if event == "finish":
                if f.size is None:
                    assert last["status"] == 404 and ledger[first]["dest"] is None
                else:
                    assert last["status"] == 200 and last["sha256"] == f.sha256, f"{f.desc}: hook saw wrong bytes"
            else:
                assert last["error"] is None, f"{f.desc}: {last}"

    for i, e in enumerate(ledger):  # DESIGN 4.1: a task accepted by resume() is never lost
        if e["event"] == "recreated":
            assert not any(r["event"] == "resumed" and r["desc"] == e["desc"] for r in ledger[:i]), \
                f"{e['desc']}: accepted by resume(), then missing from the session after a kill"

    documents = os.path.join(driver.state, "Documents")
    saved = sorted(os.listdir(documents)) if os.path.isdir(documents) else []
    assert saved == sorted(f.name for f in driver.files if f.size is not None), "the 404 must never be saved"
    for f in driver.files:
        if f.size is not None:
            assert file_sha(os.path.join(documents, f.name)) == f.sha256, f"{f.name}: bytes differ"

    for pid, launch in launches.items():
        calls = sum(1 for e in ledger if e["event"] == "handler_called" and e["pid"] == pid)
        if not launch.background:
            assert calls == 0
        elif launch.rc == 0:
            assert calls == 1, f"background launch {pid}: completion handler called {calls} times"
        else:
            assert calls <= 1
    assert bgsession.Journal(os.path.join(driver.state, "session")).check() == []


def _mixed_files(rng: random.Random, *, big: int) -> list[File]:
    """Mixed sizes (tiny to *big*), one 404, one behind Basic auth."""
    return [
        File("tiny.bin", 1, seed=1),
        File("small.bin", rng.randint(1000, 9000), seed=2),
        File("medium.bin", rng.randint(200_000, 400_000), seed=3, throttle=THROTTLE),
        File("large.bin", big + rng.randint(0, 4096), seed=4, throttle=THROTTLE // 2),
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
    driver = Driver(str(tmp_path), server, files, host)
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
    driver = Driver(str(tmp_path), server, files, host)
    try:
        first = driver.launch(background=False, block=f"{event}:file:a.bin")
        first.expect(f"blocked in {event} file:a.bin")
        driver.kill(first)
        assert first.rc == SIGKILLED
        started = [e for e in driver.ledger.read() if e["event"] == event and e["desc"] == "file:a.bin"]
        assert [e["phase"] for e in started] == ["started"]
        second = driver.relaunch()
        assert driver.wait(second) == 0, driver.app_log()
        entries = [e for e in driver.ledger.read() if e.get("desc") == "file:a.bin" and "phase" in e]
        phases = [(e["event"], e["phase"], e["pid"] == second.pid) for e in entries]
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
    assert "All checks passed." in out and "exit status -9" in out and out.count("SHA-256 ok") == 4, out


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
                      throttle=rng.choice([None, THROTTLE // 2, THROTTLE * 2]) if size > 50_000 else None)
                 for i, size in enumerate(sizes)]
        files += [File("private.bin", rng.randint(1000, 300_000), seed=batch * 100 + 50, auth=True),
                  File("missing.bin", None)]
        rng.shuffle(files)
        with fake_server.FakeServer() as server:
            driver = Driver(str(tmp_path / f"batch{batch}"), server, files, host)
            try:
                armed = _kill_loop(driver, rng, kills=rng.randint(3, 10))
                if host == "inprocess":
                    assert all(launch.rc == SIGKILLED for launch in armed), "an armed kill did not land"
                _check(driver)
            except AssertionError as err:
                raise AssertionError(f"soak seed {seed}, batch {batch}: {err}") from err
            finally:
                driver.close()


if __name__ == "__main__" and sys.argv[1:2] == ["app"]:
    sys.exit(_app_main())
