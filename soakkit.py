"""The crash-test kit: the ledger app, the driver that launches and kills it, and the contract check.

test_relaunch.py (SIGKILLs at byte offsets and inside hooks, on both hosts) and test_soak.py
(random SIGKILLs of the app and the daemon while the server misbehaves) run the same app, drive it
with the same ``Driver`` and judge the run with the same ``check``.

**The ledger app** (``python soakkit.py app --state DIR [--block EVENT:DESCRIPTION]``) is an
``appdelegate`` app with a ``bgsession.SessionManager`` subclass, wired like the seed; the driver
writes its settings to ``DIR/config.json``. It creates the batch's download tasks on its first run;
every launch re-creates the manager, re-attaches and resumes. Every hook appends to an fsynced
ledger, ``DIR/ledger.jsonl`` (``testkit.Ledger``): ``started`` when a hook begins, ``returned`` just
before it returns, so a kill inside a hook shows and a redelivery can be told from a second call.
Every line names its process for good (``proc``: pid and start token); ``violation`` lines record
what only the app can see (``LedgerManager``). It uses ``appdelegate.main`` because the daemon relaunches it as a
*background launch*: the runs then also cover the launch rules (delivery held until
``handle_events…`` saved the completion handler, ``did_finish_events…`` calling it, the exit).

**The driver** plays the user and the system: it serves the batch from a ``FakeServer``
(``TrackedRoute``: remembers the entity version each request was answered from), launches the app
through a ``fake_server.AppController``, adopts the launches the daemon makes, kills apps (now, or
at a byte offset of a download) and the daemon, and collects exit codes.

**Reading the ledger**: hooks run serially on the delegate thread, and bgsession acknowledges an
event after its hook returned and before it calls the next hook. A ``returned`` line is known to be
*acknowledged* when its process exited normally, or wrote a later delegate-thread line, or was
killed and the journal as it left it holds the acknowledgement (and no later process has begun that
event since). Any other ``returned`` line may belong to a process killed between the return and the
acknowledgement: that event may rightly be delivered again, to a later process. ``check`` applies
every rule of the contract (``RULES``, and ``SETTLED_RULES`` once the daemon has exited) and returns
the violations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import appdelegate
import bgsession
import fake_server
from testkit import HERE, LONG, Ledger, file_sha, read_pid_file, sha, stop_daemon, wait_until

#: This file: the app's program (the daemon's relaunch_command runs it too).
THIS_FILE = os.path.abspath(__file__)
#: The credential of the files behind Basic auth (the app answers the first challenge with it).
USER, PASSWORD, REALM = "alice", "wonderland", "photos"
SIGKILLED = -signal.SIGKILL
#: Exit code of an app that found another app attached (one session per identifier): it quits.
EXIT_IN_USE = 75
#: The hooks whose events are acknowledged, each exactly once per task.
HOOKS = ("finish", "complete")
#: Ledger events written by the delegate thread (serially, each after the previous event's ack).
DELEGATE_EVENTS = frozenset({"finish", "complete", "events", "challenge"})
#: Longest wait for one app launch to end, or for a line it is expected to write.
LAUNCH_TIMEOUT = LONG
#: Attempts to create the batch when the daemon keeps going away under the creates.
ENQUEUE_ATTEMPTS = 20


class LedgerReader:
    """Reads a ledger incrementally (complete lines only: a killed writer may leave half a line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._lock = threading.Lock()

    def refresh(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return list(self.records)
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                self.records.append(json.loads(line))
            self._offset += end
            return list(self.records)


# ============================================================================
# The ledger app (child process)
# ============================================================================


def _own_process() -> fake_server.ProcessRef:
    return fake_server.ProcessRef.of(os.getpid())


def _load_config(state: str) -> dict[str, Any]:
    with open(os.path.join(state, "config.json"), "rb") as f:
        cfg: dict[str, Any] = json.load(f)
    return cfg


class LedgerManager(bgsession.SessionManager):
    """The app's background session manager; session-level blocks set in ``__init__``, as in the seed.

    Besides the ledger it checks, in this process, what only this process can see: hooks never run
    concurrently, and no progress is reported for a task after its finish hook returned.
    ``block`` (event, description): that hook blocks forever, so the parent can kill the app inside it.
    """

    def __init__(self, cfg: Mapping[str, Any], block: tuple[str, str] | None) -> None:
        options = dict(cfg["session"])
        if "retry" in options:
            options["retry"] = bgsession.Retry(**options["retry"])
        super().__init__(bgsession.Configuration.background(
            cfg["identifier"], directory=cfg["directory"], host=cfg["host"],
            relaunch_command=cfg["argv"] if cfg["host"] == "daemon" else None, **options))
        self.cfg = cfg
        self.ledger = Ledger(cfg["ledger"], proc=_own_process().key)
        self.block = block
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

    def _work(self, event: str, description: str | None) -> None:
        """An app's hook takes a little time (a kill may land inside it), or blocks for good if told to."""
        if self.block == (event, description):
            self.ledger.append(event="blocked", hook=event, desc=description)
            threading.Event().wait()
        if self.cfg["hook_delay"]:
            time.sleep(self.rng.uniform(0.0, self.cfg["hook_delay"]))  # workload, not synchronisation

    def _finish(self, session: bgsession.Session, task: bgsession.DownloadTask, location: str) -> str | None:
        self._enter("finish")
        try:
            status = task.response.status if task.response is not None else None
            exists = os.path.exists(location)
            self.ledger.append(event="finish", phase="started", desc=task.description, id=task.identifier,
                               status=status, exists=exists, sha256=file_sha(location) if exists else None)
            self._work("finish", task.description)
            dest = None
            if status == 200:  # the seed's check: an error page is no photo
                name = urllib.parse.urlsplit(task.original_request.url).path.rsplit("/", 1)[-1]
                dest = os.path.join(self.cfg["documents"], bgsession.sanitize_filename(name))
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
            self._work("complete", task.description)
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


class LedgerApp(appdelegate.AppDelegate):
    """Creates the batch on its first run; every launch re-creates the manager, re-attaches and resumes."""

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        args = _app_parser().parse_args(app.argv[2:])
        cfg = _load_config(args.state)
        me = _own_process()
        ledger = Ledger(cfg["ledger"], proc=me.key)
        ledger.append(event="launch", background=app.is_background_launch, pid=me.pid, token=me.token)
        event, _, description = (args.block or "").partition(":")
        try:
            self.manager = LedgerManager(cfg, (event, description) if args.block else None)
        except bgsession.TransferError as err:
            if err.code is not bgsession.ErrorCode.BACKGROUND_SESSION_IN_USE:
                raise
            # another launch holds the session: this one quits, as a second instance would
            ledger.append(event="in_use", message=str(err))
            ledger.append(event="exit_code", code=EXIT_IN_USE)
            os._exit(EXIT_IN_USE)
        live = self._enqueue(self.manager, cfg)
        if cfg["host"] == "inprocess" and live:
            # This process hosts the transfers: ask for time to finish them before exiting.
            task_id = app.begin_background_task(lambda: app.end_background_task(task_id), name="downloads")

            def finish_then_end() -> None:
                self.manager.session.wait()
                app.end_background_task(task_id)

            threading.Thread(target=finish_then_end, daemon=True).start()

    @staticmethod
    def _enqueue(manager: LedgerManager, cfg: Mapping[str, Any]) -> list[bgsession.Task]:
        """Create what is missing (suspended, so no byte flows until noted), note it, resume it all."""
        ledger, session = manager.ledger, manager.session
        for attempt in range(ENQUEUE_ATTEMPTS):
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
                    ledger.append(event="resumed", desc=task.description, id=task.identifier)  # accepted now
            return list(live.values())
        raise RuntimeError("could not enqueue the batch: the daemon kept going away")

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.manager.saved_completion_handler = completion_handler
        self.manager.ledger.append(event="handler_saved", identifier=identifier)

    def run(self, app: appdelegate.Application) -> None:
        self.manager.session.wait()

    def will_terminate(self, app: appdelegate.Application) -> None:
        self.manager.session.close()
        self.manager.ledger.append(event="exit")


def _app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soakkit.py app")
    parser.add_argument("--state", required=True, help="the app's directory (config.json, ledger, session)")
    parser.add_argument("--block", help="EVENT:DESCRIPTION -- that hook blocks forever")
    return parser


def app_argv(state: str) -> list[str]:
    """The app's command line (also the daemon's relaunch_command)."""
    return [sys.executable, "-W", "error", THIS_FILE, "app", "--state", state]


def _app_main() -> int:
    args, _ = _app_parser().parse_known_args(sys.argv[2:])
    cfg = _load_config(args.state)
    log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)  # a relaunch by the daemon would write into daemon.log otherwise
    os.dup2(log_fd, 2)
    os.close(log_fd)
    code = appdelegate.main(LedgerApp)
    Ledger(cfg["ledger"], proc=_own_process().key).append(event="exit_code", code=code)
    return code


# ============================================================================
# The driver (parent)
# ============================================================================


@dataclasses.dataclass
class File:
    """One download of the batch, served at ``/files/<name>``."""

    name: str
    size: int | None  # None: the server answers 404
    seed: int = 0
    auth: bool = False
    #: Bytes per second of every response without a fault of its own: slow enough that the client keeps
    #: up with the server (a kill at server byte N then finds about N bytes in the client's file).
    pacing: int | None = None
    #: Faults of the first requests, in order (then ``pacing`` only).
    faults: list[fake_server.Fault | None] = dataclasses.field(default_factory=list)

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


@dataclasses.dataclass
class Launch:
    """One run of the app as the driver knows it: launched by the driver or adopted from the daemon."""

    app: fake_server.AppProcess
    #: Exit code once ended: the process's, the one its ledger's ``exit_code`` line gives, or SIGKILLED;
    #: None while it runs, or if it ended without saying (a crash).
    rc: int | None = None
    ended: bool = False
    #: After a kill: the (description, event) pairs whose acknowledgement the journal held when it died.
    acked: frozenset[tuple[str, str]] = frozenset()

    @property
    def key(self) -> str:
        return self.app.key

    @property
    def pid(self) -> int:
        return self.app.pid

    @property
    def background(self) -> bool:
        return self.app.background

    @property
    def killed_at(self) -> tuple[str, int] | None:
        return self.app.killed_at


class Driver:
    """Plays the user and the system for one app: serves its batch, launches it, kills it and the
    daemon, relaunches it (in-process host) or lets the daemon do so (daemon host), and keeps the
    exit code of every launch.

    ``session`` holds extra ``Configuration.background`` options (``retry`` as Retry's keywords);
    ``hook_delay`` is the longest time a finish/complete hook works; ``env`` is laid over the
    environment of the launches the driver makes.
    """

    def __init__(self, root: str, server: fake_server.FakeServer, files: Sequence[File], *, host: str,
                 identifier: str, session: Mapping[str, Any] | None = None, hook_delay: float = 0.0,
                 env: Mapping[str, str] | None = None) -> None:
        self.server, self.files, self.host = server, list(files), host
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
            route = TrackedRoute(f.path, fake_server.blob_bytes(f.size, f.seed), faults=f.faults,
                                 default_fault=fake_server.Fault(throttle=f.pacing) if f.pacing else None,
                                 auth=fake_server.BasicAuth(USER, PASSWORD, realm=REALM) if f.auth else None)
            self.routes[f.path] = server.add_route(route)
        cfg: dict[str, Any] = {
            "identifier": identifier, "host": host, "directory": self.session_dir, "documents": self.documents,
            "ledger": os.path.join(self.state, "ledger.jsonl"), "log": self.log, "argv": app_argv(self.state),
            "session": dict(session or {}), "hook_delay": hook_delay,
            "manifest": [{"desc": f.desc, "url": server.url(f.path)} for f in self.files],
        }
        with open(os.path.join(self.state, "config.json"), "w", encoding="utf-8") as out:
            json.dump(cfg, out)
        self.ledger = LedgerReader(cfg["ledger"])
        self.controller = fake_server.AppController(
            app_argv(self.state), identifier=identifier, cwd=self.state, output=self.log,
            env={"PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})})
        self.launches: list[Launch] = []
        self._by_key: dict[str, Launch] = {}
        self._handed_out = 0  # launches returned by launch() and relaunch()
        self._lock = threading.Lock()
        self.counts = {"app_kills": 0, "daemon_kills": 0, "launches_by_test": 0}

    # -- launches ---------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Know every app process the controller knows, in its order."""
        with self._lock:
            for app in self.controller.apps:
                if app.key not in self._by_key:
                    launch = Launch(app)
                    self._by_key[app.key] = launch
                    self.launches.append(launch)

    def launch(self, background: bool = False, block: str | None = None) -> Launch:
        """Launch the app (``block``: ``EVENT:DESCRIPTION``, that hook then blocks forever)."""
        process = self.controller.launch(background, extra_args=["--block", block] if block else [])
        self._sync()
        self.counts["launches_by_test"] += 1
        self._handed_out = len(self.launches)
        return self.launch_of(process.pid)

    def launch_of(self, pid: int) -> Launch:
        return next(x for x in reversed(self.launches) if x.pid == pid)

    def relaunch(self) -> Launch:
        """The next background launch: made here (in-process host) or by the daemon (daemon host)."""
        if self.host == "inprocess":
            return self.launch(background=True)

        def arrived() -> bool:
            self.discover()
            return len(self.launches) > self._handed_out

        wait_until(arrived, LAUNCH_TIMEOUT, what=f"the daemon to relaunch the app:\n{self.app_log()}")
        self._handed_out += 1
        return self.launches[self._handed_out - 1]

    def discover(self) -> list[dict[str, Any]]:
        """Learn of the launches the daemon made (its children now, the ledger for the rest); returns
        the ledger so far."""
        records = self.ledger.refresh()
        for r in records:
            if r["event"] == "launch" and r["proc"] not in self._by_key:
                self.controller.adopt(r["pid"], token=r.get("token"), background=bool(r["background"]))
        daemon = self.daemon()
        if daemon is not None:
            self.controller.discover(daemon.pid, THIS_FILE, self.state)
        self._sync()
        return records

    def running(self) -> list[Launch]:
        self._sync()
        return [x for x in self.launches if not x.ended and x.app.running()]

    def wait_line(self, launch: Launch, event: str, timeout: float = LAUNCH_TIMEOUT) -> dict[str, Any]:
        """Wait until ``launch`` has written a ledger line of ``event`` (AssertionError if it ends first)."""
        found: list[dict[str, Any]] = []

        def written() -> bool:
            running = launch.app.running()
            found[:] = [r for r in self.ledger.refresh() if r["proc"] == launch.key and r["event"] == event]
            assert found or running, f"app {launch.key} ended before writing {event!r}:\n{self.app_log()}"
            return bool(found)

        wait_until(written, timeout, what=f"app {launch.key} to write {event!r}")
        return found[0]

    def wait(self, launch: Launch, timeout: float = LAUNCH_TIMEOUT) -> int | None:
        """Wait for ``launch`` to end; its exit code (None: it ended without one)."""
        try:
            launch.app.wait(timeout)
        except TimeoutError as err:
            raise AssertionError(f"app {launch.key} still running after {timeout} s:\n{self.app_log()}") from err
        self._settle(launch)
        return launch.rc

    def reap(self) -> None:
        """Collect the exit codes of every launch that ended."""
        self.discover()
        for launch in list(self.launches):
            self._settle(launch)

    def _settle(self, launch: Launch) -> None:
        if launch.ended or launch.app.running():
            return
        rc = launch.app.returncode
        if rc is None:
            codes = [r["code"] for r in self.ledger.refresh() if r["event"] == "exit_code" and r["proc"] == launch.key]
            rc = codes[0] if codes else None
        launch.rc, launch.ended = rc, True
        if rc == SIGKILLED:
            launch.acked = self._acks_at_death(launch)

    def _acks_at_death(self, launch: Launch) -> frozenset[tuple[str, str]]:
        """The (description, event) acknowledgements the journal holds now that ``launch`` is dead,
        but for those a later process has begun to handle (it may have acknowledged them itself)."""
        try:
            state = bgsession.Journal(self.session_dir).state()
        except bgsession.JournalError:
            return frozenset()
        acked = {(t.description or "", event) for t in state.tasks.values() for event in t.acked}
        records = self.ledger.refresh()  # read after the journal: a later process's call is in it
        last_own: dict[tuple[str, str], int] = {}
        for i, r in enumerate(records):
            if r["proc"] == launch.key and r["event"] in HOOKS:
                last_own[(r["desc"], r["event"])] = i
        begun_since = {(r["desc"], r["event"]) for i, r in enumerate(records)
                       if r["event"] in HOOKS and r["proc"] != launch.key
                       and i > last_own.get((r["desc"], r["event"]), -1)}
        return frozenset(acked - begun_since)

    # -- kills ------------------------------------------------------------------------------------

    def kill_at(self, path: str, nbytes: int) -> fake_server.Hold:
        """SIGKILL the *next* launch when *path* has served *nbytes* in total (if it runs then).

        With the in-process host the server's handler stays stopped at the boundary after the kill
        (until the server stops): a write into the dead connection would count bytes no client
        received. With the daemon host the connection belongs to the daemon, which goes on.
        """
        self._sync()
        return self.controller.kill_when(self.server, path, nbytes, app_number=len(self.controller.apps),
                                         keep_held=self.host == "inprocess")

    def kill(self, launch: Launch) -> None:
        """SIGKILL ``launch`` now (if it runs) and wait until it has ended."""
        if launch.app.kill():
            self.counts["app_kills"] += 1
        self.wait(launch)

    def kill_apps(self) -> int:
        """SIGKILL every app process that runs (launched here or by the daemon); returns how many."""
        self.discover()
        killed = self.controller.kill_all()
        self._sync()
        for app in killed:
            self._settle(self._by_key[app.key])
        self.counts["app_kills"] += len(killed)
        return len(killed)

    def daemon(self) -> fake_server.ProcessRef | None:
        """The session's daemon, if one runs."""
        ref = read_pid_file(self.session_dir)
        return ref if ref is not None and ref.alive() else None

    def kill_daemon(self) -> bool:
        daemon = self.daemon()
        if daemon is None or not self.controller.kill_pid(daemon.pid, daemon.token):
            return False
        self.counts["daemon_kills"] += 1
        return True

    def close(self) -> None:
        """Kill every app launch still running (reaping those launched here), and stop the daemon."""
        self.discover()
        self.controller.close()
        stop_daemon(self.session_dir)
        self.discover()  # the ledger names the launches the daemon made before it stopped
        self.controller.close()

    # -- what happened ----------------------------------------------------------------------------

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.ledger.refresh()

    def delivered(self) -> set[str]:
        """The files whose complete hook returned (at least once)."""
        return {r["desc"] for r in self.records if r["event"] == "complete" and r["phase"] == "returned"}

    def served_end(self, f: File) -> int:
        """How far into the entity the server has sent bytes (a client has at most this much of it)."""
        end = 0
        for r in self.server.requests(f.path):
            if r.status in (200, 206):
                start = int(r.range_header.split("=")[1].split("-")[0]) if r.status == 206 and r.range_header else 0
                end = max(end, start + r.bytes_sent)
        return end

    @staticmethod
    def tail(path: str, n: int = 6000) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def app_log(self, n: int = 4000) -> str:
        return self.tail(self.log, n)


# ============================================================================
# The contract check
# ============================================================================


@dataclasses.dataclass
class _Run:
    """What a finished run left, for the rules to judge."""

    driver: Driver
    ledger: list[dict[str, Any]]
    launches: dict[str, Launch]
    #: (hook, description) -> that hook's ledger lines, with their index.
    calls: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]]
    #: description -> SHA-256 of the entity the server last answered it with (what the client must have).
    expected: dict[str, str]
    #: description -> the events the journal does not hold acknowledged (tasks not done with).
    pending: dict[str, set[str]]

    @classmethod
    def of(cls, driver: Driver) -> _Run:
        ledger = driver.records
        calls: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        for i, e in enumerate(ledger):
            if e["event"] in HOOKS:
                calls.setdefault((e["event"], e["desc"]), []).append((i, e))
        expected = {}
        for f in driver.files:
            entity = driver.routes[f.path].final_entity() if f.size is not None else None
            if entity is not None:
                expected[f.desc] = sha(entity.data)
        tasks = bgsession.Journal(driver.session_dir).tasks()
        pending = {t["description"]: set(HOOKS) - set(t["acked"]) for t in tasks}
        return cls(driver, ledger, {x.key: x for x in driver.launches}, calls, expected, pending)

    def rc(self, key: str) -> int | None:
        return self.launches[key].rc if key in self.launches else None

    def acknowledged(self, index: int) -> bool:
        """The ``returned`` line at ``index`` is known to be acknowledged (see the module docstring)."""
        entry = self.ledger[index]
        key = entry["proc"]
        if self.rc(key) == 0:
            return True
        if key in self.launches and (entry["desc"], entry["event"]) in self.launches[key].acked:
            return True
        return any(x["proc"] == key and x["event"] in DELEGATE_EVENTS for x in self.ledger[index + 1:])


def _rule_exits(run: _Run) -> list[str]:
    """Every app launch ended: normally, by the driver's SIGKILL, or as a second instance (EXIT_IN_USE)."""
    problems = []
    for key, launch in run.launches.items():
        kind = "background" if launch.background else "normal"
        if launch.rc == SIGKILLED and not launch.app.killed:
            problems.append(f"app {key} ({kind} launch) ended by a SIGKILL the driver did not send")
        elif launch.rc not in (0, SIGKILLED, EXIT_IN_USE):
            problems.append(f"app {key} ({kind} launch) ended with {launch.rc!r}"
                            f"{' (no exit code: crashed?)' if launch.rc is None else ''}")
    return problems


def _rule_app_saw_nothing_wrong(run: _Run) -> list[str]:
    """Hooks never ran concurrently, and no progress came for a task after its finish hook returned."""
    return [f"app {r['proc']}: {r['what']}" for r in run.ledger if r["event"] == "violation"]


def _rule_one_task_per_file(run: _Run) -> list[str]:
    """Every file is one task: one task id, never shared with another file."""
    problems: list[str] = []
    ids: list[int] = []
    for f in run.driver.files:
        found = {r["id"] for r in run.ledger if r.get("desc") == f.desc and "id" in r}
        if len(found) != 1:
            problems.append(f"{f.desc}: task ids {sorted(found)} (expected exactly one task)")
        else:
            ids += found
    if len(set(ids)) != len(ids):
        problems.append("two files share one task id")
    return problems


def _rule_hooks_exactly_once(run: _Run) -> list[str]:
    """Per file, the finish and the complete hook each returned, were never called again after a
    return known to be acknowledged, and their last call returned; a call that never returned was
    SIGKILLed; the last complete return is acknowledged (known, or -- when a daemon hosted the
    transfers and may journal an ack the dying app sent -- the final journal holds it)."""
    problems = []
    for f in run.driver.files:
        for event in HOOKS:
            entries = run.calls.get((event, f.desc), [])
            for i, e in entries:
                returned_here = any(j > i and x["phase"] == "returned" and x["proc"] == e["proc"] for j, x in entries)
                if e["phase"] == "started" and not returned_here and run.rc(e["proc"]) != SIGKILLED:
                    problems.append(f"{f.desc}: {event} hook started in {e['proc']} and never returned, "
                                    f"though that process was not killed (exit {run.rc(e['proc'])!r})")
            returns = [i for i, e in entries if e["phase"] == "returned"]
            if not returns:
                problems.append(f"{f.desc}: the {event} hook never returned ({len(entries)} calls started)")
                continue
            acked = [i for i in returns if run.acknowledged(i)]
            again = [e for i, e in entries if acked and i > acked[0]]
            if again:
                problems.append(f"{f.desc}: {event} hook called again in {again[0]['proc']} after a return that "
                                f"was acknowledged ({run.ledger[acked[0]]['proc']}, exit {run.rc(again[0]['proc'])!r})")
            if entries[-1][1]["phase"] == "started":
                problems.append(f"{f.desc}: the last {event} call never returned")
            elif event == "complete" and not run.acknowledged(returns[-1]) and not (
                    run.driver.host == "daemon" and "complete" not in run.pending.get(f.desc, set())):
                problems.append(f"{f.desc}: the last complete return was never acknowledged "
                                f"({run.ledger[returns[-1]]['proc']})")
    return problems


def _rule_finish_saw_the_file(run: _Run) -> list[str]:
    """Every finish call saw the file: a 404 for a missing file (and kept nothing), else status 200
    and the SHA-256 of the entity the server last served (a changed entity arrives in its new version)."""
    problems = []
    for f in run.driver.files:
        if f.size is not None and f.desc not in run.expected:
            problems.append(f"{f.desc}: the server never answered it with 200/206/416")
            continue
        for _, e in run.calls.get(("finish", f.desc), []):
            if f.size is None:
                if e["phase"] == "started" and e["status"] != 404:
                    problems.append(f"{f.desc}: finish hook saw status {e['status']}, expected 404")
                elif e["phase"] == "returned" and e["dest"] is not None:
                    problems.append(f"{f.desc}: the 404 page was kept as {e['dest']}")
            elif e["phase"] != "started":
                continue
            elif not e["exists"]:
                problems.append(f"{f.desc}: finish hook ({e['proc']}) got a location that does not exist")
            elif e["status"] != 200 or e["sha256"] != run.expected[f.desc]:
                problems.append(f"{f.desc}: finish hook ({e['proc']}) saw status {e['status']} and "
                                f"other bytes than the server's last entity")
    return problems


def _rule_complete_after_finish(run: _Run) -> list[str]:
    """Per file, the complete hook is first called after the finish hook returned, the finish hook
    never after the complete hook, and the last complete call reports no error."""
    problems = []
    for f in run.driver.files:
        completes = [(i, e) for i, e in run.calls.get(("complete", f.desc), []) if e["phase"] == "started"]
        finishes = run.calls.get(("finish", f.desc), [])
        if not completes:
            continue
        first = completes[0][0]
        finish_returns = [i for i, e in finishes if e["phase"] == "returned"]
        if not finish_returns or finish_returns[0] > first:
            problems.append(f"{f.desc}: complete hook called before the finish hook returned")
        if any(i > first for i, _ in finishes):
            problems.append(f"{f.desc}: finish hook called after the complete hook")
        if completes[-1][1]["error"] is not None:
            problems.append(f"{f.desc}: completed with an error: {completes[-1][1]['error']}")
    return problems


def _rule_no_task_lost(run: _Run) -> list[str]:
    """A task accepted by resume() is never lost (the app never has to create it again)."""
    return [f"{e['desc']}: accepted by resume(), then missing from the session ({e['proc']})"
            for i, e in enumerate(run.ledger)
            if e["event"] == "recreated" and any(r["event"] == "resumed" and r["desc"] == e["desc"]
                                                 for r in run.ledger[:i])]


def _rule_documents_exact(run: _Run) -> list[str]:
    """Documents/ holds exactly the files that exist, each byte-exact (SHA-256) to the server's last entity."""
    problems = []
    saved = sorted(os.listdir(run.driver.documents))
    wanted = sorted(f.name for f in run.driver.files if f.size is not None)
    if saved != wanted:
        problems.append(f"Documents: missing {sorted(set(wanted) - set(saved))[:10]}, "
                        f"unexpected {sorted(set(saved) - set(wanted))[:10]}")
    for f in run.driver.files:
        path = os.path.join(run.driver.documents, f.name)
        if f.desc in run.expected and os.path.exists(path) and file_sha(path) != run.expected[f.desc]:
            problems.append(f"{f.name}: the saved file differs from the server's last entity")
    return problems


def _rule_completion_handler_once(run: _Run) -> list[str]:
    """The saved completion handler is called exactly once per background launch that exited
    normally, at most once by one killed, never by a normal launch."""
    problems = []
    for key, launch in run.launches.items():
        calls = sum(1 for e in run.ledger if e["event"] == "handler_called" and e["proc"] == key)
        want = (1 if launch.rc == 0 else calls) if launch.background else 0
        if calls != want or calls > 1:
            problems.append(f"{'background' if launch.background else 'normal'} launch {key} (exit {launch.rc!r}) "
                            f"called the completion handler {calls} times")
    return problems


def _rule_resume_validated(run: _Run) -> list[str]:
    """Every Range request carries If-Range and Accept-Encoding: identity (validated resume)."""
    problems = []
    for f in run.driver.files:
        for record in run.driver.server.requests(f.path):
            if record.method == "GET" and record.range_header and (
                    not record.header("if-range") or record.header("accept-encoding") != "identity"):
                problems.append(f"{f.path}: Range request without If-Range/identity: {record.headers}")
                break
    return problems


def _rule_journal_clean(run: _Run) -> list[str]:
    """Journal.check() is clean, no task is left unacknowledged, tmp/ is empty and no temp file is left."""
    directory = run.driver.session_dir
    problems = [f"journal: {p}" for p in bgsession.Journal(directory).check()]
    if run.pending:
        desc, events = next(iter(run.pending.items()))
        problems.append(f"journal: {len(run.pending)} tasks not acknowledged, e.g. {desc} ({sorted(events)} not)")
    tmp = os.path.join(directory, "tmp")
    if os.path.isdir(tmp) and os.listdir(tmp):
        problems.append(f"tmp/ not empty: {sorted(os.listdir(tmp))[:10]}")
    strays = [n for n in os.listdir(directory) if n.endswith(".tmp") or n.startswith(".")]
    if strays:
        problems.append(f"temp files left in the session directory: {strays}")
    return problems


def _rule_daemon_gone(run: _Run) -> list[str]:
    """The daemon removed its pid file and socket when it exited."""
    return [f"{name} left behind by the daemon" for name in ("daemon.pid", "daemon.sock")
            if os.path.exists(os.path.join(run.driver.session_dir, name))]


#: The contract, rule by rule (each docstring states one).
RULES: tuple[Callable[[_Run], list[str]], ...] = (
    _rule_exits, _rule_app_saw_nothing_wrong, _rule_one_task_per_file, _rule_hooks_exactly_once,
    _rule_finish_saw_the_file, _rule_complete_after_finish, _rule_no_task_lost, _rule_documents_exact,
    _rule_completion_handler_once, _rule_resume_validated, _rule_journal_clean,
)
#: Rules for a run whose daemon has exited.
SETTLED_RULES: tuple[Callable[[_Run], list[str]], ...] = (_rule_daemon_gone,)


def check_by_rule(driver: Driver, *, settled: bool = False) -> dict[str, list[str]]:
    """The violations of each rule of the contract (``RULES``; with ``settled``, ``SETTLED_RULES`` too),
    by rule name, judged from the ledger, the files, the server's log and the journal."""
    driver.reap()
    run = _Run.of(driver)
    return {rule.__name__: rule(run) for rule in RULES + (SETTLED_RULES if settled else ())}


def check(driver: Driver, *, settled: bool = False) -> list[str]:
    """Every violation of the contract (see ``check_by_rule``); [] is a kept contract."""
    return [problem for problems in check_by_rule(driver, settled=settled).values() for problem in problems]


if __name__ == "__main__" and sys.argv[1:2] == ["app"]:
    sys.exit(_app_main())
