"""appdelegate — the app-lifecycle shim for bgsession (UIApplication and its delegate, for a Python process).

On iOS a background URL session is half of a pair: the other half is the app
lifecycle that relaunches the app when its transfers have news. This module is
that half, for any Python program run as a process::

    iOS (UIKit)                                          appdelegate
    UIApplicationMain(argc, argv, nil, @"AppDelegate")   sys.exit(appdelegate.main(App))
    application:didFinishLaunchingWithOptions:           App.did_finish_launching(app, launch_options)
    the main run loop, app in the foreground             App.run(app)      (optional; returning = the user quit)
    application:handleEventsForBackgroundURLSession:     App.handle_events_for_background_url_session(
        completionHandler:                                   app, identifier, completion_handler)
    applicationWillTerminate:                            App.will_terminate(app)      (optional)
    beginBackgroundTaskWithExpirationHandler:            app.begin_background_task(expiration_handler=fn)
    endBackgroundTask:                                   app.end_background_task(task_id)
    backgroundTimeRemaining                              app.background_time_remaining
    UIBackgroundTaskInvalid                              appdelegate.INVALID_BACKGROUND_TASK
    UIApplication.sharedApplication                      appdelegate.shared_application()

The shape of an app (``demo_photo_app.py`` is a complete one)::

    class App(appdelegate.AppDelegate):
        def did_finish_launching(self, app, launch_options):
            self.manager = PhotoManager()   # re-creates the background session and its hooks, every launch

        def handle_events_for_background_url_session(self, app, identifier, completion_handler):
            self.manager.saved_completion_handler = completion_handler   # its did-finish-events hook calls it

    if __name__ == "__main__":
        sys.exit(appdelegate.main(App))

**Launches.** A process started with ``BGSESSION_BACKGROUND_EVENTS=<identifier>``
in its environment is a *background launch* (the bgsession daemon, or whoever
plays the system, relaunched it because that session has events waiting).
``main`` then:

1. holds hook delivery for every bgsession session (``bgsession._delivery_gate``);
2. calls ``did_finish_launching(app, {"url_session": identifier})`` — the app
   re-creates its sessions there, every launch; they recover and resume, but no
   hook runs yet;
3. calls ``handle_events_for_background_url_session(app, identifier, handler)``
   — the app saves ``handler`` where its ``did_finish_events_for_background_session``
   hook will find it;
4. releases delivery: the waiting events arrive, then
   ``did_finish_events_for_background_session``, which calls the saved handler;
5. returns 0 once the handler has been called, the hook that called it has
   returned (work done there after the call is not cut short), and no
   background task is open.

So the saved handler is always in place before the hook that calls it can run
(the race AFNetworking users hit). If the handler is not called within
``handler_timeout`` seconds after step 4 (default 30 s, env
``BGSESSION_HANDLER_TIMEOUT``), ``main`` prints a one-line warning on stderr
naming the identifier and returns :data:`EXIT_COMPLETION_HANDLER_NOT_CALLED`
(iOS kills such apps). ``run`` is not called in a background launch.

A *normal launch* calls ``did_finish_launching(app, {})``, then ``run(app)`` on a
thread of its own (``main`` keeps the main thread for signals and the lifecycle),
then terminates: when ``run`` returns, or on SIGTERM/SIGINT, whichever comes first.

**Termination and background tasks.** Terminating waits while background tasks
are open, for at most ``background_time`` seconds (default 30 s, env
``BGSESSION_BACKGROUND_TIME``) — the seed's alternative to a background session:
ask for extra time at exit. When the time runs out (or on a second SIGTERM/SIGINT),
every open task's expiration handler runs on the main thread (it should save state
and call ``end_background_task``); then ``will_terminate(app)`` runs and ``main``
returns. In a background launch the app is in the background from the start: its
background time runs from the launch.

Signal handlers only record the signal; the lifecycle loop on the main thread acts.
Exit codes returned by ``main``:

* 0 — a normal end (``run`` returned; or a background launch whose handler was
  called), every background task ended;
* 128 + the signal number (143 for SIGTERM, 130 for SIGINT, the shell's
  convention) — ended by a signal, after the open background tasks ended or
  expired; with no task open the process ends at once;
* 1 — ``run`` raised (its traceback is on stderr);
* :data:`EXIT_COMPLETION_HANDLER_NOT_CALLED` (3) — a background launch that never
  called its completion handler;
* :data:`EXIT_BACKGROUND_TIME_EXPIRED` (4) — a background task was still open
  after its expiration handler ran (iOS would kill the app).

**asyncio.** Any lifecycle method may be ``async def``. ``main`` then runs an
asyncio event loop on a thread of its own (``app.event_loop``) and runs each
async method there, waiting for it (the main thread keeps signals and the
lifecycle); an async ``run`` is a task on that loop. A session created in an
async ``did_finish_launching`` is created on that loop, so its ``async def``
hooks run there. After ``will_terminate`` the loop's remaining tasks are
cancelled and it is closed.

An exception raised by ``did_finish_launching`` or ``handle_events…`` is not
caught: the process crashes with its traceback, as an iOS app would. ``main``
returns normally otherwise, so threads the app started should be daemon threads
(bgsession's are).

Standard library only (plus ``bgsession``); Python 3.9+.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Callable

import bgsession

__version__ = "0.1.0"

__all__ = [
    "BACKGROUND_TIME_ENV",
    "DEFAULT_BACKGROUND_TIME",
    "DEFAULT_HANDLER_TIMEOUT",
    "EXIT_BACKGROUND_TIME_EXPIRED",
    "EXIT_COMPLETION_HANDLER_NOT_CALLED",
    "EXIT_RUN_RAISED",
    "HANDLER_TIMEOUT_ENV",
    "INVALID_BACKGROUND_TASK",
    "LAUNCH_OPTIONS_URL_SESSION",
    "AppDelegate",
    "Application",
    "CompletionHandler",
    "main",
    "shared_application",
]

log = logging.getLogger("appdelegate")

#: Returned by ``begin_background_task`` when no task can start (the background time has expired).
INVALID_BACKGROUND_TASK = 0
#: Seconds a background launch has, after delivery was released, to call its completion handler.
DEFAULT_HANDLER_TIMEOUT = 30.0
#: Seconds open background tasks keep a terminating process alive.
DEFAULT_BACKGROUND_TIME = 30.0
#: Environment variables that override ``main``'s ``handler_timeout`` and ``background_time``.
HANDLER_TIMEOUT_ENV = "BGSESSION_HANDLER_TIMEOUT"
BACKGROUND_TIME_ENV = "BGSESSION_BACKGROUND_TIME"
#: Key of ``launch_options`` naming the session whose events caused a background launch
#: (``UIApplicationLaunchOptionsURLSessionKey``).
LAUNCH_OPTIONS_URL_SESSION = "url_session"
#: Exit code of a background launch that never called its completion handler.
EXIT_COMPLETION_HANDLER_NOT_CALLED = 3
#: Exit code when a background task was still open after its expiration handler ran.
EXIT_BACKGROUND_TIME_EXPIRED = 4
#: Exit code when ``run`` raised.
EXIT_RUN_RAISED = 1
#: Signals that ask the app to terminate (each present on this platform).
_TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT") if hasattr(signal, name))


# ============================================================================
# Completion handler
# ============================================================================


class CompletionHandler:
    """The completion handler given to ``handle_events_for_background_url_session``.

    Call it (no arguments) exactly once, normally from the
    ``did_finish_events_for_background_session`` hook, on any thread. A second
    call raises :class:`RuntimeError` and does nothing else.
    """

    __slots__ = ("_called", "_hook", "_identifier", "_lock", "_on_call")

    def __init__(self, identifier: str, on_call: Callable[[], None] | None = None) -> None:
        self._identifier = identifier
        self._on_call = on_call
        self._lock = threading.Lock()
        self._called = False
        self._hook: Any = None  # the bgsession hook that called it, if one did

    @property
    def identifier(self) -> str:
        """The background session whose events this handler acknowledges."""
        return self._identifier

    @property
    def called(self) -> bool:
        return self._called

    @property
    def done(self) -> bool:
        """Called, and the hook that called it (``did_finish_events_for_background_session``, say) has returned: the
        work the hook does after the call is part of handling the events, so the process waits for it too."""
        return self._called and (self._hook is None or self._hook.returned)

    def __call__(self) -> None:
        with self._lock:
            if self._called:
                raise RuntimeError(f"the completion handler for background session {self._identifier!r} was "
                                   "already called; call it exactly once")
            self._called = True
            self._hook = bgsession._running_hook()  # also inside an async def hook: a context variable
        if self._hook is not None and self._on_call is not None:
            self._hook.on_return(self._on_call)  # wake main once more when the hook has returned
        if self._on_call is not None:
            self._on_call()

    def __repr__(self) -> str:
        return f"<CompletionHandler {self._identifier!r} {'called' if self._called else 'not called'}>"


# ============================================================================
# Application and delegate
# ============================================================================


class _BackgroundTask:
    __slots__ = ("expiration_handler", "name", "task_id")

    def __init__(self, task_id: int, name: str | None, expiration_handler: Callable[[], None] | None) -> None:
        self.task_id = task_id
        self.name = name
        self.expiration_handler = expiration_handler

    def __str__(self) -> str:
        return f"background task {self.task_id}" + (f" ({self.name!r})" if self.name else "")


class Application:
    """The running app (``UIApplication``), passed to every delegate method. Created by :func:`main`."""

    def __init__(self, delegate: AppDelegate | None = None, *, argv: Sequence[str] = (),
                 background_identifier: str | None = None,
                 background_time: float = DEFAULT_BACKGROUND_TIME) -> None:
        self._delegate = delegate
        self._argv = list(argv)
        self._background_identifier = background_identifier
        self._background_time = float(background_time)
        self._lock = threading.Lock()
        self._tasks: dict[int, _BackgroundTask] = {}
        self._last_task_id = INVALID_BACKGROUND_TASK
        self._deadline: float | None = None  # time.monotonic() at which the background time runs out
        self._event_loop: Any = None  # set by main when the delegate has async def methods
        self._expired = False
        self._signals: list[int] = []  # appended by signal handlers, read by the lifecycle loop
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- public ---------------------------------------------------------------------------
    @property
    def delegate(self) -> AppDelegate | None:
        return self._delegate

    @property
    def argv(self) -> list[str]:
        """The command line given to :func:`main` (``sys.argv`` by default)."""
        return list(self._argv)

    @property
    def event_loop(self) -> Any:
        """The app's asyncio event loop (its own thread) when the delegate has ``async def`` lifecycle methods,
        else None. Sessions created in an async ``did_finish_launching`` run their async hooks on it."""
        return self._event_loop

    @property
    def is_background_launch(self) -> bool:
        """True when the process was launched to handle a background session's events."""
        return self._background_identifier is not None

    @property
    def background_identifier(self) -> str | None:
        """The session identifier of a background launch (``BGSESSION_BACKGROUND_EVENTS``), else None."""
        return self._background_identifier

    @property
    def background_time_remaining(self) -> float:
        """Seconds left for background tasks: ``inf`` while no termination is pending, 0 once expired."""
        with self._lock:
            if self._expired:
                return 0.0
            if self._deadline is None:
                return float("inf")
            return max(0.0, self._deadline - time.monotonic())

    def begin_background_task(self, expiration_handler: Callable[[], None] | None = None, *,
                              name: str | None = None) -> int:
        """Ask for time to finish work if the app is told to terminate; returns a task id.

        While the task is open, SIGTERM, SIGINT or the end of ``run`` do not end the
        process; it ends once every task is ended, or when the background time runs
        out — then *expiration_handler* runs on the main thread and should call
        :meth:`end_background_task`. Returns :data:`INVALID_BACKGROUND_TASK` once the
        background time has expired.
        """
        if expiration_handler is not None and not callable(expiration_handler):
            raise TypeError(f"expiration_handler must be callable or None, not {type(expiration_handler).__name__}")
        with self._lock:
            if self._expired:
                return INVALID_BACKGROUND_TASK
            self._last_task_id += 1
            task_id = self._last_task_id
            self._tasks[task_id] = _BackgroundTask(task_id, name, expiration_handler)
        return task_id

    def end_background_task(self, task_id: int) -> None:
        """End a task begun with :meth:`begin_background_task` (any thread; ending it twice is harmless)."""
        with self._lock:
            task = self._tasks.pop(task_id, None)
            issued = INVALID_BACKGROUND_TASK < task_id <= self._last_task_id
        if task is None:
            if not issued and task_id != INVALID_BACKGROUND_TASK:
                log.warning("end_background_task(%r): no such background task", task_id)
            return
        self._wake()

    # -- lifecycle plumbing (used by main) --------------------------------------------------
    def _open_tasks(self) -> list[_BackgroundTask]:
        with self._lock:
            return list(self._tasks.values())

    def _enter_background(self) -> None:
        """Termination is pending (or this is a background launch): the background time starts now."""
        with self._lock:
            if self._deadline is None:
                self._deadline = time.monotonic() + self._background_time

    def _seconds_to_deadline(self) -> float:
        with self._lock:
            assert self._deadline is not None
            return self._deadline - time.monotonic()

    def _expire(self) -> list[_BackgroundTask]:
        """The background time is over: run the expiration handlers; return the tasks still open."""
        with self._lock:
            self._expired = True
            tasks = list(self._tasks.values())
        for task in tasks:
            if task.expiration_handler is None:
                continue
            try:
                task.expiration_handler()
            except Exception:  # noqa: BLE001 - a user hook's failure is reported, never fatal
                sys.stderr.write(f"appdelegate: the expiration handler of {task} raised:\n")
                traceback.print_exc()
        left = self._open_tasks()
        for task in left:
            sys.stderr.write(f"appdelegate: {task} was not ended when the background time expired; "
                             "exiting anyway (iOS would kill the app)\n")
        return left

    def _wake(self) -> None:
        """Wake the lifecycle loop (any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):  # a wake-up is already pending, or the loop is gone
            self._wake_w.send(b"\0")

    def _wait(self, timeout: float | None) -> None:
        """Block the lifecycle loop until woken (thread, signal) or *timeout* seconds passed."""
        if timeout is not None and timeout <= 0:
            return
        with contextlib.suppress(InterruptedError):  # pragma: no cover - PEP 475 retries select
            select.select([self._wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def __repr__(self) -> str:
        kind = f"background launch for {self._background_identifier!r}" if self.is_background_launch else "launch"
        return f"<Application {kind}, {len(self._tasks)} background task(s)>"


class AppDelegate:
    """Override the methods your app needs (``UIApplicationDelegate``). ``main`` creates it with no arguments.

    Any of them may be ``async def``: they then run on the app's event loop (``app.event_loop``), one at a time."""

    def did_finish_launching(self, app: Application, launch_options: Mapping[str, Any]) -> Awaitable[None] | None:
        """Every launch: re-create your background sessions (with their session-level hooks) here.

        ``launch_options`` is empty for a normal launch and ``{"url_session": identifier}``
        for a background launch. Hooks do not run before this returns.
        """

    def handle_events_for_background_url_session(self, app: Application, identifier: str,
                                                 completion_handler: CompletionHandler) -> Awaitable[None] | None:
        """Background launch: save *completion_handler*; call it from ``did_finish_events_for_background_session``."""
        raise NotImplementedError(
            f"{type(self).__name__} was launched for the events of background session {identifier!r} but does "
            "not implement handle_events_for_background_url_session(app, identifier, completion_handler): save "
            "the handler there and call it from the session's did_finish_events_for_background_session hook")

    def run(self, app: Application) -> Awaitable[None] | None:
        """The foreground work of a normal launch (its own thread). Returning ends the app. Default: return."""

    def will_terminate(self, app: Application) -> Awaitable[None] | None:
        """The process is about to exit (not after SIGKILL, nor when a handler timeout kills it)."""


