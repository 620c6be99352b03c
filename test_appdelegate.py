"""Tests of appdelegate: launches, the completion handler, background tasks, signals.

Most tests run a real child process: this file is also the child
(``python test_appdelegate.py SCENARIO [DIR]``; see ``_SCENARIOS`` at the end).
The child reports on stdout, one line per step (flushed); the parent waits on those
lines, never on sleeps.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import pytest

import appdelegate
import bgsession

HERE = os.path.dirname(os.path.abspath(__file__))
#: Longest wait for one expected child line or exit (a stuck child fails the test here).
LONG = 20.0
#: Short limits the tests configure (handler timeout, background time).
SHORT_LIMIT = 0.3
#: How long a child watches for something that must NOT happen (a hook before the handler is saved).
NEGATIVE_WINDOW = 0.5
IDENTIFIER = "com.example.appdelegate-test"


# ============================================================================
# Child process plumbing (parent side)
# ============================================================================


class Child:
    """A child running one scenario: stdout lines are queued; stdin takes commands."""

    def __init__(self, scenario: str, tmp: str, *, background: bool = False,
                 env: Mapping[str, str] | None = None, extra: Sequence[str] = ()) -> None:
        full_env = dict(os.environ)
        full_env.pop(bgsession.BACKGROUND_EVENTS_ENV, None)
        for name in (appdelegate.HANDLER_TIMEOUT_ENV, appdelegate.BACKGROUND_TIME_ENV):
            full_env.pop(name, None)
        if background:
            full_env[bgsession.BACKGROUND_EVENTS_ENV] = IDENTIFIER
        full_env.update(env or {})
        full_env["PYTHONPATH"] = HERE + os.pathsep + full_env.get("PYTHONPATH", "")
        self.stderr_path = os.path.join(tmp, f"{scenario}-{id(self)}.stderr")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - the child writes it; closed in close()
        self.proc = subprocess.Popen([sys.executable, "-W", "error", os.path.abspath(__file__), scenario, tmp,
                                      *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=full_env, cwd=tmp)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def expect(self, prefix: str, timeout: float = LONG) -> str:
        """The next line starting with *prefix* (earlier lines are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} within {timeout} s; got {self.lines}; "
                                     f"stderr: {self.stderr()}") from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"child ended before {prefix!r}; got {self.lines}; stderr: {self.stderr()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = LONG) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(LONG)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return code

    def stderr(self) -> str:
        self._stderr.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()


@pytest.fixture
def spawn(tmp_path: Any) -> Iterator[Callable[..., Child]]:
    """Start children; every one is killed (if still running) and reaped at teardown."""
    children: list[Child] = []

    def start(scenario: str, **kwargs: Any) -> Child:
        child = Child(scenario, str(tmp_path), **kwargs)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.reap()


# ============================================================================
# The completion handler (in this process)
# ============================================================================


def test_handler_second_call_raises_and_does_nothing() -> None:
    """A second call of the completion handler raises RuntimeError and does not run its effect again."""
    calls = []
    handler = appdelegate.CompletionHandler("x", lambda: calls.append(1))
    handler()
    with pytest.raises(RuntimeError, match="already called"):
        handler()
    assert calls == [1] and handler.called


def test_handler_called_from_many_threads_runs_once() -> None:
    """Racing calls from several threads: exactly one succeeds, every other raises RuntimeError."""
    calls: list[int] = []
    handler = appdelegate.CompletionHandler("x", lambda: calls.append(1))
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def call() -> None:
        barrier.wait()
        try:
            handler()
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("raised")

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
    assert sorted(outcomes) == ["ok"] + ["raised"] * 7 and calls == [1]


# ============================================================================
# Application (in this process)
# ============================================================================


def test_background_task_ids_and_ending_twice() -> None:
    """Task ids are positive and distinct; ending one twice is harmless; no time limit before termination."""
    app = appdelegate.Application(background_time=5)
    try:
        a, b = app.begin_background_task(), app.begin_background_task(name="b")
        assert appdelegate.INVALID_BACKGROUND_TASK not in (a, b) and a != b
        assert app.background_time_remaining == float("inf")
        app.end_background_task(a)
        app.end_background_task(a)
        assert [t.task_id for t in app._open_tasks()] == [b]
        app._enter_background()
        assert 0 < app.background_time_remaining <= 5
    finally:
        app._close()


