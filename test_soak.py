"""The soak: random SIGKILLs of the app and of the daemon over a batch of files with random faults.

One ``FakeServer`` serves a batch of files — mostly 1-64 KiB, some 256 KiB-4 MiB, a few 404s, one
or two behind Basic auth — and every request may draw a fault from its file's list: a cut, a reset,
a short body, 500/503/429 with or without ``Retry-After``, a stall shorter than
``timeout_for_request``, throttling, an ignored ``Range``, an early 206, a wrong total, a chunked
body. The chaos loop also changes entities under running downloads, arms new faults, and takes the
server down for a moment. Meanwhile it SIGKILLs the app and the daemon at random intervals, starts
the app again, or leaves it to the daemon to relaunch it (a "background" stretch). When the time is
up the chaos stops, an app stays attached until ``session.wait()`` returns, and the whole contract
is checked: every file byte-exact (SHA-256 against the entity the server last served for it — a
changed entity must arrive in its new version), the 404s delivered as 404 and never saved, every
finish and complete hook returned and acknowledged exactly once, no task lost or duplicated,
``Journal.check()`` clean, ``tmp/`` empty, the daemon gone after its idle timeout, and in this
process no leaked threads or file descriptors.

This file is also the app (``python test_soak.py app --state DIR``). It uses ``appdelegate.main``
rather than a plain script because the daemon relaunches it as a *background launch*: the soak then
also covers the launch rules (delivery held until ``handle_events…`` saved the completion handler,
``did_finish_events…`` calling it, the process exiting after it). Every hook appends to an fsynced
ledger — ``started`` on entry, ``returned`` just before it returns — so a kill inside a hook shows,
and a redelivery can be told from a second call (the reasoning is in ``_check``).

Runs: ``pytest test_soak.py`` is the 2-minute variant (CI); ``pytest -m soak test_soak.py`` the
30-minute one. ``BGSESSION_SOAK_SECONDS`` and ``BGSESSION_SOAK_SEED`` override the duration and the
seed (printed, so a failure can be replayed). A passing run writes its counts to
``bench/results/soak_30min.json`` (the README quotes it; committed) or ``soak_2min.json`` (git-ignored,
so the everyday test run leaves the tree clean).
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

import appdelegate
import bgsession
import fake_server
from testkit import HERE, SHORT, Ledger, MiB, file_sha, sha, wait_until

KiB = 1 << 10
THIS_FILE = os.path.abspath(__file__)
IDENTIFIER = "com.example.soak"
USER, PASSWORD = "soak", "s3cret"

#: Duration of the default variant (CI runs it; the whole test stays under 150 s of wall time).
SHORT_SECONDS = 120
#: Duration of the ``soak``-marked variant.
LONG_SECONDS = 1800
SECONDS_ENV = "BGSESSION_SOAK_SECONDS"
SEED_ENV = "BGSESSION_SOAK_SEED"

#: Connections the daemon opens to the one server (bgsession's default).
CONNECTIONS = 6
#: The session's timeout_for_request; every stall and delay fault is well below it.
REQUEST_TIMEOUT = 10.0
#: Longest stall or pre-response delay a fault asks for.
STALL_MAX = 3.0
#: The daemon's idle timeout: it must be gone this long after the last app left with nothing to do.
IDLE_TIMEOUT = 1.0
#: First relaunch backoff of the daemon (doubles per relaunched app that acknowledged nothing).
RELAUNCH_BACKOFF = 0.1
#: Retries: generous (a file can meet several faults in a row), short backoffs.
RETRY = dict(total=25, backoff_factor=0.05, backoff_max=1.0)
#: The workload, if never disturbed, would take this many times the chaos phase: the transfers stay
#: busy until the chaos stops, and the drain finishes the rest at full speed. Each file is paced to
#: about the same transfer time (its share of that), so files complete -- and their events are
#: delivered, with kills landing in hooks -- all through the chaos, not only when the big ones end.
WORKLOAD_STRETCH = 1.15
#: Slowest pacing of a file (bytes/s).
MIN_PACING = 1 * KiB
#: Random pause between two chaos actions (seconds).
TICK = (0.1, 2.0)
#: A foreground stretch (an app we launched is usually attached) lasts this long.
FOREGROUND = (5.0, 20.0)
#: A background stretch (no app but what the daemon relaunches) lasts this long: longer than
#: bgsession.RELAUNCH_BATCH_WINDOW, so the daemon relaunches the app while transfers still run.
BACKGROUND = (bgsession.RELAUNCH_BATCH_WINDOW + 5.0, bgsession.RELAUNCH_BATCH_WINDOW + 20.0)
#: Exit code of an app that found another app attached (one session per identifier): it quits.
EXIT_IN_USE = 75
#: Polling interval for processes this test cannot wait on (the daemon and its children).
POLL = 0.05
#: Longest time an app's finish/complete hook works (uniform 0..this): wide enough for kills to land inside.
HOOK_DELAY = 0.15
#: Launches in the drain after which a batch that is still not delivered fails.
MAX_DRAIN_LAUNCHES = 8
SIGKILLED = -signal.SIGKILL
#: Ledger events written by the delegate thread (serially, each after the previous event's ack).
DELEGATE_EVENTS = frozenset({"finish", "complete", "events", "challenge"})
#: Where a passing run writes its counts ({variant}: 2min or 30min).
RESULTS = os.path.join(HERE, "bench", "results", "soak_{variant}.json")


# ============================================================================
# The app (child process)
# ============================================================================


def _launch_key(pid: int) -> str:
    """Names one process for good: pid and start time (pids are recycled, pid_max may be 32768)."""
    return f"{pid}-{bgsession._process_start_token(pid)}"


class LedgerReader:
    """Reads a ledger incrementally (complete lines only: a killed writer may leave half a line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0

    def refresh(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.records
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self.records.append(json.loads(line))
        self._offset += end
        return self.records


class SoakManager(bgsession.SessionManager):
    """The app's background session manager; session-level blocks set in ``__init__``, as in the seed.

    Besides the ledger it checks, in this process, what only this process can see: hooks never run
    concurrently, and no progress is reported for a task after its finish hook returned.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(bgsession.Configuration.background(
            cfg["identifier"], directory=cfg["directory"], host="daemon", relaunch_command=cfg["argv"],
            timeout_for_request=cfg["timeout_for_request"], retry=bgsession.Retry(**cfg["retry"]),
            daemon_idle_timeout=cfg["daemon_idle_timeout"], relaunch_backoff=cfg["relaunch_backoff"]))
        self.cfg = cfg
        self.ledger = Ledger(cfg["ledger"], proc=_launch_key(os.getpid()))
        self.names = {item["desc"]: item["name"] for item in cfg["manifest"]}
        self.rng = random.Random()
        self.saved_completion_handler: appdelegate.CompletionHandler | None = None
        self._in_hook = threading.Lock()
        self._finished: set[int] = set()
        self.set_download_task_did_finish_downloading(self._finish)
        self.set_task_did_complete(self._complete)
        self.set_download_task_did_write_data(self._progress)
        self.set_did_finish_events_for_background_session(self._events)
        self.set_task_did_receive_authentication_challenge(self._challenge)

    def _enter(self, hook: str) -> None:
        if not self._in_hook.acquire(blocking=False):
            self.ledger.append(event="violation", what=f"{hook} ran while another hook was running")
            self._in_hook.acquire()

    def _dawdle(self) -> None:
        """An app's hook takes a little time (and a kill may land inside it)."""
        time.sleep(self.rng.uniform(0.0, self.cfg["hook_delay"]))

    def _finish(self, session: bgsession.Session, task: bgsession.DownloadTask, location: str) -> str | None:
        self._enter("finish")
        try:
            status = task.response.status if task.response is not None else None
            exists = os.path.exists(location)
            self.ledger.append(event="finish", phase="started", desc=task.description, id=task.identifier,
                               status=status, exists=exists, sha256=file_sha(location) if exists else None)
            self._dawdle()
            dest = None
            if status == 200:  # the seed's check: an error page is no file
                dest = os.path.join(self.cfg["documents"], self.names[task.description])
            self._finished.add(task.identifier)
            self.ledger.append(event="finish", phase="returned", desc=task.description, id=task.identifier,
                               dest=dest)
            return dest  # the manager moves the file there, then the event is acknowledged
        finally:
            self._in_hook.release()

    def _complete(self, session: bgsession.Session, task: bgsession.Task,
                  error: bgsession.TransferError | None) -> None:
        self._enter("complete")
        try:
            status = task.response.status if task.response is not None else None
            self.ledger.append(event="complete", phase="started", desc=task.description, id=task.identifier,
                               status=status, error=None if error is None else f"{error.code.name}: {error}")
            self._dawdle()
            self.ledger.append(event="complete", phase="returned", desc=task.description, id=task.identifier)
        finally:
            self._in_hook.release()

    def _progress(self, session: bgsession.Session, task: bgsession.DownloadTask, written: int, total: int,
                  expected: int) -> None:
        self._enter("progress")
        try:
            if task.identifier in self._finished:
                self.ledger.append(event="violation", what=f"progress for task {task.identifier} "
                                                           f"({task.description}) after its finish hook returned")
        finally:
            self._in_hook.release()

    def _events(self, session: bgsession.Session) -> None:
        self._enter("events")
        try:
            self.ledger.append(event="events")
            handler, self.saved_completion_handler = self.saved_completion_handler, None
            if handler is not None:
                self.ledger.append(event="handler_called")
                handler()
        finally:
            self._in_hook.release()

    def _challenge(self, session: bgsession.Session, task: bgsession.Task, challenge: bgsession.AuthChallenge
                   ) -> tuple[bgsession.AuthChallengeDisposition, bgsession.Credential | None]:
        self._enter("challenge")
        try:
            self.ledger.append(event="challenge", desc=task.description, id=task.identifier,
                               failures=challenge.previous_failure_count)
            if challenge.previous_failure_count == 0:
                return bgsession.AuthChallengeDisposition.USE_CREDENTIAL, bgsession.Credential(
                    USER, PASSWORD, bgsession.CredentialPersistence.FOR_SESSION)
            return bgsession.AuthChallengeDisposition.CANCEL_AUTHENTICATION_CHALLENGE, None
        finally:
            self._in_hook.release()


class SoakApp(appdelegate.AppDelegate):
    """Enqueues the batch on its first run; every launch re-creates the manager, re-attaches and delivers."""

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        args = _app_parser().parse_args(app.argv[2:])
        with open(os.path.join(args.state, "config.json"), "rb") as f:
            cfg = json.load(f)
        ledger = Ledger(cfg["ledger"], proc=_launch_key(os.getpid()))
        ledger.append(event="launch", background=app.is_background_launch, pid=os.getpid(),
                      token=bgsession._process_start_token(os.getpid()))
        try:
            self.manager = SoakManager(cfg)
        except bgsession.TransferError as err:
            if err.code is not bgsession.ErrorCode.BACKGROUND_SESSION_IN_USE:
                raise
            # another launch holds the session: this one quits, as a second instance would
            ledger.append(event="in_use", message=str(err))
            ledger.append(event="exit_code", code=EXIT_IN_USE)
            os._exit(EXIT_IN_USE)
        self._enqueue(self.manager, cfg)

    @staticmethod
    def _enqueue(manager: SoakManager, cfg: Mapping[str, Any]) -> None:
        ledger, session = manager.ledger, manager.session
        for attempt in range(20):
            # get_tasks first, then the ledger: a task acknowledged in between has its "returned" line already
            live: dict[str, bgsession.Task] = {t.description or "": t for t in session.get_tasks()}
            records = ledger.read()
            submitted = any(r["event"] == "submitted" for r in records)
            done = {r["desc"] for r in records if r["event"] == "complete" and r["phase"] == "returned"}
            try:
                for item in cfg["manifest"]:
                    desc = item["desc"]
                    if desc in live or desc in done:
                        continue
                    if submitted:  # after the first run every task lives in the session until delivered
                        ledger.append(event="recreated", desc=desc)
                    created = session.download_task(item["url"], description=desc)
                    ledger.append(event="created", desc=desc, id=created.identifier)
                    live[desc] = created
            except bgsession.TransferError as err:
                # the daemon died under a create (which is not retried: it may have happened):
                # list the tasks again once reconnected and create only what is missing
                if err.code is not bgsession.ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED:
                    raise
                ledger.append(event="create_interrupted", attempt=attempt)
                continue
            if not submitted:
                ledger.append(event="submitted")
            for task in live.values():
                if task.state is bgsession.TaskState.SUSPENDED:
                    task.resume()
                    ledger.append(event="resumed", desc=task.description, id=task.identifier)
            return
        raise RuntimeError("could not enqueue the batch: the daemon kept going away")

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.manager.saved_completion_handler = completion_handler
        self.manager.ledger.append(event="handler_saved", identifier=identifier)

    def run(self, app: appdelegate.Application) -> None:
        self.manager.session.wait()

    def will_terminate(self, app: appdelegate.Application) -> None:
        self.manager.session.close()


def _app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test_soak.py app")
    parser.add_argument("--state", required=True)
    return parser


def _app_argv(state: str) -> list[str]:
    """The app's command line (also the daemon's relaunch_command)."""
    return [sys.executable, "-W", "error", THIS_FILE, "app", "--state", state]


def _app_main() -> int:
    args, _ = _app_parser().parse_known_args(sys.argv[2:])
    with open(os.path.join(args.state, "config.json"), "rb") as f:
        cfg = json.load(f)
    log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)  # a relaunch by the daemon would write into daemon.log otherwise
    os.dup2(log_fd, 2)
    os.close(log_fd)
    code = appdelegate.main(SoakApp)
    Ledger(cfg["ledger"], proc=_launch_key(os.getpid())).append(event="exit_code", code=code)
    return code


# ============================================================================
# The parent: the batch, the server, the chaos
# ============================================================================


@dataclasses.dataclass
class File:
    name: str
    size: int | None  # None: the server answers 404
    seed: int = 0
    auth: bool = False
    pacing: int | None = None  # bytes/s per response when no fault says otherwise

    @property
    def desc(self) -> str:
        return f"file:{self.name}"

    @property
    def path(self) -> str:
        return f"/files/{self.name}"


class TrackedRoute(fake_server.Route):
    """A blob route that remembers the entity version each request was answered from, and counts the
    requests that got one of its queued faults (the per-file pacing is no fault)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[tuple[fake_server.RequestRecord, Any]] = []
        self.injected = 0

    def serve(self, handler: Any, record: fake_server.RequestRecord, query_fault: fake_server.Fault | None
              ) -> None:
        fault = self.next_fault()
        entity = self._entity  # one version for the whole response, as Route.serve does
        with self._lock:
            self.served.append((record, entity))
            if fault is not None and fault is not self.default_fault:
                self.injected += 1
        handler.serve_entity(record, entity, fault if fault is not None else query_fault, self.auth)

    def final_entity(self) -> Any | None:
        """The entity of the last GET answered 200, 206 or 416: what a correct client ends up with."""
        with self._lock:
            served = list(self.served)
        for record, entity in reversed(served):
            if record.method == "GET" and record.status in (200, 206, 416):
                return entity
        return None


def _make_batch(rng: random.Random, seconds: float) -> list[File]:
    """A few hundred files (about 150 for two minutes): mostly small, some large, a few 404s, auth."""
    count = min(500, 150 + int(max(0.0, seconds - SHORT_SECONDS) / 7))
    big = max(8, count * 15 // 100)
    missing = max(2, count // 50)
    private = 1 if seconds <= SHORT_SECONDS * 2 else 2
    small = count - big - missing - private
    files = [File("empty.bin", 0, seed=1), File("one.bin", 1, seed=2)]
    files += [File(f"s{i:03d}.bin", rng.randint(1 * KiB, 64 * KiB), seed=100 + i) for i in range(small - 2)]
    files += [File(f"b{i:03d}.bin", rng.randint(256 * KiB, 4 * MiB), seed=1000 + i) for i in range(big)]
    files += [File(f"p{i}.bin", rng.randint(1 * KiB, 1 * MiB), seed=2000 + i, auth=True) for i in range(private)]
    files += [File(f"missing{i}.bin", None) for i in range(missing)]
    rng.shuffle(files)
    return files


def _random_fault(rng: random.Random, size: int, pacing: int | None) -> fake_server.Fault:
    """One misbehaviour for one response (kept at the file's pacing, unless it is a throttle)."""
    span = max(1, size)
    kind = rng.choice(["cut", "cut", "reset", "short", "500", "503", "429", "stall", "throttle", "ignore_range",
                       "early_206", "wrong_total", "chunked", "chunked_cut", "delay", "drop_validators",
                       "malformed_range"])
    if kind == "cut":
        fault = fake_server.Fault(cut_after=rng.randrange(span), reset=rng.random() < 0.3)
    elif kind == "reset":
        fault = fake_server.Fault(reset=True)
    elif kind == "short":
        fault = fake_server.Fault(short_body=rng.randint(1, span))
    elif kind in ("500", "503", "429"):
        retry_after = rng.choice([None, "0", "1", email.utils.formatdate(time.time() + 1, usegmt=True)])
        fault = fake_server.Fault(status=int(kind), retry_after=retry_after)
    elif kind == "stall":
        fault = fake_server.Fault(stall_after=rng.randrange(span), stall_seconds=rng.uniform(0.1, STALL_MAX))
    elif kind == "throttle":
        base = pacing or 64 * KiB
        return fake_server.Fault(throttle=rng.randint(base // 2, base * 4))
    elif kind == "ignore_range":
        fault = fake_server.Fault(ignore_range=True)
    elif kind == "early_206":
        fault = fake_server.Fault(early_206=rng.randint(1, 64 * KiB))
    elif kind == "wrong_total":
        fault = fake_server.Fault(wrong_total=True)
    elif kind == "chunked":
        fault = fake_server.Fault(chunked=True)
    elif kind == "chunked_cut":
        fault = fake_server.Fault(chunked=True, cut_after=rng.randrange(span))
    elif kind == "delay":
        fault = fake_server.Fault(delay=rng.uniform(0.1, STALL_MAX))
    elif kind == "drop_validators":
        fault = fake_server.Fault(drop_validators=True)
    else:
        fault = fake_server.Fault(malformed_range=True)
    return dataclasses.replace(fault, throttle=pacing) if pacing else fault


def _random_faults(rng: random.Random, f: File, most: int = 3) -> list[fake_server.Fault | None]:
    assert f.size is not None
    return [_random_fault(rng, f.size, f.pacing) if rng.random() < 0.85 else None
            for _ in range(rng.randint(0, most))]


@dataclasses.dataclass
class Proc:
    """One app process: launched here (``proc``) or by the daemon (seen in the ledger or as its child)."""

    pid: int
    token: str | None
    background: bool
    key: str = ""
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]
    killed: bool = False
    rc: int | None = None

    def __post_init__(self) -> None:
        self.key = f"{self.pid}-{self.token}"

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return bgsession._pid_alive(self.pid, self.token)


def _sigkill(pid: int, token: str | None) -> bool:
    """SIGKILL *pid* if it is still the process that started at *token*; True if it was alive.

    A pidfd pins the process, so the check and the kill cannot hit a recycled pid.
    """
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        pidfd = None  # no pidfd support: the token check narrows the window
    try:
        if not bgsession._pid_alive(pid, token):
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _children_of(ppid: int) -> list[int]:
    """Pids whose parent is *ppid* (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == ppid:
            found.append(int(name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class Soak:
    """Plays the user and the system: launches the app, kills it and the daemon, misbehaves as a server."""

    def __init__(self, root: str, server: fake_server.FakeServer, files: Sequence[File], rng: random.Random,
                 hook_delay: float) -> None:
        self.server, self.files, self.rng = server, list(files), rng
        self.state = os.path.join(root, "app")
        self.session_dir = os.path.join(self.state, "session")
        self.documents = os.path.join(self.state, "Documents")
        self.log = os.path.join(root, "app.log")
        os.makedirs(self.documents, mode=0o700)
        self.routes: dict[str, TrackedRoute] = {}
        for f in self.files:
            if f.size is None:
                server.add_status(f.path, 404, b"no such file\n")
                continue
            default = fake_server.Fault(throttle=f.pacing) if f.pacing else None
            route = TrackedRoute(f.path, fake_server.blob_bytes(f.size, f.seed), faults=_random_faults(rng, f),
                                 default_fault=default,
                                 auth=fake_server.BasicAuth(USER, PASSWORD, realm="soak") if f.auth else None)
            server.add_route(route)
            self.routes[f.path] = route
        self.cfg = {
            "identifier": IDENTIFIER, "directory": self.session_dir, "documents": self.documents,
            "ledger": os.path.join(self.state, "ledger.jsonl"), "log": self.log, "argv": _app_argv(self.state),
            "timeout_for_request": REQUEST_TIMEOUT, "retry": RETRY, "daemon_idle_timeout": IDLE_TIMEOUT,
            "relaunch_backoff": RELAUNCH_BACKOFF, "hook_delay": hook_delay,
            "manifest": [{"desc": f.desc, "name": f.name, "url": server.url(f.path)} for f in self.files],
        }
        with open(os.path.join(self.state, "config.json"), "w", encoding="utf-8") as out:
            json.dump(self.cfg, out)
        self.ledger = LedgerReader(os.path.join(self.state, "ledger.jsonl"))
        self._seen = 0
        self.procs: dict[str, Proc] = {}  # by launch key
        self.counts = {"app_kills": 0, "daemon_kills": 0, "entity_changes": 0, "faults_armed": 0, "outages": 0,
                       "launches_by_test": 0}

    # -- processes -----------------------------------------------------------------------------
    def start_app(self) -> Proc:
        env = dict(os.environ)
        env.pop(bgsession.BACKGROUND_EVENTS_ENV, None)
        env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(_app_argv(self.state), env=env, cwd=self.state, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)
        p = Proc(proc.pid, bgsession._process_start_token(proc.pid), background=False, proc=proc)
        self.procs[p.key] = p
        self.counts["launches_by_test"] += 1
        return p

    def discover(self) -> list[dict[str, Any]]:
        """Learn of launches by the daemon (its children now, the ledger for the rest)."""
        records = self.ledger.refresh()
        for r in records[self._seen:]:
            if r["event"] == "launch" and r["proc"] not in self.procs:
                p = Proc(r["pid"], r.get("token"), background=bool(r["background"]))
                self.procs[p.key] = p
        self._seen = len(records)
        pid, token = bgsession._read_pid_file(self.session_dir)
        if pid is not None and bgsession._pid_alive(pid, token):
            for child in _children_of(pid):
                p = Proc(child, bgsession._process_start_token(child), background=True)
                argv = _cmdline(child)
                if p.key not in self.procs and THIS_FILE in argv and self.state in argv:
                    self.procs[p.key] = p
        return records

    def running_apps(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.rc is None and not p.killed and p.alive()]

    def kill_apps(self) -> int:
        killed = 0
        for p in self.running_apps():
            if p.proc is not None:
                p.proc.kill()
                p.proc.wait()
                hit = p.proc.returncode == SIGKILLED
            else:
                hit = _sigkill(p.pid, p.token)
            if hit:
                p.killed = True
                killed += 1
        self.counts["app_kills"] += killed
        return killed

    def daemon(self) -> tuple[int | None, str | None]:
        pid, token = bgsession._read_pid_file(self.session_dir)
        if pid is None or not bgsession._pid_alive(pid, token):
            return None, None
        return pid, token

    def kill_daemon(self) -> bool:
        pid, token = self.daemon()
        if pid is None or not _sigkill(pid, token):
            return False
        self.counts["daemon_kills"] += 1
        return True

    def reap(self) -> None:
        """Collect the exit codes of every app launch that ended."""
        records = self.discover()
        codes = {r["proc"]: r["code"] for r in records if r["event"] == "exit_code"}
        for p in self.procs.values():
            if p.rc is not None:
                continue
            if p.proc is not None:
                p.rc = p.proc.poll()
            elif p.key in codes:
                p.rc = codes[p.key]
            elif not p.alive():
                p.rc = SIGKILLED if p.killed else None

    def close(self) -> None:
        """Kill and reap every app launch still running, and stop the daemon."""
        for p in self.procs.values():
            if p.proc is not None:
                if p.proc.poll() is None:
                    p.proc.kill()
                p.proc.wait()
            elif p.alive():
                _sigkill(p.pid, p.token)
        pid, token = self.daemon()
        if pid is not None:
            _sigkill(pid, token)

    # -- server-side chaos ---------------------------------------------------------------------
    def delivered(self) -> set[str]:
        return {r["desc"] for r in self.ledger.records if r["event"] == "complete" and r["phase"] == "returned"}

    def _pending_blob(self) -> File | None:
        done = self.delivered()
        pending = [f for f in self.files if f.size is not None and f.desc not in done]
        return self.rng.choice(pending) if pending else None

    def change_entity(self) -> None:
        f = self._pending_blob()
        if f is None:
            return
        assert f.size is not None
        size = self.rng.randint(max(0, f.size // 2), max(1, f.size * 3 // 2))
        self.routes[f.path].update(fake_server.blob_bytes(size, self.rng.randrange(1 << 30)))
        self.counts["entity_changes"] += 1

    def arm_faults(self) -> None:
        f = self._pending_blob()
        if f is None:
            return
        route = self.routes[f.path]
        route.set_faults(_random_faults(self.rng, dataclasses.replace(f, size=len(route.data))),
                         route.default_fault)
        self.counts["faults_armed"] += 1

    def outage(self) -> None:
        """The server goes away for a moment (open connections cut) and comes back on the same port."""
        self.server.stop()
        self.server.start()
        self.counts["outages"] += 1

    def calm(self) -> None:
        """The chaos is over: no more faults or pacing; cut the slow responses still running."""
        for route in self.routes.values():
            route.set_faults([], None)
        self.outage()

    # -- the chaos loop and the drain ------------------------------------------------------------
    def chaos(self, until: float, progress: Any) -> None:
        rng = self.rng
        began = time.monotonic()
        mode, mode_until, had_background = "fg", time.monotonic() + rng.uniform(*FOREGROUND), False
        self.start_app()
        next_report = time.monotonic() + 30.0
        while time.monotonic() < until:
            time.sleep(rng.uniform(*TICK))  # the chaos interval: workload, not synchronisation
            now = time.monotonic()
            self.reap()
            if now >= mode_until:
                if mode == "fg" and until - now > BACKGROUND[0] + 5.0 and self.daemon()[0] is not None and (
                        not had_background or rng.random() < 0.5):
                    mode, had_background = "bg", True
                    mode_until = now + min(rng.uniform(*BACKGROUND), until - now)
                    self.kill_apps()  # the user leaves the app; from now on only the daemon launches it
                else:
                    mode, mode_until = "fg", now + rng.uniform(*FOREGROUND)
            roll = rng.random()
            if mode == "fg":
                if roll < 0.30:
                    self.kill_apps()
                elif roll < 0.50:
                    self.kill_daemon()
                elif roll < 0.60:
                    self.kill_daemon()
                    self.kill_apps()
                elif roll < 0.70:
                    self.change_entity()
                elif roll < 0.85:
                    self.arm_faults()
                elif roll < 0.88:
                    self.outage()
                self.reap()
                if not self.running_apps() and rng.random() < 0.7:
                    self.start_app()
            else:
                if roll < 0.35:
                    self.kill_apps()  # only what the daemon relaunched runs now
                elif roll < 0.50:
                    self.change_entity()
                elif roll < 0.70:
                    self.arm_faults()
                elif roll < 0.73:
                    self.outage()
                elif roll < 0.74 and self.kill_daemon():  # rare: it ends the stretch (only an app restarts it)
                    self.kill_apps()
                    mode, mode_until = "fg", now + rng.uniform(*FOREGROUND)  # only an app brings it back
                    self.start_app()
            if now >= next_report:
                next_report = now + 30.0
                progress(f"  {now - began:.0f} s: {len(self.delivered())}/{len(self.files)} delivered, "
                         f"{self.counts}")

    def drain(self, deadline: float) -> None:
        """Stop the chaos and let everything finish: an app stays attached until session.wait() returns.

        Done when a launch made after the chaos exited normally with every file delivered (a
        "returned" line of a process killed before its ack is not enough: that event comes again),
        and no other launch still runs.
        """
        self.calm()
        everything = {f.desc for f in self.files}
        launches, final = 0, None
        while True:
            self.reap()
            running = self.running_apps()
            if final is not None and final.rc is not None:
                if final.rc == 0 and self.delivered() >= everything and not running:
                    return
                if final.rc not in (0, EXIT_IN_USE):
                    raise AssertionError(f"an app launched in the drain exited with {final.rc}")
                final = None
            if final is None and not running:
                if launches >= MAX_DRAIN_LAUNCHES:
                    raise AssertionError(f"{launches} launches after the chaos did not finish: {self._pending()}")
                final = self.start_app()
                launches += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"the drain timed out: {self._pending()}")
            time.sleep(POLL)  # polling processes this test may not wait on (the daemon's children)

    def _pending(self) -> str:
        """What keeps the batch from being done (for a failure message)."""
        tasks = bgsession.Journal(self.session_dir).tasks()
        phases: dict[str, int] = {}
        for t in tasks:
            phases[t["phase"]] = phases.get(t["phase"], 0) + 1
        return (f"complete hook never returned for {sorted({f.desc for f in self.files} - self.delivered())[:20]}; "
                f"{len(tasks)} tasks not acknowledged in the journal {phases}, e.g. "
                f"{[(t['description'], t['acked']) for t in tasks[:5]]}; running launches: "
                f"{[p.key for p in self.running_apps()]}; launches after the chaos: "
                f"{[(p.key, p.rc) for p in list(self.procs.values())[-MAX_DRAIN_LAUNCHES:]]}")

    def wait_daemon_gone(self) -> None:
        wait_until(lambda: self.daemon()[0] is None, IDLE_TIMEOUT + SHORT,
                   what=f"the daemon to exit within {IDLE_TIMEOUT + SHORT} s after the last app")

    def tail(self, path: str, n: int = 6000) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""


# ============================================================================
# The checks
# ============================================================================


def _check(soak: Soak) -> list[str]:
    """Every assertion of the contract, from the ledger, the files, the server's log and the journal.

    Reading the ledger: hooks run serially on the delegate thread, and bgsession acknowledges an
    event (durably, in the daemon's journal) after its hook returned and before the next hook is
    called. So a ``returned`` line is *acknowledged* if its process wrote a later delegate-thread line
    or exited normally. A returned line may legitimately be followed by another call of the same hook
    only in a *later* process, and only if the first was SIGKILLed with that return as its last
    delegate line (killed between the return and the acknowledgement). Within one process a hook that
    returned is never called again for that event (the library re-sends the ack instead).
    """
    problems: list[str] = []
    soak.reap()
    ledger = soak.ledger.refresh()
    procs = soak.procs

    for p in procs.values():
        if p.rc not in (0, SIGKILLED, EXIT_IN_USE):
            problems.append(f"app {p.key} ({'background' if p.background else 'normal'} launch) ended with "
                            f"{p.rc!r}{' (no exit code: crashed?)' if p.rc is None else ''}")
    problems += [f"app {r['proc']}: {r['what']}" for r in ledger if r["event"] == "violation"]

    def rc(key: str) -> int | None:
        return procs[key].rc if key in procs else None

    def later_delegate_line(index: int, key: str) -> bool:
        return any(x["proc"] == key and x["event"] in DELEGATE_EVENTS for x in ledger[index + 1:])

    calls: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}  # (hook, desc) -> its ledger lines
    for i, e in enumerate(ledger):
        if e["event"] in ("finish", "complete"):
            calls.setdefault((e["event"], e["desc"]), []).append((i, e))
    ids: dict[str, set[int]] = {}
    expected_sha: dict[str, str] = {}
    for f in soak.files:
        ids[f.desc] = {r["id"] for r in ledger if r.get("desc") == f.desc and "id" in r}
        if len(ids[f.desc]) != 1:
            problems.append(f"{f.desc}: task ids {sorted(ids[f.desc])} (expected exactly one task)")
        if f.size is not None:
            entity = soak.routes[f.path].final_entity()
            if entity is None:
                problems.append(f"{f.desc}: the server never answered it with 200/206/416")
                continue
            expected_sha[f.desc] = sha(entity.data)
        first_complete = None
        for event in ("finish", "complete"):
            entries = calls.get((event, f.desc), [])
            returns = [(i, e) for i, e in entries if e["phase"] == "returned"]
            if not returns:
                problems.append(f"{f.desc}: the {event} hook never returned ({len(entries)} calls started)")
                continue
            for i, e in returns:
                again = [j for j, x in entries if j > i and x["proc"] == e["proc"]]
                if again:
                    problems.append(f"{f.desc}: {event} hook called again in {e['proc']} after it returned there")
            for i, e in returns[:-1]:
                if rc(e["proc"]) != SIGKILLED or later_delegate_line(i, e["proc"]):
                    problems.append(f"{f.desc}: {event} hook called again after a return that was acknowledged "
                                    f"({e['proc']}, exit {rc(e['proc'])!r})")
            starts = [(i, e) for i, e in entries if e["phase"] == "started"]
            for i, e in starts:
                returned_here = any(j > i and x["phase"] == "returned" and x["proc"] == e["proc"]
                                    for j, x in entries)
                if not returned_here and rc(e["proc"]) != SIGKILLED:
                    problems.append(f"{f.desc}: {event} hook started in {e['proc']} and never returned, "
                                    f"though that process was not killed (exit {rc(e['proc'])!r})")
            if starts and starts[-1][0] > returns[-1][0]:
                problems.append(f"{f.desc}: the last {event} call never returned")
            if event == "finish":
                for _, e in starts:
                    if f.size is None:
                        if e["status"] != 404:
                            problems.append(f"{f.desc}: finish hook saw status {e['status']}, expected 404")
                    elif not e["exists"]:
                        problems.append(f"{f.desc}: finish hook ({e['proc']}) got a location that does not exist")
                    elif e["status"] != 200 or e["sha256"] != expected_sha.get(f.desc):
                        problems.append(f"{f.desc}: finish hook ({e['proc']}) saw status {e['status']} and "
                                        f"other bytes than the server's last entity")
            else:
                first_complete = starts[0][0] if starts else None
                last = starts[-1][1] if starts else None
                if last is not None and last["error"] is not None:
                    problems.append(f"{f.desc}: completed with an error: {last['error']}")
        finish_calls = calls.get(("finish", f.desc), [])
        finish_returns = [i for i, e in finish_calls if e["phase"] == "returned"]
        if first_complete is not None:
            if not finish_returns or finish_returns[0] > first_complete:
                problems.append(f"{f.desc}: complete hook called before the finish hook returned")
            if any(i > first_complete for i, _ in finish_calls):
                problems.append(f"{f.desc}: finish hook called after the complete hook")

    all_ids = [next(iter(s)) for s in ids.values() if len(s) == 1]
    if len(set(all_ids)) != len(all_ids):
        problems.append("two files share one task id")
    for i, e in enumerate(ledger):  # a task accepted by resume() is never lost
        if e["event"] == "recreated" and any(r["event"] == "resumed" and r["desc"] == e["desc"] for r in ledger[:i]):
            problems.append(f"{e['desc']}: accepted by resume(), then missing from the session ({e['proc']})")

    saved = sorted(os.listdir(soak.documents))
    wanted = sorted(f.name for f in soak.files if f.size is not None)
    if saved != wanted:
        problems.append(f"Documents: missing {sorted(set(wanted) - set(saved))[:10]}, "
                        f"unexpected {sorted(set(saved) - set(wanted))[:10]}")
    for f in soak.files:
        path = os.path.join(soak.documents, f.name)
        if f.size is not None and os.path.exists(path) and f.desc in expected_sha \
                and file_sha(path) != expected_sha[f.desc]:
            problems.append(f"{f.name}: the saved file differs from the server's last entity")

    for key, p in procs.items():
        calls = sum(1 for e in ledger if e["event"] == "handler_called" and e["proc"] == key)
        want = (1 if p.rc == 0 else calls) if p.background else 0
        if calls != want or calls > 1:
            problems.append(f"{'background' if p.background else 'normal'} launch {key} (exit {p.rc!r}) "
                            f"called the completion handler {calls} times")

    for route in soak.routes.values():  # validated resume: a Range request carries If-Range and identity
        for record, _ in route.served:
            if record.method == "GET" and record.range_header and (
                    not record.header("if-range") or record.header("accept-encoding") != "identity"):
                problems.append(f"{route.path}: Range request without If-Range/identity: {record.headers}")
                break

    problems += [f"journal: {p}" for p in bgsession.Journal(soak.session_dir).check()]
    left = bgsession.Journal(soak.session_dir).tasks()
    if left:
        problems.append(f"journal: {len(left)} tasks not acknowledged, e.g. {left[0]['description']} "
                        f"in {left[0]['phase']}")
    tmp = os.path.join(soak.session_dir, "tmp")
    if os.path.isdir(tmp) and os.listdir(tmp):
        problems.append(f"tmp/ not empty: {sorted(os.listdir(tmp))[:10]}")
    strays = [n for n in os.listdir(soak.session_dir) if n.endswith(".tmp") or n.startswith(".")]
    if strays:
        problems.append(f"temp files left in the session directory: {strays}")
    for name in ("daemon.pid", "daemon.sock"):
        if os.path.exists(os.path.join(soak.session_dir, name)):
            problems.append(f"{name} left behind by the daemon")
    return problems


def _summary(soak: Soak, seed: int, seconds: float, wall: float) -> dict[str, Any]:
    ledger = soak.ledger.records
    sizes = [len(e.data) for e in (r.final_entity() for r in soak.routes.values()) if e is not None]
    requests = [rec for route in soak.routes.values() for rec, _ in route.served]
    redelivered = sum(max(0, sum(1 for e in ledger if e["event"] == ev and e.get("desc") == f.desc
                                 and e["phase"] == "started") - 1)
                      for f in soak.files for ev in ("finish", "complete"))
    injected = sum(r.injected for r in soak.routes.values())
    return {
        "seed": seed, "duration": seconds, "seconds": round(wall, 1),
        "kills_app": soak.counts["app_kills"], "kills_daemon": soak.counts["daemon_kills"],
        "faults_injected": injected + soak.counts["entity_changes"] + soak.counts["outages"],
        "faulty_responses": injected, "entity_changes": soak.counts["entity_changes"],
        "outages": soak.counts["outages"], "files": len(soak.files),
        "files_404": sum(1 for f in soak.files if f.size is None), "bytes": sum(sizes),
        "bytes_served": sum(soak.server.bytes_served(f.path) for f in soak.files),
        "requests": len(requests), "range_requests": sum(1 for r in requests if r.range_header),
        "launches_by_test": soak.counts["launches_by_test"],
        "launches_by_daemon": sum(1 for p in soak.procs.values() if p.background),
        "in_use_exits": sum(1 for p in soak.procs.values() if p.rc == EXIT_IN_USE),
        "hook_redeliveries": redelivered,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_results(summary: Mapping[str, Any], variant: str) -> None:
    path = RESULTS.format(variant=variant)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ============================================================================
# The test
# ============================================================================


def _duration(default: int) -> int:
    return int(os.environ.get(SECONDS_ENV, default))


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listdir's own descriptor, closed by now
    return out


@pytest.fixture
def baseline() -> Iterator[tuple[set[threading.Thread], dict[int, str]]]:
    yield set(threading.enumerate()), _fds()


@pytest.mark.parametrize("variant", [
    pytest.param(SHORT_SECONDS, id="2min", marks=pytest.mark.timeout(max(300, _duration(SHORT_SECONDS) * 2))),
    pytest.param(LONG_SECONDS, id="30min",
                 marks=[pytest.mark.soak, pytest.mark.timeout(max(300, _duration(LONG_SECONDS) * 2))]),
])
def test_soak(tmp_path: Any, variant: int, baseline: tuple[set[threading.Thread], dict[int, str]]) -> None:
    """Random SIGKILLs of app and daemon over a faulty batch: every file exact, every hook once, nothing leaked."""
    threads_before, fds_before = baseline
    seconds = _duration(variant)
    seed = int(os.environ.get(SEED_ENV, random.SystemRandom().randrange(1 << 32)))
    rng = random.Random(seed)
    started = time.monotonic()
    print(f"soak: seed {seed} ({SEED_ENV}={seed} {SECONDS_ENV}={seconds} to replay), {seconds} s", flush=True)

    reserve = 10.0 + 0.02 * seconds  # setup, drain and checks
    chaos_seconds = max(10.0, seconds - reserve)
    files = _make_batch(rng, seconds)
    share = CONNECTIONS * chaos_seconds * WORKLOAD_STRETCH / len(files)  # seconds of transfer per file
    for f in files:
        f.pacing = max(MIN_PACING, int(f.size / (share * rng.uniform(0.5, 2.0)))) if f.size else None
    soak: Soak | None = None
    summary: dict[str, Any] | None = None
    with fake_server.FakeServer() as server:
        try:
            soak = Soak(str(tmp_path), server, files, rng, hook_delay=HOOK_DELAY)
            soak.chaos(started + chaos_seconds, progress=lambda text: print(text, flush=True))
            soak.drain(time.monotonic() + 45.0 + 0.05 * seconds)
            soak.wait_daemon_gone()
            problems = _check(soak)
            summary = _summary(soak, seed, seconds, time.monotonic() - started)
            assert problems == [], (
                f"soak seed {seed} ({SEED_ENV}={seed} {SECONDS_ENV}={seconds} to replay): {len(problems)} problems:\n"
                + "\n".join(problems[:40]) + f"\n{summary}\n--- app log ---\n{soak.tail(soak.log)}"
                + f"\n--- daemon log ---\n{soak.tail(os.path.join(soak.session_dir, 'daemon.log'), 3000)}")
        except AssertionError as err:
            if soak is not None and summary is None:
                raise AssertionError(f"soak seed {seed}: {err}\n{soak.counts}\n--- app log ---\n{soak.tail(soak.log)}"
                                     f"\n--- daemon log ---\n"
                                     f"{soak.tail(os.path.join(soak.session_dir, 'daemon.log'), 3000)}") from err
            raise
        finally:
            if soak is not None:
                soak.close()
    assert summary is not None
    summary["seconds"] = round(time.monotonic() - started, 1)

    # nothing leaked in this process: threads (the server's end within SHORT) and descriptors
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(SHORT)
    leaked = [t.name for t in set(threading.enumerate()) - threads_before]
    assert leaked == [], f"threads leaked: {leaked}"
    fds = _fds()
    assert {n: fds[n] for n in set(fds) - set(fds_before)} == {}, "file descriptors leaked"

    _write_results(summary, "30min" if variant == LONG_SECONDS else "2min")
    print("soak: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["app"]:
    sys.exit(_app_main())