_shared: Application | None = None


def shared_application() -> Application | None:
    """The :class:`Application` of the running :func:`main`, or None outside it."""
    return _shared


# ============================================================================
# main
# ============================================================================


def _seconds_from_env(name: str, value: float, what: str) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        chosen: Any = value
    else:
        try:
            chosen = float(raw)
        except ValueError:
            sys.stderr.write(f"appdelegate: ignoring {name}={raw!r} (not a number of seconds); "
                             f"using {what}={value!r}\n")
            chosen = value
    if isinstance(chosen, bool) or not isinstance(chosen, (int, float)) or not chosen >= 0:
        raise ValueError(f"{what} must be a number of seconds >= 0, not {chosen!r}")
    return float(chosen)


class _Signals:
    """Install recording handlers for SIGTERM/SIGINT and a wake-up fd; restore on exit.

    Only the main thread may install signal handlers; elsewhere (a test calling
    ``main`` from a thread) signals keep their previous handling.
    """

    def __init__(self, app: Application) -> None:
        self.app = app
        self.previous: dict[int, Any] = {}
        self.previous_fd: int | None = None

    def _record(self, signum: int, frame: Any) -> None:
        self.app._signals.append(signum)  # only record: the lifecycle loop acts

    def __enter__(self) -> _Signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self.previous_fd = signal.set_wakeup_fd(self.app._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in _TERMINATION_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous_fd is None:
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self.previous_fd)