def test_begin_after_expiry_is_invalid() -> None:
    """Once the background time has expired, begin_background_task returns INVALID_BACKGROUND_TASK."""
    app = appdelegate.Application(background_time=0)
    try:
        app._enter_background()
        app._expire()
        assert app.begin_background_task() == appdelegate.INVALID_BACKGROUND_TASK
        assert app.background_time_remaining == 0.0
    finally:
        app._close()


@pytest.mark.timeout(30)
def test_handler_timeout_argument(monkeypatch: Any, capsys: Any) -> None:
    """main(handler_timeout=…) limits a background launch that never calls its handler (no env var set)."""
    monkeypatch.setenv(bgsession.BACKGROUND_EVENTS_ENV, IDENTIFIER)
    monkeypatch.delenv(appdelegate.HANDLER_TIMEOUT_ENV, raising=False)
    saved = []

    class Silent(appdelegate.AppDelegate):
        def handle_events_for_background_url_session(self, app: Any, identifier: str, handler: Any) -> None:
            saved.append(handler)

    code = appdelegate.main(Silent, argv=["x"], handler_timeout=SHORT_LIMIT)
    assert code == appdelegate.EXIT_COMPLETION_HANDLER_NOT_CALLED
    assert len(saved) == 1 and not saved[0].called
    err = capsys.readouterr().err
    assert IDENTIFIER in err and "completion handler" in err
    assert bgsession._delivery_gate.is_set()  # delivery released again


# ============================================================================
# Launches (child processes)
# ============================================================================


@pytest.mark.timeout(60)
def test_normal_launch_order(spawn: Callable[..., Child]) -> None:
    """A normal launch runs did_finish_launching, run, will_terminate in that order and exits 0."""
    child = spawn("order")
    assert child.wait() == 0, child.stderr()
    assert child.lines == ["did_finish_launching {} background=False", "run", "will_terminate"]


@pytest.mark.timeout(60)
def test_second_handler_call_raises_first_stands(spawn: Callable[..., Child]) -> None:
    """In a background launch a second handler call raises RuntimeError; the first still ends the launch (exit 0)."""
    child = spawn("twice", background=True, env={appdelegate.HANDLER_TIMEOUT_ENV: "10"})
    assert child.wait() == 0, child.stderr()
    assert child.lines == ["handler called", "second call raised RuntimeError", "will_terminate"]


@pytest.mark.timeout(60)
def test_background_launch_with_nothing_pending_calls_handler(spawn: Callable[..., Child]) -> None:
    """A background launch with no backlog still gets did_finish_events, calls the handler, and exits 0."""
    child = spawn("idle", background=True)
    assert child.wait() == 0, child.stderr()
    assert child.lines == [
        f"did_finish_launching {{'url_session': '{IDENTIFIER}'}} background=True",
        f"handler saved for {IDENTIFIER}",
        "did_finish_events",
        "calling the handler",
        "will_terminate",
    ]


@pytest.mark.timeout(60)
def test_handler_never_called_exits_nonzero_with_warning(spawn: Callable[..., Child]) -> None:
    """A background launch that never calls its handler exits non-zero with a one-line warning naming the session."""
    child = spawn("silent", background=True, env={appdelegate.HANDLER_TIMEOUT_ENV: str(SHORT_LIMIT)})
    assert child.wait() == appdelegate.EXIT_COMPLETION_HANDLER_NOT_CALLED
    warnings = [line for line in child.stderr().splitlines() if line.startswith("appdelegate:")]
    assert len(warnings) == 1 and IDENTIFIER in warnings[0] and "completion handler" in warnings[0]
    assert "will_terminate" not in child.lines  # killed, as iOS kills it


@pytest.mark.timeout(60)
def test_background_task_keeps_sigtermed_process_alive(spawn: Callable[..., Child]) -> None:
    """After SIGTERM an open background task keeps the process alive and responsive until it is ended."""
    child = spawn("bgtask")
    child.expect("ready")
    child.proc.send_signal(signal.SIGTERM)
    for _ in range(1000):  # handshake until the child shows termination pending
        child.send("ping")
        remaining = float(child.expect("pong").split()[1])
        if remaining != float("inf"):
            break
    assert 0 < remaining <= appdelegate.DEFAULT_BACKGROUND_TIME
    assert child.proc.poll() is None
    child.send("end")
    child.expect("ending")
    assert child.wait() == 128 + signal.SIGTERM
    assert child.lines[-2:] == ["ending", "will_terminate"]  # nothing terminated before the task ended
    assert "expired" not in child.lines


@pytest.mark.timeout(60)
def test_second_sigterm_expires_background_time(spawn: Callable[..., Child]) -> None:
    """A second SIGTERM while a background task is open runs its expiration handler at once, then exits."""
    child = spawn("bgtask")
    child.expect("ready")
    child.proc.send_signal(signal.SIGTERM)
    for _ in range(1000):
        child.send("ping")
        if float(child.expect("pong").split()[1]) != float("inf"):
            break
    child.proc.send_signal(signal.SIGTERM)
    child.expect("expired")
    assert child.wait() == 128 + signal.SIGTERM
    assert child.lines[-1] == "will_terminate"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_without_background_task_ends_promptly(spawn: Callable[..., Child], signum: int) -> None:
    """SIGTERM/SIGINT with no background task open ends the process at once (128 + signal) while run() blocks."""
    child = spawn("blocked")
    child.expect("ready")
    child.proc.send_signal(signum)
    assert child.wait() == 128 + signum
    assert child.lines == ["ready", "will_terminate"]


@pytest.mark.timeout(60)
def test_run_raising_exits_1(spawn: Callable[..., Child]) -> None:
    """An exception escaping run() is printed with its traceback; will_terminate runs; the exit code is 1."""
    child = spawn("raises")
    assert child.wait() == appdelegate.EXIT_RUN_RAISED
    assert child.lines == ["will_terminate"]
    assert "ZeroDivisionError" in child.stderr()


@pytest.mark.timeout(60)
def test_expiration_handler_fires_when_time_runs_out(spawn: Callable[..., Child]) -> None:
    """When the background time runs out the expiration handler runs; begin_background_task is then invalid."""
    child = spawn("expire", env={appdelegate.BACKGROUND_TIME_ENV: str(SHORT_LIMIT)})
    assert child.wait() == 0, child.stderr()
    assert child.lines == ["run", "expired remaining=0.0 begin_again=0", "will_terminate"]


@pytest.mark.timeout(60)
def test_task_left_open_after_expiry_exits_nonzero(spawn: Callable[..., Child]) -> None:
    """A task its expiration handler does not end: the process still exits, with a warning and code 4."""
    child = spawn("stuck", env={appdelegate.BACKGROUND_TIME_ENV: str(SHORT_LIMIT)})
    assert child.wait() == appdelegate.EXIT_BACKGROUND_TIME_EXPIRED
    assert "was not ended when the background time expired" in child.stderr()
    assert child.lines == ["run", "expired", "will_terminate"]