#: The delegate methods main calls; any of them may be ``async def``.
_LIFECYCLE = ("did_finish_launching", "handle_events_for_background_url_session", "run", "will_terminate")


class _EventLoop:
    """The app's asyncio event loop, on a thread of its own ("appdelegate-loop"), for a delegate with ``async def``
    lifecycle methods: main (on the main thread, which keeps signals and the lifecycle) runs each of them there and
    waits for it. Sessions created in an async ``did_finish_launching`` are created on this loop, so their async
    hooks run on it. Closed (pending tasks cancelled) after ``will_terminate``."""

    def __init__(self) -> None:
        import asyncio  # here: a synchronous app never loads asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="appdelegate-loop", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import asyncio
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Any) -> Any:
        """Run *coroutine* on the loop; returns its concurrent.futures.Future."""
        import asyncio
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        import asyncio

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):  # the app is ending; its tasks' errors are its own
            self.submit(cancel_the_rest()).result(DEFAULT_BACKGROUND_TIME)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEFAULT_BACKGROUND_TIME)
        if not self.thread.is_alive():
            self.loop.close()


def _is_async(fn: Any) -> bool:
    import inspect  # here: most apps never need it
    return inspect.iscoroutinefunction(fn)


def _has_async_lifecycle(delegate: AppDelegate) -> bool:
    return any(_is_async(getattr(delegate, name, None)) for name in _LIFECYCLE)


class _Launch:
    """One process launch, driven from the main thread."""

    def __init__(self, app: Application, delegate: AppDelegate, handler_timeout: float) -> None:
        self.app = app
        self.delegate = delegate
        self.handler_timeout = handler_timeout
        self.run_done = False
        self.run_raised = False
        self.events: _EventLoop | None = _EventLoop() if _has_async_lifecycle(delegate) else None
        app._event_loop = self.events.loop if self.events is not None else None

    def _call(self, name: str, *args: Any) -> None:
        """Call a lifecycle method; an ``async def`` one runs on the app's event loop while main waits."""
        result = getattr(self.delegate, name)(self.app, *args)
        if self.events is not None and hasattr(result, "__await__"):
            self.events.submit(result).result()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

    # -- normal launch ---------------------------------------------------------------------
    def foreground(self) -> int:
        app = self.app
        self._call("did_finish_launching", {})
        if not app._signals:  # a signal during launching: terminate without running
            if self.events is not None and _is_async(self.delegate.run):
                self.events.submit(self.delegate.run(app)).add_done_callback(self._run_ended)
            else:
                runner = threading.Thread(target=self._run_delegate, name="appdelegate-run", daemon=True)
                runner.start()
        while not self.run_done and not app._signals:
            app._wait(None)
        code = self.terminate()
        if self.run_raised and code == 0:
            code = EXIT_RUN_RAISED
        return code

    def _run_ended(self, future: Any) -> None:  # (on the loop's thread)
        """An async run() ended (on the loop): as _run_delegate's end."""
        if not future.cancelled() and future.exception() is not None:
            self.run_raised = True
            err = future.exception()
            sys.stderr.write("appdelegate: run() raised:\n")
            traceback.print_exception(type(err), err, err.__traceback__)
        self.run_done = True
        self.app._wake()

    def _run_delegate(self) -> None:
        try:
            self.delegate.run(self.app)
        except BaseException:  # noqa: BLE001 - run() failing is reported as exit code 1
            self.run_raised = True
            sys.stderr.write("appdelegate: run() raised:\n")
            traceback.print_exc()
        finally:
            self.run_done = True
            self.app._wake()

    # -- background launch -------------------------------------------------------------------
    def background(self) -> int:
        app = self.app
        identifier = app.background_identifier
        assert identifier is not None
        app._enter_background()
        handler = CompletionHandler(identifier, app._wake)
        # The handler's time limit runs from when the session delivered its backlog (bgsession tells
        # us); while it is delivering (an in-process host finishes its transfers first) it is paused.
        # If the app never re-creates that session, it runs from the release of delivery.
        backlog: dict[str, float | None] = {"deadline": None, "delivering": False}

        def on_backlog(session_identifier: str, state: str) -> None:
            if session_identifier != identifier:
                return
            if state == "delivering":
                backlog["delivering"] = True
            elif state == "delivered":
                backlog["delivering"] = False
                backlog["deadline"] = time.monotonic() + self.handler_timeout
            app._wake()

        bgsession._backlog_listeners.append(on_backlog)
        bgsession._delivery_gate.clear()
        try:
            self._call("did_finish_launching", {LAUNCH_OPTIONS_URL_SESSION: identifier})
            self._call("handle_events_for_background_url_session", identifier, handler)
        finally:
            bgsession._delivery_gate.set()
        released_deadline = time.monotonic() + self.handler_timeout
        try:
            return self._background_loop(app, identifier, handler, backlog, released_deadline)
        finally:
            bgsession._backlog_listeners.remove(on_backlog)

    def _background_loop(self, app: Application, identifier: str, handler: CompletionHandler,
                         backlog: dict[str, Any], released_deadline: float) -> int:
        expired = False
        while True:
            if app._signals:
                return self.terminate()
            open_tasks = app._open_tasks()
            if handler.done and not open_tasks:
                break
            waits = []
            if handler.called and not handler.done:  # the hook that called it still works: background time
                left = app._seconds_to_deadline()
                if left <= 0:
                    sys.stderr.write(f"appdelegate: background launch for session {identifier!r}: the hook that "
                                     "called the completion handler had not returned when the background time "
                                     f"expired; exiting (limit: {BACKGROUND_TIME_ENV})\n")
                    sys.stderr.flush()
                    return EXIT_BACKGROUND_TIME_EXPIRED
                waits.append(left)
            if not handler.called and not backlog["delivering"]:
                deadline = backlog["deadline"] if backlog["deadline"] is not None else released_deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    sys.stderr.write(
                        f"appdelegate: background launch for session {identifier!r}: the completion handler was "
                        f"not called within {self.handler_timeout:g} s after its events were delivered; exiting "
                        f"(iOS kills such apps; limit: {HANDLER_TIMEOUT_ENV})\n")
                    sys.stderr.flush()
                    return EXIT_COMPLETION_HANDLER_NOT_CALLED
                waits.append(left)
            if open_tasks and not expired:
                left = app._seconds_to_deadline()
                if left <= 0:
                    expired = True
                    if app._expire():
                        self._will_terminate()
                        return EXIT_BACKGROUND_TIME_EXPIRED
                    continue
                waits.append(left)
            app._wait(min(waits) if waits else None)
        self._will_terminate()
        return 0

    # -- termination ---------------------------------------------------------------------------
    def terminate(self) -> int:
        """Honour open background tasks (until ended, expired, or a further signal), then will_terminate."""
        app = self.app
        app._enter_background()
        signals_seen = len(app._signals)
        code = 128 + app._signals[0] if app._signals else 0
        while app._open_tasks():
            left = app._seconds_to_deadline()
            if left <= 0 or len(app._signals) > signals_seen:
                if app._expire():
                    code = EXIT_BACKGROUND_TIME_EXPIRED
                break
            app._wait(left)
        self._will_terminate()
        return code

    def _will_terminate(self) -> None:
        try:
            self._call("will_terminate")
        except Exception:  # noqa: BLE001 - a user hook's failure is reported, never fatal
            sys.stderr.write("appdelegate: will_terminate() raised:\n")
            traceback.print_exc()