@pytest.mark.timeout(60)
def test_delivery_held_until_handle_events_returned(spawn: Callable[..., Child], tmp_path: Any) -> None:
    """In a background launch, waiting events reach no hook before handle_events… has saved the handler."""
    import fake_server

    directory = str(tmp_path / "session")
    with fake_server.FakeServer() as server:
        server.add_blob("/a.bin", size=1000, seed=7)

        class Refuse(bgsession.SessionDelegate):  # a hook that raises leaves its event for the next launch
            def download_task_did_finish_downloading(self, session: Any, task: Any, location: str) -> None:
                raise RuntimeError("not now (test setup: leave this event for the next launch)")

        config = bgsession.Configuration.background(IDENTIFIER, directory=directory, host="inprocess")
        with bgsession.Session(config, delegate=Refuse()) as session:
            session.download_task(server.url("/a.bin"), description="a").resume()
            assert session.wait(LONG)
    child = spawn("held", background=True, extra=[directory])
    assert child.wait() == 0, child.stderr()
    assert child.lines == [
        "session created; no hook ran yet",
        "handler saved",
        "finish a handler_saved=True",
        "complete a handler_saved=True",
        "did_finish_events",
        "calling the handler",
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", ["after", "after_async"])
def test_process_exits_only_after_the_hook_that_called_the_handler_returned(spawn: Callable[..., Child],
                                                                           scenario: str) -> None:
    """The did-finish-events hook calls the handler, then goes on working: the process waits for the hook to
    return (a plain hook, and an async def one on the app's event loop) before it terminates."""
    child = spawn(scenario, background=True)
    child.expect("handler called")
    with pytest.raises(subprocess.TimeoutExpired):
        child.proc.wait(NEGATIVE_WINDOW)  # the hook is still working: the process must not exit
    child.send("go")
    assert child.wait() == 0, child.stderr()
    assert child.lines[-3:] == ["handler called", "hook returning", "will_terminate"]


@pytest.mark.timeout(60)
def test_async_lifecycle_methods_run_on_the_apps_event_loop(spawn: Callable[..., Child]) -> None:
    """async def lifecycle methods run in order on app.event_loop (its own thread); so does the async run()."""
    child = spawn("async_order")
    assert child.wait() == 0, child.stderr()
    assert child.lines == ["did_finish_launching on the app loop", "run on the app loop",
                           "will_terminate on the app loop"]


@pytest.mark.timeout(60)
def test_async_run_raising_exits_1(spawn: Callable[..., Child]) -> None:
    """An async run() that raises ends the app with exit code 1 and its traceback on stderr."""
    child = spawn("async_raises")
    assert child.wait() == appdelegate.EXIT_RUN_RAISED
    assert "ZeroDivisionError" in child.stderr()


# ============================================================================
# The child scenarios (run as: python test_appdelegate.py SCENARIO TMPDIR [ARGS])
# ============================================================================


_say_lock = threading.Lock()


def _say(text: str) -> None:
    """One whole line on stdout, flushed (hooks, run() and the main thread all report)."""
    with _say_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Base(appdelegate.AppDelegate):
    def will_terminate(self, app: appdelegate.Application) -> None:
        _say("will_terminate")


class _Order(_Base):
    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        _say(f"did_finish_launching {dict(launch_options)} background={app.is_background_launch}")

    def run(self, app: appdelegate.Application) -> None:
        _say("run")


class _Twice(_Base):
    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        completion_handler()
        _say("handler called")
        try:
            completion_handler()
        except RuntimeError:
            _say("second call raised RuntimeError")


class _Idle(_Base):
    """A background launch for a session with nothing pending, wired like the seed."""

    handler: appdelegate.CompletionHandler | None = None

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        _say(f"did_finish_launching {dict(launch_options)} background={app.is_background_launch}")
        delegate = self

        class Hooks(bgsession.SessionDelegate):
            def did_finish_events_for_background_session(self, session: bgsession.Session) -> None:
                _say("did_finish_events")
                assert delegate.handler is not None
                _say("calling the handler")  # the process may exit as soon as it is called
                delegate.handler()

        config = bgsession.Configuration.background(IDENTIFIER, directory=os.path.join(sys.argv[2], "idle"),
                                                    host="inprocess")
        self.session = bgsession.Session(config, delegate=Hooks())

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.handler = completion_handler
        _say(f"handler saved for {identifier}")


class _Silent(_Base):
    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.handler = completion_handler  # saved, never called


class _BackgroundTask(_Base):
    """Begins a task at launch; run() answers ping (with the remaining time) and end over stdin."""

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        def expired() -> None:
            _say("expired")
            app.end_background_task(self.task)

        self.task = app.begin_background_task(expired)

    def run(self, app: appdelegate.Application) -> None:
        _say("ready")
        for line in sys.stdin:
            command = line.strip()
            if command == "ping":
                _say(f"pong {app.background_time_remaining}")
            elif command == "end":
                _say("ending")  # the process may exit as soon as the task ends
                app.end_background_task(self.task)


class _Blocked(_Base):
    def run(self, app: appdelegate.Application) -> None:
        _say("ready")
        sys.stdin.read()  # blocks until the parent closes stdin (it never does)


class _Raises(_Base):
    def run(self, app: appdelegate.Application) -> None:
        raise ZeroDivisionError("run() fails on purpose")


class _Expire(_Base):
    end_on_expiry = True

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        def expired() -> None:
            if not self.end_on_expiry:
                _say("expired")
                return
            again = app.begin_background_task()
            _say(f"expired remaining={app.background_time_remaining} begin_again={again}")
            app.end_background_task(self.task)

        self.task = app.begin_background_task(expired)

    def run(self, app: appdelegate.Application) -> None:
        _say("run")


class _Stuck(_Expire):
    end_on_expiry = False


class _Held(appdelegate.AppDelegate):
    """Re-creates a session that has waiting events, then checks no hook ran before the handler was saved."""

    handler: appdelegate.CompletionHandler | None = None

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        delegate = self
        hook_ran = threading.Event()

        class Hooks(bgsession.SessionDelegate):
            def download_task_did_finish_downloading(self, session: Any, task: Any, location: str) -> None:
                hook_ran.set()
                _say(f"finish {task.description} handler_saved={delegate.handler is not None}")

            def task_did_complete(self, session: Any, task: Any, error: Any) -> None:
                hook_ran.set()
                _say(f"complete {task.description} handler_saved={delegate.handler is not None}")

            def did_finish_events_for_background_session(self, session: Any) -> None:
                _say("did_finish_events")
                if delegate.handler is not None:
                    _say("calling the handler")  # the process may exit as soon as it is called
                    delegate.handler()

        config = bgsession.Configuration.background(IDENTIFIER, directory=sys.argv[3], host="inprocess")
        self.session = bgsession.Session(config, delegate=Hooks())
        # Give a wrongly released delivery every chance to run a hook now (it must not).
        _say("a hook ran before the handler was saved" if hook_ran.wait(NEGATIVE_WINDOW)
             else "session created; no hook ran yet")

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.handler = completion_handler
        _say("handler saved")


class _After(_Base):
    """A background launch whose did-finish-events hook calls the handler, then waits for "go" on stdin."""

    handler: appdelegate.CompletionHandler | None = None

    def hooks(self) -> bgsession.SessionDelegate:
        delegate = self

        class Hooks(bgsession.SessionDelegate):
            def did_finish_events_for_background_session(self, session: bgsession.Session) -> None:
                assert delegate.handler is not None
                delegate.handler()
                _say("handler called")
                sys.stdin.readline()  # work after the call: the process must wait for it
                _say("hook returning")
        return Hooks()

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        config = bgsession.Configuration.background(IDENTIFIER, directory=os.path.join(sys.argv[2], "after"),
                                                    host="inprocess")
        self.session = bgsession.Session(config, delegate=self.hooks())

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        self.handler = completion_handler


class _AfterAsync(_After):
    """As _After, with async def lifecycle methods and an async def hook on the app's event loop."""

    def hooks(self) -> bgsession.SessionDelegate:
        delegate = self

        class Hooks(bgsession.SessionDelegate):
            async def did_finish_events_for_background_session(self, session: bgsession.Session) -> None:
                import asyncio
                assert delegate.handler is not None
                delegate.handler()
                _say("handler called")
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                _say("hook returning")
        return Hooks()

    async def did_finish_launching(self, app: appdelegate.Application,  # type: ignore[override]
                                   launch_options: Mapping[str, Any]) -> None:
        _After.did_finish_launching(self, app, launch_options)

    async def will_terminate(self, app: appdelegate.Application) -> None:  # type: ignore[override]
        _say("will_terminate")


def _on_app_loop(app: appdelegate.Application) -> str:
    import asyncio
    loop = asyncio.get_running_loop()
    ok = loop is app.event_loop and threading.current_thread().name == "appdelegate-loop"
    return "on the app loop" if ok else f"NOT on the app loop ({threading.current_thread().name})"


class _AsyncOrder(appdelegate.AppDelegate):
    async def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        _say(f"did_finish_launching {_on_app_loop(app)}")

    async def run(self, app: appdelegate.Application) -> None:
        _say(f"run {_on_app_loop(app)}")

    async def will_terminate(self, app: appdelegate.Application) -> None:
        _say(f"will_terminate {_on_app_loop(app)}")


class _AsyncRaises(_Base):
    async def run(self, app: appdelegate.Application) -> None:
        raise ZeroDivisionError("run() fails on purpose")


_SCENARIOS: dict[str, type] = {
    "order": _Order, "twice": _Twice, "idle": _Idle, "silent": _Silent, "bgtask": _BackgroundTask,
    "blocked": _Blocked, "raises": _Raises, "expire": _Expire, "stuck": _Stuck, "held": _Held, "after": _After,
    "after_async": _AfterAsync, "async_order": _AsyncOrder, "async_raises": _AsyncRaises,
}

if __name__ == "__main__":
    sys.exit(appdelegate.main(_SCENARIOS[sys.argv[1]]))