def main(delegate_class: type[AppDelegate], *, argv: Sequence[str] | None = None,
         handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
         background_time: float = DEFAULT_BACKGROUND_TIME) -> int:
    """Run the app's lifecycle for this process; returns the exit code (``sys.exit(main(App))``).

    *delegate_class* is called with no arguments to make the delegate.
    ``BGSESSION_HANDLER_TIMEOUT`` and ``BGSESSION_BACKGROUND_TIME``, when set,
    override *handler_timeout* and *background_time* (the environment configures
    a deployment; the code gives the app's defaults).
    """
    global _shared
    handler_timeout = _seconds_from_env(HANDLER_TIMEOUT_ENV, handler_timeout, "handler_timeout")
    background_time = _seconds_from_env(BACKGROUND_TIME_ENV, background_time, "background_time")
    identifier = bgsession._background_launch_identifier()  # the rule the session itself uses
    delegate = delegate_class()
    app = Application(delegate, argv=sys.argv if argv is None else argv, background_identifier=identifier,
                      background_time=background_time)
    launch = _Launch(app, delegate, handler_timeout)
    previous = _shared
    _shared = app
    try:
        with _Signals(app):
            if app.is_background_launch:
                return launch.background()
            return launch.foreground()
    finally:
        launch.close()
        _shared = previous
        app._close()
