"""bgsession — background URL sessions for Python.

Downloads and uploads that outlive the process that started them: a port of iOS ``NSURLSession`` background sessions
and of AFNetworking's ``AFURLSessionManager`` pattern of *session-level* hooks, in one module you can copy into a
project. Standard library only, Python 3.9+.

The lesson this module is built around: a per-task completion block dies with the process that created it. What
survives is the session's identifier, a durable journal of its tasks, and session-level hooks that the app registers
again every time it re-creates the session with the same identifier. When the app comes back (started by the user, or
relaunched for background events) it receives every event that waited for it, then
``did_finish_events_for_background_session``.

Guarantees (README, "Guarantees"; ARCHITECTURE.md says how each is kept): nothing is lost, never a spliced file;
exactly-once hook completion; per-task order; validated resume; one live session per identifier; private files, and
no secret at rest. ARCHITECTURE.md's seams say how hostile servers, damaged state and other local users are met.

Sections, in dependency order (each uses only what is above it; ARCHITECTURE.md draws the seams between them):

 1. Errors         -- one root, leaf classes, ``ErrorCode``.
 2. Model          -- task phases and their transition table; events and attempt
                      outcomes as classes; ``TaskInfo``, the value that crosses every boundary.
 3. Policies       -- ``Retry`` (the whole "try again?" decision, waiting for connectivity
                      included), which queued task starts next, the session's bandwidth limit
                      in force, the clock.
 4. Values         -- headers, ``Request``, ``Response``, credentials, proxies, ``TLS``,
                      ``Configuration``.
 5. HTTP decisions -- pure functions: the range plan, validators, auth headers, the proxy of a
                      URL and ``next_step``, the response sequence both transfer kinds share.
 6. Store          -- the session directory: lock, journal writer, reducer, snapshot,
                      compaction, reserve, recovery, resume data. Knows nothing of HTTP or apps.
 7. Transfer       -- connections, authentication, download and upload attempts that
                      return outcomes and never take the engine's lock.
 8. Engine         -- the scheduler (the priority queue over all hosts, the caps, timers,
                      transfer threads), the planner (priority, earliest begin date, bandwidth
                      limits), the outbox (the attached app), and the engine that owns the tasks.
 9. Interface      -- the app<->engine protocol, declared once: a Protocol and one table
                      of operations that every host uses.
10. Session        -- ``move_to``, ``multipart_body``; ``SessionDelegate``, ``Task``, ``Session``,
                      ``SessionManager``; async def hooks on the session's event loop.
11. Wire           -- JSON-lines frames and the codecs of the daemon socket.
12. Daemon         -- the daemon host: server, relauncher, client, start-up.
13. CLI            -- ``python -m bgsession`` / the ``bgsession`` command."""

from __future__ import annotations

# Imports: what every session needs is imported here; a module only some paths need (argparse for the CLI,
# subprocess and signal for the daemon, hashlib for digests and pins, mimetypes, filecmp, tempfile) is imported in
# the function that needs it, when it needs it, so that `import bgsession` stays cheap (bench/startup.py measures
# it; bench/README.md, "Start-up", says where the rest of its time goes). Python caches a module after its first
# import, so a repeated local import costs a dictionary lookup.
import base64
import collections
import contextlib
import contextvars
import dataclasses
import enum
import errno
import functools
import heapq
import io
import itertools
import json
import logging
import math
import os
import random
import re
import socket
import stat
import sys
import threading
import time
import types
from collections.abc import Awaitable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar, Union, cast

if TYPE_CHECKING:  # names only annotations use
    import argparse
    import datetime
    import http.client
    import ssl
    import subprocess

# Platform differences are detected once, here.
try:  # POSIX advisory locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:  # Windows byte-range locks
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

__version__ = "0.5.0"

__all__ = [
    "TLS", "AuthChallenge", "AuthChallengeDisposition", "BGSessionError", "Configuration", "Credential",
    "CredentialPersistence", "DelayedRequestDisposition", "DownloadTask", "ErrorCode", "InvalidArgumentError",
    "Journal", "JournalError", "LoginService", "ProtectionSpace", "Request", "Response", "Retry", "Session",
    "SessionDelegate", "SessionInvalidatedError", "SessionManager", "Task", "TaskState", "TransferError", "UploadTask",
    "default_directory", "move_to", "multipart_body", "sanitize_filename",
]

log = logging.getLogger("bgsession")

#: Environment variable that marks a background relaunch (value: the session identifier).
BACKGROUND_EVENTS_ENV = "BGSESSION_BACKGROUND_EVENTS"
#: Journal and snapshot format this module reads (also the daemon protocol's version). Each record is written in the
#: oldest format that holds it (the store section says which), so that an older bgsession reads a journal that uses
#: nothing newer, and refuses one that does.
JOURNAL_VERSION = 4


# ============================================================================
# 1. Errors
# ============================================================================


class ErrorCode(enum.IntEnum):
    """Why a task failed. Values follow ``NSURLError`` where one exists."""
    UNKNOWN = -1
    CANCELLED = -999
    BAD_URL = -1000
    TIMED_OUT = -1001
    UNSUPPORTED_URL = -1002
    CANNOT_FIND_HOST = -1003
    CANNOT_CONNECT_TO_HOST = -1004
    NETWORK_CONNECTION_LOST = -1005
    DNS_LOOKUP_FAILED = -1006
    HTTP_TOO_MANY_REDIRECTS = -1007
    NOT_CONNECTED_TO_INTERNET = -1009
    BAD_SERVER_RESPONSE = -1011
    USER_CANCELLED_AUTHENTICATION = -1012
    USER_AUTHENTICATION_REQUIRED = -1013
    SECURE_CONNECTION_FAILED = -1200
    SERVER_CERTIFICATE_UNTRUSTED = -1202
    FILE_DOES_NOT_EXIST = -1100
    BACKGROUND_SESSION_IN_USE = -996
    BACKGROUND_SESSION_WAS_DISCONNECTED = -997
    CANNOT_CREATE_FILE = -3000
    CANNOT_OPEN_FILE = -3001
    CANNOT_WRITE_TO_FILE = -3003
    CANNOT_REMOVE_FILE = -3004
    CANNOT_MOVE_FILE = -3005
    CANNOT_RESUME = -3100
    INTEGRITY_MISMATCH = -3101
    SOURCE_FILE_CHANGED = -3102


class BGSessionError(Exception):
    """Root of every exception this module raises."""


class InvalidArgumentError(BGSessionError, ValueError):
    """An argument was rejected before anything was done with it."""


class SessionInvalidatedError(BGSessionError, RuntimeError):
    """The session was invalidated (or closed) and cannot take new work."""


class JournalError(BGSessionError, OSError):
    """The session's on-disk state cannot be read or written. ``.path`` names the file; a corrupt file is kept aside
    (renamed with a ``.corrupt-<time>`` suffix) rather than deleted."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class TransferError(BGSessionError):
    """A task ended without a result, or a session could not be used. ``.code`` is an :class:`ErrorCode`;
    ``.resume_data`` (bytes or None) lets a failed download continue with ``Session.download_task_with_resume_data``."""

    def __init__(self, code: ErrorCode, message: str, *, resume_data: bytes | None = None,
                 url: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.resume_data, self.url = ErrorCode(code), message, resume_data, url

    def __str__(self) -> str:
        return f"{self.message} ({self.code.name})"

    def __repr__(self) -> str:
        return f"TransferError({self.code.name}, {self.message!r})"

    def _to_record(self) -> dict[str, Any]:
        return {"code": int(self.code), "message": self.message, "url": self.url,
                "resume": self.resume_data is not None}

    @classmethod
    def _from_record(cls, rec: Mapping[str, Any]) -> TransferError:
        try:
            code = ErrorCode(rec.get("code", -1))
        except ValueError:
            code = ErrorCode.UNKNOWN
        return cls(code, str(rec.get("message", "")), url=rec.get("url"))


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message)


# ============================================================================
# 2. Model: phases, events, attempt outcomes, TaskInfo
# ============================================================================


class TaskState(enum.IntEnum):
    """The public state of a task, as ``NSURLSessionTaskState``."""
    RUNNING = 0
    SUSPENDED = 1
    CANCELING = 2
    COMPLETED = 3


class Phase(str, enum.Enum):
    """Internal lifecycle of a task. Only :data:`_TRANSITIONS` moves between them."""
    SUSPENDED = "suspended"  # created, or suspended by the app
    QUEUED = "queued"  # resumed, waiting for a transfer slot
    SCHEDULED = "scheduled"  # resumed before its earliest begin date: waits for it
    TRANSFERRING = "transferring"
    WAITING_RETRY = "waiting_retry"
    CANCELING = "canceling"  # cancel asked while a transfer runs
    DELIVERING = "finished_awaiting_delivery"  # outcome journaled; hooks pending
    ACKNOWLEDGED = "acknowledged"  # every hook returned; terminal


P = Phase
#: Transition table: phase -> {event: next phase}. Terminal phases map to {}. The events are
#: the journal's phase records (see the Store); "ack" of a task's last event ends it.
_TRANSITIONS: dict[Phase, dict[str, Phase]] = {
    P.SUSPENDED: {"resume": P.QUEUED, "cancel": P.DELIVERING, "fail": P.DELIVERING},
    P.QUEUED: {"start": P.TRANSFERRING, "schedule": P.SCHEDULED, "suspend": P.SUSPENDED, "cancel": P.DELIVERING,
               "fail": P.DELIVERING},
    P.SCHEDULED: {"due": P.QUEUED, "suspend": P.SUSPENDED, "cancel": P.DELIVERING, "fail": P.DELIVERING},
    P.TRANSFERRING: {"suspend": P.SUSPENDED, "cancel": P.CANCELING, "backoff": P.WAITING_RETRY,
                     "requeue": P.QUEUED, "finish": P.DELIVERING, "fail": P.DELIVERING},
    P.WAITING_RETRY: {"due": P.QUEUED, "suspend": P.SUSPENDED, "cancel": P.DELIVERING,
                      "fail": P.DELIVERING},
    P.CANCELING: {"finish": P.DELIVERING, "fail": P.DELIVERING},
    P.DELIVERING: {"ack": P.ACKNOWLEDGED},
    P.ACKNOWLEDGED: {},
}
del P

#: Phases in which a task counts as RUNNING for the public state (a scheduled task is resumed: on iOS too a task
#: whose earliestBeginDate is ahead is running).
_ACTIVE_PHASES = frozenset({Phase.QUEUED, Phase.SCHEDULED, Phase.TRANSFERRING, Phase.WAITING_RETRY})
#: The public state of each phase.
_PUBLIC_STATE = {**dict.fromkeys(_ACTIVE_PHASES, TaskState.RUNNING), Phase.SUSPENDED: TaskState.SUSPENDED,
                 Phase.CANCELING: TaskState.CANCELING, Phase.DELIVERING: TaskState.COMPLETED,
                 Phase.ACKNOWLEDGED: TaskState.COMPLETED}


class IllegalTransition(BGSessionError, RuntimeError):
    """A state change that the transition table does not allow; nothing changed."""

    def __init__(self, task_id: int, phase: Phase, event: str) -> None:
        super().__init__(f"task {task_id}: event {event!r} is not allowed in phase {phase.value!r}")
        self.task_id, self.phase, self.event = task_id, phase, event


def next_phase(task_id: int, phase: Phase, event: str) -> Phase:
    """Return the phase after *event*, or raise :class:`IllegalTransition`."""
    try:
        return _TRANSITIONS[phase][event]
    except KeyError:
        raise IllegalTransition(task_id, phase, event) from None


#: A task's priority unless the app sets one: the middle of the iOS scale, 0.0 (lowest) to 1.0 (highest), where
#: NSURLSessionTaskPriorityLow is 0.25, ...Default 0.5 and ...High 0.75.
DEFAULT_PRIORITY = 0.5


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A task's state as it crosses a boundary (engine -> session, daemon -> app): a value. ``request``, ``response``
    and ``error`` are in their journal form (plain JSON, no secret header); ``Task`` turns them into ``Request``,
    ``Response`` and ``TransferError``. ``events``: the durable events the task still owes the app, in order."""

    id: int
    kind: str  # "download" or "upload"
    description: str | None
    phase: Phase
    request: Mapping[str, Any]
    current_url: str
    response: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None
    received: int = 0
    expected: int = -1  # -1: unknown
    sent: int = 0
    expected_send: int = -1
    rate: float = 0.0  # bytes per second while transferring (status display)
    events: tuple[str, ...] = ()
    body_path: str | None = None  # an upload's response body, until its completion is acknowledged
    priority: float = DEFAULT_PRIORITY  # see Task.priority
    begin: float | None = None  # the earliest begin date (POSIX time), see Task.earliest_begin_date
    limit: int | None = None  # bytes per second, see Task.max_bytes_per_second
    waiting: bool = False  # waiting for connectivity: no response arrives (task_is_waiting_for_connectivity)
    last_error: Mapping[str, Any] | None = None  # why the last attempt failed (the task goes on), journal form
    next_retry: float | None = None  # wall-clock time of the next attempt, while it waits for one

    @property
    def state(self) -> TaskState:
        return _PUBLIC_STATE[self.phase]

    def to_wire(self) -> dict[str, Any]:
        return {**self.__dict__, "phase": self.phase.value}  # shallow: its mappings are plain JSON already

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> TaskInfo:
        try:
            return cls(**{**wire, "phase": Phase(wire["phase"]), "events": tuple(wire.get("events", ()))})
        except TypeError:  # a newer daemon sends fields this module does not know: leave them
            known = {k: v for k, v in wire.items() if k in cls.__dataclass_fields__}
            return cls(**{**known, "phase": Phase(wire["phase"]), "events": tuple(wire.get("events", ()))})


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """Bytes received (downloads) or sent (uploads) since the last event. Not journaled."""
    task_id: int
    bytes_written: int
    total_written: int
    total_expected: int  # -1: unknown
    upload: bool = False


@dataclasses.dataclass(frozen=True)
class FinishedEvent:
    """A download's file is complete and waits at ``location`` for the finish hook (journaled)."""
    task_id: int
    location: str
    info: TaskInfo | None = None  # the task's state when posted: hooks read it without a round trip


@dataclasses.dataclass(frozen=True)
class CompletedEvent:
    """A task ended; ``error`` is None for a response, whatever its status (journaled)."""
    task_id: int
    error: TransferError | None
    info: TaskInfo | None = None


@dataclasses.dataclass(frozen=True)
class WaitingEvent:
    """A task began waiting for connectivity: no response arrives (once per waiting period; not journaled)."""
    task_id: int
    info: TaskInfo | None = None


@dataclasses.dataclass(frozen=True)
class BacklogEnd:
    """Marks the end of the events that waited when the app attached."""
    had_events: bool


# Attempt outcomes: what one download or upload attempt ended with. The transfer section
# returns them; the engine's settle() turns each into a journaled transition.


@dataclasses.dataclass(frozen=True)
class _Finished:
    """The attempt produced a file in tmp/ (a download, or an upload's response body)."""
    file: str
    response: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class _Failed:
    """The task ends with *error*; *keep_partial*: a download's partial data may serve resume data."""
    error: TransferError
    keep_partial: bool = True


@dataclasses.dataclass(frozen=True)
class _Interrupted:
    """A transient failure: the Retry policy decides whether and when the task tries again. *offline*: no response
    came at all, the server (or the proxy, or the network) could not be reached: a task waits for connectivity."""
    code: ErrorCode
    message: str
    retry_after: str | None = None
    progressed: bool = False
    offline: bool = False


@dataclasses.dataclass(frozen=True)
class _Stopped:
    """The app suspended or cancelled the task, or the session closed, while it ran."""
    reason: str  # "suspend", "cancel" or "close"


_Outcome = Union[_Finished, _Failed, _Interrupted, _Stopped]


# ============================================================================
# 3. Policies: Retry, waiting for connectivity, limits, the clock
# ============================================================================

#: Statuses retried by default (with ``Retry-After`` honoured). iOS does not retry
#: on status; a Python user expects it (urllib3 does), so bgsession does.
DEFAULT_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_BACKOFF_FACTOR = 0.5
DEFAULT_BACKOFF_MAX = 60.0
DEFAULT_BACKOFF_JITTER = 0.25
DEFAULT_RETRY_AFTER_MAX = 3600.0
DEFAULT_RETRY_TOTAL = 10
#: Longest pause between two attempts of a task that waits for connectivity. Waiting consumes no ``Retry.total``;
#: ``timeout_for_resource`` (7 days by default, as on iOS) is its only limit.
CONNECTIVITY_BACKOFF_MAX = 30.0
#: Redirects followed before a task fails with HTTP_TOO_MANY_REDIRECTS.
MAX_REDIRECTS = 16
#: Upper bounds for configuration values; larger ones are rejected as mistakes.
MAX_TIMEOUT_FOR_REQUEST = 24 * 3600.0
MAX_TIMEOUT_FOR_RESOURCE = 366 * 24 * 3600.0
MAX_CONNECTIONS_PER_HOST = 64
#: Transfers (and transfer threads) of a session at once, over all hosts, unless configured; and the most allowed.
DEFAULT_MAX_CONCURRENT_TRANSFERS = 16
MAX_CONCURRENT_TRANSFERS = 256
#: Connections one download may use at once (``Configuration.max_connections_per_task``, aria2's ``-x``): the most
#: allowed (aria2's too).
MAX_CONNECTIONS_PER_TASK = 16


#: OS errors that mean "out of a resource that frees itself" (descriptors, buffers): an attempt that meets one is
#: retried by the Retry policy like a lost connection, never failed for good.
EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _DeadlinePassed(socket.timeout):
    """A phase of an attempt outlived its deadline (see ``_BoundedHTTP``); the message says which."""


def _check_seconds(name: str, value: Any, *, allow_zero: bool = False,
                   maximum: float = MAX_TIMEOUT_FOR_RESOURCE) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{name} must be a number of seconds, not {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise _invalid(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, not {value!r}")
    if value > maximum:
        raise _invalid(f"{name} = {value!r} s is more than the maximum of {maximum:g} s; "
                       "this is almost certainly a mistake (milliseconds instead of seconds?)")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Retry:
    """Immutable retry policy; :meth:`increment` returns a new one. It owns the whole "try again?" decision: which
    statuses (:meth:`retries_status`), which transport errors (:meth:`classify`: all of them, each with the code it
    reports), how many redirects (``redirect``), and how long to wait (:meth:`after_failure`).

    ``attempts`` counts consecutive failed attempts *without progress*: an attempt that received (or sent) at least
    one byte resets it to 1, so a long download over a flaky link keeps going while a dead server gives up.

    Backoff before attempt *n+1* after *n* failures::

        delay = min(backoff_max, backoff_factor * 2 ** (n - 1)) * (1 - backoff_jitter * U[0, 1))

    With the defaults (factor 0.5, max 60 s, jitter 0.25) the delays before jitter are 0.5, 1, 2, 4, 8, 16, 32, 60, 60
    ... seconds, and jitter only shortens them (by up to a quarter), so the cap is never exceeded. A ``Retry-After``
    header (seconds or HTTP date) replaces a shorter delay and is clamped to ``retry_after_max``. ``total`` (None: no
    limit but ``timeout_for_resource``) bounds ``attempts``."""

    total: int | None = DEFAULT_RETRY_TOTAL
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR
    backoff_max: float = DEFAULT_BACKOFF_MAX
    backoff_jitter: float = DEFAULT_BACKOFF_JITTER
    status_forcelist: frozenset[int] = DEFAULT_RETRY_STATUSES
    respect_retry_after: bool = True
    retry_after_max: float = DEFAULT_RETRY_AFTER_MAX
    attempts: int = 0
    redirect: int = MAX_REDIRECTS

    def __post_init__(self) -> None:
        if self.total is not None and (isinstance(self.total, bool) or not isinstance(self.total, int)
                                       or self.total < 0):
            raise _invalid(f"Retry.total must be None or an int >= 0, not {self.total!r}")
        if isinstance(self.redirect, bool) or not isinstance(self.redirect, int) or self.redirect < 0:
            raise _invalid(f"Retry.redirect must be an int >= 0, not {self.redirect!r}")
        for name in ("backoff_factor", "backoff_max", "retry_after_max"):
            _check_seconds(f"Retry.{name}", getattr(self, name), allow_zero=True, maximum=MAX_TIMEOUT_FOR_RESOURCE)
        if not 0.0 <= self.backoff_jitter <= 1.0:
            raise _invalid(f"Retry.backoff_jitter must be within [0, 1], not {self.backoff_jitter!r}")
        object.__setattr__(self, "status_forcelist", frozenset(self.status_forcelist))

    def increment(self, *, progressed: bool = False) -> Retry:
        """The policy after one more failed attempt (reset to 1 if it made progress)."""
        return dataclasses.replace(self, attempts=1 if progressed else self.attempts + 1)

    def is_exhausted(self) -> bool:
        return self.total is not None and self.attempts > self.total

    def is_retryable_status(self, status: int) -> bool:
        return status in self.status_forcelist

    def retries_status(self, status: int) -> bool:
        """Retry on this response? No once the budget is spent: the last one is the task's result."""
        return self.is_retryable_status(status) and not self.increment().is_exhausted()

    def allows_redirect(self, followed: int) -> bool:
        """May one more redirect be followed after *followed* of them?"""
        return followed < self.redirect

    @staticmethod
    def classify(err: BaseException) -> tuple[ErrorCode, str]:
        """What a transport failure means: the code it reports. Every one is retried (the
        server may not have seen the request, or the body stopped: resume with Range)."""
        if isinstance(err, socket.gaierror):
            return ErrorCode.CANNOT_FIND_HOST, f"cannot resolve host: {err}"
        if isinstance(err, _DeadlinePassed):
            return ErrorCode.TIMED_OUT, str(err)
        if isinstance(err, (socket.timeout, TimeoutError)):
            return ErrorCode.TIMED_OUT, "no data within timeout_for_request"
        if isinstance(err, OSError) and err.errno in EXHAUSTED_ERRNOS:
            return ErrorCode.CANNOT_CONNECT_TO_HOST, f"out of a system resource, will retry: {err.strerror or err}"
        if isinstance(err, ConnectionRefusedError):
            return ErrorCode.CANNOT_CONNECT_TO_HOST, f"connection refused: {err}"
        import http.client
        if isinstance(err, http.client.IncompleteRead):
            return (ErrorCode.NETWORK_CONNECTION_LOST,
                    f"connection closed after {len(err.partial)} bytes, {err.expected} more expected")
        if isinstance(err, http.client.HTTPException) and not isinstance(err, http.client.RemoteDisconnected):
            return ErrorCode.BAD_SERVER_RESPONSE, f"bad HTTP response: {type(err).__name__}: {err}"[:300]
        return ErrorCode.NETWORK_CONNECTION_LOST, f"connection lost: {type(err).__name__}: {err}"[:300]

    def after_failure(self, *, progressed: bool, retry_after: str | None = None, now: float | None = None,
                      rng: Callable[[], float] = random.random) -> tuple[Retry, float] | None:
        """After a failed attempt: (the policy for the next one, seconds to wait), or None: give up."""
        retry = self.increment(progressed=progressed)
        if retry.is_exhausted():
            return None
        return retry, retry.delay(retry_after, rng, now)

    def backoff(self, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the next attempt (0 before the first retry)."""
        if self.attempts <= 0:
            return 0.0
        base = min(self.backoff_max, self.backoff_factor * (2.0 ** (self.attempts - 1)))
        return base * (1.0 - self.backoff_jitter * rng())

    def parse_retry_after(self, value: str | None, now: float | None = None) -> float | None:
        """Seconds asked by a ``Retry-After`` value, clamped to [0, retry_after_max]; None if absent/invalid."""
        if not value or not self.respect_retry_after:
            return None
        value = value.strip()
        if value.isdigit():
            seconds = float(value)
        else:
            import email.utils
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, min(self.retry_after_max, seconds))

    def delay(self, retry_after: str | None = None, rng: Callable[[], float] = random.random,
              now: float | None = None) -> float:
        """The wait before the next attempt: backoff, or ``Retry-After`` if that is longer."""
        wait = self.backoff(rng)
        asked = self.parse_retry_after(retry_after, now)
        return wait if asked is None else max(wait, asked)

    def connectivity_delay(self, waits: int, rng: Callable[[], float] = random.random) -> float:
        """The pause before attempt *waits* + 1 of a task waiting for connectivity: the same doubling and jitter,
        capped at CONNECTIVITY_BACKOFF_MAX (and at ``backoff_max`` if lower). With the defaults: 0.5, 1, 2, 4, 8,
        16, 30, 30 ... seconds. It never runs out: only ``timeout_for_resource`` ends the wait."""
        base = min(self.backoff_max, CONNECTIVITY_BACKOFF_MAX,
                   self.backoff_factor * (2.0 ** min(max(waits, 1) - 1, 62)))
        return base * (1.0 - self.backoff_jitter * rng())


#: Resolver answers that say "this name does not exist" (an answer), as opposed to "no resolver answered".
_NAME_DOES_NOT_EXIST = frozenset(getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA")
                                 if hasattr(socket, name))
#: Errors of connect() that mean this machine has no route at all.
_NETWORK_DOWN = frozenset({errno.ENETUNREACH, errno.ENETDOWN})


def connect_failure(err: OSError, where: str) -> _Interrupted:
    """What a failure to *reach* a server or a proxy means (pure). Each is *offline*: no response came, so the task
    waits for connectivity (when the configuration says so). *where*: what was tried, a proxy's without its
    credential. A name the resolver says does not exist is CANNOT_FIND_HOST; a lookup that got no answer (the usual
    face of "no network") DNS_LOOKUP_FAILED. Resolvers of captive portals, VPN-only names and some offline machines
    answer "does not exist" too, so both wait unless ``fails_on_unknown_host`` asks to fail fast."""
    if isinstance(err, socket.gaierror):
        if err.errno in _NAME_DOES_NOT_EXIST:
            return _Interrupted(ErrorCode.CANNOT_FIND_HOST, f"{where}: no such host name ({err.strerror})",
                                offline=True)
        return _Interrupted(ErrorCode.DNS_LOOKUP_FAILED, f"{where}: name lookup failed ({err.strerror})",
                            offline=True)
    if isinstance(err, (socket.timeout, TimeoutError)):
        return _Interrupted(ErrorCode.TIMED_OUT, f"{where}: no connection within timeout_for_request", offline=True)
    if err.errno in _NETWORK_DOWN:
        return _Interrupted(ErrorCode.NOT_CONNECTED_TO_INTERNET, f"{where}: network unreachable ({err.strerror})",
                            offline=True)
    why = "connection refused" if isinstance(err, ConnectionRefusedError) else (err.strerror or str(err))
    return _Interrupted(ErrorCode.CANNOT_CONNECT_TO_HOST, f"{where}: {why}", offline=True)


@dataclasses.dataclass(frozen=True)
class _RetryPlan:
    """After an interrupted attempt (:func:`plan_retry`): try again after *delay* seconds with *retry*, or give up
    (*delay* None, *why*). *waiting*: attempts that found no connectivity since the last response (0: not
    waiting); only a response ends a waiting period."""
    delay: float | None
    retry: Retry
    waiting: int = 0
    why: str = ""


def plan_retry(retry: Retry, outcome: _Interrupted, waiting: int, *, waits_for_connectivity: bool,
               fails_on_unknown_host: bool, now: float | None = None,
               rng: Callable[[], float] = random.random) -> _RetryPlan:
    """Whether and when an interrupted task tries again (pure). Offline, with ``waits_for_connectivity``: wait with
    :meth:`Retry.connectivity_delay`, consuming nothing of ``Retry.total``; a host name that does not exist fails at
    once with ``fails_on_unknown_host``. Anything else (the server answered badly, a body was cut): ``Retry``."""
    if outcome.offline and fails_on_unknown_host and outcome.code is ErrorCode.CANNOT_FIND_HOST:
        return _RetryPlan(None, retry, why="fails_on_unknown_host")
    if outcome.offline and waits_for_connectivity:
        return _RetryPlan(retry.connectivity_delay(waiting + 1, rng), retry, waiting + 1)
    decision = retry.after_failure(progressed=outcome.progressed, retry_after=outcome.retry_after, now=now, rng=rng)
    if decision is None:
        return _RetryPlan(None, retry, why="retries exhausted")
    return _RetryPlan(decision[1], decision[0], waiting)


@dataclasses.dataclass(frozen=True, order=True)
class _Queued:
    """A queued task as the scheduling decision sees it, ordered by ``rank``: the higher priority first, then the
    first in (``seq`` counts arrivals in the queue; a relaunch queues tasks again in the order they were created)."""
    rank: tuple[float, int]
    task_id: int = dataclasses.field(compare=False)
    origin: Any = dataclasses.field(compare=False)

    @classmethod
    def of(cls, task_id: int, origin: Any, priority: float, seq: int) -> _Queued:
        return cls((-priority, seq), task_id, origin)


def next_to_start(queued: Iterable[_Queued], active: Mapping[Any, int], *, running: int, max_concurrent: int,
                  per_host: int) -> _Queued | None:
    """Which queued task starts next (pure): none while ``running`` transfers fill ``max_concurrent``; else the
    best-ranked one -- highest priority, then first in -- whose origin runs fewer than ``per_host`` transfers.

    It only fills a free slot: a running transfer is never stopped for a higher-priority one (as on iOS; BITS
    preempts, but a preempted HTTP download pays a new request and a Range resume, and an upload starts over)."""
    if running >= max_concurrent:
        return None
    return min((q for q in queued if active.get(q.origin, 0) < per_host), default=None)


def extra_connections(wanted: int, *, running: int, max_concurrent: int, origin_running: int, per_host: int,
                      waiting: bool) -> int:
    """How many more connections a running split download may open now (pure). None while a queued task could take a
    free slot (*waiting*): a segment never takes a slot from a task that waits for one, and never preempts a
    transfer. Else as many of *wanted* as both caps leave free: the session's (*running* of *max_concurrent*) and its
    origin's (*origin_running* of *per_host*). Each connection granted counts as a transfer against both caps until
    it is given back (when its segments are done)."""
    if waiting:
        return 0
    return max(0, min(wanted, max_concurrent - running, per_host - origin_running))


def session_rate(configured: int | None, override: tuple[int | None, int | None] | None) -> int | None:
    """The session's bandwidth limit in force (pure). *configured*: ``Configuration.max_bytes_per_second`` of the
    app that opened the session last; *override*: a limit set while the session ran (``session.max_bytes_per_second
    = ...``, ``bgsession limit RATE``) and the configured limit it replaced. The newer decision wins: the override
    holds -- across relaunches and daemon restarts -- until an app configures a limit other than the one it
    replaced."""
    if override is not None and override[1] == configured:
        return override[0]
    return configured


class _Clock:
    """Time source for the engine; tests substitute one that does not sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)


# ============================================================================
# 4. Values: headers, requests, responses, credentials, proxies, TLS, configuration
# ============================================================================

#: Identifier syntax: one path component, no dots-only names.
IDENTIFIER_RE = re.compile(r"\A[A-Za-z0-9._-]{1,200}\Z")
#: Headers whose values never reach the journal or any file: requests send them from memory only (the app's
#: process, or the daemon's), responses are stored without them. ``secret_headers`` (Configuration, Request) adds more.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "set-cookie2"})
_TOKEN_RE = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CTL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Printable ASCII: what an IRI keeps as it is when it becomes a URI (everything else is percent-encoded).
_URI_SAFE = "".join(map(chr, range(0x21, 0x7F)))
#: Bounds on what an app hands over (the journal's records must stay well under its line limit).
MAX_URL_BYTES = 64 << 10
MAX_HEADER_BYTES = 1 << 20
MAX_DESCRIPTION_BYTES = 1 << 20


class CredentialPersistence(enum.Enum):
    """How long a credential is kept. Never on disk: ``FOR_SESSION`` is memory only."""
    NONE = "none"
    FOR_SESSION = "for_session"


@dataclasses.dataclass(frozen=True)
class Credential:
    """User and password for Basic or Digest authentication (repr hides the password)."""

    user: str
    password: str = dataclasses.field(repr=False)
    persistence: CredentialPersistence = CredentialPersistence.FOR_SESSION

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or not isinstance(self.password, str):
            raise _invalid("Credential user and password must be str")
        if ":" in self.user:
            raise _invalid("a Basic-auth user name cannot contain ':'")
        if not isinstance(self.persistence, CredentialPersistence):
            raise _invalid(f"persistence must be a CredentialPersistence, not {self.persistence!r}")


def _iri_to_uri(iri: str) -> str:
    """An IRI as the URI that goes on the wire (RFC 3987, 3.1): the host IDNA-encoded, every other non-ASCII character
    percent-encoded as UTF-8. ASCII comes back unchanged (an existing ``%xx`` stays as it is)."""
    import urllib.parse
    if iri.isascii():
        return iri
    parts = urllib.parse.urlsplit(iri)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host, colon, port = hostport.partition(":") if not hostport.startswith("[") else (hostport, "", "")
    try:
        host = host.encode("idna").decode("ascii") if host and not host.isascii() else host
    except UnicodeError as err:
        raise TransferError(ErrorCode.BAD_URL, f"host {host!r} cannot be written as an IDNA (xn--) name: "
                            f"{err}", url=None) from None

    def quote(text: str) -> str:
        return urllib.parse.quote(text, safe=_URI_SAFE)
    netloc = f"{quote(userinfo)}{at}{host}{colon}{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, quote(parts.path), quote(parts.query),
                                    quote(parts.fragment)))


def _location_to_iri(value: str) -> str:
    """A ``Location`` header as text: http.client decodes header bytes as Latin-1, servers send UTF-8; bytes that are
    not UTF-8 are percent-encoded as they are."""
    import urllib.parse
    raw = value.encode("latin-1", "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return urllib.parse.quote_from_bytes(raw, safe=_URI_SAFE)


def _split_userinfo(url: str) -> tuple[str, Credential | None]:
    """(the URL without ``user:password@``, the credential it carried or None). The URL bgsession keeps never holds
    the userinfo; the credential lives in memory and answers the origin's challenges."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    stripped = urllib.parse.urlunsplit(parts._replace(netloc=hostport))
    try:
        return stripped, Credential(urllib.parse.unquote(user), urllib.parse.unquote(password),
                                    CredentialPersistence.NONE)
    except InvalidArgumentError:
        return stripped, None


def _redact(url: str) -> str:
    """The URL with any userinfo removed: what messages and logs may show."""
    with contextlib.suppress(ValueError):
        return _split_userinfo(url)[0]
    return "(unparsable URL)"


def _check_url(url: Any, what: str = "URL") -> str:
    """Validate an http(s) URL; return it as a URI (see :func:`_iri_to_uri`). Messages never show its userinfo."""
    import urllib.parse
    if not isinstance(url, str):
        raise _invalid(f"{what} must be a str, not {type(url).__name__}")
    shown = _redact(url)
    if _CTL_RE.search(url) or " " in url:
        raise _invalid(f"{what} {shown!r} contains spaces or control characters (CR/LF injection?); "
                       "percent-encode them")
    if len(url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        raise _invalid(f"{what} is longer than {MAX_URL_BYTES} bytes")
    try:
        url = _iri_to_uri(url)
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise TransferError(ErrorCode.BAD_URL, f"malformed {what} {shown!r}: {err}", url=shown) from None
    except TransferError as err:
        raise TransferError(ErrorCode.BAD_URL, f"malformed {what} {shown!r}: {err.message}", url=shown) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise TransferError(ErrorCode.UNSUPPORTED_URL, f"unsupported {what} scheme {parts.scheme or '(none)'!r} in "
                            f"{shown!r}: only http and https are transferred", url=shown)
    if not parts.hostname:
        raise TransferError(ErrorCode.BAD_URL, f"{what} {shown!r} has no host", url=shown)
    del port
    return str(url)


def _check_headers(headers: Mapping[str, str] | None, what: str = "header") -> tuple[tuple[str, str], ...]:
    if headers is None:
        return ()
    if not isinstance(headers, Mapping):
        raise _invalid(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    out, size = [], 0
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN_RE.match(name):
            raise _invalid(f"invalid {what} name {name!r}")
        if not isinstance(value, str) or "\r" in value or "\n" in value or "\x00" in value:
            raise _invalid(f"invalid value for {what} {name!r}: {value!r} (CR, LF and NUL are not allowed)")
        try:
            size += len(name) + len(value.encode("latin-1"))
        except UnicodeEncodeError:
            raise _invalid(f"the value of {what} {name!r} has characters HTTP cannot send (only Latin-1 is "
                           "allowed in header values; percent-encode or base64 the rest)") from None
        out.append((name, value))
    if size > MAX_HEADER_BYTES:
        raise _invalid(f"{what}s total {size} bytes, more than the {MAX_HEADER_BYTES} allowed")
    return tuple(out)


def _check_secret_names(names: Any, what: str) -> tuple[str, ...]:
    """Header names marked secret, lower-case and sorted (a value: comparable, hashable)."""
    if names is None:
        return ()
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise _invalid(f"{what} must be a list of header names, not {names!r}")
    out = set()
    for name in names:
        if not isinstance(name, str) or not _TOKEN_RE.match(name):
            raise _invalid(f"invalid header name {name!r} in {what}")
        out.add(name.lower())
    return tuple(sorted(out))


def _public_pairs(pairs: Iterable[tuple[str, str]], secret: Iterable[str] = ()) -> list[list[str]]:
    """Header pairs as they may be stored: without the secret ones (built in, and the names in *secret*)."""
    hidden = _SECRET_HEADERS.union(name.lower() for name in secret)
    return [[k, v] for k, v in pairs if k.lower() not in hidden]


def _check_description(description: Any) -> str | None:
    if description is not None and not isinstance(description, str):
        raise _invalid("task description must be a str or None")
    if description is not None and len(description.encode("utf-8", "surrogatepass")) > MAX_DESCRIPTION_BYTES:
        raise _invalid(f"task description is longer than {MAX_DESCRIPTION_BYTES} bytes; keep a key to your own "
                       "records in it, not the records")
    return description


class Headers(Mapping[str, str]):
    """Case-insensitive, read-only header mapping that keeps repeated fields."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._pairs = tuple((str(k), str(v)) for k, v in pairs)
        self._map: dict[str, str] = {}
        for k, v in self._pairs:
            key = k.lower()
            self._map[key] = f"{self._map[key]}, {v}" if key in self._map else v

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def __iter__(self) -> Iterator[str]:  # each name once, as first spelled
        names: dict[str, str] = {}
        for k, _ in self._pairs:
            names.setdefault(k.lower(), k)
        return iter(names.values())

    def __len__(self) -> int:
        return len(self._map)

    def get_all(self, key: str) -> list[str]:
        key = key.lower()
        return [v for k, v in self._pairs if k.lower() == key]

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return self._pairs

    def __repr__(self) -> str:
        return f"Headers({list(self._pairs)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._pairs == other._pairs

    __hash__ = None  # type: ignore[assignment]


#: Bounds of a bandwidth limit in bytes per second (a larger one is a mistake).
MIN_BYTES_PER_SECOND = 1
MAX_BYTES_PER_SECOND = 1 << 40
#: Latest earliest begin date accepted (a POSIX time beyond year 9999 is milliseconds, not seconds).
_MAX_BEGIN_DATE = 253402300799.0


def _check_priority(value: Any) -> float:
    """A task priority: a number from 0.0 (lowest) to 1.0 (highest)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise _invalid(f"priority must be a number from 0.0 (lowest) to 1.0 (highest), as on iOS "
                       f"(0.25 low, 0.5 default, 0.75 high), not {value!r}")
    return float(value)


def _check_rate(value: Any, what: str = "max_bytes_per_second") -> int | None:
    """A bandwidth limit: None (no limit) or a whole number of bytes per second."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
            not MIN_BYTES_PER_SECOND <= value <= MAX_BYTES_PER_SECOND:
        raise _invalid(f"{what} must be None (no limit) or bytes per second from {MIN_BYTES_PER_SECOND} to "
                       f"{MAX_BYTES_PER_SECOND}, not {value!r}")
    return int(value)


def _begin_timestamp(value: Any) -> float | None:
    """An earliest begin date as POSIX time: from a ``datetime`` with a time zone, or a POSIX timestamp; None: none."""
    if value is None:
        return None
    import datetime
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _invalid(f"earliest_begin_date {value!r} has no time zone, so the moment it names is ambiguous; "
                           "use an aware datetime (datetime.now(timezone.utc) + ..., or .astimezone())")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"earliest_begin_date must be a datetime with a time zone, a POSIX timestamp or None, "
                       f"not {value!r}")
    if not 0 <= value <= _MAX_BEGIN_DATE:
        raise _invalid(f"earliest_begin_date {value!r} is not a POSIX time in seconds (milliseconds?)")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to transfer: ``Request(url, method="GET", headers=None, sha256=None, priority=None,
    earliest_begin_date=None, secret_headers=())``.

    ``sha256`` (hex) is verified before a download reaches the finish hook. A URL with non-ASCII characters becomes
    its URI (IDNA host, UTF-8 percent-encoding). Secrets stay in memory (this process's, or the daemon's), never in
    the journal or any file: ``Authorization``, ``Cookie``, ``Proxy-Authorization``, the headers named in
    *secret_headers*, and a URL's ``user:password@`` (kept out of every stored URL; it answers the first
    authentication challenge of the URL's origin). After a relaunch they are gone, and the server's 401 reaches
    ``task_did_receive_challenge``. Response headers by those names (and ``Set-Cookie``) are never stored either.
    ``priority`` and ``earliest_begin_date`` are the new task's first ``Task.priority`` and
    ``Task.earliest_begin_date`` (None: the default priority, no date)."""

    url: str
    method: str = "GET"
    headers: Any = None
    sha256: str | None = None
    priority: float | None = None
    earliest_begin_date: datetime.datetime | float | None = None
    secret_headers: Any = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _check_url(self.url))
        if not isinstance(self.method, str) or not _TOKEN_RE.match(self.method):
            raise _invalid(f"invalid HTTP method {self.method!r}")
        object.__setattr__(self, "method", self.method.upper())
        headers = self.headers
        if isinstance(headers, Headers):
            headers = dict(headers.pairs())
        object.__setattr__(self, "headers", Headers(_check_headers(headers)))
        if self.sha256 is not None:
            if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
                raise _invalid(f"sha256 must be 64 hex digits, not {self.sha256!r}")
            object.__setattr__(self, "sha256", self.sha256.lower())
        if self.priority is not None:
            _check_priority(self.priority)
        _begin_timestamp(self.earliest_begin_date)
        object.__setattr__(self, "secret_headers", _check_secret_names(self.secret_headers, "secret_headers"))

    def _to_record(self, secret: Iterable[str] = ()) -> dict[str, Any]:
        """The journal form: no secret header (built in, this request's, or *secret*: the configuration's names),
        no userinfo in the URL."""
        public = _public_pairs(self.headers.pairs(), (*self.secret_headers, *secret))
        rec = {"url": _split_userinfo(self.url)[0], "method": self.method, "headers": public, "sha256": self.sha256}
        if self.secret_headers:
            rec["secret_headers"] = list(self.secret_headers)  # names only: responses by these names are not stored
        return rec

    def _task_options(self) -> dict[str, Any]:
        """The scheduling options this request gives its task, as the task record's fields (defaults left out)."""
        options: dict[str, Any] = {}
        if self.priority is not None and self.priority != DEFAULT_PRIORITY:
            options["priority"] = float(self.priority)
        if self.earliest_begin_date is not None:
            options["begin"] = _begin_timestamp(self.earliest_begin_date)
        return options

    def _secret_headers(self, secret: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
        """The headers kept in memory only, never journaled."""
        hidden = _SECRET_HEADERS.union(self.secret_headers, (name.lower() for name in secret))
        return tuple((k, v) for k, v in self.headers.pairs() if k.lower() in hidden)

    def _credential(self) -> Credential | None:
        """The credential of the URL's ``user:password@``, if any (memory only)."""
        return _split_userinfo(self.url)[1]

    def __repr__(self) -> str:  # what a log line or a traceback may show: no userinfo, no secret value
        secret = {k for k, _ in self._secret_headers()}
        headers = {k: "<secret>" if k in secret else v for k, v in self.headers.pairs()}
        return (f"Request({_redact(self.url)!r}, method={self.method!r}, headers={headers!r}, sha256={self.sha256!r}"
                f", secret_headers={self.secret_headers!r})")

    @classmethod
    def _from_record(cls, rec: Mapping[str, Any]) -> Request:
        return cls(rec["url"], rec.get("method", "GET"), dict(rec.get("headers") or []), rec.get("sha256"),
                   secret_headers=tuple(rec.get("secret_headers") or ()))

    def _with_url(self, url: str, method: str | None = None) -> Request:
        return dataclasses.replace(self, url=url, method=method or self.method, headers=dict(self.headers.pairs()))


def _secret_names(request: Request) -> dict[str, Any]:
    """The task record's ``secrets``: the names of the request's secret headers, never their values (a restart
    without them asks the app for them again)."""
    names = [name for name, _ in request._secret_headers()]
    return {"secrets": names} if names else {}


def _coerce_request(request: str | Request) -> Request:
    if isinstance(request, Request):
        return request
    if isinstance(request, str):
        return Request(request)
    raise _invalid(f"expected a URL string or bgsession.Request, not {type(request).__name__}")


_UNSAFE_NAME_RE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)] + [f"LPT{i}" for i in range(1, 10)])


#: Longest file name sanitize_filename() returns, in bytes of UTF-8: file systems allow 255, and this leaves room for
#: a ``.N`` suffix that keeps a name unique.
MAX_NAME_BYTES = 240


def _fit_bytes(text: str, limit: int) -> str:
    """The longest prefix of *text* whose UTF-8 takes at most *limit* bytes (never half a character)."""
    return text.encode("utf-8", "surrogatepass")[:max(0, limit)].decode("utf-8", "ignore")


def sanitize_filename(name: str | None, default: str = "download") -> str:
    """A safe single file name from an untrusted one (URL path, Content-Disposition).

    Drops directories (``/``, ``\\``), ``..``, control characters and NUL, leading dots and trailing dots/spaces,
    Windows device names; shortens it to MAX_NAME_BYTES bytes of UTF-8 (keeping a short extension), so that it fits
    any file system; returns *default* when nothing usable is left."""
    import urllib.parse
    if not name:
        return default
    name = urllib.parse.unquote(str(name))
    name = re.split(r"[/\\]", name)[-1]
    name = _UNSAFE_NAME_RE.sub("_", name).strip().lstrip(".").rstrip(". ")
    if not name or name in (".", ".."):
        return default
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = "_" + name
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if dot and stem and len(ext.encode("utf-8", "surrogatepass")) < 20:
            name = _fit_bytes(stem, MAX_NAME_BYTES - len(ext.encode("utf-8", "surrogatepass")) - 1).rstrip(". ")
            name = f"{name}.{ext}" if name else default
        else:
            name = _fit_bytes(name, MAX_NAME_BYTES).rstrip(". ") or default
    return name


_CONTENT_RANGE_RE = re.compile(r"\A\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*\Z", re.I)


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """``bytes A-B/T`` -> (A, B, T); ``bytes */T`` -> (None, None, T); T may be None for ``*``.

    Returns None for anything malformed (including B < A or B >= T)."""
    if not value:
        return None
    m = _CONTENT_RANGE_RE.match(value)
    if not m:
        return None
    first = int(m.group(1)) if m.group(1) is not None else None
    last = int(m.group(2)) if m.group(2) is not None else None
    total = None if m.group(3) == "*" else int(m.group(3))
    if first is None and total is None:
        return None
    if first is not None and last is not None:
        if last < first or (total is not None and last >= total):
            return None
    return first, last, total


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


@dataclasses.dataclass(frozen=True)
class Response:
    """An HTTP response as the task saw it (``NSHTTPURLResponse``)."""

    url: str
    status: int
    headers: Headers = dataclasses.field(default_factory=Headers)

    @property
    def status_code(self) -> int:
        return self.status

    @property
    def expected_content_length(self) -> int:
        """The entity's full length, or -1 when unknown."""
        cr = self.headers.get("Content-Range")
        if cr:
            parsed = parse_content_range(cr)
            if parsed and parsed[2] is not None:
                return parsed[2]
        length = _content_length(self.headers)
        return -1 if length is None else length

    @property
    def suggested_filename(self) -> str:
        """A sanitised name from Content-Disposition, else the URL's last path component."""
        import urllib.parse
        cd = self.headers.get("Content-Disposition", "")
        m = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", cd) or re.search(
            r'filename\s*=\s*"([^"]*)"', cd) or re.search(r"filename\s*=\s*([^;\s]+)", cd)
        if m:
            return sanitize_filename(m.group(1))
        return sanitize_filename(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])

    def _to_record(self, secret: Iterable[str] = ()) -> dict[str, Any]:
        """The stored form: without ``Set-Cookie`` and the other secret headers (built in, and *secret*)."""
        return {"url": self.url, "status": self.status, "headers": _public_pairs(self.headers.pairs(), secret)}

    @classmethod
    def _from_record(cls, rec: Mapping[str, Any] | None) -> Response | None:
        if not rec:
            return None
        return cls(rec["url"], int(rec["status"]), Headers(tuple(p) for p in rec.get("headers", [])))


@dataclasses.dataclass(frozen=True)
class ProtectionSpace:
    """Where a credential applies: host, port, realm and scheme (``"basic"``/``"digest"``). *is_proxy*: the
    challenge came from a proxy (a 407; host and port are the proxy's), as ``NSURLProtectionSpace.isProxy``."""
    host: str
    port: int
    realm: str | None
    scheme: str
    protocol: str = "http"
    is_proxy: bool = False


class AuthChallengeDisposition(enum.Enum):
    USE_CREDENTIAL = "use_credential"
    PERFORM_DEFAULT_HANDLING = "perform_default_handling"
    CANCEL_AUTHENTICATION_CHALLENGE = "cancel_authentication_challenge"
    REJECT_PROTECTION_SPACE = "reject_protection_space"


@dataclasses.dataclass(frozen=True)
class AuthChallenge:
    """A 401 (or a proxy's 407) the task met: answer with a disposition and, for USE_CREDENTIAL, a credential."""
    protection_space: ProtectionSpace
    previous_failure_count: int
    failure_response: Response | None
    proposed_credential: Credential | None = None


class DelayedRequestDisposition(enum.Enum):
    """The answer of ``task_will_begin_delayed_request`` (``NSURLSessionDelayedRequestDisposition``)."""
    CONTINUE_LOADING = "continue_loading"  # send the request as it is
    USE_NEW_REQUEST = "use_new_request"  # send the request returned with it (a new URL, fresh headers)
    CANCEL = "cancel"  # end the task with CANCELLED (resume data kept)


@dataclasses.dataclass(frozen=True)
class _Proxy:
    """An HTTP proxy: where it is and the credential its URL carried. The credential lives in memory only (never
    journaled, never in a message): ``str()`` names host and port alone."""
    host: str
    port: int
    credential: Credential | None = None

    def __str__(self) -> str:
        return f"proxy {self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class _Proxies:
    """Which proxy each scheme goes through and the hosts that bypass them (``no_proxy``), resolved when the
    Configuration is made: the daemon uses these, never its own environment."""
    http: _Proxy | None = None
    https: _Proxy | None = None
    no_proxy: tuple[str, ...] = ()


#: Keys of a proxies mapping (those of urllib.request.getproxies() that bgsession uses).
_PROXY_KEYS = ("http", "https", "all", "no")


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """``http_proxy``, ``https_proxy``, ``all_proxy`` and ``no_proxy`` as urllib reads them (getproxies_environment):
    any case; a lower-case variable wins over an upper-case one, and an empty lower-case one removes it; under CGI
    (``REQUEST_METHOD`` set) ``HTTP_PROXY`` is ignored, since a client's ``Proxy:`` header sets it (httpoxy)."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy") and name.lower()[:-6] in _PROXY_KEYS:
            found[name.lower()[:-6]] = value
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy") and name.lower()[:-6] in _PROXY_KEYS:
            if value:
                found[name.lower()[:-6]] = value
            else:
                found.pop(name.lower()[:-6], None)
    return found


def _parse_proxy(url: Any, what: str) -> _Proxy:
    """``http://[user[:password]@]host[:port]`` (no scheme: http; no port: 80). Messages never repeat the URL: it
    may hold a password."""
    import urllib.parse
    if not isinstance(url, str) or not url.strip() or _CTL_RE.search(url):
        raise _invalid(f"{what} must be a proxy URL such as 'http://proxy.example:3128'")
    text = url.strip() if "://" in url else "http://" + url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise _invalid(f"{what} is not a valid proxy URL (bad port?)") from None
    if parts.scheme.lower() != "http":
        raise _invalid(f"{what}: only http:// proxies are supported (https goes through their CONNECT tunnel), "
                       f"not {parts.scheme}://")
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise _invalid(f"{what} must be scheme://host:port, without a path")
    credential = None
    if parts.username is not None:
        credential = Credential(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    return _Proxy(parts.hostname.lower(), port or 80, credential)


def _resolve_proxies(spec: Any, environ: Mapping[str, str] | None = None) -> _Proxies | None:
    """``"environment"``, a mapping ({"http": url, "https": url, "all": url, "no": "host,host"}) or None -> the
    proxies a session uses (None: none). ``all`` serves a scheme without its own. An environment proxy bgsession
    cannot use (socks5://, https://) is ignored with a warning; in a mapping it is an error."""
    if spec is None:
        return None
    from_environment = isinstance(spec, str) and spec == "environment"
    if from_environment:
        table: Mapping[str, Any] = _environment_proxies(os.environ if environ is None else environ)
    elif isinstance(spec, Mapping):
        unknown = sorted(str(k) for k in spec if k not in _PROXY_KEYS)
        if unknown:
            raise _invalid(f"unknown proxies key(s) {unknown}: use {list(_PROXY_KEYS)}")
        table = spec
    else:
        raise _invalid(f"proxies must be 'environment', a mapping or None, not {spec!r}")
    chosen: dict[str, _Proxy] = {}
    for scheme in ("http", "https"):
        url = table.get(scheme) or table.get("all")
        if not url:
            continue
        try:
            chosen[scheme] = _parse_proxy(url, f"the {scheme} proxy")
        except InvalidArgumentError as err:
            if not from_environment:
                raise
            log.warning("ignoring the %s proxy of the environment: %s", scheme, err)
    no = table.get("no") or ()
    if isinstance(no, str):
        no = no.split(",")
    if not all(isinstance(name, str) for name in no):
        raise _invalid("proxies['no'] must be a comma-separated str or a list of host names")
    names = tuple(name.strip().lower() for name in no if name.strip())
    return _Proxies(chosen.get("http"), chosen.get("https"), names) if chosen else None


#: TLS versions a ``TLS(minimum_version=...)`` may name, and their ssl.TLSVersion member names.
_TLS_VERSIONS = {"TLSv1": "TLSv1", "TLSv1.1": "TLSv1_1", "TLSv1.2": "TLSv1_2", "TLSv1.3": "TLSv1_3"}


@dataclasses.dataclass(frozen=True)
class TLS:
    """TLS settings as plain data: the same on both hosts, since the daemon receives them whole (an
    ``ssl.SSLContext`` cannot be sent to it). Paths are made absolute when the value is made.

    *cafile* / *capath*: the CA certificates to trust, instead of the system's (a PEM file; a directory of hashed
    PEM files). *certfile* / *keyfile* / *key_password*: a client certificate (PEM; the key may be in *certfile*;
    the password of an encrypted key lives in memory only: hidden from repr, never journaled). *minimum_version*:
    ``"TLSv1.2"`` or ``"TLSv1.3"`` (or an ``ssl.TLSVersion``). *pinned_certificates_sha256*: SHA-256 digests (hex)
    of DER certificates; the server's own certificate must be one of them, in addition to passing verification
    (AFSecurityPolicy's certificate pinning): a mismatch fails the task with SERVER_CERTIFICATE_UNTRUSTED."""

    cafile: str | None = None
    capath: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    minimum_version: str | None = None
    pinned_certificates_sha256: tuple[str, ...] = ()
    key_password: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("cafile", "capath", "certfile", "keyfile"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                    raise _invalid(f"TLS {name} must be a path, not {value!r}")
                object.__setattr__(self, name, os.path.abspath(os.fspath(value)))
        if self.keyfile is not None and self.certfile is None:
            raise _invalid("TLS keyfile needs its certfile")
        if self.key_password is not None and not isinstance(self.key_password, str):
            raise _invalid("TLS key_password must be a str")
        version = self.minimum_version
        if version is not None and not isinstance(version, str):
            import ssl
            if isinstance(version, ssl.TLSVersion):
                version = version.name
        if isinstance(version, str):
            version = version.replace("_", ".")
        if version is not None and version not in _TLS_VERSIONS:
            raise _invalid(f"TLS minimum_version must be one of {sorted(_TLS_VERSIONS)}, not {self.minimum_version!r}")
        object.__setattr__(self, "minimum_version", version)
        pins = self.pinned_certificates_sha256
        if isinstance(pins, (str, bytes)) or not isinstance(pins, Iterable):
            raise _invalid("TLS pinned_certificates_sha256 must be a list of SHA-256 digests (hex), not one str")
        clean = tuple(str(pin).replace(":", "").strip().lower() for pin in pins)
        if not all(re.fullmatch(r"[0-9a-f]{64}", pin) for pin in clean):
            raise _invalid("each TLS pinned_certificates_sha256 entry must be 64 hex digits (a SHA-256 of a DER "
                           "certificate; colons allowed)")
        object.__setattr__(self, "pinned_certificates_sha256", clean)


def _check_identifier(identifier: Any) -> str:
    if not isinstance(identifier, str) or not IDENTIFIER_RE.match(identifier) or set(identifier) <= {"."}:
        raise _invalid(f"session identifier {identifier!r} must be 1-200 characters of "
                       "[A-Za-z0-9._-] and not only dots (it names a directory)")
    return identifier


def _state_base() -> str:
    """The per-user state directory of this platform (see :func:`default_directory`)."""
    if sys.platform == "win32":
        return os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~"), "Library", "Application Support")
    base = os.environ.get("XDG_STATE_HOME") or ""
    return base if os.path.isabs(base) else os.path.join(os.path.expanduser("~"), ".local", "state")


def default_directory(identifier: str) -> str:
    """The per-user state directory for a session identifier.

    Linux/BSD: ``$XDG_STATE_HOME`` (or ``~/.local/state``)``/bgsession/<identifier>``;
    macOS: ``~/Library/Application Support/bgsession/<identifier>``;
    Windows: ``%LOCALAPPDATA%\\bgsession\\<identifier>``."""
    _check_identifier(identifier)
    return os.path.join(_state_base(), "bgsession", identifier)


_PYTHON_NAME_RE = re.compile(r"\Apython[0-9.]*\Z")


def _check_relaunch_command(command: Any) -> None:
    """An argv whose program exists now: a relaunch that cannot start is refused here, where the mistake is made,
    not found later in daemon.log. A bare name is looked up on PATH; a path is taken from the current directory
    (the relaunch runs there too). A ``python3`` found on PATH that is not this interpreter is warned about: from
    an unactivated virtual environment it is the wrong one, and the relaunched app cannot import its packages."""
    import shutil
    if isinstance(command, (str, bytes)) or not isinstance(command, Sequence) or not command or \
            not all(isinstance(a, str) for a in command):
        raise _invalid("relaunch_command must be a non-empty list of str (an argv, never a shell line), "
                       f"not {command!r}; for this program: [sys.executable, os.path.abspath(__file__)]")
    program = command[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        found = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    else:
        found = shutil.which(program)
    if found is None:
        raise _invalid(f"relaunch_command program {program!r} does not exist or is not executable"
                       f"{'' if os.sep in program else ' (not found on PATH)'}; use an absolute path, such as "
                       "sys.executable for a Python app")
    if _PYTHON_NAME_RE.match(os.path.basename(program)) and os.path.realpath(found) != \
            os.path.realpath(sys.executable):
        log.warning("relaunch_command runs %r (%s), not this interpreter (%s): a relaunched app may not find its "
                    "packages; use sys.executable", program, found, sys.executable)


@dataclasses.dataclass(frozen=True)
class Configuration:
    """How a session behaves. Build with :meth:`background` or :meth:`default`.

    ``timeout_for_request`` is the longest wait for the next byte (connect, headers or body) before the attempt counts
    as failed and is retried, and also bounds the whole of a response's head and of a body bgsession discards (a
    redirect's, an error page's), however the bytes trickle in; it does not bound a slow but moving transfer.
    ``timeout_for_resource`` bounds a task's whole life, wall-clock, from its first ``resume()`` (or its earliest
    begin date, if later), across relaunches, every phase of every attempt included; then it fails with
    ``TIMED_OUT``. ``secret_headers``: more header names (besides ``Authorization``, ``Cookie``,
    ``Proxy-Authorization``, ``Set-Cookie``) whose values are never stored: requests send them from memory, stored
    responses leave them out.

    ``max_concurrent_transfers`` bounds the transfers running at once over all hosts (and the session's transfer
    threads and open connections); ``max_connections_per_host`` bounds them per origin. ``max_bytes_per_second``
    limits the session's transfers together, downloads and uploads (None: no limit); ``session.max_bytes_per_second``
    changes it while they run.

    ``waits_for_connectivity`` (background sessions: True, as on iOS): while no response arrives (no network, DNS
    failing, the server or the proxy unreachable) a task waits and tries again every 30 s at most, without consuming
    ``Retry.total``, until ``timeout_for_resource``; ``task_is_waiting_for_connectivity`` tells the app once per
    waiting period. ``fails_on_unknown_host``: a host name the resolver says does not exist fails the task at once
    (CANNOT_FIND_HOST) instead of waiting. ``proxies``: ``"environment"`` (http_proxy, https_proxy, all_proxy,
    no_proxy, read when the configuration is made), a mapping or None; the daemon uses these. ``tls``: a
    :class:`TLS`, the way to give TLS settings to the daemon host (``ssl_context`` works in-process only).
    ``max_connections_per_task`` (1 to 16, default 1; aria2's ``-x``/``-s``): a download whose response allows it (a
    strong validator, a known length, Range support) is split into up to that many segments fetched on parallel
    connections, each resumed and validated on its own (README, "Segmented downloads"). Its extra connections count
    against both caps above and are taken only when no queued task could use them."""

    identifier: str | None
    directory: str | None
    host: str
    relaunch_command: tuple[str, ...] | None = None
    max_connections_per_host: int = 6
    timeout_for_request: float = 60.0
    timeout_for_resource: float = 7 * 24 * 3600.0
    retry: Retry = dataclasses.field(default_factory=Retry)
    headers: Any = None
    ssl_context: ssl.SSLContext | None = None
    working_directory: str | None = None
    daemon_idle_timeout: float = 30.0
    relaunch_backoff: float = 1.0
    max_concurrent_transfers: int = DEFAULT_MAX_CONCURRENT_TRANSFERS
    max_bytes_per_second: int | None = None
    secret_headers: tuple[str, ...] = ()
    waits_for_connectivity: bool = False
    fails_on_unknown_host: bool = False
    proxies: _Proxies | None = None
    tls: TLS | None = None
    max_connections_per_task: int = 1

    @classmethod
    def background(cls, identifier: str, *, directory: str | None = None, host: str | None = None,
                   relaunch_command: Sequence[str] | None = None, max_connections_per_host: int = 6,
                   timeout_for_request: float = 60.0, timeout_for_resource: float = 7 * 24 * 3600.0,
                   retry: Retry | None = None, headers: Mapping[str, str] | None = None,
                   ssl_context: ssl.SSLContext | None = None, daemon_idle_timeout: float = 30.0,
                   relaunch_backoff: float = 1.0, max_concurrent_transfers: int = DEFAULT_MAX_CONCURRENT_TRANSFERS,
                   max_bytes_per_second: int | None = None, waits_for_connectivity: bool = True,
                   fails_on_unknown_host: bool = False, proxies: Any = "environment",
                   tls: TLS | None = None, secret_headers: Iterable[str] | None = None,
                   max_connections_per_task: int = 1) -> Configuration:
        """A durable session: its tasks and undelivered events survive the process.

        *host*: ``"daemon"`` (the default on POSIX: transfers run in a detached daemon and go
        on while the app is dead) or ``"inprocess"`` (the default on Windows: transfers run in
        the app and resume when it re-creates the session). *relaunch_command*: the argv the daemon
        runs (in the current directory) to relaunch the app for its events, such as
        ``[sys.executable, os.path.abspath(__file__)]``; a program that does not exist is refused here."""
        _check_identifier(identifier)
        if host is None:
            host = "daemon" if fcntl is not None and hasattr(socket, "AF_UNIX") else "inprocess"
        if directory is None:
            directory = default_directory(identifier)
        elif not isinstance(directory, (str, os.PathLike)) or not os.path.isabs(os.fspath(directory)):
            raise _invalid(f"directory must be an absolute path, not {directory!r} "
                           "(a relative one would change meaning when the app is relaunched)")
        if host not in ("daemon", "inprocess"):
            raise _invalid(f"host must be 'daemon' or 'inprocess', not {host!r}")
        if host == "daemon" and fcntl is None:
            raise _invalid("the daemon host needs POSIX (fcntl, Unix sockets); use host='inprocess' on Windows")
        if relaunch_command is not None:
            _check_relaunch_command(relaunch_command)
        common = cls.default(max_connections_per_host=max_connections_per_host, timeout_for_request=timeout_for_request,
                             timeout_for_resource=timeout_for_resource, retry=retry, headers=headers,
                             ssl_context=ssl_context, max_concurrent_transfers=max_concurrent_transfers,
                             max_bytes_per_second=max_bytes_per_second, waits_for_connectivity=waits_for_connectivity,
                             fails_on_unknown_host=fails_on_unknown_host, proxies=proxies, tls=tls,
                             secret_headers=secret_headers, max_connections_per_task=max_connections_per_task)
        return dataclasses.replace(
            common, identifier=identifier, directory=os.path.normpath(os.fspath(directory)), host=host,
            relaunch_command=tuple(relaunch_command) if relaunch_command is not None else None,
            working_directory=os.getcwd(), relaunch_backoff=_check_seconds("relaunch_backoff", relaunch_backoff,
                                                                           maximum=3600.0),
            daemon_idle_timeout=_check_seconds("daemon_idle_timeout", daemon_idle_timeout, allow_zero=True,
                                               maximum=MAX_TIMEOUT_FOR_REQUEST))

    @classmethod
    def default(cls, *, max_connections_per_host: int = 6, timeout_for_request: float = 60.0,
                timeout_for_resource: float = 7 * 24 * 3600.0, retry: Retry | None = None,
                headers: Mapping[str, str] | None = None, ssl_context: ssl.SSLContext | None = None,
                max_concurrent_transfers: int = DEFAULT_MAX_CONCURRENT_TRANSFERS,
                max_bytes_per_second: int | None = None, waits_for_connectivity: bool = False,
                fails_on_unknown_host: bool = False, proxies: Any = "environment",
                tls: TLS | None = None, secret_headers: Iterable[str] | None = None,
                max_connections_per_task: int = 1) -> Configuration:
        """An in-process, in-memory session: nothing durable (``NSURLSessionConfiguration.default``)."""
        for name, value, most in (("max_connections_per_host", max_connections_per_host, MAX_CONNECTIONS_PER_HOST),
                                  ("max_concurrent_transfers", max_concurrent_transfers, MAX_CONCURRENT_TRANSFERS),
                                  ("max_connections_per_task", max_connections_per_task, MAX_CONNECTIONS_PER_TASK)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise _invalid(f"{name} must be an int from 1 to {most}, not {value!r}")
        for name, flag in (("waits_for_connectivity", waits_for_connectivity),
                           ("fails_on_unknown_host", fails_on_unknown_host)):
            if not isinstance(flag, bool):
                raise _invalid(f"{name} must be True or False, not {flag!r}")
        if tls is not None and not isinstance(tls, TLS):
            raise _invalid(f"tls must be a bgsession.TLS, not {type(tls).__name__}")
        if tls is not None and ssl_context is not None:
            raise _invalid("give tls or ssl_context, not both (tls reaches the daemon; ssl_context works in-process)")
        if retry is not None and not isinstance(retry, Retry):
            raise _invalid(f"retry must be a bgsession.Retry, not {type(retry).__name__}")
        if ssl_context is not None:
            import ssl
            if not isinstance(ssl_context, ssl.SSLContext):
                raise _invalid(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        return cls(identifier=None, directory=None, host="inprocess", max_connections_per_host=max_connections_per_host,
                   timeout_for_request=_check_seconds("timeout_for_request", timeout_for_request,
                                                      maximum=MAX_TIMEOUT_FOR_REQUEST),
                   timeout_for_resource=_check_seconds("timeout_for_resource", timeout_for_resource),
                   retry=retry or Retry(), headers=Headers(_check_headers(headers)), ssl_context=ssl_context,
                   max_concurrent_transfers=max_concurrent_transfers,
                   max_bytes_per_second=_check_rate(max_bytes_per_second),
                   waits_for_connectivity=waits_for_connectivity, fails_on_unknown_host=fails_on_unknown_host,
                   proxies=_resolve_proxies(proxies), tls=tls,
                   secret_headers=_check_secret_names(secret_headers, "secret_headers"),
                   max_connections_per_task=max_connections_per_task)

    @property
    def is_background(self) -> bool:
        return self.directory is not None


# ============================================================================
# 5. HTTP decisions (pure: no I/O)
# ============================================================================
#
# What to do with a response, as functions of the response and of where the attempt
# stands. The transfer section sends, reads and writes; it asks these what to do next.

def resume_validator(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The validator a later ``If-Range`` may use: a strong ETag, else Last-Modified, else None."""
    etag, modified = headers.get("ETag", "").strip(), headers.get("Last-Modified", "").strip()
    if etag and not etag.startswith("W/"):
        return {"etag": etag}
    return {"last_modified": modified} if modified else None


@dataclasses.dataclass(frozen=True)
class RangePlan:
    """What to do with a download response (:func:`plan_response`). ``action``: ``"write"`` (write the body at
    ``start``, truncating the partial file there first), ``"complete"`` (the local file is already whole),
    ``"rerequest"`` (discard this response, ask again without Range); for a segment of a split download
    (:func:`plan_segment`) also ``"restart"`` and ``"unsplit"`` (go on with one connection)."""

    action: str
    start: int = 0
    total: int | None = None
    resumable: bool = False
    reason: str = ""


def same_entity(held: Mapping[str, str] | None, headers: Mapping[str, str]) -> bool:
    """Do these response headers describe the entity whose bytes are held (*held*: its ``resume_validator``)? A
    validator the response carries must equal the held one (a strong ETag exactly, a weak one never matches a strong
    one); a response that carries none is taken at its word (it answered the ``If-Range``)."""
    if not held:
        return True
    etag, modified = headers.get("ETag", "").strip(), headers.get("Last-Modified", "").strip()
    if held.get("etag"):
        return not etag or etag == held["etag"]
    return not modified or modified == held.get("last_modified")


def plan_response(offset: int, asked_range: bool, status: int, headers: Mapping[str, str],
                  known_total: int | None, validator: Mapping[str, str] | None = None) -> RangePlan:
    """The validated-resume rule (README, "Guarantees"), as a pure function.

    *offset*: bytes held locally; *asked_range*: a ``Range: bytes=offset-`` with ``If-Range`` was sent;
    *known_total*: the entity length recorded earlier; *validator*: what the held bytes belong to. A 206 is appended
    only if it is of the same entity (its validator matches), its Content-Range starts at *offset* (or earlier:
    truncate to its start) and reaches past it, agrees with its Content-Length, and its total matches; a 200, a
    changed total, another entity or a malformed or useless range restarts from zero; 416 ``*/N`` with N == offset
    completes."""
    if status == 206:
        cr = parse_content_range(headers.get("Content-Range"))
        if cr is None or cr[0] is None:
            return RangePlan("rerequest", reason=f"malformed Content-Range {headers.get('Content-Range')!r}")
        first, last, total = cr
        assert first is not None and last is not None
        limit = offset if asked_range else 0
        length = _content_length(headers)
        if first > limit:
            return RangePlan("rerequest", reason=f"206 starts at {first}, after the {limit} bytes held")
        if asked_range and last + 1 <= offset:
            return RangePlan("rerequest", reason=f"206 ends at byte {last}, before the {offset} bytes held: it "
                                                 "would never advance")
        if length is not None and length != last + 1 - first:
            return RangePlan("rerequest", reason=f"206 of {length} bytes for the range {first}-{last}")
        if asked_range and not same_entity(validator, headers):
            return RangePlan("rerequest", reason="206 of another entity (its validator differs from the held one: "
                                                 "If-Range ignored)")
        if asked_range and known_total is not None and total is not None and total != known_total:
            return RangePlan("rerequest", reason=f"entity length changed from {known_total} to {total}")
        return RangePlan("write", start=first, total=total, resumable=True)
    if status == 416:
        cr = parse_content_range(headers.get("Content-Range"))
        if asked_range and cr is not None and cr[0] is None and cr[2] == offset and (
                known_total is None or known_total == offset):
            return RangePlan("complete", start=offset, total=offset, resumable=True)
        if asked_range:
            return RangePlan("rerequest", reason="416 does not confirm the local length")
        return RangePlan("write", start=0, total=_content_length(headers), resumable=False)
    if 200 <= status < 300:
        total = _content_length(headers) if "chunked" not in headers.get("Transfer-Encoding", "").lower() else None
        why = "the server sent the whole entity (Range ignored or If-Range failed)" if asked_range else ""
        return RangePlan("write", start=0, total=total, resumable=status == 200, reason=why)
    return RangePlan("write", start=0, total=_content_length(headers), resumable=False)


#: The smallest segment a download is split into (aria2's smallest ``--min-split-size``): a download with fewer than
#: twice this many bytes left stays on one connection, and a longer one gets at most one segment per this many bytes.
MIN_SEGMENT_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Where a download is split (:func:`plan_split`): ``segments``, the entity's bytes ``(start, end)`` (end excluded)
    of each connection, the first from 0 (the partial file); empty: one connection, for ``reason``."""

    segments: tuple[tuple[int, int], ...] = ()
    reason: str = ""


def _accepts_byte_ranges(headers: Mapping[str, str]) -> bool:
    return "bytes" in (token.strip().lower() for token in headers.get("Accept-Ranges", "").split(","))


def plan_split(connections: int, status: int, headers: Mapping[str, str], plan: RangePlan,
               min_segment: int = MIN_SEGMENT_SIZE) -> SplitPlan:
    """Whether to fetch a download on *connections* parallel connections, and which bytes each fetches (pure).

    *plan* is :func:`plan_response`'s decision for this response (status, headers), whose body is written from
    ``plan.start``. Only an entity that later Range requests can continue without a splice is split: one with a
    strong validator (:func:`resume_validator`: a strong ETag, else Last-Modified), a known length (no chunked
    coding) and Range support (this answer is a 206, or a 200 that says ``Accept-Ranges: bytes``). The bytes still
    to fetch are cut into equal segments of at least *min_segment* bytes: the first runs on from 0 (the bytes held
    and this response's body), each other one is asked with ``Range: bytes=A-B`` and ``If-Range``. Anything else
    stays on one connection."""
    if connections < 2:
        return SplitPlan(reason="one connection per task")
    if plan.action != "write" or not plan.resumable or status not in (200, 206):
        return SplitPlan(reason=f"HTTP {status}: not a whole or partial entity that a Range request can continue")
    if resume_validator(headers) is None:
        return SplitPlan(reason="no strong validator (strong ETag or Last-Modified)")
    if plan.total is None:
        return SplitPlan(reason="unknown length")
    if status == 200 and not _accepts_byte_ranges(headers):
        return SplitPlan(reason="no Accept-Ranges: bytes")
    rest = plan.total - plan.start
    count = min(connections, rest // max(1, min_segment))
    if count < 2:
        return SplitPlan(reason=f"{rest} bytes to fetch: less than two segments of {min_segment}")
    bounds = [0] + [plan.start + rest * i // count for i in range(1, count)] + [plan.total]
    return SplitPlan(tuple(zip(bounds, bounds[1:])))


def _validator_changed(validator: Mapping[str, str] | None, headers: Mapping[str, str]) -> bool:
    """Does a response name another entity than *validator* (the one the held bytes belong to)? Only a validator of
    the same kind tells: a response without one is taken at its If-Range."""
    if not validator:
        return False
    if validator.get("etag"):
        etag = headers.get("ETag", "").strip()
        return bool(etag) and etag != validator["etag"]
    modified = headers.get("Last-Modified", "").strip()
    return bool(modified) and modified != validator.get("last_modified")


def plan_segment(position: int, segment: tuple[int, int], status: int, headers: Mapping[str, str],
                 validator: Mapping[str, str] | None, known_total: int | None) -> RangePlan:
    """The validated-resume rule for one segment of a split download (pure): what to do with the answer to
    ``Range: bytes=P-(E-1)`` and ``If-Range``, where *position* P is how far the segment's file holds it and
    *segment* (S, E) its bytes of the entity.

    ``"write"`` at ``start``: a 206 whose Content-Range starts within [S, P] (earlier than P: the file is cut back to
    it), whose total is the entity's and whose validators, if it sends any, are the entity's -- plan_response's rule,
    with the validators compared too. ``"restart"``: the entity changed (another validator or length, a 416 inside
    it): the whole download starts again from zero on one connection, never a splice of two entities.
    ``"unsplit"``: the server does not serve this range reliably (a 200 for the same entity, a malformed or misplaced
    Content-Range, another status): the bytes held contiguously from the start are kept and the download goes on
    with one connection."""
    changed = _validator_changed(validator, headers)
    if status == 206:
        cr = parse_content_range(headers.get("Content-Range"))
        first, total = (None, None) if cr is None else (cr[0], cr[2])
        if first is None or total is None:
            return RangePlan("unsplit", reason=f"malformed Content-Range {headers.get('Content-Range')!r}")
        if total != known_total or changed:
            return RangePlan("restart", reason=f"the entity changed (length {known_total} -> {total}"
                                               f"{', another validator' if changed else ''})")
        if not segment[0] <= first <= position:
            return RangePlan("unsplit", reason=f"206 starts at {first}, not within [{segment[0]}, {position}]")
        return RangePlan("write", start=first, total=total, resumable=True)
    length = _content_length(headers) if 200 <= status < 300 else None
    if status == 416 or changed or length not in (None, known_total):
        return RangePlan("restart", reason=f"the entity changed (HTTP {status} to a Range request inside it)")
    return RangePlan("unsplit", reason=f"HTTP {status} to a Range request")


def _parse_origin(url: str) -> tuple[str, str, int]:
    """A URL's (scheme, host, port), parsed."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


_cached_origin = functools.lru_cache(maxsize=1024)(_parse_origin)

_AUTHORITY_END_RE = re.compile(r"[/?#]")


def _origin(url: str) -> tuple[str, str, int]:
    """A URL's (scheme, host, port). Parsed once per scheme and authority, and the tuple shared: a session that opens
    with 100,000 queued tasks of a few servers parses a few URLs, not 100,000. (An authority with userinfo is not kept
    in the cache: a password stays in memory no longer than its task needs it.)"""
    scheme, sep, rest = url.partition("://")
    end = _AUTHORITY_END_RE.search(rest)
    head = scheme + sep + (rest if end is None else rest[:end.start()])
    return _parse_origin(url) if not sep or "@" in head else _cached_origin(head)


def bypasses_proxy(host: str, port: int, no_proxy: Sequence[str]) -> bool:
    """urllib's ``no_proxy`` rule (proxy_bypass_environment), pure: ``*`` bypasses every host; an entry matches the
    host itself, or ``host:port``, or any host under it as a domain suffix (a leading dot changes nothing); case is
    ignored. No address ranges (CIDR), as in urllib: name each host or address."""
    host = host.lower().strip("[]")
    for entry in no_proxy:
        if entry == "*":
            return True
        name = entry.lower().lstrip(".")
        if not name:
            continue
        for candidate in (host, f"{host}:{port}"):
            if candidate == name or candidate.endswith("." + name):
                return True
    return False


def proxy_for(url: str, proxies: _Proxies | None) -> _Proxy | None:
    """The proxy a request for *url* goes through (None: straight to the server)."""
    if proxies is None:
        return None
    scheme, host, port = _origin(url)
    proxy = proxies.https if scheme == "https" else proxies.http
    if proxy is None or bypasses_proxy(host, port, proxies.no_proxy):
        return None
    return proxy


def _request_target(url: str) -> str:
    """The origin-form request target of *url*: its path and query."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _authority(url: str) -> str:
    """``host:port`` of *url* (an IPv6 address in brackets): what a CONNECT asks for."""
    _, host, port = _origin(url)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _absolute_target(url: str) -> str:
    """The absolute-form request target a proxy receives: scheme, authority, path and query (no user
    information, no fragment)."""
    return f"{_origin(url)[0]}://{_authority(url)}{_request_target(url)}"


_AUTH_PARAM_RE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_www_authenticate(values: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` field values -> [(scheme lower-case, params)], in offered order."""
    out: list[tuple[str, dict[str, str]]] = []
    for value in values:
        pos = 0
        while pos < len(value):
            m = re.compile(r"\s*,?\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s+|$)").match(value, pos)
            if not m:
                break
            scheme = m.group(1).lower()
            pos = m.end()
            params: dict[str, str] = {}
            while pos < len(value):
                pm = _AUTH_PARAM_RE.match(value, pos)
                if not pm:
                    break
                raw = pm.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[pm.group(1).lower()] = raw
                pos = pm.end()
            out.append((scheme, params))
    return out


def _basic_authorization(cred: Credential) -> str:
    return "Basic " + base64.b64encode(f"{cred.user}:{cred.password}".encode()).decode("ascii")


def _digest_authorization(cred: Credential, params: Mapping[str, str], method: str, uri: str,
                          nc: int, cnonce: str | None = None) -> str:
    """RFC 7616 Digest with qop=auth (or none), MD5 or SHA-256 (and their -sess forms)."""
    algorithm = params.get("algorithm", "MD5")
    base_alg = algorithm.upper().replace("-SESS", "")
    hname = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}.get(base_alg)
    if hname is None:
        raise TransferError(ErrorCode.USER_AUTHENTICATION_REQUIRED, f"unsupported Digest algorithm {algorithm!r}")

    def h(text: str) -> str:
        import hashlib
        return hashlib.new(hname, text.encode("utf-8")).hexdigest()

    realm, nonce = params.get("realm", ""), params.get("nonce", "")
    cnonce = cnonce or os.urandom(8).hex()
    ha1 = h(f"{cred.user}:{realm}:{cred.password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce}")
    ha2 = h(f"{method}:{uri}")
    qops = [q.strip() for q in params.get("qop", "").split(",") if q.strip()]
    ncs = f"{nc:08x}"
    if "auth" in qops:
        response = h(f"{ha1}:{nonce}:{ncs}:{cnonce}:auth:{ha2}")
    else:
        response = h(f"{ha1}:{nonce}:{ha2}")
    fields = [f'username="{cred.user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"',
              f"algorithm={algorithm}", f'response="{response}"']
    if "opaque" in params:
        fields.append(f'opaque="{params["opaque"]}"')
    if "auth" in qops:
        fields += ["qop=auth", f"nc={ncs}", f'cnonce="{cnonce}"']
    return "Digest " + ", ".join(fields)


def _entity_response(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A finished download's response as the app sees it: a resumed 206 becomes the entity's 200."""
    if rec.get("status") != 206:
        return dict(rec)
    headers = [[k, v] for k, v in rec.get("headers", []) if k.lower() not in ("content-range", "content-length")]
    cr = parse_content_range(Headers(tuple(p) for p in rec.get("headers", [])).get("Content-Range"))
    if cr and cr[2] is not None:
        headers.append(["Content-Length", str(cr[2])])
    return {"url": rec["url"], "status": 200, "headers": headers}


#: Statuses that redirect when a ``Location`` comes with them.
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Re-requests without Range within one attempt before the server counts as broken.
_MAX_REREQUESTS = 3
#: New requests from task_will_begin_delayed_request within one attempt before a 401/403 is the task's result.
_MAX_RENEWALS = 3


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """Where one attempt stands in its response sequence: the input of :func:`next_step`."""

    kind: str  # "download" or "upload"
    method: str
    url: str
    retry: Retry
    redirects: int = 0  # followed so far in this attempt
    rerequests: int = 0  # whole-entity re-requests so far in this attempt
    offset: int = 0  # download: bytes held locally
    validator: Mapping[str, str] | None = None  # download: what the held bytes belong to
    known_total: int | None = None  # download: the entity length recorded earlier
    rerequest: bool = False  # download: ask without Range (the last range answer was unusable)
    auth_declined: bool = False  # the 401 (or 407) in hand was not answered with a credential
    renewals: int = 0  # new requests the app gave for a 401/403 in this attempt
    renew_declined: bool = False  # the 401/403 in hand stands: the app continued or gave nothing new
    segment: tuple[int, int] | None = None  # a split download's segment (start, end): asks bytes offset..end-1

    @property
    def asks_range(self) -> bool:
        return self.kind == "download" and (self.offset > 0 or self.segment is not None) and \
            self.validator is not None and not self.rerequest

    def request_headers(self) -> dict[str, str]:
        """A download never asks for a transfer coding that would change the bytes; it asks for the
        rest (``Range`` + ``If-Range`` with the strong ETag, else Last-Modified) of an entity whose
        validator it holds, and for the whole entity otherwise."""
        if self.kind != "download":
            return {}
        if not self.asks_range:
            return {"Accept-Encoding": "identity"}
        assert self.validator is not None
        last = "" if self.segment is None else str(self.segment[1] - 1)
        return {"Accept-Encoding": "identity", "Range": f"bytes={self.offset}-{last}",
                "If-Range": self.validator.get("etag") or self.validator["last_modified"]}


# The steps next_step() answers with; it may also end the attempt with a _Failed or an _Interrupted.


@dataclasses.dataclass(frozen=True)
class _FollowRedirect:
    """Ask *url* (a URI, never with userinfo); *credential*: the userinfo the Location carried, for that origin."""
    url: str
    credential: Credential | None = None


@dataclasses.dataclass(frozen=True)
class _Authenticate:
    """A 401 (a 407: *proxy*) offering these Basic/Digest challenges, in the server's order."""
    offers: tuple[tuple[str, Mapping[str, str]], ...]
    proxy: bool = False


@dataclasses.dataclass(frozen=True)
class _Renew:
    """A 401 no challenge answered, or a 403: ask the app for a new request (task_will_begin_delayed_request)."""
    status: int


@dataclasses.dataclass(frozen=True)
class _AskAgain:
    """Discard this response and ask for the whole entity (the range answer was unusable)."""
    reason: str


@dataclasses.dataclass(frozen=True)
class _Accept:
    """This response is the result; a download writes its body as *plan* says (None: uploads)."""
    plan: RangePlan | None


_Step = Union[_FollowRedirect, _Authenticate, _Renew, _AskAgain, _Accept, _Failed, _Interrupted]


def _redirect_step(ex: _Exchange, status: int, location: str) -> _Step:
    import urllib.parse
    if not ex.retry.allows_redirect(ex.redirects):
        return _Failed(TransferError(ErrorCode.HTTP_TOO_MANY_REDIRECTS,
                                     f"more than {ex.retry.redirect} redirects (last: {ex.url})", url=ex.url))
    try:
        new, credential = _split_userinfo(urllib.parse.urljoin(ex.url, _location_to_iri(location.strip())))
        new = _check_url(new, "redirect URL")
    except (TransferError, InvalidArgumentError, ValueError) as err:
        code = err.code if isinstance(err, TransferError) else ErrorCode.BAD_URL
        message = err.message if isinstance(err, TransferError) else str(err)
        return _Failed(TransferError(code, f"refused redirect from {ex.url}: {message}", url=ex.url))
    if ex.kind == "upload" and status in (301, 302, 303) and ex.method != "PUT":
        return _Failed(TransferError(ErrorCode.BAD_SERVER_RESPONSE,
                                     f"upload redirected with {status}, which would drop the body", url=new))
    return _FollowRedirect(new, credential)


def next_step(ex: _Exchange, status: int, headers: Headers) -> _Step:
    """The response sequence of both transfer kinds, in order: redirect -> 401/407 challenge -> 401/403 renewal ->
    retryable status -> (downloads) the validated-range plan (a split download's segment: :func:`plan_segment`'s).
    Pure: the caller does what it says. A 407 that no credential answers fails the task: a proxy's page is not the
    resource's answer."""
    if status in _REDIRECT_STATUSES and "Location" in headers:
        return _redirect_step(ex, status, headers["Location"])
    if status in (401, 407) and not ex.auth_declined:
        field = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        offers = tuple((scheme, params) for scheme, params in parse_www_authenticate(headers.get_all(field))
                       if scheme in ("basic", "digest"))
        if offers:
            return _Authenticate(offers, proxy=status == 407)
    if status == 407:
        return _Failed(TransferError(ErrorCode.USER_AUTHENTICATION_REQUIRED, f"the proxy asks for credentials "
                                     f"(HTTP 407 for {ex.url}) and none was given", url=ex.url))
    if status in (401, 403) and not ex.renew_declined and ex.renewals < _MAX_RENEWALS:
        return _Renew(status)
    if ex.retry.retries_status(status):
        return _Interrupted(ErrorCode.BAD_SERVER_RESPONSE, f"HTTP {status} from {ex.url}",
                            retry_after=headers.get("Retry-After"))
    if ex.kind != "download":
        return _Accept(None)
    if ex.segment is not None:  # the segment's worker writes, restarts or falls back to one connection
        return _Accept(plan_segment(ex.offset, ex.segment, status, headers, ex.validator, ex.known_total))
    plan = plan_response(ex.offset, ex.asks_range, status, headers, ex.known_total, ex.validator)
    if plan.action != "rerequest":
        return _Accept(plan)
    if ex.rerequests >= _MAX_REREQUESTS:
        return _Interrupted(ErrorCode.CANNOT_RESUME, f"server keeps answering unusable ranges: {plan.reason}")
    return _AskAgain(plan.reason)


@dataclasses.dataclass(frozen=True)
class _Complete:
    """The body ended with the entity: the file is whole."""


@dataclasses.dataclass(frozen=True)
class _AskRest:
    """The body ended early but advanced the file: ask for the rest with Range, in this attempt."""


def after_body(held_before: int, held_after: int, total: int | None, resumable: bool
               ) -> _Complete | _AskRest | _Interrupted | _Failed:
    """What to do once an accepted download body ended (pure). *held_before*: bytes held before this response;
    *held_after*: after its body; *total*: the entity's length if known; *resumable*: the held bytes have a validator.

    A body that ended early asks for the rest only if it advanced the file: one that did not (a 206 with no body, a
    connection closed before the first new byte) ends the attempt, so the Retry policy -- which counts attempts
    without progress -- bounds it; never a loop of requests inside one attempt."""
    if total is None or held_after == total:
        return _Complete()
    if held_after > total:
        return _Failed(TransferError(ErrorCode.BAD_SERVER_RESPONSE, f"server sent {held_after} bytes of a "
                                     f"{total}-byte entity"), keep_partial=False)
    if held_after <= held_before:
        return _Interrupted(ErrorCode.NETWORK_CONNECTION_LOST, f"body ended at {held_after} of {total} bytes "
                            f"without advancing past the {held_before} bytes held")
    if not resumable:
        return _Interrupted(ErrorCode.NETWORK_CONNECTION_LOST, f"body ended at {held_after} of {total} bytes")
    return _AskRest()


# ============================================================================
# 6. Store: the session directory, journal, snapshot, recovery, resume data
# ============================================================================
#
# On disk, per session: journal.jsonl (append-only records, group-committed), snapshot.json (the state folded at the
# last compaction), tmp/ (partial, finished-awaiting-delivery and resume files), lock, reserve. The store knows tasks
# as records and files; it knows nothing of HTTP or of apps.

_JOURNAL_NAME = "journal.jsonl"
_PREV_JOURNAL_NAME = "journal.prev.jsonl"  # the journal a running compaction is folding into the next snapshot
_SNAPSHOT_NAME = "snapshot.json"
_LOCK_NAME = "lock"
_TMP_DIR = "tmp"
#: The marker of a directory bgsession made (the CACHEDIR.TAG idea): only in such a directory does it chmod, take
#: files back or delete them.
_MARKER_NAME = "BGSESSION.TAG"
_MARKER_SIGNATURE = b"Signature: bgsession session directory\n"
#: Names bgsession gives the files it keeps in tmp/ (the only ones it ever removes there): a task's partial,
#: finished, upload-response file, the marker that a finish hook was handed one, a split download's segment, and a
#: partial kept for resume data.
_TMP_NAME_RE = re.compile(r"\A(\d+)\.(?:part|done|body|seg\d+)(?:\.handed)?\Z")
_RESUME_NAME_RE = re.compile(r"\Aresume-\d+-[0-9a-f]{12}\.part\Z")


def _handed_name(finished: str) -> str:
    """The marker the delegate thread creates next to a finished file (a name or a path) just before it hands the file
    to the finish hook. A finished file found gone *with* its marker was taken by the hook (which died before its
    acknowledgement); gone *without* it, it vanished before delivery (a temp-file cleaner): that is an error."""
    return f"{finished}.handed"


#: Longest journal line read: a longer one is damage, skipped without reading it into memory (the API's bounds on
#: URLs, headers and descriptions keep every record far below it).
_MAX_RECORD_BYTES = 16 << 20
#: Problems reported one by one, per file; beyond that they are counted.
_MAX_PROBLEMS = 20
#: Space kept in reserve so that the journal can still record a "disk full" failure.
_RESERVE_NAME = "reserve"
RESERVE_BYTES = 256 << 10
#: Record types that move a task through the transition table (their "t" is the event).
_PHASE_RECORDS = frozenset({"resume", "schedule", "suspend", "start", "backoff", "due", "requeue", "cancel", "finish",
                            "fail"})
_DIR_MODE = 0o700
_FILE_MODE = 0o600
#: Every journal record type; the reducer (_SessionState.apply) handles exactly these.
_RECORD_TYPES = _PHASE_RECORDS | frozenset({"header", "reserve", "task", "ack", "describe", "response", "progress",
                                            "redirect", "vanished", "priority", "begin", "limit", "split", "unsplit"})
#: What journal format 2 added to format 1: the scheduling options (these record types, these fields of a task).
#: A record or snapshot is written as format 2 only if it uses one of them: a journal that uses none stays readable
#: by a bgsession of format 1, and one that does is refused by it (with its clear error) instead of being misread --
#: a scheduled task started at once, a limit ignored.
_FORMAT_2_RECORDS = frozenset({"schedule", "priority", "begin", "limit"})
_FORMAT_2_TASK_FIELDS = {"priority": DEFAULT_PRIORITY, "begin": None, "limit": None}  # and their defaults
#: What format 3 added: segmented downloads (these record types, a ``progress`` record of a segment, a task's
#: ``segments``). A reader of format 2 would take a segment's offset for the whole file's: it must refuse them. And
#: ``vanished`` (a finished file removed before delivery), which came in the same release: a reader of format 2 would
#: not know the record type.
_FORMAT_3_RECORDS = frozenset({"split", "unsplit", "vanished"})
#: What format 4 added: a journal header with ``after`` (the journal goes on from the previous one, kept as
#: ``journal.prev.jsonl`` while a compaction folds it in the background). A reader of format 3 would replay the new
#: journal over a snapshot that lacks the previous one's records: it must refuse it.
#: Task identifiers reserved (durably) at a time: a task lost to a kill before its record reached
#: the disk leaves a gap, never a reused identifier.
ID_RESERVE_BLOCK = 1024
#: Journal records after which the journal is compacted into the snapshot.
DEFAULT_COMPACT_RECORDS = 20_000
#: Prefix of resume data produced by this module (versioned; the rest is JSON). Version 2 names its partial file
#: relative to the session's tmp/ (version 1, an absolute path: only its name is used, inside tmp/).
_RESUME_MAGIC = b"bgsession-resume-data/2\n"
_RESUME_MAGICS = (_RESUME_MAGIC, b"bgsession-resume-data/1\n")
#: Days a partial file kept for resume data survives before it is removed.
RESUME_FILE_TTL = 7 * 24 * 3600.0


def _record_version(record_type: str, fields: Mapping[str, Any]) -> int:
    """The oldest journal format that holds a record (the "v" it is written with)."""
    if record_type == "header" and "after" in fields:
        return 4
    if record_type in _FORMAT_3_RECORDS or (record_type == "progress" and "segment" in fields):
        return 3
    if record_type in _FORMAT_2_RECORDS or (record_type == "task" and not _FORMAT_2_TASK_FIELDS.keys().isdisjoint(
            fields)):
        return 2
    return 1


def _boot_id() -> str | None:
    """The running kernel boot's identifier (None: none here). Same boot as a journal record: the page cache survived
    a process kill, every byte written is there; another boot: only what an fsynced offset record covers."""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip() or None
    return None


_BOOT_ID = _boot_id()


class _FileSystem:
    """Every file-system operation the durability order depends on, in one table, the way SQLite routes its I/O
    through a VFS: production uses these ``os`` functions; the power-loss tests swap ``_vfs`` for a recorder that
    replays every state a disk may hold after a crash. Reads and metadata do not go through it; bgsession never
    writes at an offset other than the file's position."""

    open = staticmethod(os.open)
    write = staticmethod(os.write)
    truncate = staticmethod(os.ftruncate)
    sync = staticmethod(getattr(os, "fdatasync", os.fsync))  # a file's data (and the metadata to read it back)
    sync_dir = staticmethod(os.fsync)  # a directory's entries
    replace = staticmethod(os.replace)
    link = staticmethod(os.link)
    unlink = staticmethod(os.unlink)
    mkdir = staticmethod(os.mkdir)
    close = staticmethod(os.close)


_vfs = _FileSystem()


def _open_private(path: str, flags: int) -> int:
    """os.open with mode 0600 whatever the umask."""
    fd = _vfs.open(path, flags | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
    if os.name == "posix":
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != _FILE_MODE:
                os.fchmod(fd, _FILE_MODE)
        except OSError:
            _vfs.close(fd)
            raise
    return fd


def _truncate_file(path: str, size: int) -> None:
    """Cut (or extend) the file at *path* to *size* bytes (recovery: a partial file to what can be trusted)."""
    fd = _open_private(path, os.O_RDWR)
    try:
        _vfs.truncate(fd, size)
    finally:
        _vfs.close(fd)


def _fsync(fd: int) -> None:
    if sys.platform == "darwin" and fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    _vfs.sync(fd)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return
    fd = _vfs.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _vfs.sync_dir(fd)
    finally:
        _vfs.close(fd)


def _makedirs(path: str, mode: int) -> None:
    """os.makedirs, and each directory it creates is made durable in its parent (fsync of the parent)."""
    parent = os.path.dirname(path)
    if os.path.isdir(path) or not parent or parent == path:
        return
    _makedirs(parent, mode)
    try:
        _vfs.mkdir(path, mode)
    except FileExistsError:
        return
    _fsync_dir(parent)


class _GroupSync:
    """One fsync shared by concurrent callers: a caller arriving during a sync waits for the next."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._cond = threading.Condition(threading.Lock())
        self._done = 0  # syncs completed
        self._running = False

    def sync(self) -> None:
        with self._cond:
            target = self._done + (2 if self._running else 1)  # a sync already under way may predate us
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._cond.release()
                try:
                    self._fn()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done += 1
                    self._cond.notify_all()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[_vfs.write(fd, view):]


def _atomic_write(path: str, data: bytes) -> None:
    """Same-directory temp file (0600) -> write -> fsync -> os.replace -> fsync the directory."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            _write_all(fd, data)
            _fsync(fd)
        finally:
            _vfs.close(fd)
        _vfs.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the original exception matters, not this one
            _vfs.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _make_private_dirs(path: str) -> None:
    """Create *path* and each missing parent with mode 0700, whatever the umask (os.makedirs would create the parents
    0777 & ~umask: with umask 000, a directory other users can plant a fake session or daemon socket in). Existing
    parents are left as they are."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            _vfs.mkdir(directory, _DIR_MODE)
        except FileExistsError:
            continue  # another process made it meanwhile: its own business, checked below if it is ours
        if os.name == "posix" and stat.S_IMODE(os.lstat(directory).st_mode) != _DIR_MODE:
            os.chmod(directory, _DIR_MODE)  # a umask can only take bits away; this puts 0700 back
        _fsync_dir(os.path.dirname(directory))  # durable in its parent: a power loss must not take the session


def _is_session_dir(path: str) -> bool:
    """Does *path* look like a session directory bgsession made: its marker, or (made by an older bgsession, before
    markers) a journal or snapshot? Reads only."""
    try:
        with open(os.path.join(path, _MARKER_NAME), "rb") as f:
            return f.read(len(_MARKER_SIGNATURE)) == _MARKER_SIGNATURE
    except OSError:
        return any(os.path.isfile(os.path.join(path, name)) for name in (_JOURNAL_NAME, _SNAPSHOT_NAME))


def _private_dir(path: str, what: str = "session directory") -> os.stat_result:
    """Check that *path* is a real directory (not a symbolic link) of this user; returns its lstat."""
    try:
        st = os.lstat(path)
    except OSError as err:
        raise JournalError(f"cannot use the {what} {path}: {err.strerror or err}", path) from err
    if stat.S_ISLNK(st.st_mode):
        raise _invalid(f"the {what} {path} is a symbolic link; bgsession does not follow it (another user could "
                       "point it anywhere): give the real path")
    if not stat.S_ISDIR(st.st_mode):
        raise _invalid(f"the {what} {path} is not a directory")
    if os.name == "posix" and st.st_uid != os.getuid():
        raise JournalError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
                           "refusing to use it", path)
    return st


def _claim_session_dir(path: str, identifier: str | None) -> None:
    """Make *path* this user's private session directory, or refuse it. Created (with private parents) if missing;
    an existing one must be a real directory of this user that bgsession made (its marker) or an empty one, which
    gets the marker; anything else -- a folder of the user's files -- is refused untouched: bgsession deletes and
    chmods only in directories it made."""
    try:
        _make_private_dirs(path)
    except OSError as err:
        raise JournalError(f"cannot create the session directory {path}: {err.strerror or err}", path) from err
    st = _private_dir(path)
    if not _is_session_dir(path):
        try:
            foreign = os.listdir(path)
        except OSError as err:
            raise JournalError(f"cannot read the session directory {path}: {err.strerror or err}", path) from err
        # (its own marker's temp file, left by a crash or a power loss while bgsession claimed the directory)
        stray = [name for name in foreign if re.fullmatch(re.escape(_MARKER_NAME) + r"\.tmp-\d+-\d+", name)]
        for name in stray:
            with contextlib.suppress(FileNotFoundError):
                _vfs.unlink(os.path.join(path, name))
        foreign = [name for name in foreign if name not in stray]
        if foreign:
            raise _invalid(f"{path} is not a bgsession session directory (no {_MARKER_NAME}, and it holds "
                           f"{len(foreign)} entries, e.g. {sorted(foreign)[0]!r}); refusing to use it: give a new or "
                           "empty directory")
    tmp = os.path.join(path, _TMP_DIR)
    try:
        if os.name == "posix" and stat.S_IMODE(st.st_mode) != _DIR_MODE:
            os.chmod(path, _DIR_MODE)
        marker = os.path.join(path, _MARKER_NAME)
        if not os.path.exists(marker):
            _atomic_write(marker, _MARKER_SIGNATURE + f"# identifier: {identifier}\n# bgsession "
                                                       f"{__version__}\n".encode())
        if not os.path.isdir(tmp):
            with contextlib.suppress(FileExistsError):
                _vfs.mkdir(tmp, _DIR_MODE)
                _fsync_dir(path)
        if os.name == "posix" and stat.S_IMODE(_private_dir(tmp, "session's tmp directory").st_mode) != _DIR_MODE:
            os.chmod(tmp, _DIR_MODE)
    except OSError as err:
        raise JournalError(f"cannot prepare the session directory {path}: {err.strerror or err}", path) from err


def _dumps(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _snapshot_bytes(snap: Mapping[str, Any]) -> bytes:
    """A snapshot as written: its fields, then ``tasks`` last, a task a line. Any JSON reader reads it whole (as every
    bgsession before did); a compaction in the background reads it a task at a time (``_parse_snapshot``) and writes
    it so, never holding the interpreter for the whole of a large snapshot in one call (the app's threads wait for
    that: 0.5 s at 100,000 tasks)."""
    head = _dumps({k: v for k, v in snap.items() if k != "tasks"})
    tasks = b",\n".join([_dumps(task)[:-1] for task in snap["tasks"]])
    return b"".join((head[:-2], b',"tasks":[\n', tasks, b"\n]}\n"))


_TASKS_OPEN, _TASKS_CLOSE = b',"tasks":[', b"\n]}\n"


def _parse_snapshot(data: bytes, by_task: bool) -> Any:
    """A snapshot's JSON value; *by_task*: a snapshot in ``_snapshot_bytes``'s layout is parsed a task at a time."""
    first, _, rest = data.partition(b"\n")
    if by_task and first.endswith(_TASKS_OPEN) and rest.endswith(_TASKS_CLOSE):
        with contextlib.suppress(ValueError):  # (not of that layout after all: read whole, below)
            snap = json.loads(first[:-len(_TASKS_OPEN)] + b"}")
            if isinstance(snap, dict):
                body = rest[:-len(_TASKS_CLOSE)]
                snap["tasks"] = [json.loads(line.rstrip(b",")) for line in body.split(b"\n") if line]
                return snap
    return json.loads(data)


def _read_if_exists(path: str) -> bytes | None:
    """A small file's bytes (the CLI's and the login service's own files), or None if there is none."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _size(path: str) -> int | None:
    """The file's size, or None if it cannot be read."""
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _unlink_quietly(path: str) -> None:
    try:
        _vfs.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("cannot remove %s: %s", path, err)


_PROCESS_LOCKS: dict[str, int] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _acquire_lock(directory: str, name: str, identifier: str | None) -> int:
    """Take the exclusive lock file *name* in *directory*: held by a live owner (this process or another), it raises
    TransferError BACKGROUND_SESSION_IN_USE; the kernel releases it when its owner dies, so a dead one's is taken."""
    path = os.path.join(directory, name)
    with _PROCESS_LOCKS_GUARD:
        if path in _PROCESS_LOCKS:
            raise TransferError(ErrorCode.BACKGROUND_SESSION_IN_USE, f"background session {identifier!r} is already "
                                f"live in this process (lock {path}); use that Session, or close/invalidate it first")
        fd = _open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif msvcrt is not None:  # pragma: no cover - Windows
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as err:
            owner = b""
            with contextlib.suppress(OSError):
                owner = os.pread(fd, 64, 0).strip() if hasattr(os, "pread") else b""
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise TransferError(ErrorCode.BACKGROUND_SESSION_IN_USE, f"background session {identifier!r} is in "
                                    f"use by process {owner.decode('ascii', 'replace') or '?'} (lock {path}); one "
                                    "live session per identifier") from None
            raise JournalError(f"cannot lock {path}: {err.strerror or err}", path) from err
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        _PROCESS_LOCKS[path] = fd
        return fd


def _release_lock(directory: str, name: str) -> None:
    path = os.path.join(directory, name)
    with _PROCESS_LOCKS_GUARD:
        fd = _PROCESS_LOCKS.pop(path, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops flock


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_pairs(v: Any) -> bool:
    return all(type(p) is list and len(p) == 2 and type(p[0]) is str and type(p[1]) is str for p in v)


def _is_names(v: Any) -> bool:
    return type(v) is list and all(type(n) is str for n in v)


_NO_ITEMS: list[Any] = []  # (a missing list's default in the checks below: read, never changed)


def _is_request(v: Mapping[str, Any]) -> bool:
    get = v.get  # (once per record of a snapshot of 100,000 tasks: no generator for an empty list)
    headers, names = get("headers", _NO_ITEMS), get("secret_headers", _NO_ITEMS)
    return type(get("url")) is str and type(get("method", "")) is str and type(headers) is list \
        and (not headers or _is_pairs(headers)) and type(get("sha256")) in (str, type(None)) \
        and type(names) is list and (not names or _is_names(names))


def _is_response(v: Mapping[str, Any]) -> bool:
    return type(v.get("url")) is str and type(v.get("status")) is int and type(v.get("headers", [])) is list \
        and _is_pairs(v.get("headers", ()))


_NONE = type(None)
_INT, _NUMBER, _TEXT, _OBJECT = frozenset({int}), frozenset({int, float}), frozenset({str}), frozenset({dict})
#: The types the value of each field a journal record or a snapshot's task may carry can have (a missing field takes
#: its default; an unknown one is ignored, for newer bgsessions)...
_FIELD_TYPES: dict[str, frozenset[type]] = {
    **dict.fromkeys(("v", "id", "generation", "after", "upto", "next_id", "delivery_counter", "durable_offset",
                     "start", "offset", "code"), _INT),
    **dict.fromkeys(("total", "delivery_seq"), _INT | {_NONE}),
    **dict.fromkeys(("created", "delay"), _NUMBER), **dict.fromkeys(("started", "at"), _NUMBER | {_NONE}),
    **dict.fromkeys(("t", "kind", "phase", "event", "url", "current_url"), _TEXT),
    **dict.fromkeys(("description", "boot", "file", "resume_file", "problem"), _TEXT | {_NONE}),
    **dict.fromkeys(("cancel_requested", "want_resume_data", "resume_data"), frozenset({bool})),
    "request": _OBJECT, **dict.fromkeys(("response", "error", "validator", "upload"), _OBJECT | {_NONE}),
    "acked": frozenset({list}), "secrets": frozenset({list}),
    "priority": _NUMBER, "begin": _NUMBER | {_NONE}, **dict.fromkeys(("limit", "rate", "configured"), _INT | {_NONE}),
}
_PHASE_VALUES = frozenset(p.value for p in Phase)
_PHASE_OF = {p.value: p for p in Phase}
#: ...and what more than its type a value (not None) must be. Records are checked before they are applied: a record
#: or snapshot task that does not fit is skipped and reported, never half-applied, never a crash at every open. File
#: names must be the ones bgsession gives files in tmp/: damaged state never points the store at another file.
_FIELD_FORMS: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(("generation", "after", "upto", "next_id", "delivery_counter", "durable_offset", "start",
                     "offset", "total", "delivery_seq"), (0).__le__),  # (C methods, not lambdas: this runs per record)
    "id": (1).__le__, "kind": frozenset({"download", "upload"}).__contains__, "phase": _PHASE_VALUES.__contains__,
    "request": _is_request, "response": _is_response,
    "acked": lambda v: all(map(("finish", "complete").__contains__, v)),
    "error": lambda v: type(v.get("code", 0)) is int and type(v.get("message", "")) is str
    and type(v.get("url")) in (str, _NONE),
    "validator": lambda v: all(type(v.get(k, "")) is str for k in ("etag", "last_modified")),
    "upload": lambda v: type(v.get("path")) is str and all(type(v.get(k, 0)) is int for k in ("size", "mtime_ns")),
    "file": lambda v: _TMP_NAME_RE.match(v) is not None, "resume_file": lambda v: _RESUME_NAME_RE.match(v) is not None,
    "priority": lambda v: 0.0 <= v <= 1.0, **dict.fromkeys(("limit", "rate", "configured"), (1).__le__),
}


def _check_fields(rec: Any, required: Sequence[str] = ()) -> None:
    """Raise JournalError unless *rec* is an object whose fields have the types and forms above."""
    if type(rec) is not dict:
        raise JournalError(f"a record must be an object, not {type(rec).__name__}")
    for name in required:
        if name not in rec:
            raise JournalError(f"field {name!r} is missing")
    types, forms = _FIELD_TYPES, _FIELD_FORMS
    for name, value in rec.items():
        allowed = types.get(name)
        if allowed is None or (value is None and _NONE in allowed):
            continue
        form = forms.get(name)
        if type(value) not in allowed or (form is not None and not form(value)):
            raise JournalError(f"field {name!r} has a value of the wrong type or form: {value!r}"[:300])


#: At most this many record shapes are remembered by _check_task (a hostile snapshot of every shape costs no memory).
_MAX_SHAPES = 64


def _check_task(rec: Any, shapes: dict[Any, tuple[tuple[str, Callable[[Any], bool]], ...]]) -> None:
    """``_check_fields(rec, ("id", "request"))`` for each task of a snapshot, with the same outcome and errors, in a
    fraction of the time: a snapshot's tasks share a few shapes (their field names, and the type of each value), and
    a record of a shape that passed once has the same types, so only its fields' forms are checked (*shapes*: the
    forms to check of each shape seen, filled here). A record of a new shape, or one that fails a form, goes
    through _check_fields, which raises the error."""
    if type(rec) is dict:
        shape = (tuple(rec), tuple(map(type, rec.values())))
        forms = shapes.get(shape)
        if forms is not None:
            for name, form in forms:
                if not form(rec[name]):
                    break
            else:
                return
        _check_fields(rec, ("id", "request"))
        if forms is None and len(shapes) < _MAX_SHAPES:  # passed: remember the forms its values need
            shapes[shape] = tuple((name, _FIELD_FORMS[name]) for name, kind in zip(*shape) if name in _FIELD_FORMS
                                  and not (kind is _NONE and _NONE in _FIELD_TYPES[name]))
        return
    _check_fields(rec, ("id", "request"))


#: The fields a slim snapshot task leaves out when they hold these values (the defaults _TaskRecord reads them as).
_SLIM_DEFAULTS: dict[str, Any] = {
    "acked": [], "secrets": [], **dict.fromkeys(("cancel_requested", "want_resume_data"), False),
    **dict.fromkeys(("boot", "delivery_seq", "description", "error", "file", "problem", "response", "resume_file",
                     "started", "total", "upload", "validator"), None), "durable_offset": 0,
}


class _TaskRecord:
    """One task as the journal knows it. Mutated only by :class:`_SessionState`."""

    __slots__ = (
        "acked", "begin", "boot", "cancel_requested", "created", "current_url", "delivery_seq", "description",
        "durable_offset", "error", "file", "id", "kind", "limit", "live", "phase", "priority", "problem", "request",
        "response", "resume_file", "secrets", "segments", "started", "total", "upload", "validator", "want_resume_data",
    )

    def __init__(self, rec: Mapping[str, Any]) -> None:
        get = rec.get  # (runs once per task of a snapshot: 100,000 at a relaunch)
        self.id: int = int(rec["id"])
        self.kind: str = get("kind", "download")
        self.request: dict[str, Any] = dict(rec["request"])
        self.description: str | None = get("description")
        self.created: float = float(get("created", 0.0))
        self.started: float | None = get("started")
        phase = get("phase", "suspended")
        self.phase: Phase = (type(phase) is str and _PHASE_OF.get(phase)) or Phase(phase)  # (ValueError: unknown)
        self.cancel_requested: bool = bool(get("cancel_requested", False))
        self.want_resume_data: bool = bool(get("want_resume_data", False))
        self.upload: dict[str, Any] | None = get("upload")
        self.response: dict[str, Any] | None = get("response")
        self.validator: dict[str, Any] | None = get("validator")
        self.total: int | None = get("total")
        self.durable_offset: int = int(get("durable_offset", 0))
        self.boot: str | None = get("boot")
        self.error: dict[str, Any] | None = get("error")
        self.file: str | None = get("file")
        self.resume_file: str | None = get("resume_file")
        self.delivery_seq: int | None = get("delivery_seq")
        acked = get("acked")
        self.acked: tuple[str, ...] = tuple(acked) if acked else ()  # (a tuple: the empty one is shared)
        self.current_url: str = get("current_url") or self.request["url"]
        self.problem: str | None = get("problem")  # e.g. unusable resume data: fails at resume()
        self.priority: float = float(get("priority", DEFAULT_PRIORITY))  # the scheduling options (format 2)
        self.begin: float | None = get("begin")
        self.limit: int | None = get("limit")
        secrets = get("secrets")
        self.secrets: tuple[str, ...] = tuple(secrets) if secrets else ()  # names of the request's secret headers
        #: A split download's segments, [start, end, durable position] each (format 3); [] once it fell back to one
        #: connection (it is never split again); None: never split.
        self.segments: list[list[int]] | None = get("segments")
        self.live: Any = None  # engine-side state, never persisted

    def snapshot(self, slim: bool = False) -> dict[str, Any]:
        """The task in snapshot form; *slim*: without the fields that hold their default (every reader since format
        1 takes a missing field's default: a snapshot of 100,000 queued tasks is half the size, and half the
        objects to decode at the next open)."""
        out = {name: getattr(self, name) for name in self.__slots__ if name != "live"}
        out["phase"], out["acked"], out["secrets"] = self.phase.value, list(self.acked), list(self.secrets)
        for name, default in (*_FORMAT_2_TASK_FIELDS.items(), ("segments", None)):
            if out[name] == default:
                del out[name]  # (a task without options keeps the snapshot format 1)
        if slim:
            for name, default in _SLIM_DEFAULTS.items():
                value = out[name]
                if value is default or (type(value) is type(default) and value == default):
                    del out[name]
            if self.current_url == self.request.get("url"):
                del out["current_url"]
        return out

    def resource_expired(self, now: float, timeout: float) -> bool:
        """Has *timeout* (timeout_for_resource) passed? It counts from the first resume(), or from the earliest begin
        date if that is later."""
        if self.started is None:
            return False
        return now - (self.started if self.begin is None else max(self.started, self.begin)) > timeout

    def resource_left(self, now: float, timeout: float) -> float:
        """Seconds until timeout_for_resource (all of it if the task has not started)."""
        if self.started is None:
            return timeout
        return (self.started if self.begin is None else max(self.started, self.begin)) + timeout - now

    def events(self) -> list[str]:
        """The durable events this task owes the app, in order, not yet acknowledged."""
        if self.phase is not Phase.DELIVERING:
            return []
        owed = (["finish"] if self.file and self.kind == "download" else []) + ["complete"]
        return [e for e in owed if e not in self.acked]

    @property
    def partial_name(self) -> str:
        return f"{self.id}.part"

    @property
    def done_name(self) -> str:
        """The verified, fsynced file between its rename and its finish record (recovery takes it back)."""
        return f"{self.id}.done"

    def segment_name(self, index: int) -> str:
        """The file of a split download's segment: the partial file for the first, ``<id>.seg<k>`` for the others."""
        return self.partial_name if index == 0 else f"{self.id}.seg{index}"


def _split_segments(task: _TaskRecord, bounds: Any) -> list[list[int]]:
    """A ``split`` record's segments as the task keeps them, [start, end, durable position] each: contiguous from 0
    to the entity's length; the first keeps the partial file's durable bytes (JournalError if they do not fit)."""
    if task.segments is not None:
        raise JournalError(f"task {task.id} is split again (or after it fell back to one connection)")
    try:
        pairs = [(int(start), int(end)) for start, end in bounds]
    except (TypeError, ValueError) as err:
        raise JournalError(f"malformed segments {bounds!r} of task {task.id}") from err
    ends = [end for _, end in pairs]
    if not 2 <= len(pairs) <= MAX_CONNECTIONS_PER_TASK or pairs[0][0] != 0 or ends[-1] != task.total or any(
            start >= end for start, end in pairs) or [start for start, _ in pairs[1:]] != ends[:-1]:
        raise JournalError(f"segments {bounds!r} of task {task.id} do not cover its {task.total} bytes in order")
    return [[start, end, min(task.durable_offset, end) if i == 0 else start] for i, (start, end) in enumerate(pairs)]


class _SessionState:
    """The journal's reducer: records in, model out, no I/O. ``apply(record)`` validates first and changes nothing
    when a record does not fit (IllegalTransition, JournalError); recovery skips such records into ``problems``."""

    def __init__(self) -> None:
        self.tasks: dict[int, _TaskRecord] = {}
        self.next_id, self.delivery_counter, self.generation = 1, 0, 0
        self.reserved = 0  # see the "reserve" record
        self.replayed = 0  # journal records recovery replayed on top of the snapshot
        self.problems: list[str] = []
        self.session_limit: tuple[int | None, int | None] | None = None  # see the session's "limit" record

    def to_snapshot(self) -> dict[str, Any]:
        tasks = [t.snapshot(slim=True) for t in self.tasks.values() if t.phase is not Phase.ACKNOWLEDGED]
        newer = self.session_limit is not None or any(
            t["phase"] == Phase.SCHEDULED.value or not _FORMAT_2_TASK_FIELDS.keys().isdisjoint(t) for t in tasks)
        version = 3 if any("segments" in t for t in tasks) else 2 if newer else 1
        snap: dict[str, Any] = {"v": version, "t": "snapshot", "generation": self.generation,
                "next_id": max(self.next_id, self.reserved), "delivery_counter": self.delivery_counter, "tasks": tasks}
        if self.session_limit is not None:
            snap["session_limit"] = list(self.session_limit)
        return snap

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> _SessionState:
        """The state a snapshot holds. ValueError if the snapshot itself is unusable; a task in it that does not fit
        is skipped into ``problems`` (the others are kept). Consumes the snapshot's task list (each task is dropped
        from it once read)."""
        try:
            _check_fields({k: v for k, v in snap.items() if k != "tasks"}, ("generation", "next_id"))
        except JournalError as err:
            raise ValueError(str(err)) from None
        if type(snap.get("tasks", [])) is not list:
            raise ValueError("its tasks are not a list")
        state = cls()
        state.generation, state.next_id = snap["generation"], snap["next_id"]
        state.delivery_counter = snap.get("delivery_counter", 0)
        shapes: dict[Any, tuple[tuple[str, Callable[[Any], bool]], ...]] = {}
        records = snap.get("tasks", [])
        for i, rec in enumerate(records):
            records[i] = None  # (the decoded task goes as its record comes: a lower peak at 100,000 tasks)
            try:
                _check_task(rec, shapes)
                if rec["id"] in state.tasks:
                    raise JournalError(f"duplicate task id {rec['id']}")
                task = _TaskRecord(rec)
            except (JournalError, ValueError) as err:
                state.problems.append(f"snapshot task skipped: {err} in {rec!r}"[:500])
                continue
            state.tasks[task.id] = task
        if snap.get("session_limit") is not None:
            rate, configured = snap["session_limit"]
            state.session_limit = (rate, configured)
        return state

    def apply(self, rec: Mapping[str, Any]) -> _TaskRecord | None:
        kind = rec.get("t")
        if _is_count(rec.get("v")) and rec["v"] > JOURNAL_VERSION:
            raise JournalError(f"record of journal version {rec.get('v')} is newer than this bgsession "
                               f"(version {JOURNAL_VERSION})")
        if kind not in _RECORD_TYPES:
            raise JournalError(f"unknown record type {kind!r}")
        if kind == "header":
            return None
        if kind == "reserve":
            # identifiers below "upto" may have been handed out: recovery never hands them out again
            self.reserved = max(self.reserved, int(rec["upto"]))
            return None
        if kind == "limit" and "id" not in rec:  # the session's: the rate and the configured limit it replaced
            self.session_limit = (_check_rate(rec.get("rate")), _check_rate(rec.get("configured")))
            return None
        if kind == "task":
            tid = int(rec["id"])
            if tid in self.tasks or tid < 1:
                raise JournalError(f"duplicate task id {tid}")
            task = _TaskRecord({**rec, "phase": Phase.SUSPENDED.value})
            self.tasks[tid] = task
            self.next_id = max(self.next_id, tid + 1)
            return task
        try:
            task = self.tasks[int(rec["id"])]
        except (KeyError, TypeError, ValueError):
            raise JournalError(f"record {kind!r} for unknown task {rec.get('id')!r}") from None
        if kind in _PHASE_RECORDS:
            new = next_phase(task.id, task.phase, kind)  # raises before any change
            self._apply_phase(task, kind, new, rec)
        elif kind == "ack":
            event = rec.get("event")
            if event not in task.events():
                raise JournalError(f"ack of {event!r} for task {task.id} which does not owe it")
            if event == "complete":
                if task.events() != ["complete"]:
                    raise JournalError(f"ack of 'complete' before 'finish' for task {task.id}")
                task.phase = next_phase(task.id, task.phase, "ack")
            task.acked += (event,)
        elif kind == "vanished":
            if "finish" not in task.events():
                raise JournalError(f"task {task.id} owes no finished file that could have vanished")
            task.error, task.file = rec["error"], None  # owes no finish any more: the complete event reports it
        elif kind == "describe":
            task.description = rec.get("description")
        elif kind == "response":
            task.response = rec.get("response")
            task.current_url = rec.get("response", {}).get("url") or task.current_url
            task.validator = rec.get("validator")
            task.total = rec.get("total")
            task.durable_offset = min(task.durable_offset, int(rec.get("start", 0)))
            task.boot = rec.get("boot")
        elif kind == "progress":
            self._apply_progress(task, rec)
        elif kind == "split":
            task.segments = _split_segments(task, rec.get("segments"))
        elif kind == "unsplit":  # one connection from now on; the partial file holds the bytes recorded
            task.segments, task.durable_offset, task.boot = [], int(rec["offset"]), rec.get("boot")
        elif kind == "priority":
            task.priority = _check_priority(rec["priority"])
        elif kind == "begin":
            task.begin = _begin_timestamp(rec.get("at"))
        elif kind == "limit":
            task.limit = _check_rate(rec.get("rate"))
        else:  # "redirect"
            task.current_url = rec["url"]
        return task

    @staticmethod
    def _apply_progress(task: _TaskRecord, rec: Mapping[str, Any]) -> None:
        offset = int(rec["offset"])
        if "segment" in rec:  # a split download's segment was fsynced up to offset
            if not task.segments:
                raise JournalError(f"progress of a segment of task {task.id}, which is not split")
            segment = task.segments[int(rec["segment"])]
            if not segment[0] <= offset <= segment[1]:
                raise JournalError(f"progress {offset} outside segment {segment[:2]} of task {task.id}")
            segment[2] = offset
        else:
            task.durable_offset = offset
        task.boot = rec.get("boot")

    def _apply_phase(self, task: _TaskRecord, kind: str, new: Phase, rec: Mapping[str, Any]) -> None:
        if kind == "resume":
            if task.started is None:
                task.started = rec.get("at")
            if rec.get("upload"):
                task.upload = dict(rec["upload"])  # the source as it was at resume() (BITS rule)
        if kind == "cancel":
            task.cancel_requested = True
            task.want_resume_data = bool(rec.get("resume_data"))
        if new is Phase.DELIVERING:
            task.error = rec.get("error")
            task.file = rec.get("file")
            task.resume_file = rec.get("resume_file")
            if rec.get("response") is not None:
                task.response = rec["response"]
            self.delivery_counter += 1
            task.delivery_seq = self.delivery_counter
        task.phase = new

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Apply records read from a journal: each is type-checked first; one that does not fit is skipped and
        reported (at most _MAX_PROBLEMS one by one); a record of a newer bgsession stops everything."""
        skipped = 0
        for rec in records:
            self.replayed += 1
            try:
                _check_fields(rec)
                self.apply(rec)
            except (IllegalTransition, JournalError, KeyError, TypeError, ValueError, AttributeError) as err:
                if isinstance(err, JournalError) and "newer than this bgsession" in str(err):
                    raise
                skipped += 1
                if skipped <= _MAX_PROBLEMS:
                    self.problems.append(f"journal record skipped: {err} in {rec!r}"[:500])
        if skipped > _MAX_PROBLEMS:
            self.problems.append(f"journal: {skipped - _MAX_PROBLEMS} more records skipped")

    def backlog(self) -> list[_TaskRecord]:
        """Tasks owing durable events, in the order their outcomes were journaled."""
        owing = [t for t in self.tasks.values() if t.phase is Phase.DELIVERING]
        return sorted(owing, key=lambda t: t.delivery_seq or 0)


class _JournalReader:
    """Reads ``journal.jsonl`` as a stream, one line in memory at a time (a garbage journal of gigabytes costs no more
    memory than one record): :meth:`records` yields each readable record; then ``valid`` is the length of the prefix
    appends resume after (a torn last line -- the writer died mid-append -- is left out), ``problems`` what was
    skipped, and ``damaged`` how many lines could not be read."""

    def __init__(self, path: str) -> None:
        self.path, self.valid, self.damaged = path, 0, 0
        self.problems: list[str] = []

    def _skip(self, at: int, why: str) -> None:
        self.damaged += 1
        if self.damaged <= _MAX_PROBLEMS:
            self.problems.append(f"{self.path}: unreadable line at byte {at} skipped ({why})")

    def records(self) -> Iterator[dict[str, Any]]:
        try:
            f = io.BufferedReader(io.FileIO(self.path, "r"), buffer_size=1 << 20)  # (the generator closes it)
        except FileNotFoundError:
            return
        except OSError as err:
            raise JournalError(f"cannot read {self.path}: {err.strerror or err}", self.path) from err
        with f:
            pos = 0
            while True:
                line = f.readline(_MAX_RECORD_BYTES + 1)
                start, pos = pos, pos + len(line)
                if not line.endswith(b"\n"):
                    if len(line) <= _MAX_RECORD_BYTES:
                        break  # end of file; a torn last line (if any) is not part of the journal
                    found = -1
                    while found < 0:  # longer than any record: skip to its end, a block at a time
                        block = f.read(1 << 20)
                        if not block:
                            break
                        found = block.find(b"\n")
                        pos += len(block) if found < 0 else found + 1
                    if found < 0:
                        self._skip(start, f"more than {_MAX_RECORD_BYTES} bytes without a newline, to the end")
                        break
                    f.seek(pos)
                    self._skip(start, f"longer than {_MAX_RECORD_BYTES} bytes")
                    self.valid = pos
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                except ValueError as err:
                    if not f.peek(1):
                        break  # a torn last line that happens to end in a newline byte
                    self._skip(start, str(err)[:100])
                    self.valid = pos
                    continue
                self.valid = pos
                yield rec
        if self.damaged > _MAX_PROBLEMS:
            self.problems.append(f"{self.path}: {self.damaged - _MAX_PROBLEMS} more unreadable lines skipped")


class _JournalWriter:
    """The one writer of ``journal.jsonl``, in order, fsynced in batches (group commit). ``append`` returns a ticket
    at once; ``wait(ticket)`` blocks until that record (and all before it) is on disk: a waiter that finds no flush
    under way flushes everything queued itself, waiters arriving meanwhile share the next one, and a background thread
    flushes what nobody waits for. A failed write is undone (truncated), raised to waiters as JournalError, retried."""

    RETRY_PAUSE = 0.5

    def __init__(self, path: str, valid_length: int) -> None:
        self.path = path
        self._fd = _open_private(path, os.O_WRONLY | os.O_CREAT)
        _vfs.truncate(self._fd, valid_length)  # drop a torn last line before appending
        os.lseek(self._fd, valid_length, os.SEEK_SET)
        self._length = valid_length
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[bytes] = []
        self._appended = self._durable = 0  # tickets handed out, tickets on disk
        self._flushing = False
        self._error: JournalError | None = None
        self._retry_at = 0.0
        self._closing = False
        self._callbacks: list[tuple[int, Callable[[], None]]] = []
        self.records_written = 0
        self._thread = threading.Thread(target=self._run, name="bgsession-journal", daemon=True)
        self._thread.start()

    def append(self, record: Mapping[str, Any], waited: bool = False) -> int:
        """Queue *record*; its ticket. *waited*: the caller waits for it at once (and so flushes it itself): the
        journal thread is not woken for it (a wake-up that would only contend with the caller's flush)."""
        line = _dumps(record)
        with self._cond:
            if self._closing:
                raise SessionInvalidatedError("the session's journal is closed")
            self._pending.append(line)
            self._appended += 1
            if not waited:
                self._cond.notify_all()
            return self._appended

    def wait(self, ticket: int) -> None:
        with self._cond:
            while self._durable < ticket:
                if self._error is not None:
                    raise self._error
                if self._closing and not self._thread.is_alive() and not self._pending:
                    raise SessionInvalidatedError("the session's journal closed before a record was written")
                if not self._flushing and self._pending:
                    self._flush_locked()
                else:
                    self._cond.wait(1.0)

    def flush(self) -> None:
        with self._cond:
            ticket = self._appended
        self.wait(ticket)

    def on_durable(self, ticket: int, callback: Callable[[], None]) -> None:
        """Run *callback* (on the journal thread, without its lock) once *ticket* is on disk."""
        with self._cond:
            self._callbacks.append((ticket, callback))
            self._cond.notify_all()

    def _flush_locked(self) -> None:
        """Write and fsync everything queued. Called and returns with the lock held; I/O runs without it."""
        self._flushing = True
        batch, self._pending = self._pending, []
        upto = self._appended
        data = b"".join(batch)
        failure: OSError | None = None
        self._cond.release()
        try:
            _write_all(self._fd, data)
            _fsync(self._fd)
        except OSError as err:
            failure = err
            with contextlib.suppress(OSError):  # the write error is what matters
                _vfs.truncate(self._fd, self._length)
                os.lseek(self._fd, self._length, os.SEEK_SET)
        finally:
            self._cond.acquire()
        self._flushing = False
        if failure is None:
            self._length += len(data)
            self.records_written += len(batch)
            self._durable = upto
            self._error = None
        else:
            error = JournalError(f"cannot write the journal {self.path}: {failure.strerror or failure}", self.path)
            error.__cause__ = failure
            if self._error is None:
                log.error("%s", error)
            self._error = error
            self._pending[:0] = batch
            self._retry_at = time.monotonic() + self.RETRY_PAUSE
        self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            while True:
                due = [cb for t, cb in self._callbacks if t <= self._durable]
                if due:
                    self._callbacks = [(t, cb) for t, cb in self._callbacks if t > self._durable]
                    self._cond.release()
                    try:
                        for callback in due:
                            try:
                                callback()
                            except Exception:
                                log.exception("journal callback failed")
                    finally:
                        self._cond.acquire()
                    continue
                if self._closing and not self._pending and not self._flushing:
                    return
                if not self._pending or self._flushing:
                    self._cond.wait()
                    continue
                if self._error is not None:
                    pause = self._retry_at - time.monotonic()
                    if pause > 0 and not self._closing:
                        self._cond.wait(pause)
                        continue
                    if self._closing:
                        return  # the disk stays unwritable: give up; the records were never durable
                self._flush_locked()

    def reopen(self, valid_length: int) -> None:
        """Switch to a new file at the same path (after compaction); nothing may be pending."""
        with self._cond:
            assert not self._pending and self._durable == self._appended
            _vfs.close(self._fd)
            self._fd = _open_private(self.path, os.O_WRONLY)
            os.lseek(self._fd, valid_length, os.SEEK_SET)
            self._length = valid_length
            self.records_written = 0

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(30.0)
        with contextlib.suppress(OSError):
            _vfs.close(self._fd)


class _MemoryWriter:
    """The journal of ``Configuration.default()``: nothing is written, everything is durable at once."""

    records_written = 0

    def append(self, record: Mapping[str, Any], waited: bool = False) -> int: return 0
    def wait(self, ticket: int) -> None: pass
    def flush(self) -> None: pass
    def reopen(self, valid_length: int) -> None: pass
    def on_durable(self, ticket: int, callback: Callable[[], None]) -> None: callback()
    def close(self) -> None: pass


def _aside_name(path: str) -> str:
    """Where a damaged file is kept for a post-mortem (never deleted)."""
    return f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def _check_version(rec: Mapping[str, Any], path: str) -> None:
    if _is_count(rec.get("v")) and rec["v"] > JOURNAL_VERSION:
        raise JournalError(f"{path} was written by a newer bgsession (format {rec.get('v')}, this one reads "
                           f"{JOURNAL_VERSION}); upgrade bgsession or move {os.path.dirname(path)} aside", path)


#: How every snapshot bgsession writes begins: a file that does not is not read into memory at all.
_SNAPSHOT_START = re.compile(rb'\A\s*\{\s*"v"\s*:\s*\d+\s*,\s*"t"\s*:\s*"snapshot"')


def _read_snapshot(path: str, readonly: bool, by_task: bool = False) -> _SessionState | None:
    """The state ``snapshot.json`` holds (None: there is none). One that cannot be read raises JournalError; unless
    *readonly*, it is first moved aside (so the next open recovers from the journal). *by_task*: parsed a task at a
    time (a compaction in the background)."""
    try:
        with open(path, "rb") as f:
            if not _SNAPSHOT_START.match(f.read(64)):
                raise ValueError("not a bgsession snapshot")
            f.seek(0)
            snap = _parse_snapshot(f.read(), by_task)
        if not isinstance(snap, dict) or snap.get("t") != "snapshot":
            raise ValueError("not a bgsession snapshot")
        _check_version(snap, path)
        return _SessionState.from_snapshot(snap)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise JournalError(f"cannot read {path}: {err.strerror or err}", path) from err
    except (ValueError, KeyError, TypeError) as err:
        if readonly:
            raise JournalError(f"the snapshot {path} is corrupt ({err})", path) from err
        aside = _aside_name(path)
        os.replace(path, aside)
        raise JournalError(f"the snapshot {path} is corrupt ({err}); it was kept aside as {aside}. Opening "
                           "the session again recovers what the journal holds; partial files stay in tmp/.",
                           path) from err


def _header_generation(header: Mapping[str, Any]) -> int:
    generation = header.get("generation", 0) if header.get("t") == "header" else 0
    return generation if _is_count(generation) else 0


class _FoldedMeanwhile(Exception):
    """A reader without the session's lock found the previous journal gone: a compaction finished meanwhile."""


def _replay_previous(state: _SessionState, path: str, problems: list[str], snap_path: str) -> None:
    """Replay the previous journal (of the snapshot's generation) into *state*: the records a compaction had not yet
    folded into a snapshot when the process stopped (or, for a reader without the session's lock, has not yet)."""
    reader = _JournalReader(path)
    records = reader.records()
    header = next(records, None)
    if header is None or _header_generation(header) != state.generation:
        with contextlib.suppress(OSError), open(snap_path, "rb") as f:
            written = re.search(rb'"generation":(\d+)', f.read(256))
            if written and int(written.group(1)) > state.generation:
                raise _FoldedMeanwhile  # (the snapshot read first was the one before)
        problems.append(f"{path}: the journal of generation {state.generation} is missing: what it recorded after "
                        "the snapshot is lost")
        return
    _check_version(header, path)
    state.replay(itertools.chain([header], records))
    problems.extend(reader.problems)


def _load_state_once(directory: str, readonly: bool, journal_name: str,
                     by_task: bool) -> tuple[_SessionState, int, list[str]]:
    """One reading of the snapshot and the journals (``_load_state``, below)."""
    snap_path, journal_path = os.path.join(directory, _SNAPSHOT_NAME), os.path.join(directory, journal_name)
    snapshot = _read_snapshot(snap_path, readonly, by_task)
    state = snapshot or _SessionState()
    problems, state.problems = state.problems, []
    reader = _JournalReader(journal_path)
    records = reader.records()
    header = next(records, None)
    if header is not None:
        _check_version(header, journal_path)
        gen = _header_generation(header)
        if header.get("after") == state.generation and gen == state.generation + 1:
            _replay_previous(state, os.path.join(directory, _PREV_JOURNAL_NAME), problems, snap_path)
            state.generation = gen
            state.replay(itertools.chain([header], records))
        elif gen >= state.generation:
            if gen > state.generation and snapshot is not None:
                problems.append(f"{journal_path}: generation {gen} is ahead of the snapshot's {state.generation}")
            state.generation = gen
            state.replay(itertools.chain([header], records))
    valid = reader.valid if header is None or state.replayed else 0  # 0: folded into the snapshot already
    problems.extend(reader.problems + state.problems)
    state.problems = []
    state.next_id = max(state.next_id, state.reserved)  # a task lost before its record leaves a gap
    return state, valid, problems


def _load_state(directory: str, readonly: bool = False, journal_name: str = _JOURNAL_NAME,
                by_task: bool = False) -> tuple[_SessionState, int, list[str]]:
    """Snapshot + journal replay, streamed: (state, valid length of the journal to append after, problems). A snapshot
    that cannot be read is kept aside (unless *readonly*) and reported once; a file of a newer bgsession is refused and
    left untouched. A journal that goes on from the previous one (``after``: a compaction was folding that one when
    the process stopped) has the previous one replayed first. *journal_name*: the journal to replay (a compaction
    reads the previous one alone, and its snapshot a task at a time: *by_task*). A reader without the session's lock
    that meets a compaction finishing reads again."""
    for _ in range(2):
        with contextlib.suppress(_FoldedMeanwhile):
            return _load_state_once(directory, readonly, journal_name, by_task)
    return _load_state_once(directory, readonly, journal_name, by_task)


class Journal:
    """A session directory's journal, read-only: for tests, the CLI and post-mortems. ``Journal(directory).check()``
    lists every inconsistency it finds (empty: clean); it takes no lock and changes nothing."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(os.fspath(directory))

    def state(self) -> _SessionState:
        state, _, problems = _load_state(self.directory, readonly=True)
        state.problems = problems
        return state

    def tasks(self) -> list[dict[str, Any]]:
        """The tasks not yet acknowledged, as plain dicts (snapshot form)."""
        return [t.snapshot() for t in self.state().tasks.values() if t.phase is not Phase.ACKNOWLEDGED]

    def check(self) -> list[str]:
        d = self.directory
        if not os.path.isdir(d):
            return [f"{d}: no such session directory"]
        if not _is_session_dir(d):
            return [f"{d}: not a bgsession session directory (no {_MARKER_NAME}, no journal)"]
        try:
            state = self.state()
        except JournalError as err:
            return [str(err)]
        problems = list(state.problems)
        tmp = os.path.join(d, _TMP_DIR)
        if os.name == "posix":  # the session directory, its subdirectories 0700, every file 0600
            paths = [(d, _DIR_MODE)] + [(os.path.join(root, name), mode) for root, dirs, files in os.walk(d)
                                        for names, mode in ((dirs, _DIR_MODE), (files, _FILE_MODE)) for name in names]
            for path, want in paths:
                if path.endswith(".handed"):
                    continue  # a handed marker is a link to the delivered file: the app's mode is its business
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    if not stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) != want:
                        problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):o}, expected {want:o}")
        referenced = set()
        for t in state.tasks.values():
            if t.phase is Phase.ACKNOWLEDGED:
                continue
            if t.resume_file:
                referenced.add(t.resume_file)
            segments = [t.segment_name(k) for k in range(1, len(t.segments or ()))]
            referenced.update(segments)  # (a split download's other segments, until its completion is acknowledged)
            if t.phase is Phase.DELIVERING:
                if t.file:
                    # (a missing finished file whose finish event is not acknowledged is not a problem: the hook
                    # moved it and died before the ack, or it vanished; recovery acknowledges or reports it)
                    referenced.update((t.file, _handed_name(t.file)))
                referenced.add(t.partial_name)
            else:
                referenced.update((t.partial_name, t.done_name))  # .done: recovery takes it back
                held = [(t.partial_name, t.durable_offset)] if not t.segments else [
                    (t.segment_name(k), durable - start) for k, (start, _, durable) in enumerate(t.segments)]
                for name, durable in held:
                    size = _size(os.path.join(tmp, name)) or _size(os.path.join(tmp, t.done_name)) or 0
                    if durable > size:
                        problems.append(f"task {t.id}: journal says {durable} bytes are durable but tmp/{name} "
                                        f"has {size}")
        if os.path.isdir(tmp):
            for name in sorted(os.listdir(tmp)):
                if name not in referenced and not _RESUME_NAME_RE.match(name):
                    problems.append(f"tmp/{name}: temp file that no live task refers to")
        return problems


def recovered_offset(file_size: int | None, durable_offset: int, record_boot: str | None,
                     current_boot: str | None) -> int:
    """How many bytes of a partial file to keep after a restart (pure). Same kernel boot as the last record: the page
    cache survived the process, every byte written is there and consistent (a restart's record is committed before
    its first byte): keep them all. Another boot (or no boot id): keep what an fsynced offset record covers."""
    if not file_size:
        return 0
    if record_boot is not None and record_boot == current_boot:
        return file_size
    return min(file_size, durable_offset)


def _parse_resume_data(data: bytes) -> tuple[dict[str, Any] | None, str]:
    """Validate resume data (pure): version and fields. The partial file it names is only ever looked for inside the
    session's tmp/, by a name bgsession gives such files (the engine checks it is there): crafted resume data cannot
    hand any other file of the user to the session, nor to the finish hook."""
    magic = next((m for m in _RESUME_MAGICS if data.startswith(m)), None)
    if magic is None:
        return None, "resume data is not bgsession resume data (or of an unknown version)"
    try:
        body = json.loads(data[len(magic):])
        _check_fields({k: body.get(k) for k in ("request", "validator", "total", "response")}, ("request",))
        request = Request._from_record(body["request"])
        name, size = os.path.basename(str(body["file"])), body["size"]
        if not _RESUME_NAME_RE.match(name) or not _is_count(size):
            raise ValueError(f"it names no partial file of a session ({body['file']!r}, {size!r} bytes)")
        validator = body["validator"]
        if not isinstance(validator, dict) or not (validator.get("etag") or validator.get("last_modified")):
            raise ValueError("no validator")
    except (ValueError, KeyError, TypeError, BGSessionError) as err:
        return None, f"resume data is malformed ({err})"
    return {"request": request._to_record(), "file": name, "fields": {
        "validator": validator, "total": body.get("total"), "durable_offset": size, "boot": None,
        "response": body.get("response")}}, ""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while an open (or a compaction in the background) builds the objects of
    every task, then as it was. Building 100,000 tasks triggers about a dozen full collections, each walking every
    object made so far (a fifth to a third of the open); what an open builds holds no reference cycles, so nothing
    waits for the collector meanwhile. The host's setting is restored (a host thread that switches the collector on
    or off during an open may see its change undone: switch it around the open, not during it)."""
    import gc
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _forget_acknowledged(state: _SessionState) -> None:
    """Drop the acknowledged tasks (a compaction: their acknowledgements are on disk, nothing will ask for them)."""
    for tid in [t.id for t in state.tasks.values() if t.phase is Phase.ACKNOWLEDGED]:
        del state.tasks[tid]


def _open_compacts(journal_records: int, tasks: int) -> bool:
    """Does an open fold the journal it replayed into a new snapshot? Only when the journal is long next to the
    snapshot (more records than a quarter of the tasks, or DEFAULT_COMPACT_RECORDS): rewriting and fsyncing the
    whole snapshot costs more than the next open's replay of a few records (a relaunch of 100,000 queued tasks
    finds a dozen). The running session compacts at DEFAULT_COMPACT_RECORDS, so the journal stays bounded."""
    return journal_records > 0 and (journal_records > tasks // 4 or journal_records >= DEFAULT_COMPACT_RECORDS)


class _Compaction:
    """Folding the journal into the snapshot: at an open at once (nothing else runs yet), in a running session in the
    background, so that transfers and hooks do not wait for a whole snapshot's serialisation and fsync."""

    def __init__(self, store: _Store) -> None:
        self.store = store
        self._folding: threading.Thread | None = None  # the fold of journal.prev.jsonl, if one runs
        self._retry = 0  # after a fold that failed: the journal's record count at which to try again

    def now(self) -> None:
        """Fold the journal into a new snapshot (generation + 1) and start a fresh journal, at once (an open: nothing
        else runs yet). A running session compacts in the background instead (``when_due``)."""
        store = self.store
        if store.directory is None:
            return
        self.join()
        with store.lock:
            store.writer.flush()
            store.writer.reopen(self.fold())
        _unlink_quietly(os.path.join(store.directory, _PREV_JOURNAL_NAME))  # folded in (a leftover is ignored)

    def fold(self) -> int:
        """Write the state as a new snapshot (generation + 1), then a fresh journal (new files, renamed over the
        old ones); returns the journal's length."""
        store = self.store
        assert store.directory is not None
        store.state.generation += 1
        _forget_acknowledged(store.state)
        _atomic_write(os.path.join(store.directory, _SNAPSHOT_NAME), _snapshot_bytes(store.state.to_snapshot()))
        header = _dumps({"v": _record_version("header", {}), "t": "header", "generation": store.state.generation})
        _atomic_write(os.path.join(store.directory, _JOURNAL_NAME), header)
        return len(header)

    def when_due(self) -> None:
        """Once the journal holds DEFAULT_COMPACT_RECORDS records, start a compaction (called without ``lock``).

        Only the switch to a new journal holds the engine's lock (a flush, a link, a one-line file; a few fsyncs):
        the old journal keeps a second name, ``journal.prev.jsonl``, and a new one of the next generation says it
        goes on from it (``after``). A background thread then folds the snapshot and the previous journal -- read
        from disk, as the next open would -- into the next snapshot, and removes the previous journal. Until that
        snapshot is in place, recovery replays the previous journal, then the new one; afterwards the new one
        alone, as usual. Transfers and hooks go on meanwhile: nothing they record waits for the fold."""
        store = self.store
        if store.directory is None or store.writer.records_written <= DEFAULT_COMPACT_RECORDS:
            return  # the cheap unlocked check, on every acknowledgement and progress sync
        with store.lock:
            if store.writer.records_written <= max(DEFAULT_COMPACT_RECORDS, self._retry) or \
                    (self._folding is not None and self._folding.is_alive()):
                return  # another thread compacted while this one waited for the lock, or a fold still runs
            try:
                if not os.path.exists(os.path.join(store.directory, _PREV_JOURNAL_NAME)) and \
                        not self._switch_journal():
                    store.writer.reopen(self.fold())  # no second name for the journal here: fold at once
                    return
                # (with a previous journal left by a fold that failed: fold it again, as it is)
            except OSError as err:
                log.warning("journal compaction failed (will retry): %s", err)
                return
            self._folding = threading.Thread(target=self._fold_previous, args=(store.state.generation,),
                                             name="bgsession-compact", daemon=True)
            self._folding.start()

    def _switch_journal(self) -> bool:
        """Under ``lock``: the current journal becomes the previous one, a new journal of the next generation goes on
        from it. The second name is durable before the journal's name moves on (else a power loss could leave the
        new journal and no previous one). False (nothing changed) where the file system makes no hard link."""
        store = self.store
        assert store.directory is not None
        journal, previous = (os.path.join(store.directory, name) for name in (_JOURNAL_NAME, _PREV_JOURNAL_NAME))
        store.writer.flush()
        generation = store.state.generation
        try:
            _vfs.link(journal, previous)
        except OSError as err:
            log.debug("no second name for the journal (%s): compacting at once", err)
            return False
        try:
            _fsync_dir(store.directory)
            header = _dumps({"v": _record_version("header", {"after": generation}), "t": "header",
                             "generation": generation + 1, "after": generation})
            _atomic_write(journal, header)
        except BaseException:
            _unlink_quietly(previous)  # the journal was not switched: it is still the one to append to
            raise
        store.state.generation = generation + 1
        _forget_acknowledged(store.state)  # (their acknowledgements are in the previous journal)
        store.writer.reopen(len(header))
        return True

    def _fold_previous(self, generation: int) -> None:
        """On the ``bgsession-compact`` thread, without the engine's lock: snapshot + previous journal, read from disk
        (both no longer change), become the snapshot of *generation*; then the previous journal goes. One that cannot
        be read or written is tried again after another DEFAULT_COMPACT_RECORDS records (and met by the next open)."""
        store = self.store
        assert store.directory is not None
        try:
            with _gc_paused():  # (a full collection over the fold's new objects held the app's threads 0.35 s)
                state, _, problems = _load_state(store.directory, readonly=True, journal_name=_PREV_JOURNAL_NAME,
                                                 by_task=True)
                if not problems:
                    _forget_acknowledged(state)
                    state.generation = generation
                    data = _snapshot_bytes(state.to_snapshot())
                del state
            if not problems:
                _atomic_write(os.path.join(store.directory, _SNAPSHOT_NAME), data)
                _unlink_quietly(os.path.join(store.directory, _PREV_JOURNAL_NAME))
                return
            failure = "; ".join(problems[:3])
        except (OSError, JournalError) as err:
            failure = str(err)
        log.warning("session %s: journal compaction failed (will retry): %s", store.identifier, failure)
        self._retry = store.writer.records_written + DEFAULT_COMPACT_RECORDS

    def join(self) -> None:
        """Wait for a fold that runs (a close: the session's lock is not released while it writes)."""
        folding = self._folding
        if folding is not None:
            folding.join()


class _Store:
    """One session's durable state: directory and lock, reducer state, journal writer, compaction, disk reserve,
    recovery, tmp/ and resume data. Callers that change the state hold ``lock`` (the engine's) and wait for a record's
    ticket after releasing it. ``Configuration.default()`` gets a store in memory: a temp tmp/, nothing journaled."""

    def __init__(self, directory: str | None, identifier: str | None, lock: threading.RLock) -> None:
        self.lock, self.directory, self.identifier = lock, directory, identifier
        self.acks = 0  # acknowledgements recorded (the daemon's relaunch backoff watches it)
        self.offsets: dict[int, int] = {}  # recovery: bytes of each partial download kept
        self.delivered_at: dict[int, float] = {}  # when each outcome waiting for the app was journaled
        self.finish_released: set[int] = set()  # tasks whose finish files this process removed (skipped at complete)
        self._reserved_ids = 0  # identifiers below this are reserved on disk (none yet in this process)
        self.compaction = _Compaction(self)
        self.writer: _JournalWriter | _MemoryWriter
        if directory is None:
            import tempfile
            self.tmp, self.tmp_sync = tempfile.mkdtemp(prefix="bgsession-"), _GroupSync(lambda: None)
            self.state, self.writer = _SessionState(), _MemoryWriter()
            return
        _claim_session_dir(directory, identifier)
        self.tmp = os.path.join(directory, _TMP_DIR)
        self.tmp_sync = _GroupSync(lambda: _fsync_dir(self.tmp))
        _acquire_lock(directory, _LOCK_NAME, identifier)
        try:
            self._open(directory)
        except BaseException:
            writer = getattr(self, "writer", None)
            if writer is not None:
                writer.close()
            _release_lock(directory, _LOCK_NAME)
            raise

    def _open(self, directory: str) -> None:
        self.state, valid, problems = _load_state(directory)
        for problem in problems:
            log.warning("session %s: %s", self.identifier, problem)
        journal = os.path.join(directory, _JOURNAL_NAME)
        if problems:
            # keep the damaged files as they were for a post-mortem, then fold what could be read into new
            # ones at once: the next open is clean, and the kept files are never appended to or cut
            previous = os.path.join(directory, _PREV_JOURNAL_NAME)
            for path in (journal, os.path.join(directory, _SNAPSHOT_NAME), previous):
                self._keep_aside(path)
            valid = self.compaction.fold()
            _unlink_quietly(previous)
        self.writer = _JournalWriter(journal, valid)
        if valid == 0:
            self.writer.append({"v": _record_version("header", {}), "t": "header", "generation": self.state.generation})
        elif not problems:
            self.writer.records_written = self.state.replayed  # the journal goes on: when_due counts it all
        with self.lock:
            self._recover()
        self.writer.flush()
        if not problems and (_open_compacts(self.state.replayed - 1, len(self.state.tasks))
                             or not os.path.exists(os.path.join(directory, _SNAPSHOT_NAME))
                             or os.path.exists(os.path.join(directory, _PREV_JOURNAL_NAME))):
            self.compaction.now()  # fold a long journal in (a short one stays: the snapshot is not rewritten for it)
        self.make_reserve()

    def _keep_aside(self, path: str) -> None:
        """Keep a damaged file as ``<name>.corrupt-<time>``: a hard link (no copy of a file that may be huge), or a
        copy where the file system has no links."""
        import shutil
        if not os.path.exists(path):
            return
        aside = _aside_name(path)
        try:
            os.link(path, aside)
        except OSError:
            try:
                shutil.copyfile(path, aside)
                os.chmod(aside, _FILE_MODE)
            except OSError as err:
                raise JournalError(f"cannot keep the damaged {path} aside: {err.strerror or err}", path) from err
        log.warning("session %s: damaged %s kept as %s", self.identifier, os.path.basename(path), aside)

    # -- records ------------------------------------------------------------------------
    def record(self, task: _TaskRecord | None, record_type: str, /, waited: bool = False, **fields: Any) -> int:
        """Apply a record (validated first: nothing changes if it does not fit) and queue it
        for the journal; returns the ticket to wait for (*waited*: the caller does, at once). Under ``lock``."""
        rec: dict[str, Any] = {"v": _record_version(record_type, fields), "t": record_type}
        if task is not None:
            rec["id"] = task.id
        rec.update(fields)
        before = task.phase if task is not None else None
        self.state.apply(rec)
        if record_type == "ack":
            self.acks += 1
        if task is not None and task.phase is not before:
            if task.phase is Phase.DELIVERING:
                self.delivered_at[task.id] = time.monotonic()
            elif task.phase is Phase.ACKNOWLEDGED:
                self.delivered_at.pop(task.id, None)
                if self.directory is None:
                    del self.state.tasks[task.id]  # in memory there is no compaction to forget it: forget it now
        return int(self.writer.append(rec, waited))

    def wait(self, ticket: int) -> None:
        """Block until the record of *ticket* (and every one before it) is on disk."""
        self.writer.wait(ticket)

    def record_progress(self, task: _TaskRecord, offset: int, segment: int | None = None) -> None:
        """Record that a download's partial file (or a split download's *segment*) is fsynced up to *offset*, if that
        is further than recorded. Under ``lock``."""
        if task.phase is Phase.ACKNOWLEDGED:
            return
        if segment is None and offset > task.durable_offset:
            self.record(task, "progress", offset=offset, boot=_BOOT_ID)
        elif segment is not None and task.segments and offset > task.segments[segment][2]:
            self.record(task, "progress", offset=offset, segment=segment, boot=_BOOT_ID)

    def new_id(self, reserve: bool = True) -> tuple[int, int]:
        """The next task identifier and the ticket of its durable reservation (0: none needed).
        Under ``lock``. Identifiers are never used twice, even when a kill loses a task before
        its record reached the disk: they are reserved ID_RESERVE_BLOCK at a time. Without *reserve*
        (the caller hands the identifier out only once the task's record is on disk, as the daemon does)
        nothing is reserved, and identifiers stay 1, 2, 3... across restarts."""
        tid, ticket = self.state.next_id, 0
        if reserve and tid >= self._reserved_ids:
            self._reserved_ids = tid + ID_RESERVE_BLOCK
            ticket = self.record(None, "reserve", upto=self._reserved_ids)
        return tid, ticket

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    # -- outcomes that touch files (under ``lock``) ----------------------------------------
    def fail(self, task: _TaskRecord, error: TransferError, event: str, *, keep_partial: bool = True,
             offset: int = 0) -> int:
        """Record that *task* ends with *error* (*event*: "fail", or "finish" for a running one)."""
        resume_file = self.keep_for_resume(task, offset) if keep_partial else None
        if not keep_partial:
            _unlink_quietly(self.path(task.partial_name))
        return self.record(task, event, error=error._to_record(), resume_file=resume_file)

    def finish_cancel(self, task: _TaskRecord, offset: int = 0) -> int:
        """Record the end of a cancelled transfer (with resume data if the app asked for it)."""
        _unlink_quietly(self.path(task.done_name))  # finished just as it was cancelled
        resume_file = self.keep_for_resume(task, offset) if task.want_resume_data else None
        err = TransferError(ErrorCode.CANCELLED, "cancelled", url=task.request["url"])
        return self.record(task, "finish", error=err._to_record(), resume_file=resume_file)

    def describe(self, task: _TaskRecord, description: str | None) -> int:
        """Record the app's new description (an acknowledged task's, about to be forgotten, in memory only)."""
        if task.phase is Phase.ACKNOWLEDGED:
            task.description = description
            return 0
        return self.record(task, "describe", description=description)

    def settle_missing_finish(self, task: _TaskRecord) -> None:
        """An owed finish event whose file is gone (at recovery, and at attach for a daemon that outlived its app):
        with its handed marker, the finish hook took the file and the app died before its acknowledgement was durable:
        acknowledge it instead of posting it again. Without, it vanished before any hook saw it (a temp-file cleaner):
        record that, and the complete event reports FILE_DOES_NOT_EXIST -- never a silent success."""
        if not (task.file and "finish" in task.events()) or os.path.exists(self.path(task.file)):
            return
        if os.path.exists(self.path(_handed_name(task.file))):
            log.info("task %s: finished file was consumed by the finish hook; acknowledging", task.id)
            self.record(task, "ack", event="finish")
            return
        log.warning("task %s: its finished file tmp/%s vanished before it was delivered", task.id, task.file)
        error = TransferError(ErrorCode.FILE_DOES_NOT_EXIST, f"the finished download (tmp/{task.file}) vanished "
                              "from the session directory before it was delivered (removed by a temp-file "
                              "cleaner?); download it again", url=task.request["url"])
        self.record(task, "vanished", error=error._to_record())

    def release_files(self, task: _TaskRecord, event: str) -> None:
        """After the acknowledgement of *event* is durable: remove what the task no longer needs (an upload's own
        body file too: see ``multipart_body``)."""
        if task.file and task.id not in self.finish_released:
            _unlink_quietly(self.path(task.file))
            _unlink_quietly(self.path(_handed_name(task.file)))
            if event == "finish":
                self.finish_released.add(task.id)  # (a process that dies first leaves it to the complete event's)
        if event == "complete":
            self.finish_released.discard(task.id)
            if task.file != task.done_name:  # (a finished download's partial file became tmp/<id>.done)
                _unlink_quietly(self.path(task.partial_name))
            if task.upload and task.upload.get("remove") and task.upload.get("path"):
                _unlink_quietly(task.upload["path"])
            if task.segments:
                self.drop_segments(task)

    def drop_segments(self, task: _TaskRecord) -> None:
        """Remove the files of a split download's segments but the first (the partial file)."""
        for k in range(1, len(task.segments or ())):
            _unlink_quietly(self.path(task.segment_name(k)))

    # -- resume data -------------------------------------------------------------------------
    def keep_for_resume(self, task: _TaskRecord, size: int) -> str | None:
        """Move a partial file aside so that resume data can refer to it after the task ends."""
        if task.kind != "download" or task.validator is None:
            return None
        part = self.path(task.partial_name)
        if task.segments:  # a split download: the first segment's bytes, the prefix the partial file holds
            size = min(size, task.segments[0][1], _size(part) or 0)
        if size <= 0 or not os.path.exists(part):
            return None
        name = f"resume-{task.id}-{os.urandom(6).hex()}.part"
        try:
            fd = _open_private(part, os.O_RDWR)
            try:
                _vfs.truncate(fd, size)
                _fsync(fd)
            finally:
                _vfs.close(fd)
            _vfs.replace(part, self.path(name))
            self.tmp_sync.sync()
        except OSError as err:
            log.warning("task %s: cannot keep partial data for resume (%s)", task.id, err)
            return None
        return name

    def resume_data(self, task: _TaskRecord) -> bytes | None:
        """Opaque resume data for *task* (read back by :func:`_parse_resume_data`), or None."""
        if not task.resume_file or task.validator is None:
            return None
        path = self.path(task.resume_file)
        size = _size(path)
        if size is None:
            return None
        body = {"url": task.request["url"], "request": task.request, "file": task.resume_file, "size": size,
                "validator": task.validator, "total": task.total, "response": task.response,
                "identifier": self.identifier}
        return _RESUME_MAGIC + json.dumps(body, sort_keys=True).encode("utf-8")

    def resume_fields(self, resume: Mapping[str, Any] | None) -> dict[str, Any]:
        """The fields a new task takes from parsed resume data (see _parse_resume_data): what the partial file
        holds, or the ``problem`` that fails the task at resume() -- bad data, or a partial file that is not (or no
        longer whole) in this session's tmp/."""
        if not resume:
            return {}
        if resume.get("invalid"):
            return {"problem": resume["invalid"]}
        name, size = resume["file"], resume["fields"]["durable_offset"]
        actual = _size(self.path(name))
        if actual is None:
            return {"problem": f"resume data is stale: its partial file {name} is not in this session any more"}
        if actual < size:
            return {"problem": f"resume data is stale: its partial file {name} has {actual} bytes, not {size}"}
        return dict(resume["fields"])

    def adopt_partial(self, task: _TaskRecord, name: str) -> bool:
        """Take the partial file (in tmp/) that resume data refers to as *task*'s own."""
        try:
            _vfs.replace(self.path(name), self.path(task.partial_name))
            self.tmp_sync.sync()
        except OSError as err:
            log.warning("task %s: resume file unusable (%s); it will start from zero", task.id, err)
            return False
        return True

    # -- recovery ------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Bring every task to rest, however the last process ended: transfers back to the queue,
        a cancel finished, partial files cut to what can be trusted, a finished file that a hook
        already took acknowledged; files of no live task removed (an acknowledged upload's own body too)."""
        present = set(os.listdir(self.tmp))  # one listing, not two stat calls per queued task
        has_files = {int(m.group(1)) for m in map(_TMP_NAME_RE.match, present) if m}  # (tasks with a file there)
        for task in list(self.state.tasks.values()):
            if task.phase is Phase.TRANSFERRING:
                self.record(task, "requeue")
            elif task.phase is Phase.WAITING_RETRY:
                self.record(task, "due")
            if task.phase is Phase.CANCELING:
                self.finish_cancel(task)
            elif task.phase in (Phase.QUEUED, Phase.SCHEDULED, Phase.SUSPENDED) and task.kind == "download" and (
                    task.id in has_files or task.segments):  # (no file in tmp/: nothing kept)
                self.offsets[task.id] = self._recover_partial(task, present)
            elif task.phase is Phase.DELIVERING:
                self.settle_missing_finish(task)
                self.delivered_at[task.id] = time.monotonic()
            elif task.phase is Phase.ACKNOWLEDGED:
                self.release_files(task, "complete")  # killed after the last acknowledgement, before this ran
        self._clean_tmp()

    def _recover_partial(self, task: _TaskRecord, present: set[str]) -> int:
        """*present*: the names in tmp/ (a file of this task not among them does not exist)."""
        if task.partial_name not in present and task.done_name not in present and not task.segments:
            return 0  # a queued task that never started: no file (and so nothing to keep)
        part, done = self.path(task.partial_name), self.path(task.done_name)
        if task.done_name in present and os.path.exists(done):
            # killed after the finished file was renamed, before its record: the file is whole
            # and verified; take it back as the partial file (the resume gets a 416 and completes)
            _vfs.replace(done, part)
            if task.segments:  # assembled from its segments: one file now, fsynced before its rename
                whole = _size(part) or 0
                self.record(task, "unsplit", offset=whole, boot=_BOOT_ID)
                return whole
        if task.segments:
            return self._recover_segments(task)
        size = _size(part)
        keep = 0 if task.validator is None else recovered_offset(size, task.durable_offset, task.boot, _BOOT_ID)
        if size is not None and size != keep:
            _truncate_file(part, keep)
        return keep

    def _recover_segments(self, task: _TaskRecord) -> int:
        """A split download's segment files cut to what can be trusted, each by the rule of a partial file (the
        first also to its end: an assembly may have begun); returns the bytes held."""
        held = 0
        for k, (start, end, durable) in enumerate(task.segments or ()):
            path = self.path(task.segment_name(k))
            size = _size(path)
            keep = min(recovered_offset(size, durable - start, task.boot, _BOOT_ID), end - start)
            if size is not None and size != keep:
                _truncate_file(path, keep)
            held += keep
        return held

    def _clean_tmp(self) -> None:
        """Remove what bgsession left in tmp/ and no task needs: only names it gives files (anything else there is
        not its to delete)."""
        tasks = self.state.tasks
        keep_names = {t.resume_file for t in tasks.values() if t.resume_file}
        now = time.time()
        for name in os.listdir(self.tmp):
            path = self.path(name)
            if _RESUME_NAME_RE.match(name):
                with contextlib.suppress(OSError):
                    if name not in keep_names and now - os.path.getmtime(path) > RESUME_FILE_TTL:
                        _vfs.unlink(path)
                continue
            ours = _TMP_NAME_RE.match(name)
            task = tasks.get(int(ours.group(1))) if ours else None
            if ours and (task is None or task.phase is Phase.ACKNOWLEDGED or (".seg" in name and (
                    not task.segments or task.phase is Phase.DELIVERING))):
                with contextlib.suppress(OSError):
                    _vfs.unlink(path)  # left behind by a kill after its acknowledgement (or a segment's, after
                    # its download fell back to one connection or ended)

    # -- compaction and the disk reserve ------------------------------------------------------
    def make_reserve(self) -> None:
        """Keep RESERVE_BYTES allocated; released when the disk fills so the journal can record it."""
        assert self.directory is not None
        path = os.path.join(self.directory, _RESERVE_NAME)
        try:
            if not os.path.exists(path) or os.path.getsize(path) < RESERVE_BYTES:
                fd = _open_private(path, os.O_WRONLY | os.O_CREAT)
                try:
                    if hasattr(os, "posix_fallocate"):  # allocated blocks, not a sparse file
                        os.posix_fallocate(fd, 0, RESERVE_BYTES)
                    else:  # pragma: no cover - Windows
                        _write_all(fd, bytes(RESERVE_BYTES))
                finally:
                    _vfs.close(fd)
        except OSError as err:
            _unlink_quietly(path)
            log.warning("cannot keep %d bytes in reserve in %s: %s", RESERVE_BYTES, self.directory, err)

    def release_reserve(self) -> None:
        if self.directory is not None:
            _unlink_quietly(os.path.join(self.directory, _RESERVE_NAME))

    def close(self) -> None:
        """Flush the journal, let a running compaction finish, then release the session lock (memory sessions:
        remove tmp/)."""
        self.writer.flush()
        self.writer.close()
        self.compaction.join()
        if self.directory is not None:
            _release_lock(self.directory, _LOCK_NAME)
        else:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)


# ============================================================================
# 7. Transfer: connections, authentication, download and upload attempts
# ============================================================================
#
# One attempt of one task on a worker thread: send, ask next_step() what to do with the
# response, write the body into tmp/, return an outcome. Nothing here takes the engine's
# lock; what must be journaled or told to the app goes through a _TransferHost.

#: Size of the reused buffer a transfer reads into (256 KiB copies stay in the CPU cache; 1 MiB
#: was measured 2x slower on the benchmark machine).
DEFAULT_BUFFER_SIZE = 256 << 10
#: The response reader's own buffer (the status line and headers are read through it; a body's reads of more bypass it).
_RESPONSE_BUFFER = 8192
#: Minimum seconds between two progress callbacks for one task.
DEFAULT_PROGRESS_INTERVAL = 0.1
#: Seconds (or bytes, below) of received data between two fsync + offset records.
DEFAULT_SYNC_INTERVAL = 1.0
DEFAULT_SYNC_BYTES = 64 << 20
#: Largest body of a redirect or error response read (and discarded) to keep the connection.
_DISCARD_LIMIT = 64 << 10
#: 401s for one protection space before the 401 is handed through as the response.
_MAX_AUTH_FAILURES = 10
#: Seconds an idle keep-alive connection is kept for reuse.
IDLE_CONNECTION_SECONDS = 30.0
#: A bandwidth limit's bucket holds at most this many seconds' worth of bytes: after an idle moment a transfer runs
#: that much ahead of its limit, never more (so a 10-second window carries at most 2.5 % more than the limit).
LIMIT_BURST_SECONDS = 0.25
#: A limited transfer moves this many seconds' worth of its limit at a time (at most its buffer): smooth, not bursty.
LIMIT_CHUNK_SECONDS = 0.05
#: Longest sleep while a limit holds a transfer back: a cancel, suspend or close ends it at once, and a changed
#: limit applies after at most this.
LIMIT_SLICE_SECONDS = 0.1

#: The ``done`` of a task no attempt runs for: set, shared (an Event per task costs ~0.5 KiB).
_SETTLED = threading.Event()
_SETTLED.set()


class _DeadlineReader(io.RawIOBase):
    """A connection's socket as its response reads it (the socket's own raw reader, which keeps the socket open while
    the response needs it), each read armed first by the connection (see _BoundedHTTP.arm)."""

    def __init__(self, conn: _BoundedHTTP, sock: socket.socket) -> None:
        super().__init__()
        self._conn, self._sock, self._raw = conn, sock, sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._conn.arm(self._sock)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


# http.client (which imports ssl and email) is imported when the first connection is made, not with this module
# (~15 ms). The classes based on its classes are written here on bases that are http.client's only for type
# checkers; _http_classes() makes the ones connections are made of, on the real bases, then.
if TYPE_CHECKING:
    _HTTPResponse = http.client.HTTPResponse
    _HTTPConnection = http.client.HTTPConnection
    _HTTPSConnectionBase = http.client.HTTPSConnection
else:
    _HTTPResponse = _HTTPConnection = _HTTPSConnectionBase = object


class _BoundedResponse(_HTTPResponse):
    """An HTTPResponse that reads through a _DeadlineReader (http.client only asks its socket for makefile())."""

    class _Socket:
        def __init__(self, conn: _BoundedHTTP, sock: socket.socket) -> None:
            self._conn, self._sock = conn, sock

        def makefile(self, mode: str) -> io.BufferedReader:
            return io.BufferedReader(_DeadlineReader(self._conn, self._sock), _RESPONSE_BUFFER)

    def __init__(self, conn: _BoundedHTTP, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(cast(socket.socket, self._Socket(conn, sock)), *args, **kwargs)


class _BoundedHTTP(_HTTPConnection):
    """An http.client connection whose every socket wait -- connect, each send, each read of the response head and
    body -- ends by ``deadline`` (a time.monotonic()), as well as after ``timeout`` seconds without a byte. A server
    that drips one byte a second resets a socket timeout forever; it cannot move the deadline, which the transfer
    sets per phase (see _HTTP.send). The response reads through a _DeadlineReader, which re-arms the socket before
    each read."""

    deadline = math.inf
    deadline_reason = "timeout_for_resource exceeded"
    response_type: type[_BoundedResponse]  # set by _http_classes()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.response_class = functools.partial(self.response_type, self)  # type: ignore[assignment]

    def set_deadline(self, deadline: float, reason: str) -> None:
        self.deadline, self.deadline_reason = deadline, reason

    def time_left(self) -> float:
        """Seconds until ``deadline``; _DeadlinePassed once it has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed(self.deadline_reason)
        return left

    def arm(self, sock: socket.socket) -> None:
        """Before a socket wait: its timeout is ``timeout``, or what is left of the phase once that is less than half
        of it. (A wait may so end up to half a ``timeout`` late, never later; a phase bounded by ``timeout`` itself
        ends on time. And a socket is re-armed -- a system call -- only near a deadline, not at every read.)"""
        left = self.time_left()
        wanted = left if left < self.timeout / 2 else self.timeout  # type: ignore[operator]
        if sock.gettimeout() != wanted:
            sock.settimeout(wanted)

    def connect(self) -> None:
        timeout, self.timeout = self.timeout, min(self.timeout, self.time_left())  # type: ignore[type-var]
        try:
            super().connect()
        finally:
            self.timeout = timeout

    def send(self, data: Any) -> None:
        if self.sock is not None:
            self.arm(self.sock)
        super().send(data)


_Origin = tuple[str, str, int]
_PoolKey = tuple[str, str, int, Union[_Proxy, None], int]  # an origin, the proxy, the configuration generation
_Held = dict[_PoolKey, _BoundedHTTP]  # an attempt's connections, by origin and proxy
_Answer = tuple[AuthChallengeDisposition, Union[Credential, None]]  # a challenge hook's answer
_Renewal = tuple[DelayedRequestDisposition, Union[Request, None]]  # a delayed-request hook's answer


class _AttemptEnded(Exception):
    """Raised anywhere inside an attempt to end it with ``outcome``."""

    def __init__(self, outcome: _Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _fail(code: ErrorCode, message: str, url: str | None, keep_partial: bool = True) -> _AttemptEnded:
    return _AttemptEnded(_Failed(TransferError(code, message, url=url), keep_partial))


class _RateLimit:
    """A bandwidth limit as a token bucket: ``rate`` bytes per second on average (None: no limit), at most
    LIMIT_BURST_SECONDS' worth ahead after an idle moment. A transfer reserves bytes before it moves them -- the
    bucket may go into debt, and the transfer then waits (``delay``) until the debt is paid -- and gives back what it
    did not move. Its own lock: a changed rate applies to the next ``delay`` of every transfer that shares it.
    *clock*: seconds, monotonic (tests give their own)."""

    def __init__(self, rate: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.rate = rate
        self._tokens = 0.0  # bytes that may move now; negative: reserved ahead of the rate
        self._at = clock()

    def set_rate(self, rate: int | None) -> None:
        with self._lock:
            self._refill()
            self.rate = rate
            self._tokens = 0.0 if rate is None else min(self._tokens, rate * LIMIT_BURST_SECONDS)

    def chunk(self, most: int) -> int:
        """How many bytes a transfer moves at a time under this limit (at most *most*)."""
        rate = self.rate
        return most if rate is None else max(1, min(most, int(rate * LIMIT_CHUNK_SECONDS)))

    def reserve(self, n: int) -> None:
        with self._lock:
            if self.rate is not None:
                self._refill()
                self._tokens -= n

    def give_back(self, n: int) -> None:
        """Return reserved bytes that did not move (a short read, a stopped transfer)."""
        with self._lock:
            if self.rate is not None and n > 0:
                self._refill()
                self._tokens = min(self._tokens + n, self.rate * LIMIT_BURST_SECONDS)

    def delay(self) -> float:
        """Seconds until what was reserved may move (0: now), at the rate in force."""
        with self._lock:
            if self.rate is None:
                return 0.0
            self._refill()
            return max(0.0, -self._tokens / self.rate)

    def _refill(self) -> None:
        now = self._clock()
        if self.rate is not None:
            self._tokens = min(self._tokens + (now - self._at) * self.rate, self.rate * LIMIT_BURST_SECONDS)
        self._at = now


class _Control:
    """Lets another thread stop a running attempt (suspend, cancel, close), and each of its connections: a split
    download's segments run under children of the attempt's control, stopped with it."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()  # set with the reason: ends a wait for a bandwidth limit at once
        self.children: list[_Control] = []

    def child(self) -> _Control:
        """A control for one more connection of this attempt: stopped when this one is (or on its own)."""
        child = _Control()
        with self.lock:
            self.children.append(child)
            reason = self.reason
        if reason is not None:
            child.stop(reason)
        return child

    def stop(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason
            conn, children = self.conn, list(self.children)
        self.stopped.set()
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read at once
        for child in children:
            child.stop(reason)

    def check(self) -> None:
        if self.reason is not None:
            raise _AttemptEnded(_Stopped(self.reason))


_LIVE_LIMITS_GUARD = threading.Lock()
_NO_ENTRIES: Mapping[Any, Any] = types.MappingProxyType({})  # (shared by every _Live that has none: read-only)


class _Live:
    """A task's state in this process, never persisted: transfer fields (offset, retry policy,
    secrets, the request the app renewed, auth, progress, connectivity) and engine fields (timer,
    worker, delivery)."""

    __slots__ = (
        "_limit", "auth_header", "auth_origin", "control", "done", "due", "events_ready", "expected", "expected_send",
        "failures", "last_error", "needs_renewal", "next_retry", "offset", "progress_at", "progress_pending",
        "proxy_auth", "rate", "rate_at", "rate_bytes", "renewed", "rerequest", "retry", "secret_headers", "sent",
        "url_credentials", "waiting", "worker",
    )

    def __init__(self, retry: Retry, offset: int = 0, expected: int = -1, limit: int | None = None,
                 needs_renewal: bool = False) -> None:
        self.offset, self.expected, self.retry = offset, expected, retry
        self._limit: _RateLimit | int | None = limit  # the task's own bandwidth limit: its rate until first used
        self.sent, self.expected_send = 0, -1
        self.secret_headers: tuple[tuple[str, str], ...] = ()
        self.url_credentials: Mapping[_Origin, Credential] = _NO_ENTRIES  # a URL's user:password@, by origin
        # (memory only; this mapping and failures are replaced, never changed: a queued task shares the empty one)
        self.renewed: Request | None = None  # the app's new request (task_will_begin_delayed_request), secrets too
        self.needs_renewal = needs_renewal  # ask the app first: secret headers lost, or a delayed task begins
        self.auth_header: str | Callable[[str, str], str] | None = None  # (method, request target) -> value
        self.auth_origin: _Origin | None = None
        self.proxy_auth: str | Callable[[str, str], str] | None = None  # Proxy-Authorization from a 407's answer
        self.failures: Mapping[tuple[str, int, str | None, str, bool], int] = _NO_ENTRIES
        self.waiting = 0  # attempts in a row that found no connectivity (0: not waiting)
        self.last_error: TransferError | None = None  # why the last attempt failed, until a response is accepted
        self.next_retry: float | None = None  # wall-clock time of the next attempt
        self.rerequest = False  # the last range answer was unusable: ask for the whole entity
        self.progress_at, self.progress_pending = 0.0, 0
        self.rate, self.rate_at, self.rate_bytes = 0.0, 0.0, 0  # bytes per second, smoothed (status)
        # engine
        self.due = 0.0  # the timer in force (a retry, or the earliest begin date)
        self.control: _Control | None = None
        self.worker = False  # an attempt runs (or is settling)
        self.events_ready = True  # False while the outcome's record is not yet durable
        self.done = _SETTLED  # the current attempt settled (a fresh Event per attempt)

    @property
    def limit(self) -> _RateLimit:
        """The task's own bandwidth limit, made when first used (a queued task of 100,000 needs no bucket, no lock)."""
        limit = self._limit
        if isinstance(limit, _RateLimit):
            return limit
        with _LIVE_LIMITS_GUARD:  # (two threads' first uses get one bucket)
            limit = self._limit
            if not isinstance(limit, _RateLimit):
                limit = self._limit = _RateLimit(limit)
            return limit

    def take_plan(self, plan: _RetryPlan, outcome: _Interrupted, url: str, now: float) -> bool:
        """After an interrupted attempt: the retry policy in force, why it failed, when it tries next. True: a
        waiting period for connectivity begins (the app is told once)."""
        begins = plan.waiting > 0 and self.waiting == 0
        self.retry, self.waiting = plan.retry, plan.waiting
        self.last_error = TransferError(outcome.code, outcome.message, url=url)
        self.next_retry = now + (plan.delay or 0.0)
        return begins

    def timed_out(self) -> TransferError:
        """The error of a task whose timeout_for_resource ran out while it waited to try again."""
        why = f" (last attempt: {self.last_error.message})" if self.last_error is not None else ""
        return TransferError(ErrorCode.TIMED_OUT, f"timeout_for_resource exceeded{why}")


class _TunnelRefused(Exception):
    """A proxy answered CONNECT with something else than 200 (a 407, a 502 ...): *response*, already read."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        super().__init__(f"CONNECT refused: {response.status} {response.reason}")
        self.response = response


class _PinMismatch(Exception):
    """The server's certificate is not one of ``TLS.pinned_certificates_sha256``."""


def _tls_context(config: Configuration) -> ssl.SSLContext:
    """The SSLContext of a configuration: its ``ssl_context`` (in-process), or one made from its :class:`TLS`
    (what the daemon does too), or the system's defaults. Errors are InvalidArgumentError."""
    import ssl
    if config.ssl_context is not None:
        return config.ssl_context
    tls = config.tls or TLS()
    try:
        ctx = ssl.create_default_context(cafile=tls.cafile, capath=tls.capath)
        if tls.certfile is not None:
            ctx.load_cert_chain(tls.certfile, tls.keyfile, password=tls.key_password)
        if tls.minimum_version is not None:
            ctx.minimum_version = ssl.TLSVersion[_TLS_VERSIONS[tls.minimum_version]]
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError (a wrong key password among them)
        raise _invalid(f"cannot load the TLS settings (certificate, key or CA files): {err}") from err
    return ctx


class _HTTPSConnection(_BoundedHTTP, _HTTPSConnectionBase):
    """_BoundedHTTP over TLS: straight to the server, or through an HTTP proxy's CONNECT tunnel (whose refusal, a 407
    included, raises _TunnelRefused with the proxy's response), checking certificate pins after the handshake.
    ``sock`` is set once the TCP connection stands, so that a failure can tell "not reached" (offline) from what came
    after. The handshake as a whole ends within ``timeout`` (and by the deadline): a server that drips it a byte at a
    time cannot stretch it. (The tunnel's answer is bounded per byte by ``timeout``.)"""

    def __init__(self, host: str, port: int, *, timeout: float, context: ssl.SSLContext, pins: Sequence[str],
                 proxy: _Proxy | None) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.tls, self.pins, self.proxy = context, frozenset(pins), proxy
        self.proxy_authorization: str | None = None  # set before each request: memory only

    def connect(self) -> None:
        timeout = min(self.timeout, self.time_left())  # type: ignore[type-var]
        if self.proxy is None:
            self.sock = raw = socket.create_connection((self.host, self.port), timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (as http.client does)
        else:
            self.sock = raw = socket.create_connection((self.proxy.host, self.proxy.port), timeout)
            raw.settimeout(self.timeout)
            self._open_tunnel(raw)
        self.sock = self._handshake(raw)
        if self.pins:
            import hashlib
            der = self.sock.getpeercert(binary_form=True) or b""
            digest = hashlib.sha256(der).hexdigest()
            if digest not in self.pins:
                raise _PinMismatch(f"the certificate of {self.host} (SHA-256 {digest}) is not one of "
                                   "TLS.pinned_certificates_sha256")

    def _handshake(self, raw: socket.socket) -> ssl.SSLSocket:
        """The TLS handshake, run without blocking so that its whole, not each read, ends by a time: ``timeout`` from
        now or the deadline, whichever comes first."""
        import selectors
        import ssl
        ends = min(time.monotonic() + self.timeout, self.deadline)  # type: ignore[operator]
        tls = self.tls.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = tls  # (it holds the connection's socket now: closing the connection closes it)
        tls.settimeout(0.0)
        with selectors.DefaultSelector() as selector:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    events = selectors.EVENT_READ
                except ssl.SSLWantWriteError:
                    events = selectors.EVENT_WRITE
                left = ends - time.monotonic()
                if left <= 0 and ends >= self.deadline:
                    raise _DeadlinePassed(self.deadline_reason)
                if left <= 0:
                    raise _DeadlinePassed(f"the TLS handshake with {self.host} took longer than timeout_for_request "
                                          f"({self.timeout:g} s)")
                selector.register(tls, events)
                selector.select(left)  # (ready or not: the time is checked above)
                selector.unregister(tls)
        tls.settimeout(self.timeout)
        return tls

    def _open_tunnel(self, raw: socket.socket) -> None:
        import http.client
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.proxy_authorization:
            lines.append(f"Proxy-Authorization: {self.proxy_authorization}")
        raw.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = http.client.HTTPResponse(raw, method="CONNECT")
        response.begin()
        if response.status != 200:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if response.length is not None and response.length <= _DISCARD_LIMIT:
                    response.read()
            response.close()
            raise _TunnelRefused(response)
        response.close()  # (the socket stays open: it carries the tunnel)


@functools.cache
def _http_classes() -> tuple[type[_BoundedHTTP], type[_HTTPSConnection]]:
    """The classes connections are made of: _BoundedHTTP and _HTTPSConnection on http.client's classes."""
    import http.client

    def make(cls: type[Any], base: type[Any], **attrs: Any) -> Any:
        return type(cls.__name__, (cls, base), {"__module__": __name__, "__qualname__": cls.__qualname__,
                                                "__doc__": cls.__doc__, **attrs})

    response = make(_BoundedResponse, http.client.HTTPResponse)
    return (make(_BoundedHTTP, http.client.HTTPConnection, response_type=response),
            make(_HTTPSConnection, http.client.HTTPSConnection, response_type=response))


class _ConnectionPool:
    """Keep-alive connections by origin and proxy, shared by the workers: an attempt holds the ones it
    uses (*held*) and gives them back when it ends. Its own lock, never the engine's. The connections
    open at once, held and idle, stay within ``max_concurrent_transfers``: an idle one is closed
    (the oldest first) before a new one is opened beyond it. A new configuration (TLS, proxies)
    retires every connection made under the old one."""

    def __init__(self, config: Configuration) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._idle: dict[_PoolKey, list[tuple[float, _BoundedHTTP]]] = {}
        self._idle_count = 0
        self._held = 0  # connections in attempts' *held* (closed ones too, until released)
        self._ssl: ssl.SSLContext | None = None  # created once: loading the CA store is slow
        self._generation = 0  # of the configuration; part of every key

    def configure(self, config: Configuration) -> None:
        with self._lock:
            self.config, self._ssl = config, None
            self._generation += 1
        self.close()

    def get(self, url: str, proxy: _Proxy | None, held: _Held, fresh: bool) -> tuple[_BoundedHTTP, bool]:
        """A connection for *url*'s origin through *proxy*: the attempt's own, an idle one, or a new one.
        Returns it and whether it was used before (a dead keep-alive may need a retry)."""
        key: _PoolKey = (*_origin(url), proxy, self._generation)
        conn = held.get(key)
        if conn is not None and not fresh:
            return conn, conn.sock is not None
        if conn is not None:
            conn.close()  # replaced below: still one of the attempt's
        else:
            with self._lock:
                self._held += 1
        idle = None if fresh else self._take(key)
        held[key] = idle or self._new(key)
        return held[key], idle is not None

    def release(self, held: _Held, ok: bool) -> None:
        """After an attempt: its connections go back to the idle lists (keep-alive), within the
        per-origin and overall bounds; everything is closed if the attempt failed."""
        for key, conn in list(held.items()):
            del held[key]
            with self._lock:
                idle = self._idle.setdefault(key, [])
                keep = ok and conn.sock is not None and key[4] == self._generation and \
                    len(idle) < self.config.max_connections_per_host
                if keep:
                    idle.append((time.monotonic(), conn))
                    self._idle_count += 1
                    self._held -= 1
            if not keep:
                conn.close()  # closed before it stops counting: a new one never overlaps it
                with self._lock:
                    self._held -= 1

    def _take(self, key: _PoolKey) -> _BoundedHTTP | None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                at, conn = idle.pop()
                self._idle_count -= 1
                if now - at < IDLE_CONNECTION_SECONDS:
                    return conn
                conn.close()
        return None

    def _new(self, key: _PoolKey) -> _BoundedHTTP:
        with self._lock:  # room for one more: close idle connections, the oldest first
            while self._idle_count and self._idle_count + self._held > self.config.max_concurrent_transfers:
                oldest = min((idle for idle in self._idle.values() if idle), key=lambda idle: idle[0][0])
                oldest.pop(0)[1].close()
                self._idle_count -= 1
        scheme, host, port, proxy, _ = key
        timeout = self.config.timeout_for_request
        plain, tls = _http_classes()
        if scheme == "https":
            if self._ssl is None:
                self._ssl = _tls_context(self.config)
            pins = self.config.tls.pinned_certificates_sha256 if self.config.tls else ()
            return tls(host, port, timeout=timeout, context=self._ssl, pins=pins, proxy=proxy)
        if proxy is not None:  # absolute-form requests to the proxy
            return plain(proxy.host, proxy.port, timeout=timeout)
        return plain(host, port, timeout=timeout)

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._idle_count = self._idle, {}, 0
        for conns in idle.values():
            for _, conn in conns:
                conn.close()


class _TransferHost(Protocol):
    """What an attempt needs from the engine. Each method takes the engine's lock itself. ``change_connections``: a
    split download asks for *count* more connections (returns how many the scheduler grants) or, with a negative
    *count*, gives that many back."""

    def record(self, task: _TaskRecord, record_type: str, /, **fields: Any) -> int: ...
    def record_offset(self, task: _TaskRecord, offset: int, segment: int | None = None) -> None: ...
    def change_connections(self, task: _TaskRecord, count: int) -> int: ...
    def post(self, event: ProgressEvent) -> None: ...
    def ask(self, task: _TaskRecord, control: _Control, challenge: AuthChallenge) -> _Answer: ...
    def renew(self, task: _TaskRecord, control: _Control, request: Request) -> _Renewal: ...
    def resource_expired(self, task: _TaskRecord) -> bool: ...
    def resource_left(self, task: _TaskRecord) -> float: ...


class _Authenticator:
    """Answers 401s and proxies' 407s: the session's credentials (memory only, by protection space)
    first, then the app's challenge hook through the host; then sets the Authorization (or
    Proxy-Authorization) of the retried request. A proxy URL's own credential is sent from the
    first request on (Basic), as curl does."""

    def __init__(self, host: _TransferHost) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._credentials: dict[tuple[str, int, str | None, str, bool], Credential] = {}

    def proxy_authorization(self, task: _TaskRecord, proxy: _Proxy, method: str, target: str) -> str | None:
        """The Proxy-Authorization of a request through *proxy* (*target*: as the proxy sees it)."""
        auth: str | Callable[[str, str], str] | None = task.live.proxy_auth
        if auth is None and proxy.credential is not None:
            return _basic_authorization(proxy.credential)
        return auth(method, target) if callable(auth) else auth

    def respond(self, task: _TaskRecord, control: _Control, url: str, offers: Sequence[tuple[str, Mapping[str, str]]],
                headers: Headers, proxy: _Proxy | None = None) -> bool:
        """True: retry the request with credentials; False: the 401 (407 with *proxy*) stands."""
        live = task.live
        scheme_of_url, host, port = _origin(url) if proxy is None else ("http", proxy.host, proxy.port)
        for scheme, params in offers:
            realm = params.get("realm")
            key = (host, port, realm, scheme, proxy is not None)
            failures = live.failures.get(key, 0)
            if scheme == "digest" and params.get("stale", "").lower() == "true" and failures > 0:
                failures -= 1  # a stale nonce is not a wrong password
            if failures >= _MAX_AUTH_FAILURES:
                return False
            with self._lock:  # a proxy URL's credential is the one stored for its proxy
                stored = self._credentials.get(key) or (proxy.credential if proxy is not None else None)
                cred = stored if failures == 0 else None
            if cred is None and failures == 0 and proxy is None:
                cred = live.url_credentials.get(_origin(url))  # the URL's user:password@
            if cred is None:
                space = ProtectionSpace(host, port, realm, scheme, scheme_of_url, is_proxy=proxy is not None)
                status, proposed = (407, proxy.credential) if proxy is not None else (401, None)
                disposition, cred = self._host.ask(task, control, AuthChallenge(
                    space, failures, Response(url, status, headers), proposed))
                if disposition is AuthChallengeDisposition.CANCEL_AUTHENTICATION_CHALLENGE:
                    raise _fail(ErrorCode.USER_CANCELLED_AUTHENTICATION,
                                "authentication challenge cancelled by the app", url)
                if disposition is AuthChallengeDisposition.REJECT_PROTECTION_SPACE:
                    continue
                with self._lock:
                    if disposition is AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING:
                        cred = self._credentials.get(key) if failures == 0 else None
                    if cred is None:
                        return False
                    if cred.persistence is CredentialPersistence.FOR_SESSION:
                        self._credentials[key] = cred
            live.failures = {**live.failures, key: failures + 1}
            if proxy is not None:
                live.proxy_auth = self._header(scheme, cred, params)
            else:
                live.auth_origin = _origin(url)
                live.auth_header = self._header(scheme, cred, params)
            return True
        return False

    @staticmethod
    def _header(scheme: str, cred: Credential, params: Mapping[str, str]) -> str | Callable[[str, str], str]:
        if scheme == "basic":
            return _basic_authorization(cred)
        counter, chosen = itertools.count(1), dict(params)

        def digest(method: str, target: str) -> str:
            return _digest_authorization(cred, chosen, method, target, next(counter))
        return digest


class _HTTP:
    """The request/response half of an attempt: headers, sending on a pooled connection (through a
    proxy when one applies), and the response sequence that :func:`next_step` decides (redirects,
    challenges, renewals, retryable statuses)."""

    def __init__(self, config: Configuration, host: _TransferHost, connections: _ConnectionPool) -> None:
        self.config, self.host, self.connections = config, host, connections
        self.auth = _Authenticator(host)

    def exchange(self, task: _TaskRecord, control: _Control, held: _Held, ex: _Exchange,
                 extra: Mapping[str, str] | None = None,
                 body: Callable[[http.client.HTTPConnection], None] | None = None
                 ) -> tuple[http.client.HTTPResponse, _BoundedHTTP, _Exchange, RangePlan | None]:
        """Send until next_step() accepts a response; returns it, its connection, where the
        exchange ended (its URL) and, for downloads, the range plan. Every phase ends by the
        task's timeout_for_resource (see send)."""
        live = task.live
        deadline = time.monotonic() + self.host.resource_left(task)
        while True:
            proxy = proxy_for(ex.url, self.config.proxies)
            headers = self.headers(task, ex.url, ex.method, {**ex.request_headers(), **(extra or {})})
            resp, conn = self.send(task, control, ex.url, ex.method, held, headers, body, proxy, deadline)
            live.waiting = 0  # a response: connectivity is back (a later loss starts a new waiting period)
            hdrs = Headers(resp.getheaders())
            step = next_step(ex, resp.status, hdrs)
            if isinstance(step, _Authenticate):
                asker = proxy if step.proxy else None
                if (asker is not None or not step.proxy) and self.auth.respond(task, control, ex.url, step.offers,
                                                                               hdrs, asker):
                    self.drain(resp, conn, deadline)
                    continue
                step = next_step(dataclasses.replace(ex, auth_declined=True), resp.status, hdrs)
            if isinstance(step, _Renew):
                if self.renew(task, control, f"HTTP {step.status} from {ex.url}") and live.renewed is not None:
                    self.drain(resp, conn)
                    ex = dataclasses.replace(ex, url=live.renewed.url, renewals=ex.renewals + 1)
                    continue
                step = next_step(dataclasses.replace(ex, auth_declined=True, renew_declined=True), resp.status, hdrs)
            if isinstance(step, _Accept):
                live.last_error = None
                return resp, conn, ex, step.plan
            self.drain(resp, conn, deadline)
            if isinstance(step, _FollowRedirect):
                if step.credential is not None:  # the Location's user:password@, for its origin, in memory
                    task.live.url_credentials = {**task.live.url_credentials, _origin(step.url): step.credential}
                self.host.record(task, "redirect", url=step.url)
                ex = dataclasses.replace(ex, url=step.url, redirects=ex.redirects + 1)
            elif isinstance(step, _AskAgain):
                log.info("task %s: %s; asking for the whole entity", task.id, step.reason)
                live.rerequest = True
                ex = dataclasses.replace(ex, rerequests=ex.rerequests + 1, rerequest=True)
            else:  # _Failed or _Interrupted (never _Authenticate or _Renew: they were declined above)
                raise _AttemptEnded(cast(_Outcome, step))

    def request_in_force(self, task: _TaskRecord) -> Request:
        """The request this task's attempts send: the app's renewed one, else the journaled one with
        the secret headers this process holds for it."""
        live: _Live = task.live
        if live.renewed is not None:
            return live.renewed
        rec = task.request
        headers = {**dict(rec.get("headers") or []), **dict(live.secret_headers)}
        return Request(rec["url"], rec.get("method", "GET"), headers, rec.get("sha256"))

    def renew(self, task: _TaskRecord, control: _Control, why: str) -> bool:
        """Ask the app (task_will_begin_delayed_request, through the host: an app is waited for, or
        relaunched) whether to send the request in force, a new one, or to cancel. True: a new
        request is in force (``live.renewed``); its URL and headers replace the old ones in memory."""
        live = task.live
        live.needs_renewal = False
        disposition, new = self.host.renew(task, control, self.request_in_force(task))
        if disposition is DelayedRequestDisposition.CANCEL:
            raise _fail(ErrorCode.CANCELLED, f"cancelled by task_will_begin_delayed_request ({why})", task.current_url)
        if disposition is not DelayedRequestDisposition.USE_NEW_REQUEST or new is None:
            return False
        if (new.method == "GET") != (task.kind == "download"):
            log.warning("task %s: task_will_begin_delayed_request gave a %s request to a %s task; ignored", task.id,
                        new.method, task.kind)
            return False
        live.renewed, live.secret_headers = new, new._secret_headers()
        return True

    def headers(self, task: _TaskRecord, url: str, method: str, extra: Mapping[str, str]) -> dict[str, str]:
        """The configuration's headers and the request's; the secret ones of both only to the
        origin of the request (a redirect elsewhere drops them); the credential of a challenge
        (the origin that asked only); then *extra*."""
        live = task.live
        renewed = live.renewed
        public = renewed._to_record()["headers"] if renewed is not None else task.request.get("headers", [])
        config = self.config.headers.pairs()
        headers = {"User-Agent": f"bgsession/{__version__} Python/{sys.version.split()[0]}",
                   **{k: v for k, v in config if k.lower() not in _SECRET_HEADERS}, **dict(public)}
        if _origin(url) == _origin(renewed.url if renewed is not None else task.request["url"]):
            headers.update((k, v) for k, v in config if k.lower() in _SECRET_HEADERS)
            headers.update(live.secret_headers)
        auth = live.auth_header
        if auth is not None and live.auth_origin == _origin(url):
            headers["Authorization"] = auth(method, _request_target(url)) if callable(auth) else auth
        headers.update(extra)
        return headers

    def _bound(self, conn: _BoundedHTTP, deadline: float, phase: str | None = None) -> None:
        """The deadline of the next phase on *conn*: the resource's, or (a *phase* named) timeout_for_request for
        the whole of it, if that ends first."""
        limit = time.monotonic() + self.config.timeout_for_request
        if phase is None or deadline <= limit:
            conn.set_deadline(deadline, "timeout_for_resource exceeded")
        else:
            conn.set_deadline(limit, f"{phase} did not arrive whole within timeout_for_request")

    def send(self, task: _TaskRecord, control: _Control, url: str, method: str, held: _Held,
             headers: Mapping[str, str], body: Callable[[http.client.HTTPConnection], None] | None = None,
             proxy: _Proxy | None = None, deadline: float = math.inf) -> tuple[http.client.HTTPResponse, _BoundedHTTP]:
        """Send one request (through *proxy*: http in absolute form, https in a CONNECT tunnel); a reused keep-alive
        connection that turns out dead is replaced once. Connecting and sending end by *deadline* (the resource's),
        the response head within timeout_for_request as well; the body is left bounded by *deadline*."""
        import http.client
        import ssl
        import urllib.parse
        parts = urllib.parse.urlsplit(url)
        target, tunnel_auth = _request_target(url), None
        if proxy is not None and parts.scheme.lower() == "http":
            target = _absolute_target(url)
            auth = self.auth.proxy_authorization(task, proxy, method, target)
            headers = {**headers, "Proxy-Authorization": auth} if auth else headers
        elif proxy is not None:
            tunnel_auth = self.auth.proxy_authorization(task, proxy, "CONNECT", _authority(url))
        for attempt in (0, 1):
            control.check()
            c, reused = self.connections.get(url, proxy, held, attempt == 1)
            control.conn = c
            try:
                self._bound(c, deadline)
                if c.sock is None:
                    refused = self._connect(c, control, url, proxy, tunnel_auth)
                    if refused is not None:
                        return refused, c
                c.putrequest(method, target, skip_accept_encoding=True)
                for k, v in headers.items():
                    c.putheader(k, v)
                c.endheaders()
                # connected now: a stop() that came before had no socket to shut down, and the read
                # below would wait out timeout_for_request (close, cancel, suspend)
                control.check()
                if body is not None:
                    body(c)
                self._bound(c, deadline, "the response head")
                resp = c.getresponse()
                self._bound(c, deadline)
                return resp, c
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError, http.client.ImproperConnectionState) as err:
                c.close()
                control.check()
                if not reused or attempt == 1:
                    raise _AttemptEnded(_Interrupted(*Retry.classify(err))) from err
            except (OSError, http.client.HTTPException) as err:
                c.close()
                control.check()
                if isinstance(err, ssl.SSLCertVerificationError):
                    raise _fail(ErrorCode.SERVER_CERTIFICATE_UNTRUSTED,
                                f"TLS certificate of {parts.hostname} not trusted: {err.verify_message}", url) from err
                if isinstance(err, ssl.SSLError):
                    raise _fail(ErrorCode.SECURE_CONNECTION_FAILED, f"TLS failed: {err}", url) from err
                raise _AttemptEnded(_Interrupted(*Retry.classify(err))) from err
        raise AssertionError("unreachable")

    def _connect(self, c: _BoundedHTTP, control: _Control, url: str, proxy: _Proxy | None,
                 tunnel_auth: str | None) -> http.client.HTTPResponse | None:
        """Open *c*. Returns None, or a proxy's 407 to CONNECT (to answer like any 407). Not reaching
        the server or the proxy at all is an offline _Interrupted (the task waits for connectivity);
        a failure after that (TLS, a reset) is raised for send() to classify."""
        if isinstance(c, _HTTPSConnection):
            c.proxy_authorization = tunnel_auth
        try:
            c.connect()
        except _TunnelRefused as refused:
            c.close()
            status, reason = refused.response.status, refused.response.reason
            if status == 407:
                return refused.response
            message = f"{proxy} refused the tunnel to {_authority(url)}: {status} {reason}"
            if self.config.retry.is_retryable_status(status):
                raise _AttemptEnded(_Interrupted(ErrorCode.BAD_SERVER_RESPONSE, message)) from None
            raise _fail(ErrorCode.CANNOT_CONNECT_TO_HOST, message, url) from None
        except _PinMismatch as err:
            c.close()
            raise _fail(ErrorCode.SERVER_CERTIFICATE_UNTRUSTED, str(err), url) from None
        except OSError as err:
            if c.sock is not None:
                raise  # reached: what failed came after (a TLS handshake, a reset)
            c.close()
            control.check()
            raise _AttemptEnded(connect_failure(err, str(proxy) if proxy else _authority(url))) from err
        return None

    def drain(self, resp: http.client.HTTPResponse, conn: _BoundedHTTP, deadline: float = math.inf) -> None:
        """Read and discard a small body (within timeout_for_request, whatever its pace) so the connection can be
        reused; close it otherwise."""
        import http.client
        self._bound(conn, deadline, "a discarded body (redirect, error page)")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if resp.length is not None and resp.length <= _DISCARD_LIMIT:
                resp.read()
                return
            if resp.chunked and len(resp.read(_DISCARD_LIMIT + 1)) <= _DISCARD_LIMIT and resp.isclosed():
                return
        conn.close()


class _Segment:
    """One segment of a split download in this attempt: the entity's bytes [start, end), held up to ``pos`` in its
    own file (``fd``)."""

    __slots__ = ("end", "fd", "index", "pos", "start")

    def __init__(self, index: int, start: int, end: int, fd: int, size: int) -> None:
        self.index, self.start, self.end, self.fd = index, start, end, fd
        self.pos = start + min(size, end - start)


class _Segments:
    """One attempt of a split download: its segments fetched on parallel connections, then put together.

    The attempt's thread works on the segments -- the first on the response that decided the split, if there is one
    -- with as many helper threads (``bgsession-segment``, joined before :meth:`run` returns) as the engine grants it
    extra connections: only slots that no queued task could use (:func:`extra_connections`); a helper gives its slot
    back when no segment is left to start. Each segment is written to its own file (the first: the partial file) from
    its own position, fsynced and journaled like a one-connection download (``progress`` with ``segment``), and each
    answer passes :func:`plan_segment`. The first failure stops the other connections and ends the attempt: each
    segment resumes from its own position at the next. An answer that means "one connection from now on" keeps the
    bytes held contiguously from the start (none if the entity changed) in the partial file, journals ``unsplit``
    and lets the attempt go on with one connection. When every segment is complete, the others are appended to the
    partial file, which the transfer then finishes like any download.

    Why a file per segment, not one preallocated file written at each segment's offset: a file's size is the exact,
    kill-proof record of how far its writer got -- a one-connection download relies on it after a process kill
    (:func:`recovered_offset`), and so does each segment. In one shared file, written and preallocated bytes look
    alike after a kill; a side map updated after each write would lose the bytes written between the write and the
    map's update (and a write that a SIGKILL cut short), which would be fetched again. The price: the other segments
    are copied into the partial file once at the end, and need that much more space until then."""

    def __init__(self, transfer: _Transfer, task: _TaskRecord, control: _Control, buf: bytearray) -> None:
        self.transfer, self.task, self.control, self.buf = transfer, task, control, buf
        self.lock = threading.Lock()  # the queue, the first failure, the task's byte count and its progress
        self.segments: list[_Segment] = []
        self.queue: list[_Segment] = []  # segments no connection works on yet
        self.failure: _Outcome | RangePlan | None = None  # the first; a RangePlan: go on with one connection
        self.controls: list[_Control] = []
        self.url = task.current_url

    def run(self, held: _Held, fd: int, url: str,
            first: tuple[http.client.HTTPResponse, http.client.HTTPConnection] | None = None) -> bool:
        """Fetch every segment not complete yet (*first*: the response that decided the split, which streams the first
        segment). True: the partial file holds the whole entity; False: the download goes on with one connection."""
        self.url = url
        try:
            self._open(fd)
            self.queue = [seg for seg in self.segments[1 if first is not None else 0:] if seg.pos < seg.end]
            wanted = len(self.queue) - (1 if first is None else 0)  # (without a first response, this thread takes one)
            granted = self.transfer.host.change_connections(self.task, wanted) if wanted > 0 else 0
            helpers: list[threading.Thread] = []
            try:
                for _ in range(granted):
                    helpers.append(threading.Thread(target=self._helper, name="bgsession-segment", daemon=True))
                    helpers[-1].start()
                self._work(held, self._child(), self.buf, first)
            except BaseException:
                self._stop_others()
                raise
            finally:
                for thread in helpers:
                    if thread.ident is not None:
                        thread.join()
            return self._conclude(fd, held)
        finally:
            for seg in self.segments[1:]:
                _vfs.close(seg.fd)

    def _open(self, fd: int) -> None:
        """Each segment's file (created if need be) and how far it holds its segment."""
        task = self.task
        for k, (start, end, _) in enumerate(task.segments or ()):
            path = self.transfer.store.path(task.segment_name(k))
            try:
                seg_fd = fd if k == 0 else _open_private(path, os.O_RDWR | os.O_CREAT)
            except OSError as err:
                raise _fail(ErrorCode.CANNOT_CREATE_FILE, f"cannot create {path}: {err}", self.url) from err
            size = os.fstat(seg_fd).st_size
            if size > end - start:
                _vfs.truncate(seg_fd, end - start)  # (the first segment: an assembly had begun)
            self.segments.append(_Segment(k, start, end, seg_fd, size))
        task.live.offset = sum(seg.pos - seg.start for seg in self.segments)

    def _child(self) -> _Control:
        child = self.control.child()
        with self.lock:
            self.controls.append(child)
        return child

    def _helper(self) -> None:
        held: _Held = {}
        clean = False
        try:
            clean = self._work(held, self._child(), bytearray(len(self.buf)))
        except BaseException as err:  # a bug must not hang the attempt: it fails the task clearly
            log.exception("task %s: internal error in a segment", self.task.id)
            self._fail(_Failed(TransferError(ErrorCode.UNKNOWN, f"internal error: {err!r}", url=self.url)))
        finally:
            self.transfer.http.connections.release(held, clean)
            self.transfer.host.change_connections(self.task, -1)

    def _work(self, held: _Held, control: _Control, buf: bytearray,
              first: tuple[http.client.HTTPResponse, http.client.HTTPConnection] | None = None) -> bool:
        """One connection: the first response's segment, then segments off the queue until none is left or the
        attempt ends. A failure is kept (the first one) and stops the other connections. True: ended cleanly."""
        try:
            if first is not None:
                control.conn = first[1]  # (a stop of this connection shuts it down)
                self._stream(self.segments[0], control, buf, *first)
                if self.segments[0].pos < self.segments[0].end:
                    self._fetch(self.segments[0], control, held, buf)
            while (seg := self._next()) is not None:
                self._fetch(seg, control, held, buf)
            return control.reason is None
        except _AttemptEnded as end:
            self._fail(end.outcome)
        except OSError as err:  # a segment's file
            self._fail(_Failed(TransferError(ErrorCode.CANNOT_WRITE_TO_FILE, f"cannot write a segment: {err}",
                                             url=self.url)))
        return False

    def _next(self) -> _Segment | None:
        with self.lock:
            if self.failure is not None or self.control.reason is not None or not self.queue:
                return None
            return self.queue.pop(0)

    def _fail(self, outcome: _Outcome | RangePlan) -> None:
        """Keep the first failure (a stop is the attempt's control's business) and stop the other connections."""
        if isinstance(outcome, _Stopped):
            return
        with self.lock:
            if self.failure is not None:
                return
            self.failure = outcome
        self._stop_others()

    def _stop_others(self) -> None:
        with self.lock:
            controls = list(self.controls)
        for control in controls:
            control.stop("segment")

    def _fetch(self, seg: _Segment, control: _Control, held: _Held, buf: bytearray) -> None:
        """Ask for the rest of a segment (``Range: bytes=pos-end-1``, ``If-Range``) until it is complete."""
        task = self.task
        ex = _Exchange("download", "GET", self.url, task.live.retry, validator=task.validator,
                       known_total=task.total, segment=(seg.start, seg.end))
        while seg.pos < seg.end:
            control.check()
            ex = dataclasses.replace(ex, offset=seg.pos)
            resp, conn, ex, plan = self.transfer.http.exchange(task, control, held, ex)
            assert plan is not None
            if plan.action != "write":
                self.transfer.http.drain(resp, conn)
                log.info("task %s: segment %d: %s; going on with one connection", task.id, seg.index, plan.reason)
                self._fail(plan)
                return
            self._stream(seg, control, buf, resp, conn, skip=seg.pos - plan.start)

    def _stream(self, seg: _Segment, control: _Control, buf: bytearray, resp: http.client.HTTPResponse,
                conn: http.client.HTTPConnection, skip: int = 0) -> None:
        """Copy an answer into the segment's file from its position, at most to its end (a longer answer's
        connection is closed there), paced by the task's and the session's limits, with progress and fsync ticks.
        *skip*: bytes the answer repeats before the position (a 206 that starts early)."""
        import http.client
        transfer, task = self.transfer, self.task
        read = transfer._reader(resp, buf)
        os.lseek(seg.fd, seg.pos - seg.start, os.SEEK_SET)
        last_sync, unsynced = time.monotonic(), 0
        while seg.pos < seg.end:
            allowed = transfer._pace(task, control, min(len(buf), seg.end - seg.pos + skip))
            try:
                data = read(allowed)
                transfer._give_back(task, allowed - len(data))
                if not data:
                    resp.read()  # the end of the answer (IncompleteRead if it was cut): ask for the rest
                    return
            except (OSError, http.client.HTTPException) as err:
                control.check()
                raise _AttemptEnded(_Interrupted(*Retry.classify(err))) from err
            if skip:
                dropped = min(skip, len(data))
                data, skip = data[dropped:], skip - dropped
                if not data:
                    continue
            transfer._write(task, seg.fd, data)
            seg.pos += len(data)
            unsynced += len(data)
            with self.lock:
                task.live.offset += len(data)
                transfer._progress(task, len(data))
            control.check()
            now = time.monotonic()
            if unsynced >= DEFAULT_SYNC_BYTES or now - last_sync >= DEFAULT_SYNC_INTERVAL:
                self._sync_segment(seg)
                last_sync, unsynced = now, 0
                if transfer.host.resource_expired(task):
                    raise _fail(ErrorCode.TIMED_OUT, "timeout_for_resource exceeded", task.current_url)
        if resp.chunked or resp.length != 0:
            conn.close()  # the answer goes on past the segment (the response that decided the split): drop it
        else:
            resp.read()  # complete: the keep-alive connection can be reused

    def _sync_segment(self, seg: _Segment) -> None:
        _fsync(seg.fd)  # data first, then the record that covers it
        self.transfer.host.record_offset(self.task, seg.pos, seg.index)
        self.transfer.store.compaction.when_due()

    def _conclude(self, fd: int, held: _Held) -> bool:
        """After every connection stopped: the attempt's end, a fall-back to one connection, or the whole file."""
        failure = self.failure
        if not isinstance(failure, (_Failed, RangePlan)):
            for seg in self.segments:  # what arrived is kept: each segment resumes after it
                if seg.pos > (self.task.segments[seg.index][2] if self.task.segments else seg.end):
                    try:
                        self._sync_segment(seg)
                    except OSError as err:
                        log.warning("task %s: cannot sync segment %d: %s", self.task.id, seg.index, err)
        if self.control.reason is not None:
            if self.control.reason == "cancel" and self.task.want_resume_data and not isinstance(failure, _Failed):
                self._unsplit(fd, held, restart=False)  # resume data: every byte held contiguously from the start
            raise _AttemptEnded(_Stopped(self.control.reason))
        if isinstance(failure, RangePlan):
            self._unsplit(fd, held, restart=failure.action == "restart")
            return False
        if failure is not None:
            raise _AttemptEnded(failure)
        os.lseek(fd, self.segments[0].end, os.SEEK_SET)
        for seg in self.segments[1:]:
            self._append(fd, seg)
        with self.lock:
            self.transfer._progress(self.task, 0, final=True)
        return True

    def _append(self, fd: int, seg: _Segment) -> None:
        """Copy what a segment's file holds to the partial file's position."""
        os.lseek(seg.fd, 0, os.SEEK_SET)
        left = seg.pos - seg.start
        while left:
            data = os.read(seg.fd, min(left, len(self.buf)))
            if not data:
                raise _fail(ErrorCode.CANNOT_WRITE_TO_FILE, f"segment {seg.index}'s file is shorter than its "
                            f"{seg.pos - seg.start} bytes", self.url)
            self.transfer._write(self.task, fd, memoryview(data))
            left -= len(data)

    def _unsplit(self, fd: int, held: _Held, restart: bool) -> None:
        """One connection from now on: the partial file keeps the bytes held contiguously from the start (none for
        a *restart*: the entity changed), fsynced before the ``unsplit`` record that says so; the other segments'
        files go."""
        prefix = 0
        if not restart:
            os.lseek(fd, self.segments[0].pos, os.SEEK_SET)
            prefix = self.segments[0].pos
            for before, seg in zip(self.segments, self.segments[1:]):
                if before.pos < before.end or seg.pos == seg.start:
                    break
                self._append(fd, seg)
                prefix = seg.pos
        _vfs.truncate(fd, prefix)
        _fsync(fd)
        self.transfer.store.wait(self.transfer.host.record(self.task, "unsplit", offset=prefix, boot=_BOOT_ID))
        for seg in self.segments[1:]:
            _unlink_quietly(self.transfer.store.path(self.task.segment_name(seg.index)))
        for conn in held.values():
            conn.close()  # (one may be in the middle of an answer)
        self.task.live.offset = prefix


class _Transfer:
    """Runs one attempt of a task and returns its outcome: a download into ``tmp/<id>.part``
    (validated resume, periodic fsync + offset records, verified, fsynced and renamed to
    ``<id>.done`` before the outcome points at it), or an upload from the file as it was at
    ``resume()`` (the BITS rule: a file that changes meanwhile is never sent as a mix)."""

    def __init__(self, config: Configuration, store: _Store, host: _TransferHost,
                 connections: _ConnectionPool) -> None:
        self.store, self.host = store, host
        self.http = _HTTP(config, host, connections)
        self.session_limit = _RateLimit()  # the session's bandwidth limit, shared by every attempt

    def attempt(self, task: _TaskRecord, control: _Control, held: _Held, buf: bytearray) -> _Outcome:
        live = task.live
        start, fd = live.offset, -1
        try:
            if live.needs_renewal:
                self.http.renew(task, control, "it begins after a delay, or without the secret headers it had")
            if task.kind == "upload":
                return self._upload(task, control, held)
            fd = self._open_partial(task)
            if not task.segments:  # (a split download counts the bytes of every segment's file)
                live.offset = min(live.offset, os.fstat(fd).st_size)
            start = live.offset
            return self._download(task, control, held, buf, fd)
        except _AttemptEnded as end:
            outcome = end.outcome
            if fd >= 0 and not isinstance(outcome, _Failed) and not task.segments:
                self._sync_quietly(task, fd)  # what arrived is kept: the next attempt resumes after it
            if isinstance(outcome, _Interrupted):
                if control.reason is not None:
                    return _Stopped(control.reason)
                return dataclasses.replace(outcome, progressed=task.kind == "download" and live.offset > start)
            return outcome
        except OSError as err:
            if task.kind == "download" and err.errno not in EXHAUSTED_ERRNOS:
                raise  # an I/O error on the partial file: the worker reports it
            return _Interrupted(*Retry.classify(err))  # (out of descriptors: retried, like a lost connection)
        finally:
            if fd >= 0:
                _vfs.close(fd)

    def _secret(self, task: _TaskRecord) -> tuple[str, ...]:
        """The header names marked secret for *task* (the configuration's and its request's)."""
        return (*self.http.config.secret_headers, *task.request.get("secret_headers", ()))

    # -- downloads ---------------------------------------------------------------------------
    def _open_partial(self, task: _TaskRecord) -> int:
        part = self.store.path(task.partial_name)
        try:
            done = self.store.path(task.done_name)
            if os.path.exists(done) and not os.path.exists(part):  # .done is rare: one stat mostly
                _vfs.replace(done, part)  # finished just as it was suspended: the file is whole
            return _open_private(part, os.O_RDWR | os.O_CREAT)
        except OSError as err:
            if err.errno in EXHAUSTED_ERRNOS:
                raise
            raise _fail(ErrorCode.CANNOT_CREATE_FILE, f"cannot create {part}: {err}", task.current_url) from err

    def _download(self, task: _TaskRecord, control: _Control, held: _Held, buf: bytearray, fd: int) -> _Finished:
        live = task.live
        if task.segments and _Segments(self, task, control, buf).run(held, fd, task.current_url):
            return self._finish_split(task, fd)  # (split in an earlier attempt: each segment resumed on its own)
        ex = _Exchange("download", "GET", self.http.request_in_force(task).url, live.retry)
        size = live.offset
        while True:
            control.check()
            ex = dataclasses.replace(ex, offset=live.offset, validator=task.validator, known_total=task.total,
                                     rerequest=live.rerequest)
            resp, conn, ex, plan = self.http.exchange(task, control, held, ex)
            assert plan is not None
            response = Response(ex.url, resp.status, Headers(resp.getheaders()))
            if plan.action == "complete":
                self.http.drain(resp, conn)
                return self._finalize(task, fd, _entity_response(task.response or
                                                                 response._to_record(self._secret(task))))
            held_before = live.offset
            self._accept(task, fd, response, plan, size)
            if self._split(task, response, plan):
                if _Segments(self, task, control, buf).run(held, fd, ex.url, (resp, conn)):
                    return self._finish_split(task, fd)
            elif self._write_body(task, control, resp, fd, buf, response, plan, held_before):
                return self._finalize(task, fd, _entity_response(response._to_record(self._secret(task))))
            else:
                conn.close()  # the body ended early: that connection is done
            size = live.offset  # a shorter range than asked (or one connection from now on): ask for the rest

    def _split(self, task: _TaskRecord, response: Response, plan: RangePlan) -> bool:
        """Split the download across parallel connections (journaled) if the configuration asks for it and the
        response allows it (:func:`plan_split`); a download that was split or fell back is not split again."""
        config = self.http.config
        if task.segments is not None:
            return False
        connections = min(config.max_connections_per_task, config.max_connections_per_host,
                          config.max_concurrent_transfers)
        split = plan_split(connections, response.status, response.headers, plan, MIN_SEGMENT_SIZE)
        if not split.segments:
            if connections > 1:
                log.info("task %s: one connection: %s", task.id, split.reason)
            return False
        # durable before a segment's file gets a byte: recovery can always tell what the files hold
        self.store.wait(self.host.record(task, "split", segments=[list(segment) for segment in split.segments]))
        return True

    def _finish_split(self, task: _TaskRecord, fd: int) -> _Finished:
        """The partial file holds the segments put together: finish it like any download; then the segments'
        files go (the finished file is durable)."""
        assert task.response is not None
        finished = self._finalize(task, fd, _entity_response(task.response))
        self.store.drop_segments(task)
        return finished

    def _accept(self, task: _TaskRecord, fd: int, response: Response, plan: RangePlan, size: int) -> None:
        """Take a response whose body is written at ``plan.start``: the partial file is cut back there and the
        response journaled (a restart durably, before its first byte)."""
        live = task.live
        had_data = size > plan.start or live.offset > plan.start
        if had_data:
            _vfs.truncate(fd, plan.start)
        validator = resume_validator(response.headers) if plan.resumable else None
        ticket = self.host.record(task, "response", response=response._to_record(self._secret(task)),
                                  start=plan.start, total=plan.total, validator=validator, boot=_BOOT_ID)
        if had_data and plan.start == 0:
            self.store.wait(ticket)  # a restart is durable before its first byte
        live.offset, live.rerequest = plan.start, False
        live.expected = plan.total if plan.total is not None else -1
        if plan.reason:
            log.info("task %s: restarting from zero: %s", task.id, plan.reason)

    def _write_body(self, task: _TaskRecord, control: _Control, resp: http.client.HTTPResponse, fd: int,
                    buf: bytearray, response: Response, plan: RangePlan, held_before: int) -> bool:
        """Write an accepted response's body at ``plan.start``. True: the entity is complete; False: the server
        sent less, and a Range request may fetch the rest (after_body decides; *held_before*: bytes held before
        this response)."""
        live = task.live
        self._stream(task, control, resp, fd, buf)
        end = after_body(held_before, live.offset, plan.total, task.validator is not None)
        if isinstance(end, (_Interrupted, _Failed)):
            if isinstance(end, _Failed):
                end.error.url = response.url
            raise _AttemptEnded(end)
        return isinstance(end, _Complete)

    def _stream(self, task: _TaskRecord, control: _Control, resp: http.client.HTTPResponse, fd: int,
                buf: bytearray) -> None:
        """Copy the body into the partial file at the current offset, with progress and fsync ticks."""
        import http.client
        live = task.live
        os.lseek(fd, live.offset, os.SEEK_SET)
        last_sync, unsynced = time.monotonic(), 0
        read = self._reader(resp, buf)
        while True:
            allowed = self._pace(task, control, len(buf))
            try:
                data = read(allowed)
                self._give_back(task, allowed - len(data))
                if not data:
                    if resp.length:  # closed before the announced end: never resp.read() that rest (http.client
                        resp.close()  # would allocate it whole: a MemoryError for tens of GB); the caller resumes
                    else:
                        resp.read()  # marks the response done, so the keep-alive connection can be reused
                    break
            except (OSError, http.client.HTTPException) as err:
                control.check()
                raise _AttemptEnded(_Interrupted(*Retry.classify(err))) from err
            self._write(task, fd, data)
            live.offset += len(data)
            unsynced += len(data)
            self._progress(task, len(data))
            control.check()
            now = time.monotonic()
            if unsynced >= DEFAULT_SYNC_BYTES or now - last_sync >= DEFAULT_SYNC_INTERVAL:
                self._sync_offset(task, fd)
                last_sync, unsynced = now, 0
                if self.host.resource_expired(task):
                    raise _fail(ErrorCode.TIMED_OUT, "timeout_for_resource exceeded", task.current_url)
        self._progress(task, 0, final=True)

    def _pace(self, task: _TaskRecord, control: _Control, most: int) -> int:
        """How many bytes (at most *most*) the attempt may move next, once the task's and the session's bandwidth
        limits allow them. It waits in slices that a cancel, suspend or close ends at once, and reads the limits
        again after each: a changed or removed limit applies within LIMIT_SLICE_SECONDS."""
        limits = (task.live.limit, self.session_limit)
        if limits[0].rate is None and limits[1].rate is None:
            return most
        n = min(limit.chunk(most) for limit in limits)
        for limit in limits:
            limit.reserve(n)
        try:
            while (wait := max(limit.delay() for limit in limits)) > 0:
                control.stopped.wait(min(wait, LIMIT_SLICE_SECONDS))
                control.check()
        except _AttemptEnded:
            self._give_back(task, n)
            raise
        return n

    def _give_back(self, task: _TaskRecord, n: int) -> None:
        """Bytes allowed by _pace that did not move."""
        if n > 0:
            task.live.limit.give_back(n)
            self.session_limit.give_back(n)

    @staticmethod
    def _reader(resp: http.client.HTTPResponse, buf: bytearray) -> Callable[[int], memoryview]:
        """What has arrived (at most the given number of bytes), at most one socket read per call, so that a slow link
        still reaches the disk and the progress hook promptly and a cut loses nothing already received. A body with a
        length (or close-delimited) is read into the reused buffer: no allocation per read, memory flat in the file
        size. http.client has no public readinto1: its buffered reader (.fp) and bytes-still-due (.length) are what its
        own read1() uses. Chunked bodies, or an http.client without them, use read1().

        Bytes may wait in the reader's own buffer: those that came with the headers, or the rest of a socket read
        made for a read smaller than that buffer. readinto1() of more than what waits there copies it, then waits for
        one more socket read before it returns (CPython's BufferedReader): on a link that stalls right after, those
        bytes reached neither the disk nor the progress hook, and a cut lost them. While bytes may be waiting,
        read1() is used, which returns them at once."""
        size, view = len(buf), memoryview(buf)
        fp: Any = getattr(resp, "fp", None)
        if resp.chunked or fp is None or not hasattr(fp, "readinto1"):
            return lambda most: memoryview(resp.read1(min(size, most)))
        waiting = True  # after the headers

        def direct(most: int) -> memoryview:
            nonlocal waiting
            want = min(size, most) if resp.length is None else min(size, most, resp.length)
            if not want:
                n = 0
            elif waiting or want <= _RESPONSE_BUFFER:
                data = fp.read1(want)  # what waits in the buffer, or one socket read
                n = len(data)
                view[:n] = data
                waiting = n == want  # (fewer: the buffer is empty now)
            else:
                n = fp.readinto1(view[:want])  # nothing waits: one socket read, straight into the buffer
            if resp.length is not None:
                resp.length -= n
            return view[:n]
        return direct

    def _write(self, task: _TaskRecord, fd: int, data: memoryview) -> None:
        try:
            _write_all(fd, data)
        except OSError as err:
            if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                self.store.release_reserve()  # room for the journal to record this failure
            raise _fail(ErrorCode.CANNOT_WRITE_TO_FILE, f"cannot write the download: {err.strerror or err}",
                        task.current_url) from err

    def _sync_offset(self, task: _TaskRecord, fd: int) -> None:
        offset = task.live.offset
        _fsync(fd)  # data first, then the record that covers it
        self.host.record_offset(task, offset)
        self.store.compaction.when_due()  # a long transfer writes a record a second: bound the journal here too

    def _sync_quietly(self, task: _TaskRecord, fd: int) -> None:
        try:
            self._sync_offset(task, fd)
        except OSError as err:
            log.warning("task %s: cannot sync partial data: %s", task.id, err)

    def _finalize(self, task: _TaskRecord, fd: int, response: Mapping[str, Any]) -> _Finished:
        """Verify, fsync, rename to ``<id>.done``, fsync the directory: then the record may point to it."""
        expected = task.request.get("sha256")
        try:
            if expected:
                import hashlib
                digest = hashlib.sha256()
                os.lseek(fd, 0, os.SEEK_SET)
                for block in iter(lambda: os.read(fd, 1 << 20), b""):
                    digest.update(block)
                if digest.hexdigest() != expected:
                    raise _fail(ErrorCode.INTEGRITY_MISMATCH, f"SHA-256 {digest.hexdigest()} does not match the "
                                f"expected {expected}", task.current_url, keep_partial=False)
            _fsync(fd)
            _vfs.replace(self.store.path(task.partial_name), self.store.path(task.done_name))
            self.store.tmp_sync.sync()
        except OSError as err:
            if err.errno in EXHAUSTED_ERRNOS:
                raise  # retried (attempt)
            raise _fail(ErrorCode.CANNOT_WRITE_TO_FILE, f"cannot finish the file: {err}", task.current_url) from err
        return _Finished(task.done_name, response)

    def _progress(self, task: _TaskRecord, n: int, final: bool = False, upload: bool = False) -> None:
        """Count *n* bytes; post a ProgressEvent at most every DEFAULT_PROGRESS_INTERVAL seconds."""
        live = task.live
        live.progress_pending += n
        live.rate_bytes += n
        now = time.monotonic()
        if now - live.rate_at >= 0.5:
            if live.rate_at:
                sample = live.rate_bytes / (now - live.rate_at)
                live.rate = sample if not live.rate else 0.7 * live.rate + 0.3 * sample
            live.rate_at, live.rate_bytes = now, 0
        if live.progress_pending and (final or now - live.progress_at >= DEFAULT_PROGRESS_INTERVAL):
            live.progress_at = now
            sent, live.progress_pending = live.progress_pending, 0
            if upload:
                self.host.post(ProgressEvent(task.id, sent, live.sent, live.expected_send, True))
            else:
                self.host.post(ProgressEvent(task.id, sent, live.offset, live.expected))

    # -- uploads -----------------------------------------------------------------------------
    def _upload(self, task: _TaskRecord, control: _Control, held: _Held) -> _Finished:
        info = task.upload or {}
        path = info.get("path", "")
        try:
            st = os.stat(path)
        except OSError as err:
            raise _fail(ErrorCode.FILE_DOES_NOT_EXIST, f"upload source {path} cannot be read: "
                        f"{err.strerror or err}", task.request["url"]) from err
        if (st.st_size, st.st_mtime_ns) != (info.get("size"), info.get("mtime_ns")):
            raise _fail(ErrorCode.SOURCE_FILE_CHANGED, f"upload source {path} changed since resume() (size/mtime); "
                        "refusing to upload a mix of two versions", task.request["url"])
        request = self.http.request_in_force(task)
        ex = _Exchange("upload", request.method, request.url, task.live.retry)
        resp, _, ex, _ = self.http.exchange(task, control, held, ex, {"Content-Length": str(st.st_size)},
                                            lambda conn: self._send_file(task, control, conn, path, st))
        name = f"{task.id}.body"  # the server's response body (UploadTask.response_data), until acknowledged
        fd = _open_private(self.store.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for block in iter(lambda: resp.read(64 << 10), b""):
                _write_all(fd, block)
            _fsync(fd)
        finally:
            _vfs.close(fd)
        self.store.tmp_sync.sync()
        return _Finished(name, Response(ex.url, resp.status, Headers(resp.getheaders()))._to_record(self._secret(task)))

    def _send_file(self, task: _TaskRecord, control: _Control, conn: http.client.HTTPConnection, path: str,
                   st: os.stat_result) -> None:
        """Send all but the last byte, check that the source did not change meanwhile, then send the
        last byte: a changed file leaves the server an incomplete body, never a mix."""
        live, size = task.live, st.st_size
        live.sent = 0
        with open(path, "rb") as f:
            while live.sent < size - 1:
                block = f.read(self._pace(task, control, min(256 << 10, size - 1 - live.sent)))
                if not block:
                    break
                conn.send(block)
                live.sent += len(block)
                self._progress(task, len(block), upload=True)
                control.check()
            last = f.read(1) if size else b""
            now = os.fstat(f.fileno())
        try:
            named: os.stat_result | None = os.stat(path)  # replaced by a new file meanwhile?
        except OSError:
            named = None
        if live.sent != max(0, size - 1) or len(last) != min(1, size) or named is None or \
                (now.st_size, now.st_mtime_ns, now.st_ino) != (size, st.st_mtime_ns, st.st_ino) or \
                (named.st_ino, named.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            conn.close()
            raise _fail(ErrorCode.SOURCE_FILE_CHANGED, f"upload source {path} changed while it was sent; the "
                        "server got an incomplete body, not a mix", task.request["url"])
        if last:
            conn.send(last)
            live.sent += 1
            self._progress(task, 1, final=True, upload=True)


# ============================================================================
# 8. Engine: scheduler, planner, outbox, and the engine that owns the tasks
# ============================================================================
#
# The engine runs in the app (in-process host) or in the daemon. One lock (``_Engine.lock``)
# guards the store's state and every task's live fields; no network or data-file I/O happens
# under it, and journal waits happen after it is released so that callers share one fsync.

#: Seconds an idle transfer thread waits for more work before it exits.
WORKER_LINGER = 2.0


#: Longest wait for an earliest begin date before the wall clock is read again: the timers run on the monotonic
#: clock, which a machine that sleeps, or a clock that is set, does not move as it moves the wall clock.
BEGIN_DATE_RECHECK = 60.0


class _Scheduler:
    """When each task runs: the queued tasks of every origin in priority order (ties: first in, first out), the
    session's cap (``max_concurrent_transfers``) and each origin's (``max_connections_per_host``), the timers
    (retries, earliest begin dates), and the threads -- the transfer threads, never more than the cap, and the timer
    thread -- which it owns and joins on :meth:`close`. Which task starts next is :func:`next_to_start`'s decision, on
    the best task of each origin; a running transfer is never preempted. Called with the engine's lock held, except
    :meth:`close`."""

    def __init__(self, lock: threading.RLock, clock: _Clock, config: Configuration,
                 work: Callable[[], None], due: Callable[[int, float], None]) -> None:
        self.lock, self.clock = lock, clock
        self.per_host, self.cap = config.max_connections_per_host, config.max_concurrent_transfers
        self.closed = False
        self.cond = threading.Condition(lock)  # idle transfer threads wait here for work
        self._queues: dict[_Origin, list[_Queued]] = {}  # a heap per origin
        self._queued: dict[int, _Queued] = {}  # each queued task's entry in force (the heaps keep stale ones)
        self._seq = itertools.count()
        self._active: dict[_Origin, int] = {}  # transfers running (and split downloads' extra connections), by origin
        self._running: dict[int, _Origin] = {}
        self._extra: dict[int, int] = {}  # a split download's extra connections (see grant), by task
        self._threads = 0  # transfer threads that will still take work
        self._work, self._due = work, due
        self._timers: list[tuple[float, int, int]] = []
        self._timer_seq = itertools.count()
        self._wake = threading.Event()
        self._workers: set[threading.Thread] = set()
        self._timer_thread = threading.Thread(target=self._timer_loop, name="bgsession-scheduler", daemon=True)
        self._timer_thread.start()

    def configure(self, config: Configuration) -> None:
        self.per_host, self.cap = config.max_connections_per_host, config.max_concurrent_transfers
        self.cond.notify_all()
        self._spawn()

    def enqueue(self, task_id: int, origin: _Origin, priority: float) -> None:
        """Queue a task (behind those of its priority); wake or start a transfer thread for it."""
        self._push(_Queued.of(task_id, origin, priority, next(self._seq)))
        self.cond.notify()
        self._spawn()

    def reprioritize(self, task_id: int, priority: float) -> None:
        """A queued task's new priority orders it from now on (among equals it keeps its place)."""
        entry = self._queued.get(task_id)
        if entry is not None:
            self._push(_Queued.of(task_id, entry.origin, priority, entry.rank[1]))

    def next_task(self, runnable: Callable[[int], bool]) -> int | None:
        """The task a transfer thread starts next (counted as running until :meth:`finished`), or None: the thread
        exits. An idle thread lingers a little first, so that a stream of small tasks does not start a thread each."""
        deadline = None
        while not self.closed:
            entry = self._pick(runnable)
            if entry is not None:
                self._running[entry.task_id] = entry.origin
                self._active[entry.origin] = self._active.get(entry.origin, 0) + 1
                return entry.task_id
            now = time.monotonic()
            if deadline is None:
                deadline = now + WORKER_LINGER
            if now >= deadline:
                break
            self.cond.wait(deadline - now)
        self._threads -= 1
        return None

    def finished(self, task_id: int) -> None:
        """The task's attempt ended: its slot is free (its thread asks for the next task itself)."""
        origin = self._running.pop(task_id)
        self._active[origin] -= 1 + self._extra.pop(task_id, 0)
        if not self._active[origin]:
            del self._active[origin]

    @property
    def busy(self) -> int:
        """Transfers running, each split download's extra connections included."""
        return len(self._running) + sum(self._extra.values())

    def grant(self, task_id: int, wanted: int) -> int:
        """Extra connections for a running task (a split download's segments): as many of *wanted* as are free --
        slots no queued task could take now, within both caps (:func:`extra_connections`). Each counts as a
        transfer until :meth:`release`d (or the attempt ends)."""
        origin = self._running.get(task_id)
        if origin is None or wanted <= 0:
            return 0
        waiting = next_to_start(self._heads(), self._active, running=self.busy, max_concurrent=self.cap,
                                per_host=self.per_host) is not None
        count = extra_connections(wanted, running=self.busy, max_concurrent=self.cap, per_host=self.per_host,
                                  origin_running=self._active.get(origin, 0), waiting=waiting)
        if count:
            self._extra[task_id] = self._extra.get(task_id, 0) + count
            self._active[origin] += count
        return count

    def release(self, task_id: int, count: int) -> int:
        """A split download gives back extra connections: the slots may start queued tasks. Returns 0."""
        count = min(count, self._extra.get(task_id, 0))
        if count <= 0:
            return 0
        self._extra[task_id] -= count
        if not self._extra[task_id]:
            del self._extra[task_id]
        self._active[self._running[task_id]] -= count
        self.cond.notify(count)
        self._spawn()
        return 0

    def push_timer(self, task_id: int, delay: float) -> float:
        """Call ``due(task_id, due)`` after *delay* seconds; returns *due* (identifies this timer)."""
        due = self.clock.monotonic() + delay
        heapq.heappush(self._timers, (due, next(self._timer_seq), task_id))
        self._wake.set()
        return due

    def _push(self, entry: _Queued) -> None:
        self._queued[entry.task_id] = entry
        heapq.heappush(self._queues.setdefault(entry.origin, []), entry)

    def _heads(self) -> list[_Queued]:
        """The best queued task of each origin."""
        heads = []
        for origin, heap in list(self._queues.items()):
            while heap and self._queued.get(heap[0].task_id) is not heap[0]:
                heapq.heappop(heap)  # stale: re-ranked or queued again since
            if heap:
                heads.append(heap[0])
            else:
                del self._queues[origin]
        return heads

    def _pick(self, runnable: Callable[[int], bool]) -> _Queued | None:
        """Take the task to start next off the queue (a task no longer runnable -- suspended, cancelled, scheduled
        -- is dropped on the way)."""
        while True:
            entry = next_to_start(self._heads(), self._active, running=self.busy, max_concurrent=self.cap,
                                  per_host=self.per_host)
            if entry is None:
                return None
            heapq.heappop(self._queues[entry.origin])
            del self._queued[entry.task_id]
            if runnable(entry.task_id):
                return entry

    def _spawn(self) -> None:
        """Start a transfer thread if the queue has more tasks than idle threads, within the cap."""
        if self._threads < self.cap and self._threads - len(self._running) < len(self._queued) and not self.closed:
            self._threads += 1
            thread = threading.Thread(target=self._run_worker, daemon=True, name="bgsession-worker")
            self._workers.add(thread)
            thread.start()

    def _run_worker(self) -> None:
        try:
            self._work()
        finally:
            with self.lock:
                self._workers.discard(threading.current_thread())

    def _timer_loop(self) -> None:
        while True:
            with self.lock:
                if self.closed:
                    return
                now = self.clock.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    due, _, tid = heapq.heappop(self._timers)
                    self._due(tid, due)
                next_due = self._timers[0][0] - now if self._timers else None
                self._wake.clear()
            if next_due is None:
                self._wake.wait()  # until a timer is pushed (a test's clock only simulates timed waits)
            else:
                self.clock.wait(self._wake, next_due)

    def close(self) -> None:
        """Stop: lingering threads and the timer thread exit; join every thread."""
        with self.lock:
            self.closed = True
            self.cond.notify_all()
            workers = list(self._workers)
        self._wake.set()
        for thread in workers:
            thread.join(30.0)
        self._timer_thread.join(30.0)


class _Planner:
    """The app's scheduling options -- each task's priority, earliest begin date and bandwidth limit, and the
    session's bandwidth limit -- journaled and applied: to the scheduler's order and timers, and to the rate limits
    the transfers read. A task that may run is queued; while its earliest begin date is ahead it is scheduled (a
    phase of its own, which survives relaunches and daemon restarts) and a timer queues it when the date comes.
    Called with the engine's lock held."""

    def __init__(self, store: _Store, scheduler: _Scheduler, clock: _Clock, session_limit: _RateLimit) -> None:
        self.store, self.scheduler, self.clock, self.session_limit = store, scheduler, clock, session_limit
        self.configured: int | None = None  # Configuration.max_bytes_per_second

    def configure(self, config: Configuration) -> None:
        self.configured = config.max_bytes_per_second
        self.session_limit.set_rate(session_rate(self.configured, self.store.state.session_limit))

    def queue(self, task: _TaskRecord) -> None:
        """A task that may run now (resumed, due again, recovered queued or scheduled, its date changed): queue it
        -- or, while its earliest begin date is ahead, schedule it and set a timer."""
        wait = 0.0 if task.begin is None else task.begin - self.clock.time()
        if wait > 0:
            if task.phase is Phase.QUEUED:
                self.store.record(task, "schedule")
            task.live.due = self.scheduler.push_timer(task.id, min(wait, BEGIN_DATE_RECHECK))
            return
        if task.phase is Phase.SCHEDULED:
            self.store.record(task, "due")
            task.live.needs_renewal = True  # a delayed task begins: task_will_begin_delayed_request, as on iOS
        self.scheduler.enqueue(task.id, _origin(task.request["url"]), task.priority)

    def set_priority(self, task: _TaskRecord, priority: Any) -> int:
        priority = _check_priority(priority)
        if task.phase in (Phase.CANCELING, Phase.DELIVERING, Phase.ACKNOWLEDGED):
            return 0  # it has ended: nothing left to order
        ticket = self.store.record(task, "priority", priority=priority)
        self.scheduler.reprioritize(task.id, priority)
        return ticket

    def set_begin(self, task: _TaskRecord, begin: Any) -> int:
        at = _begin_timestamp(begin)
        if task.phase not in (Phase.SUSPENDED, Phase.QUEUED, Phase.SCHEDULED):
            raise _invalid(f"task {task.id} is {task.phase.value}: its earliest begin date can change only before "
                           "it begins (while it is suspended, queued or scheduled)")
        ticket = self.store.record(task, "begin", at=at)
        if task.phase is Phase.SCHEDULED or (task.phase is Phase.QUEUED and (at or 0) > self.clock.time()):
            self.queue(task)  # scheduled with a new timer, or queued now (a queued task with a past date stays)
        return ticket

    def set_limit(self, task: _TaskRecord | None, rate: Any) -> int:
        """A task's bandwidth limit, or the session's (*task* None); it applies to running transfers at once."""
        rate = _check_rate(rate)
        if task is None:
            ticket = self.store.record(None, "limit", rate=rate, configured=self.configured)
            self.session_limit.set_rate(rate)
            return ticket
        if task.phase in (Phase.DELIVERING, Phase.ACKNOWLEDGED):
            return 0
        ticket = self.store.record(task, "limit", rate=rate)
        task.live.limit.set_rate(rate)
        return ticket


@dataclasses.dataclass(frozen=True)
class ChallengeEvent:
    """A task met a 401: the app's challenge hook answers through ``reply(disposition, credential)``."""
    task_id: int
    challenge: AuthChallenge
    reply: Callable[[_Answer], None]


@dataclasses.dataclass(frozen=True)
class DelayedRequestEvent:
    """A task is about to send *request* again after a restart without its secrets, or after a 401/403: the app's
    ``task_will_begin_delayed_request`` answers through ``reply(disposition, new_request)``."""
    task_id: int
    request: Request
    reply: Callable[[_Renewal], None]


class _SinkGone(Exception):
    """The attached app went away while it was being asked something; wait for the next one."""


class _Waiter:
    """One answer handed from the delegate thread to a thread that waits for it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()

    def wait(self, control: _Control | None, gone: Callable[[], bool]) -> Any:
        """The answer; meanwhile the control is checked (a suspend must not wait for an app) and
        whether the app is *gone* (then _SinkGone: the engine waits for the next one)."""
        while not self.event.wait(0.5):
            if control is not None:
                control.check()
            if gone():
                raise _SinkGone()
        if self.value is None:
            raise _SinkGone()
        return self.value


class _Sink(Protocol):
    """The attached app as the engine sees it (the session's delegate thread, or the daemon's
    connection to an app): events in order, never blocking; challenges answered or _SinkGone."""

    def post(self, event: Any) -> None: ...
    def challenge(self, task_id: int, challenge: AuthChallenge, control: _Control | None) -> _Answer: ...
    def renew(self, task_id: int, request: Request, control: _Control | None) -> _Renewal: ...


def _checked_renewal(answer: Any) -> _Renewal:
    """A delayed-request hook's return value, or CONTINUE_LOADING if it is not a valid answer (None: quietly)."""
    disposition, request = answer if isinstance(answer, (tuple, list)) and len(answer) == 2 else (None, None)
    if isinstance(request, str):
        with contextlib.suppress(BGSessionError):
            request = Request(request)
    new = request if isinstance(request, Request) else None
    if isinstance(disposition, DelayedRequestDisposition) and (
            disposition is not DelayedRequestDisposition.USE_NEW_REQUEST or new is not None):
        return disposition, new if disposition is DelayedRequestDisposition.USE_NEW_REQUEST else None
    if answer is not None:
        log.warning("task_will_begin_delayed_request returned %r, not (disposition, request); continuing with the "
                    "request as it is", answer)
    return DelayedRequestDisposition.CONTINUE_LOADING, None


def _checked_answer(answer: Any) -> _Answer:
    """A challenge hook's return value, or default handling if it is not a valid answer."""
    disposition, cred = answer if isinstance(answer, (tuple, list)) and len(answer) == 2 else (None, None)
    if isinstance(disposition, AuthChallengeDisposition) and (
            disposition is not AuthChallengeDisposition.USE_CREDENTIAL or isinstance(cred, Credential)):
        return disposition, cred
    log.warning("task_did_receive_challenge returned %r, not (disposition, credential); performing default handling",
                answer)
    return AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING, None


def _task_info(task: _TaskRecord, store: _Store | None) -> TaskInfo:
    """A task's record and live state as the value that crosses boundaries."""
    live = task.live
    return TaskInfo(
        id=task.id, kind=task.kind, description=task.description, phase=task.phase, request=task.request,
        current_url=task.current_url, response=task.response, error=task.error,
        received=live.offset if live else 0,
        expected=live.expected if live and live.expected >= 0 else (-1 if task.total is None else task.total),
        sent=live.sent if live else 0, expected_send=live.expected_send if live else -1,
        rate=round(live.rate, 1) if live and task.phase is Phase.TRANSFERRING else 0.0, events=tuple(task.events()),
        body_path=(store.path(task.file) if store is not None and task.kind == "upload" and task.file
                   and task.phase is Phase.DELIVERING else None), priority=task.priority, begin=task.begin,
        limit=task.limit, waiting=bool(live and live.waiting and task.phase in _ACTIVE_PHASES),
        last_error=live.last_error._to_record() if live and live.last_error and task.phase in _ACTIVE_PHASES else None,
        next_retry=live.next_retry if live and task.phase is Phase.WAITING_RETRY else None)


class _Outbox:
    """The engine's side of the attached app: one app at a time, the events it is owed, the
    BacklogEnd that follows the events waiting at attach, and questions (challenges, delayed
    requests) waiting for an app. Called with the engine's lock held, except :meth:`post`,
    :meth:`ask` and :meth:`renew`."""

    def __init__(self, store: _Store, changed: threading.Condition) -> None:
        self.store, self.lock, self.changed = store, store.lock, changed
        self.sink: _Sink | None = None
        self.closed = False
        self.waiting_challenges = 0  # workers blocked until an app answers a challenge or a delayed request
        self.renews: bool | None = None  # the last app implements task_will_begin_delayed_request (None: unknown)
        self._backlog_waiting: set[int] | None = None  # see begin_backlog()

    def bind(self, sink: _Sink, renews: bool) -> None:
        if self.sink is not None:
            raise TransferError(ErrorCode.BACKGROUND_SESSION_IN_USE, "another app is attached to this session")
        self.sink, self.renews = sink, renews

    def begin_backlog(self, had_events: bool, waiting: set[int]) -> None:
        """After the waiting events were posted: BacklogEnd now, or once every task in *waiting*
        (transfers this launch resumed, in-process background launch) has ended or been suspended."""
        if waiting:
            self._backlog_waiting = waiting
        elif self.sink is not None:
            self.sink.post(BacklogEnd(had_events))

    def backlog_step(self, task_id: int) -> None:
        waiting = self._backlog_waiting
        if waiting and task_id in waiting:
            waiting.discard(task_id)
            if not waiting:
                self._backlog_waiting = None
                self.post(BacklogEnd(True))

    def unbind(self, sink: _Sink) -> bool:
        if self.sink is not sink:
            return False
        self.sink = None
        self._backlog_waiting = None
        return True

    def post(self, event: Any) -> None:
        sink = self.sink
        if sink is not None:
            sink.post(event)

    def post_task_events(self, task: _TaskRecord) -> None:
        """Post the durable events *task* still owes, if an app is attached and they are on disk."""
        if self.sink is None or not task.live.events_ready:
            return
        info = _task_info(task, self.store)
        for name in info.events:
            if name == "finish":
                self.post(FinishedEvent(task.id, self.store.path(task.file or ""), info))
            else:
                error = TransferError._from_record(task.error) if task.error else None
                if error is not None:
                    error.resume_data = self.store.resume_data(task)
                self.post(CompletedEvent(task.id, error, info))
        self.backlog_step(task.id)

    def ask(self, task_id: int, control: _Control, challenge: AuthChallenge) -> _Answer:
        """Ask the attached app (waiting for one to attach) to answer a challenge."""
        return _checked_answer(self._ask(control, lambda sink: sink.challenge(task_id, challenge, control)))

    def renew(self, task_id: int, control: _Control, request: Request) -> _Renewal:
        """Ask the attached app (waiting for one to attach) whether to send *request*, a new one, or to cancel. An
        app known not to implement task_will_begin_delayed_request is not waited for: the request goes as it is."""
        answer = self._ask(control, lambda sink: sink.renew(task_id, request, control), skip=lambda: not self.renews)
        return (DelayedRequestDisposition.CONTINUE_LOADING, None) if answer is None else _checked_renewal(answer)

    def _ask(self, control: _Control, question: Callable[[_Sink], Any],
             skip: Callable[[], bool] = lambda: False) -> Any:
        """Put *question* to the attached app, waiting for one to attach (the daemon relaunches the app while
        ``waiting_challenges``); if the app goes away meanwhile, to the next one. None: *skip* said not to ask."""
        while True:
            with self.lock:
                if self.renews is not None and skip():
                    return None
                self.waiting_challenges += 1
                try:
                    while self.sink is None:
                        control.check()
                        if self.closed:
                            raise _AttemptEnded(_Stopped("close"))
                        self.changed.wait(1.0)  # re-check the control: a suspend must not wait for an app
                finally:
                    self.waiting_challenges -= 1
                sink = self.sink
                if skip():
                    return None
            try:
                return question(sink)
            except _SinkGone:
                with self.lock:
                    if self.sink is sink:
                        self.sink = None


@dataclasses.dataclass(frozen=True)
class _EngineStatus:
    """What a host needs to know of its engine (the daemon: when to exit, when to relaunch)."""
    running: int  # tasks queued, transferring or waiting to retry
    scheduled: int  # tasks waiting for their earliest begin date
    canceling: int
    backlog: int  # tasks whose durable events wait for an app
    backlog_age: float  # seconds since the oldest of those was journaled (0: none)
    attached: bool
    waiting_challenges: int
    acks: int  # acknowledgements recorded since the engine started


class _Runner:
    """The engine's running of tasks, its base class: the scheduler's transfer threads take queued tasks (``_work``),
    run one attempt at a time on the transfer, and settle each outcome into one journaled transition (``_settle``:
    finished, failed, retried later or waiting for connectivity); timers bring tasks back (``_due``). It is also the
    transfer's host (``_TransferHost``): records, progress, questions for the app, deadlines. _Engine, below, adds
    the app's operations; both share its lock, store, scheduler, planner and outbox."""

    config: Configuration
    clock: _Clock
    buffer_size: int
    lock: threading.RLock
    changed: threading.Condition
    closed: bool
    store: _Store
    outbox: _Outbox
    connections: _ConnectionPool
    transfer: _Transfer
    scheduler: _Scheduler
    planner: _Planner

    # -- for the transfer (_TransferHost) ---------------------------------------------------------
    def record(self, task: _TaskRecord, record_type: str, /, **fields: Any) -> int:
        with self.lock:
            return self.store.record(task, record_type, **fields)

    def record_offset(self, task: _TaskRecord, offset: int, segment: int | None = None) -> None:
        with self.lock:
            self.store.record_progress(task, offset, segment)

    def change_connections(self, task: _TaskRecord, count: int) -> int:
        with self.lock:
            return self.scheduler.grant(task.id, count) if count > 0 else self.scheduler.release(task.id, -count)

    def post(self, event: ProgressEvent) -> None:
        self.outbox.post(event)

    def ask(self, task: _TaskRecord, control: _Control, challenge: AuthChallenge) -> _Answer:
        return self.outbox.ask(task.id, control, challenge)

    def renew(self, task: _TaskRecord, control: _Control, request: Request) -> _Renewal:
        return self.outbox.renew(task.id, control, request)

    def resource_expired(self, task: _TaskRecord) -> bool:
        return task.resource_expired(self.clock.time(), self.config.timeout_for_resource)

    def resource_left(self, task: _TaskRecord) -> float:
        return task.resource_left(self.clock.time(), self.config.timeout_for_resource)

    # -- running tasks ------------------------------------------------------------------------------
    def _work(self) -> None:
        """A transfer thread (owned by the scheduler): run the queue's tasks, one attempt at a time."""
        held: _Held = {}  # the attempt's connections by origin; back to the pool (keep-alive) after it
        buf = bytearray(self.buffer_size)
        while True:
            with self.lock:
                task = self._start_next()
            if task is None:
                return
            control = task.live.control
            assert control is not None
            try:
                outcome = self.transfer.attempt(task, control, held, buf)
            except BaseException as err:  # a bug must not lose the task: fail it clearly
                log.exception("task %s: internal error", task.id)
                outcome = _Failed(TransferError(ErrorCode.UNKNOWN, f"internal error: {err!r}",
                                                url=task.request["url"]))
            self.connections.release(held, isinstance(outcome, _Finished))
            self._end_attempt(task, outcome)

    def _start_next(self) -> _TaskRecord | None:
        if self.closed:  # close() stopped the attempts it saw; one started after it would run on unstopped
            return None
        while True:
            tid = self.scheduler.next_task(self._runnable)
            if tid is None:
                return None
            task = self.store.state.tasks[tid]
            if self.resource_expired(task):
                self.scheduler.finished(tid)
                self._fail_now(task, TransferError(ErrorCode.TIMED_OUT, "timeout_for_resource exceeded"))
                continue
            self.store.record(task, "start")
            task.live.control, task.live.worker, task.live.done = _Control(), True, threading.Event()
            return task

    def _runnable(self, tid: int) -> bool:
        task = self.store.state.tasks.get(tid)  # (None: cancelled, acknowledged and compacted away)
        return task is not None and task.phase is Phase.QUEUED and not task.live.worker

    def _end_attempt(self, task: _TaskRecord, outcome: _Outcome) -> None:
        with self.lock:
            self.scheduler.finished(task.id)
            task.live.control = None
            ticket = self._settle(task, outcome)
            task.live.worker = False
            if task.phase is Phase.QUEUED and not self.closed:
                self.planner.queue(task)  # resumed again while this attempt was stopping
            if ticket is None:
                task.live.done.set()
                self.changed.notify_all()
            else:
                task.live.events_ready = False  # posted once the outcome is on disk
        if ticket is not None:
            # the next transfer starts now; the events follow the record to the disk
            self.store.writer.on_durable(ticket, lambda: self._outcome_durable(task))

    def _settle(self, task: _TaskRecord, outcome: _Outcome) -> int | None:
        """Turn an attempt's outcome into a journaled transition; returns a ticket to wait for."""
        if task.phase is Phase.CANCELING:
            return self.store.finish_cancel(task, task.live.offset)
        if task.phase is not Phase.TRANSFERRING:
            return None  # suspended meanwhile: the attempt recorded how far it got
        if isinstance(outcome, _Finished):
            return self.store.record(task, "finish", file=outcome.file, response=dict(outcome.response), error=None)
        if isinstance(outcome, _Failed):
            return self.store.fail(task, outcome.error, "finish", keep_partial=outcome.keep_partial,
                                   offset=task.live.offset)
        if isinstance(outcome, _Interrupted):
            return self._retry_later(task, outcome)
        return None  # stopped by close: the attempt recorded how far it got

    def _retry_later(self, task: _TaskRecord, outcome: _Interrupted) -> int | None:
        """Settle an interrupted attempt as plan_retry() says: a timer (a waiting period may begin), or the end."""
        live, config = task.live, self.config
        plan = plan_retry(live.retry, outcome, live.waiting, waits_for_connectivity=config.waits_for_connectivity,
                          fails_on_unknown_host=config.fails_on_unknown_host, now=self.clock.time())
        if plan.delay is None or self.resource_expired(task):
            why = plan.why if plan.delay is None else "timeout_for_resource exceeded"
            code = outcome.code if plan.delay is None else ErrorCode.TIMED_OUT
            return self.store.fail(task, TransferError(code, f"{outcome.message} ({why})", url=task.current_url),
                                   "finish", offset=live.offset)
        begins_waiting = live.take_plan(plan, outcome, task.current_url, self.clock.time())
        log.debug("task %s: %s; again in %.2fs (waiting: %s)", task.id, outcome.message, plan.delay, plan.waiting)
        self.store.record(task, "backoff", delay=round(plan.delay, 3), code=int(outcome.code))
        live.due = self.scheduler.push_timer(task.id, plan.delay)
        if begins_waiting:
            self.outbox.post(WaitingEvent(task.id, _task_info(task, self.store)))
        return None

    def _due(self, tid: int, due: float) -> None:
        """A timer fired (scheduler thread, under the lock): a retry's, or an earliest begin date's."""
        task = self.store.state.tasks.get(tid)
        if task is None or task.phase not in (Phase.WAITING_RETRY, Phase.SCHEDULED) or task.live.due != due:
            return  # suspended, cancelled or rescheduled meanwhile
        if task.phase is Phase.SCHEDULED:
            self.planner.queue(task)  # its date came (or the wall clock says not yet: it waits on)
        elif self.resource_expired(task):
            self._fail_now(task, task.live.timed_out())
        else:
            self.store.record(task, "due")
            self.planner.queue(task)

    def _outcome_durable(self, task: _TaskRecord) -> None:
        with self.lock:
            task.live.events_ready = True
            self.outbox.post_task_events(task)
            task.live.done.set()
            self.changed.notify_all()

    def _fail_now(self, task: _TaskRecord, error: TransferError) -> None:
        """Fail a task that no attempt runs for (rare paths: waits for the journal under the lock)."""
        error.url = error.url or task.request["url"]
        self.store.wait(self.store.fail(task, error, "fail", offset=task.live.offset))
        self.outbox.post_task_events(task)
        self.changed.notify_all()


class _Engine(_Runner):
    """A session's engine: owns the tasks (the store), runs them (its base, _Runner: the scheduler's workers run the
    transfer's attempts) and reports to the attached app (the outbox): the in-process _Backend; the daemon serves it
    over a socket. *durable_create*: ``new_task`` returns once the task's record is on disk (the daemon: its app may
    outlive it), not only its reserved identifier."""

    def __init__(self, config: Configuration, *, clock: _Clock | None = None,
                 buffer_size: int = DEFAULT_BUFFER_SIZE, durable_create: bool = False) -> None:
        self.config, self.clock, self.buffer_size = config, clock or _Clock(), buffer_size
        self.durable_create = durable_create
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.closed = False
        with _gc_paused():  # (a relaunch may build 100,000 tasks' objects here)
            self.store = _Store(config.directory, config.identifier, self.lock)
            self.outbox = _Outbox(self.store, self.changed)
            self.connections = _ConnectionPool(config)
            self.transfer = _Transfer(config, self.store, self, self.connections)
            self.scheduler = _Scheduler(self.lock, self.clock, config, self._work, self._due)
            self.planner = _Planner(self.store, self.scheduler, self.clock, self.transfer.session_limit)
            try:
                with self.lock:
                    self.planner.configure(config)
                    for task in self.store.state.tasks.values():
                        task.live = _Live(config.retry, self.store.offsets.get(task.id, 0),
                                          task.total if task.total is not None else -1, task.limit, bool(task.secrets))
                        if task.phase in (Phase.QUEUED, Phase.SCHEDULED):
                            self.planner.queue(task)
            except BaseException:
                self.close()  # releases the session lock: a failed open never keeps the identifier
                raise

    # -- the app<->engine interface ---------------------------------------------------------
    def new_task(self, kind: str, request: Request, description: str | None, upload_path: str | None = None,
                 resume: Mapping[str, Any] | None = None, remove_upload: bool = False) -> TaskInfo:
        """A new suspended task, with its info (resume: parsed resume data, see _parse_resume_data; remove_upload:
        the upload's file is the task's own, removed once its completion is acknowledged). Its secrets (secret
        headers, the URL's userinfo) stay in this process's memory."""
        _check_description(description)
        upload = None
        if upload_path is not None:
            st = os.stat(upload_path)
            upload = {"path": upload_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            if remove_upload:
                upload["remove"] = True
        with self.lock:
            self._check_open()
            tid, reserve_ticket = self.store.new_id(reserve=not self.durable_create)
            fields: dict[str, Any] = {"kind": kind, "request": request._to_record(self.config.secret_headers),
                                      "description": description, "created": self.clock.time(), "upload": upload,
                                      **request._task_options(), **_secret_names(request)}
            fields.update(self.store.resume_fields(resume))
            ticket = self.store.record(None, "task", id=tid, **fields)
            task = self.store.state.tasks[tid]
            task.live = _Live(self.config.retry)
            task.live.secret_headers = request._secret_headers(self.config.secret_headers)
            credential = request._credential()
            if credential is not None:
                task.live.url_credentials = {**task.live.url_credentials, _origin(request.url): credential}
            if upload:
                task.live.expected_send = upload["size"]
            if resume and not task.problem and self.store.adopt_partial(task, resume["file"]):
                task.live.offset = int(resume["fields"].get("durable_offset", 0))
                task.live.expected = task.total if task.total is not None else -1
        self.store.wait(ticket if self.durable_create else reserve_ticket)
        return self.task_info(tid)

    def resume(self, ids: Sequence[int]) -> None:
        """Resume tasks; durable (one shared fsync) when it returns."""
        ticket, failed = 0, []
        with self.lock:
            self._check_open()
            for tid in ids:
                t, failing = self._resume_locked(self._task(tid))
                ticket = max(ticket, t)
                if failing is not None:
                    failed.append(failing)
            self.changed.notify_all()
        self.store.wait(ticket)  # the highest ticket: every resume and fail record is durable
        if failed:
            with self.lock:
                for task in failed:
                    self.outbox.post_task_events(task)

    def suspend(self, tid: int) -> None:
        with self.lock:
            self._check_open()
            task = self._task(tid)
            if task.phase not in _ACTIVE_PHASES:
                return
            ticket = self.store.record(task, "suspend")
            if task.live.control is not None:
                task.live.control.stop("suspend")
            self.outbox.backlog_step(task.id)
            self.changed.notify_all()
        self.store.wait(ticket)

    def cancel(self, tid: int, produce_resume_data: bool = False) -> bytes | None:
        """Cancel a task; with *produce_resume_data*, the resume data of its partial file (or None)."""
        with self.lock:
            self._check_open()
            task = self._task(tid)
            if task.phase in (Phase.DELIVERING, Phase.ACKNOWLEDGED):
                return None
            running, ticket = task.phase in (Phase.TRANSFERRING, Phase.CANCELING), 0
            if task.phase is Phase.TRANSFERRING:
                self.store.record(task, "cancel", resume_data=produce_resume_data)
                if task.live.control is not None:
                    task.live.control.stop("cancel")
            elif not running:
                resume_file = self.store.keep_for_resume(task, task.live.offset) if produce_resume_data else None
                err = TransferError(ErrorCode.CANCELLED, "cancelled", url=task.request["url"])
                ticket = self.store.record(task, "cancel", resume_data=produce_resume_data, error=err._to_record(),
                                           resume_file=resume_file)
            done = task.live.done
        if running:
            done.wait()  # the worker settles the cancel (and keeps the partial file if asked)
        else:
            self.store.wait(ticket)
        with self.lock:
            if not running:
                self.outbox.post_task_events(task)
                self.changed.notify_all()
            return self.store.resume_data(task) if produce_resume_data else None

    def describe(self, tid: int, description: str | None) -> None:
        _check_description(description)
        self._change(tid, lambda task: self.store.describe(task, description))

    def set_priority(self, tid: int, priority: float) -> None:
        """Change a task's priority: it orders the queue from now on; a running transfer goes on."""
        self._change(tid, lambda task: self.planner.set_priority(task, priority))

    def set_begin_date(self, tid: int, at: float | None) -> None:
        """Change a task's earliest begin date (POSIX time; None: none) before it begins."""
        self._change(tid, lambda task: self.planner.set_begin(task, at))

    def set_limit(self, tid: int | None, rate: int | None) -> None:
        """Change a task's bandwidth limit, or the session's (*tid* None): bytes per second, None for none."""
        self._change(tid, lambda task: self.planner.set_limit(task, rate))

    def session_limit(self) -> int | None:
        """The session's bandwidth limit in force (bytes per second; None: none)."""
        return self.planner.session_limit.rate

    def ack(self, tid: int, event: str) -> None:
        """The app's hook for *event* returned: journal that, then remove what it no longer needs."""
        with self.lock:
            task = self.store.state.tasks.get(tid)
            if task is None or event not in task.events():
                return
            ticket = self.store.record(task, "ack", waited=True, event=event)
        self.store.wait(ticket)
        self.store.release_files(task, event)  # (nothing waits on `changed` for an acknowledgement)
        self.store.compaction.when_due()

    def task_info(self, tid: int) -> TaskInfo:
        with self.lock:
            task = self.store.state.tasks.get(tid)
            if task is None:
                raise InvalidArgumentError(f"no task {tid} in this session (ended and forgotten, or never made)")
            return _task_info(task, self.store)

    def tasks(self) -> list[TaskInfo]:
        """Every task not yet acknowledged."""
        with self.lock:
            return [_task_info(t, self.store) for t in self.store.state.tasks.values()
                    if t.phase is not Phase.ACKNOWLEDGED]

    def outstanding(self, exclude: Iterable[int] = ()) -> int:
        """Tasks not yet completed and delivered, leaving out *exclude* (cheap: no info built)."""
        skip = set(exclude)
        with self.lock:
            return sum(1 for t in self.store.state.tasks.values()
                       if t.phase is not Phase.ACKNOWLEDGED and t.id not in skip)

    def attach(self, sink: _Sink, wait_for_active: bool = False, renews_requests: bool = False) -> None:
        """Attach the app: post every event that waited, then BacklogEnd. *wait_for_active* (in-process host,
        background launch): the transfers this launch resumed belong to the backlog too, so BacklogEnd (and
        did_finish_events) waits until they end or are suspended. *renews_requests*: the app answers renewals."""
        with self.lock:
            self._check_open()
            self.outbox.bind(sink, renews_requests)
            backlog = [t for t in self.store.state.backlog() if t.live.events_ready]
            for task in backlog:
                self.store.settle_missing_finish(task)
                self.outbox.post_task_events(task)
            waiting = {t.id for t in self.store.state.tasks.values() if t.phase in (  # (not a scheduled one)
                Phase.QUEUED, Phase.TRANSFERRING, Phase.WAITING_RETRY, Phase.CANCELING)} if wait_for_active else set()
            self.outbox.begin_backlog(bool(backlog), waiting)
            self.changed.notify_all()

    def detach(self, sink: _Sink) -> None:
        with self.lock:
            if self.outbox.unbind(sink):
                self.changed.notify_all()

    def close(self) -> None:
        """Stop transfers (they resume at the next open), join every thread, flush the journal,
        release the session lock."""
        with self.lock:
            if self.closed:
                return
            self.closed = self.outbox.closed = True
            for task in self.store.state.tasks.values():
                if task.live is not None and task.live.control is not None:
                    task.live.control.stop("close")
            self.changed.notify_all()
        self.scheduler.close()
        self.connections.close()
        self.store.close()

    # -- for the host ----------------------------------------------------------------------------
    def status(self) -> _EngineStatus:
        with self.lock:
            phases = collections.Counter(t.phase for t in self.store.state.tasks.values())
            backlog = self.store.state.backlog()
            oldest = min((self.store.delivered_at.get(t.id, 0.0) for t in backlog), default=None)
            return _EngineStatus(
                sum(phases[p] for p in _ACTIVE_PHASES) - phases[Phase.SCHEDULED], phases[Phase.SCHEDULED],
                phases[Phase.CANCELING], len(backlog), 0.0 if oldest is None else time.monotonic() - oldest,
                self.outbox.sink is not None, self.outbox.waiting_challenges, self.store.acks)

    def configure(self, config: Configuration) -> None:
        """Take a newer configuration of the same session (the daemon: each app brings its own)."""
        if config.identifier != self.config.identifier:
            raise InvalidArgumentError(f"a configuration of session {config.identifier!r}, "
                                       f"not {self.config.identifier!r}")
        with self.lock:
            self.config = config
            self.scheduler.configure(config)
            self.planner.configure(config)
        self.connections.configure(config)
        self.transfer.http.config = config

    # -- helpers (under the lock) ----------------------------------------------------------------
    def _task(self, tid: int) -> _TaskRecord:
        """The task *tid*; one that ended and was forgotten (compacted away) comes back as a finished record, so that
        resume(), suspend() and cancel() of a completed task do nothing, as on iOS."""
        task = self.store.state.tasks.get(tid)
        if task is not None:
            return task
        if isinstance(tid, int) and 0 < tid < self.store.state.next_id:
            return _TaskRecord({"id": tid, "request": {"url": ""}, "phase": Phase.ACKNOWLEDGED.value})
        raise InvalidArgumentError(f"no task {tid} in this session")

    def _check_open(self) -> None:
        if self.closed:
            raise SessionInvalidatedError("the session is closed")

    def _change(self, tid: int | None, change: Callable[[Any], int]) -> None:
        """Apply *change* to a task (None: the session) under the lock; return once its record is durable."""
        with self.lock:
            self._check_open()
            ticket = change(None if tid is None else self._task(tid))
        self.store.wait(ticket)

    def _resume_locked(self, task: _TaskRecord) -> tuple[int, _TaskRecord | None]:
        """Journal a resume. Returns (ticket, the task if it fails at once)."""
        if task.phase is not Phase.SUSPENDED:
            return 0, None
        upload = None
        if task.kind == "upload" and task.upload:
            upload = dict(task.upload)
            with contextlib.suppress(OSError):  # the attempt reports FILE_DOES_NOT_EXIST
                st = os.stat(upload["path"])
                upload.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
                task.live.expected_send = st.st_size
        ticket = self.store.record(task, "resume", at=self.clock.time(), upload=upload)
        if task.problem:
            error = TransferError(ErrorCode.CANNOT_RESUME, task.problem, url=task.request["url"])
            return self.store.fail(task, error, "fail", keep_partial=False), task
        self.planner.queue(task)
        return ticket, None


# ============================================================================
# 9. Interface: the app<->engine protocol, declared once
# ============================================================================
#
# A Session talks to its engine through a _Backend. In-process that is the _Engine itself; with the daemon host it is
# a _DaemonClient, which sends each operation over the socket to the daemon, where _serve_operation() decodes it and
# calls the same _Engine method. _OPERATIONS is the one table all three use: each operation's name, its arguments and
# result, and how each crosses the wire. Adding an operation is a row here and its _Engine method. The engine talks
# back through a _Sink (section 8): events in order, challenges answered.


class _Backend(Protocol):
    """The operations an app asks of its session's engine (each a row of _OPERATIONS, but close)."""

    def new_task(self, kind: str, request: Request, description: str | None, upload_path: str | None = None,
                 resume: Mapping[str, Any] | None = None, remove_upload: bool = False) -> TaskInfo: ...
    def resume(self, ids: Sequence[int]) -> None: ...
    def suspend(self, tid: int) -> None: ...
    def cancel(self, tid: int, produce_resume_data: bool = False) -> bytes | None: ...
    def describe(self, tid: int, description: str | None) -> None: ...
    def set_priority(self, tid: int, priority: float) -> None: ...
    def set_begin_date(self, tid: int, at: float | None) -> None: ...
    def set_limit(self, tid: int | None, rate: int | None) -> None: ...
    def session_limit(self) -> int | None: ...
    def ack(self, tid: int, event: str) -> None: ...
    def task_info(self, tid: int) -> TaskInfo: ...
    def tasks(self) -> list[TaskInfo]: ...
    def outstanding(self, exclude: Iterable[int] = ()) -> int: ...
    def attach(self, sink: _Sink, wait_for_active: bool = False, renews_requests: bool = False) -> None: ...
    def detach(self, sink: _Sink) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class _Codec:
    """How a value crosses the daemon socket as JSON: encoded on one side, decoded on the other."""
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


def _request_to_wire(request: Request) -> dict[str, Any]:
    # secret headers and the URL's userinfo travel over the 0700 socket into the daemon's memory, never to a disk
    return {**request._to_record(), "url": request.url, "secret": [list(p) for p in request._secret_headers()],
            "priority": request.priority, "begin": _begin_timestamp(request.earliest_begin_date)}


def _request_from_wire(wire: Mapping[str, Any]) -> Request:
    headers = dict(wire.get("headers") or [])
    headers.update(dict(wire.get("secret") or []))
    return Request(wire["url"], wire.get("method", "GET"), headers, wire.get("sha256"),
                   priority=wire.get("priority"), earliest_begin_date=wire.get("begin"),
                   secret_headers=tuple(wire.get("secret_headers") or ()))


_PLAIN = _Codec(lambda value: value, lambda value: value)
_IDS = _Codec(lambda ids: [int(i) for i in ids], lambda ids: [int(i) for i in ids])
_REQUEST = _Codec(_request_to_wire, _request_from_wire)
_INFO = _Codec(TaskInfo.to_wire, TaskInfo.from_wire)
_INFOS = _Codec(lambda infos: [i.to_wire() for i in infos], lambda infos: [TaskInfo.from_wire(i) for i in infos])
_BYTES = _Codec(lambda data: base64.b64encode(data).decode("ascii") if data else None,
                lambda text: base64.b64decode(text) if text else None)


@dataclasses.dataclass(frozen=True)
class _Operation:
    """One row of the app<->engine table. *args* in the order of the _Backend method's
    parameters; *resend*: idempotent, a client may send it again after a reconnect; *binds_sink*:
    the operation takes the caller's sink (over the socket: the daemon's connection to that app)."""

    name: str
    args: tuple[tuple[str, _Codec], ...] = ()
    result: _Codec = _PLAIN
    resend: bool = True
    binds_sink: bool = False

    def encode_args(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {name: codec.encode(values[name]) for name, codec in self.args if name in values}

    def decode_args(self, wire: Mapping[str, Any]) -> dict[str, Any]:
        return {name: codec.decode(wire[name]) for name, codec in self.args if name in wire}


#: The app<->engine interface: every operation, its arguments, result and wire form.
_OPERATIONS: dict[str, _Operation] = {op.name: op for op in (
    _Operation("new_task", (("kind", _PLAIN), ("request", _REQUEST), ("description", _PLAIN), ("upload_path", _PLAIN),
                            ("resume", _PLAIN), ("remove_upload", _PLAIN)), _INFO, resend=False),
    _Operation("resume", (("ids", _IDS),)),
    _Operation("suspend", (("tid", _PLAIN),)),
    _Operation("cancel", (("tid", _PLAIN), ("produce_resume_data", _PLAIN)), _BYTES),
    _Operation("describe", (("tid", _PLAIN), ("description", _PLAIN))),
    _Operation("set_priority", (("tid", _PLAIN), ("priority", _PLAIN))),
    _Operation("set_begin_date", (("tid", _PLAIN), ("at", _PLAIN))),
    _Operation("set_limit", (("tid", _PLAIN), ("rate", _PLAIN))),
    _Operation("session_limit"),
    _Operation("ack", (("tid", _PLAIN), ("event", _PLAIN))),
    _Operation("task_info", (("tid", _PLAIN),), _INFO),
    _Operation("tasks", (), _INFOS),
    _Operation("outstanding", (("exclude", _IDS),)),
    _Operation("attach", (("wait_for_active", _PLAIN), ("renews_requests", _PLAIN)), binds_sink=True),
    _Operation("detach", (), resend=False, binds_sink=True),
)}


def _serve_operation(backend: _Backend, name: Any, wire_args: Mapping[str, Any], sink: _Sink | None) -> Any:
    """Serve one operation from its wire form: decode the arguments, call, encode the result."""
    op = _OPERATIONS.get(name) if isinstance(name, str) else None
    if op is None:
        raise InvalidArgumentError(f"unknown operation {name!r}")
    args = op.decode_args(wire_args)
    if op.binds_sink:
        if sink is None:
            raise InvalidArgumentError(f"{name!r} needs an attached app")
        args["sink"] = sink
    return op.result.encode(getattr(backend, op.name)(**args))


#: The engine behind a Session, by ``Configuration.host`` (the daemon section adds "daemon").
_HOSTS: dict[str, Callable[[Configuration, _Clock | None], _Backend]] = {
    "inprocess": lambda config, clock: _Engine(config, clock=clock)}


def _open_backend(config: Configuration, clock: _Clock | None = None) -> _Backend:
    return _HOSTS[config.host if config.is_background else "inprocess"](config, clock)


# ============================================================================
# 10. Session: SessionDelegate, Task, Session, SessionManager
# ============================================================================

# -- files handed out of and into tasks: move_to (a finished download), multipart_body (an upload's body) --------

def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _check_path(value: Any, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _invalid(f"{what} must be a path (str or os.PathLike), not {value!r}")
    return os.fspath(value)


def _same_bytes(a: str, b: str) -> bool:
    import filecmp
    with contextlib.suppress(OSError):
        return os.path.isfile(b) and filecmp.cmp(a, b, shallow=False)
    return False


class _NameTaken(FileExistsError):
    """move_to's destination exists with other bytes."""


#: Errors of os.link that mean "this file system has no hard links", not "this name cannot be made".
_NO_LINKS = frozenset({errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def _place(src: str, dest: str, replace: bool) -> bool:
    """Give *dest* *src*'s file, whole or not at all; False: *dest* held those very bytes already. Across file
    systems the file is first copied next to *dest* and fsynced. Without *replace* the new name is a hard link, which
    the kernel refuses to make over an existing name: a file another process creates under that name meanwhile is
    never replaced (on a file system without hard links: checked first, then renamed, a window left open). *src*
    stays: the caller removes it once the new name is durable."""
    def copy_beside() -> str:
        import shutil
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.bgsession-{os.urandom(6).hex()}")
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                _fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):  # the original error is what matters
                _vfs.unlink(tmp)
            raise
        return tmp

    def taken() -> bool:
        if _same_bytes(src, dest):
            return False
        raise _NameTaken(errno.EEXIST, f"{dest} exists with other bytes; pass exist_ok=True to replace it, or choose "
                         "another name", dest)

    def link(source: str) -> bool:
        try:
            _vfs.link(source, dest)
            return True
        except FileExistsError:
            return taken()

    if not replace:
        try:
            return link(src)
        except OSError as err:
            if err.errno not in _NO_LINKS | {errno.EXDEV}:
                raise
            cross = err.errno == errno.EXDEV
        if cross:
            tmp = copy_beside()
            try:
                return link(tmp)
            except OSError as err:
                if err.errno not in _NO_LINKS:
                    raise
            finally:
                with contextlib.suppress(OSError):
                    _vfs.unlink(tmp)
        if os.path.lexists(dest):  # no hard links here: check, then rename
            return taken()
    try:
        _vfs.replace(src, dest)
        return True
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    tmp = copy_beside()
    try:
        _vfs.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            _vfs.unlink(tmp)
        raise
    return True


def move_to(location: str | os.PathLike[str], directory_or_path: str | os.PathLike[str], *, exist_ok: bool = False,
            name: str | None = None) -> str:
    """Move a finished download (a finish hook's *location*) to where the app keeps it; returns its new path.

    *directory_or_path*: an existing directory, or a path ending with a separator, receives the file as *name*
    (sanitised; default: the location's own name, ``<id>.done`` for a download, so pass
    ``name=task.response.suggested_filename``); any other path is the file's new name. Missing directories are
    created. It works across file systems (copied, fsynced, then renamed into place) and the file is whole or absent
    at its new name, never partial. The moved file gets the mode a file this process creates would have (0666 minus
    the umask), not the session's private 0600.

    When the name exists: holding the very same bytes, it is taken as this file (an earlier launch moved it and was
    killed before the acknowledgement): the location is removed and the path returned. With other bytes:
    FileExistsError, unless *exist_ok*, which replaces it atomically. Any other failure raises TransferError
    CANNOT_MOVE_FILE. On failure the location stays, so a finish hook that lets the error propagate gets the event
    again at the next launch."""
    src, target = _check_path(location, "location"), _check_path(directory_or_path, "directory_or_path")
    into = target.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)) or os.path.isdir(target)
    if name is not None and (not into or not isinstance(name, str)):
        raise _invalid(f"name= ({name!r}) is a file name for when directory_or_path is a directory; "
                       f"{target!r} is not one")
    dest = os.path.abspath(os.path.join(target, sanitize_filename(name or os.path.basename(src))) if into else target)
    parent = os.path.dirname(dest)
    try:
        if not os.path.isfile(src):
            raise FileNotFoundError(errno.ENOENT, "no such file", src)
        _makedirs(parent, 0o777)  # (the umask applies, as to any directory the app creates)
        placed = _place(src, dest, exist_ok)
        _fsync_dir(parent)  # the new name is durable before the location goes and the finish is acknowledged
        if os.path.lexists(src):  # linked, copied from another file system, or the same bytes were there
            _vfs.unlink(src)
        if placed:
            os.chmod(dest, 0o666 & ~_umask())
    except _NameTaken:
        raise
    except OSError as err:
        raise TransferError(ErrorCode.CANNOT_MOVE_FILE, f"cannot move {src} to {dest}: {err.strerror or err}; the file "
                            "stays in the session and is delivered again at the next launch") from err
    return dest


#: Bodies multipart_body() wrote in this process that no upload task owns yet.
_unclaimed_bodies: set[str] = set()
_unclaimed_lock = threading.Lock()
#: Bytes read from a file part per write.
_MULTIPART_BLOCK = 256 << 10


def _form_name(value: str) -> bytes:
    """A quoted name of a Content-Disposition, as browsers send it (RFC 7578 4.2: UTF-8, quote and newlines
    percent-encoded; never the RFC 5987 ``filename*`` form)."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode("utf-8")


def _multipart_parts(fields: Any, files: Any) -> list[tuple[bytes, str | None, str | bytes]]:
    """The parts, checked before anything is written: (headers, path of a file part or None, text or path)."""
    def pairs(value: Any, what: str) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, Mapping):
            return list(value.items())
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise _invalid(f"{what} must be a mapping or (name, ...) tuples, not {type(value).__name__}")
        return [tuple(item) for item in value]
    parts: list[tuple[bytes, str | None, str | bytes]] = []
    for item in pairs(fields, "fields"):
        if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], (str, bytes)):
            raise _invalid(f"a field is a (name, value) pair of str, not {item!r}")
        parts.append((b'Content-Disposition: form-data; name="' + _form_name(item[0]) + b'"\r\n', None, item[1]))
    for item in pairs(files, "files"):
        if not 2 <= len(item) <= 4 or not isinstance(item[1], (str, os.PathLike)):
            raise _invalid(f"a file is (name, path[, filename[, content_type]]), not {item!r}")
        name, path, filename, ctype = (*item, None, None)[:4]
        path = os.path.abspath(os.fspath(path))
        if not isinstance(name, str) or not os.path.isfile(path):
            raise _invalid(f"file part {name!r}: {path} is not a readable regular file")
        filename = os.path.basename(path) if filename is None else filename
        if not isinstance(filename, str) or not (ctype is None or (isinstance(ctype, str) and ctype.isprintable())):
            raise _invalid(f"file part {name!r}: filename and content_type must be str, not {filename!r}, {ctype!r}")
        if not ctype:
            import mimetypes
            ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        head = (b'Content-Disposition: form-data; name="' + _form_name(name) + b'"; filename="' + _form_name(filename)
                + b'"\r\nContent-Type: ' + ctype.encode("ascii", "replace") + b"\r\n")
        parts.append((head, path, path))
    return parts


def _write_multipart(fd: int, parts: list[tuple[bytes, str | None, str | bytes]], boundary: bytes) -> bool:
    """Stream the body into *fd*; False if the boundary occurs in a part (the caller picks another)."""
    delimiter = b"--" + boundary
    for head, path, value in parts:
        _write_all(fd, delimiter + b"\r\n" + head + b"\r\n")
        if path is None:
            data = value.encode("utf-8") if isinstance(value, str) else value
            if delimiter in data:
                return False
            _write_all(fd, data)
        else:
            tail = b""  # the end of the previous block: a delimiter may straddle two
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_MULTIPART_BLOCK), b""):
                    if delimiter in tail + block:
                        return False
                    _write_all(fd, block)
                    tail = block[-len(delimiter) + 1:]
        _write_all(fd, b"\r\n")
    _write_all(fd, delimiter + b"--\r\n")
    return True


def multipart_body(fields: Mapping[str, str] | Iterable[tuple[str, str]] | None,
                   files: Mapping[str, str | os.PathLike[str]] | Iterable[tuple[Any, ...]] | None,
                   directory: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """Write a ``multipart/form-data`` body (RFC 7578) into a new file for ``upload_task(request, from_file=path)``:
    AFNetworking's ``requestWithMultipartFormRequest:writingStreamContentsToFile:``, because a background upload
    comes from a file. Returns ``(path, content_type)``; send *content_type* (it carries the boundary) as the
    request's ``Content-Type``.

    *fields*: text fields, a mapping or ``(name, value)`` pairs, in order. *files*: a mapping of field name to path,
    or ``(name, path[, filename[, content_type]])`` tuples (filename: the path's base name; content type: guessed
    from it, else ``application/octet-stream``). Names may be any Unicode (sent as UTF-8, as browsers do); files may
    hold any bytes: they are streamed in 256 KiB blocks, never whole in memory, and a boundary that occurs in them is
    replaced. The body is fsynced before this returns.

    The file is the upload's own: an upload task made from it removes it once its completion is acknowledged
    (until then it is needed: the upload may be retried, or resumed after a relaunch). *directory*: where it is
    written (created 0700; default: ``bgsession-multipart`` in bgsession's per-user state directory, which outlives
    a reboot, as the task does)."""
    parts = _multipart_parts(fields, files)
    if directory is None:
        directory = os.path.join(_state_base(), "bgsession-multipart")
    directory = os.path.abspath(_check_path(directory, "directory"))
    _make_private_dirs(directory)
    import tempfile
    for _ in range(8):
        boundary = b"bgsession-" + os.urandom(16).hex().encode("ascii")
        fd, tmp = tempfile.mkstemp(prefix="body-", suffix=".part", dir=directory)
        try:
            written = _write_multipart(fd, parts, boundary)
            if written:
                _fsync(fd)
        finally:
            os.close(fd)
        if not written:
            os.unlink(tmp)
            continue
        path = tmp[: -len(".part")] + ".multipart"
        _vfs.replace(tmp, path)
        _fsync_dir(directory)
        with _unclaimed_lock:
            _unclaimed_bodies.add(path)
        return path, f"multipart/form-data; boundary={boundary.decode('ascii')}"
    raise BGSessionError("no boundary absent from the parts was found (8 random ones occurred in the data)")


# -- delivery: the gate, the running hook, the event loop ------------------------------------------------------

#: Set unless an app-lifecycle shim holds every session's hook delivery: appdelegate.main clears it during a
#: background launch until ``handle_events_for_background_url_session`` has returned.
_delivery_gate = threading.Event()
_delivery_gate.set()


def _background_launch_identifier() -> str | None:
    return os.environ.get(BACKGROUND_EVENTS_ENV) or None


#: Callables (identifier, state) told when a background launch's session starts delivering its
#: backlog ("delivering") and when did_finish_events_for_background_session has run ("delivered").
#: appdelegate starts its completion-handler time limit from "delivered".
_backlog_listeners: list[Callable[[str, str], None]] = []


def _notify_backlog(identifier: str | None, state: str) -> None:
    if identifier is None:
        return
    for listener in _backlog_listeners:
        try:
            listener(identifier, state)
        except Exception:
            log.exception("backlog listener failed")


class _HookCall:
    """One call of a hook, until it returns. appdelegate asks for the one running (:func:`_running_hook`) when the
    completion handler is called, so that the process exits only after the hook that called it has returned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._returned = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def returned(self) -> bool:
        return self._returned

    def on_return(self, callback: Callable[[], None]) -> None:
        """Run *callback* (on the delegate thread) once the hook has returned; at once if it has."""
        with self._lock:
            if not self._returned:
                self._callbacks.append(callback)
                return
        callback()

    def finish(self) -> None:
        with self._lock:
            self._returned, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("hook-return callback failed")


#: The hook running in this context: set on the delegate thread around each hook, and in the task that runs an
#: ``async def`` hook on the event loop (a context variable follows the coroutine, a thread-local would not).
_current_hook: contextvars.ContextVar[_HookCall | None] = contextvars.ContextVar("bgsession_hook", default=None)


def _running_hook() -> _HookCall | None:
    """The hook (or SessionManager block) running in the caller's context, or None outside any hook."""
    return _current_hook.get()


def _running_loop() -> Any:
    """The asyncio event loop running in this thread, or None. (Without asyncio imported, none can run: the daemon
    and plain apps never import it.)"""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _HookAbandoned(Exception):
    """An async hook did not return: the session closed, or its event loop did, while it ran."""


def _resolve(future: Any, value: Any = None, error: BaseException | None = None) -> None:
    """Complete an asyncio future unless its awaiter gave up (on the future's loop)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class _AsyncBridge:
    """A session's asyncio side. ``loop`` is the event loop the session was created on (None: created outside one):
    ``async def`` hooks run there, one at a time, because the delegate thread waits for each coroutine before it
    acknowledges the event and takes the next one. The futures of ``wait_async`` and ``await task`` wait here; the
    delegate thread resolves them. Nothing blocking runs on the loop: journal, socket and file work stay on the
    delegate thread."""

    #: Seconds between the delegate thread's checks that an async hook's session or loop is still there.
    POLL = 0.25

    def __init__(self) -> None:
        self.loop = _running_loop()
        self._lock = threading.Lock()
        self._waiters: list[Any] = []  # futures of wait_async
        self._completions: dict[int, list[Any]] = {}  # task id -> futures of `await task`
        self.closed = False

    def run(self, awaitable: Awaitable[Any], call: _HookCall | None, stopping: Callable[[], bool]) -> Any:
        """Run an async hook's awaitable on the loop and return its value; the calling (delegate) thread waits."""
        loop = self.loop
        if loop is None or loop.is_closed():
            getattr(awaitable, "close", lambda: None)()  # never awaited: no "coroutine was never awaited" warning
            raise SessionInvalidatedError("an async def hook needs a Session created inside a running asyncio "
                                          "event loop, which must still exist")
        import asyncio
        import concurrent.futures

        async def in_hook_context() -> Any:
            _current_hook.set(call)  # this task's own context
            return await awaitable

        future = asyncio.run_coroutine_threadsafe(in_hook_context(), loop)
        while not future.done():
            concurrent.futures.wait([future], self.POLL)
            if not future.done() and (stopping() or loop.is_closed()):
                future.cancel()
                raise _HookAbandoned("the session or its event loop closed while an async hook ran")
        if future.cancelled():
            raise _HookAbandoned("the async hook was cancelled")
        return future.result()

    # -- futures the delegate thread resolves -------------------------------------------------
    def _future(self) -> Any:
        import asyncio
        return asyncio.get_running_loop().create_future()

    @staticmethod
    def _settle(future: Any, value: Any = None, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody awaits it any more
            future.get_loop().call_soon_threadsafe(_resolve, future, value, error)

    def waiter(self) -> Any:
        """A future that ``settle_waiters`` resolves (``wait_async``)."""
        future = self._future()
        with self._lock:
            if self.closed:
                _resolve(future, True)
            else:
                self._waiters.append(future)
        return future

    def discard(self, future: Any) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiters.remove(future)

    def has_waiters(self) -> bool:
        return bool(self._waiters)

    def settle_waiters(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for future in waiters:
            self._settle(future, True)

    def completion(self, task: Task) -> Any:
        """A future of *task*'s completion in this process: the error ``task_did_complete`` was given."""
        future = self._future()
        with self._lock:
            if task._outcome is not None:
                _resolve(future, *task._outcome)
            elif self.closed:
                _resolve(future, error=SessionInvalidatedError("the session closed before the task completed"))
            else:
                self._completions.setdefault(task.identifier, []).append(future)
        return future

    def complete(self, task: Task, error: TransferError | None, raised: BaseException | None = None) -> None:
        """*task*'s completion was delivered with *error*; or its hooks failed (*raised*: what ``await`` raises)."""
        with self._lock:
            task._outcome = (error, raised)
            futures = self._completions.pop(task.identifier, [])
        for future in futures:
            self._settle(future, error, raised)

    def close(self) -> None:
        """The session ended: ``wait_async`` returns True; ``await task`` of an unfinished task raises."""
        with self._lock:
            self.closed = True
            pending = [f for futures in self._completions.values() for f in futures]
            self._completions.clear()
        self.settle_waiters()
        for future in pending:
            self._settle(future, error=SessionInvalidatedError("the session closed before the task completed"))


def _is_async_def(fn: Any) -> bool:
    import inspect  # here: the daemon never needs it
    return inspect.iscoroutinefunction(fn)


def _async_hooks(delegate: Any, names: Iterable[str]) -> list[str]:
    """The names of *delegate*'s hooks that are ``async def``."""
    return [name for name in names if _is_async_def(getattr(delegate, name, None))]


class SessionDelegate:
    """Session-level hooks, Apple style: override the ones you need.

    They run serially on the session's delegate thread, never concurrently, and only after the Session (or
    SessionManager, subclass ``__init__`` included) is fully constructed. Register them again every time the app
    re-creates the session: that is what makes them survive a relaunch.

    A hook may be ``async def`` when the Session is created inside a running asyncio event loop: it then runs on
    that loop, still one at a time and in order, and its event is acknowledged after the coroutine returns. A hook
    that raises (or whose coroutine does) is logged; its event is not acknowledged, the task gets no further event
    in this process, and it is delivered again the next time the session is created."""

    def download_task_did_finish_downloading(self, session: Session, task: DownloadTask, location: str
                                             ) -> Awaitable[None] | None:
        """The file is complete at *location*; move it (:func:`move_to`) or read it before returning (it is
        deleted after)."""

    def download_task_did_write_data(self, session: Session, task: DownloadTask, bytes_written: int,
                                     total_bytes_written: int, total_bytes_expected: int) -> Awaitable[None] | None:
        """Progress (throttled); *total_bytes_expected* is -1 when unknown."""

    def task_did_send_body_data(self, session: Session, task: Task, bytes_sent: int,
                                total_bytes_sent: int, total_bytes_expected: int) -> Awaitable[None] | None:
        """Upload progress (throttled)."""

    def task_did_receive_challenge(self, session: Session, task: Task, challenge: AuthChallenge
                                   ) -> _Answer | Awaitable[_Answer]:
        """A 401: return (disposition, credential). Default: use the session's stored credential, if any."""
        return AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING, None

    def task_did_complete(self, session: Session, task: Task, error: TransferError | None
                          ) -> Awaitable[None] | None:
        """The task ended. *error* is None for any HTTP response (check ``task.response.status``)."""

    def task_is_waiting_for_connectivity(self, session: Session, task: Task) -> Awaitable[None] | None:
        """No response arrives for *task* (no network, the server or proxy unreachable): it waits and tries again
        (``Configuration.waits_for_connectivity``). Once per waiting period, to the app attached when it begins."""

    def task_will_begin_delayed_request(self, session: Session, task: Task, request: Request
                                        ) -> tuple[DelayedRequestDisposition, Request | None]:
        """*task* is about to begin after its earliest begin date (as on iOS), or to send *request* again without the
        secret headers it was created with (they lived in the memory of a process that ended), or the server
        answered 401 (no challenge answered) or 403. Return
        (CONTINUE_LOADING, None), (USE_NEW_REQUEST, new_request) -- a new URL and fresh headers, e.g. a presigned URL
        that expired or a rotated token; the resume stays validated by If-Range -- or (CANCEL, None). Asked only if
        the delegate overrides it; a relaunch brings the app for it when none is attached."""
        return DelayedRequestDisposition.CONTINUE_LOADING, None

    def _renews_requests(self) -> bool:
        """Whether the engine should ask task_will_begin_delayed_request (this delegate overrides it)."""
        return type(self).task_will_begin_delayed_request is not SessionDelegate.task_will_begin_delayed_request

    def did_finish_events_for_background_session(self, session: Session) -> Awaitable[None] | None:
        """Every event that waited for the app was delivered: call the saved completion handler here."""

    def did_become_invalid(self, session: Session, error: BaseException | None) -> Awaitable[None] | None:
        """The session was invalidated; its identifier may be used again."""


#: The hooks of SessionDelegate, by name.
_HOOK_NAMES = tuple(name for name in vars(SessionDelegate) if not name.startswith("_"))


class Task:
    """A transfer in a session (``NSURLSessionTask``). Get one from the session; never construct it."""

    def __init__(self, session: Session, identifier: int, info: TaskInfo) -> None:
        self._session, self._identifier, self._cache = session, identifier, info
        self._frozen = False  # finished: the state that came with its events is final
        #: (error, None) once task_did_complete was delivered here; (None, exception) if its hooks failed
        self._outcome: tuple[TransferError | None, BaseException | None] | None = None

    def _info(self) -> TaskInfo:
        if self._frozen:
            return self._cache
        # acknowledged and compacted away, or the session closed: the last known state stands
        with contextlib.suppress(BGSessionError):
            self._cache = self._session._backend.task_info(self._identifier)
        return self._cache

    @property
    def identifier(self) -> int:
        """Unique in its session, stable across relaunches."""
        return self._identifier

    @property
    def description(self) -> str | None:
        """App-owned text (e.g. ``"photo:42"``): persisted, restored after a relaunch, never changed by bgsession."""
        return self._info().description

    @description.setter
    def description(self, value: str | None) -> None:
        self._session._backend.describe(self._identifier, value)
        self._cache = dataclasses.replace(self._cache, description=value)

    @property
    def original_request(self) -> Request:
        return Request._from_record(self._info().request)

    @property
    def current_request(self) -> Request:
        info = self._info()
        return Request._from_record(info.request)._with_url(info.current_url)

    @property
    def response(self) -> Response | None:
        return Response._from_record(self._info().response)

    @property
    def state(self) -> TaskState:
        return self._info().state

    @property
    def error(self) -> TransferError | None:
        rec = self._info().error
        return TransferError._from_record(rec) if rec else None

    @property
    def count_of_bytes_received(self) -> int:
        return self._info().received

    @property
    def count_of_bytes_expected_to_receive(self) -> int:
        return self._info().expected

    @property
    def count_of_bytes_sent(self) -> int:
        return self._info().sent

    @property
    def count_of_bytes_expected_to_send(self) -> int:
        return self._info().expected_send

    @property
    def is_waiting_for_connectivity(self) -> bool:
        """True while no response arrives and the task waits to try again (its state stays RUNNING, as on iOS)."""
        return self._info().waiting

    @property
    def last_attempt_error(self) -> TransferError | None:
        """Why the last attempt failed while the task goes on (waiting for connectivity, or before a retry)."""
        rec = self._info().last_error
        return TransferError._from_record(rec) if rec else None

    @property
    def next_attempt_at(self) -> float | None:
        """When the next attempt starts (``time.time()`` seconds), while the task waits for one."""
        return self._info().next_retry

    @property
    def priority(self) -> float:
        """From 0.0 (lowest) to 1.0 (highest), default 0.5, as ``NSURLSessionTask.priority``; persisted. Across all
        hosts, a higher-priority queued task starts before a lower one (equal ones: first in, first out). Setting it
        reorders a queued task at once; a running transfer goes on (it is never preempted)."""
        return self._info().priority

    @priority.setter
    def priority(self, value: float) -> None:
        self._session._backend.set_priority(self._identifier, _check_priority(value))

    @property
    def earliest_begin_date(self) -> datetime.datetime | None:
        """The task does not start before this moment (``NSURLSessionTask.earliestBeginDate``), an aware datetime
        in UTC, or None; persisted. Set it with a ``datetime`` that has a time zone or a POSIX timestamp, while the
        task is suspended, queued or scheduled. A task resumed before its date is scheduled: it waits -- across
        relaunches and daemon restarts -- and ``timeout_for_resource`` counts from the date."""
        import datetime
        begin = self._info().begin
        return None if begin is None else datetime.datetime.fromtimestamp(begin, datetime.timezone.utc)

    @earliest_begin_date.setter
    def earliest_begin_date(self, value: datetime.datetime | float | None) -> None:
        self._session._backend.set_begin_date(self._identifier, _begin_timestamp(value))

    @property
    def max_bytes_per_second(self) -> int | None:
        """This task's bandwidth limit (downloads and uploads), or None; persisted. The session's limit
        (``Configuration.max_bytes_per_second``) applies too. Setting it applies to a running transfer at once."""
        return self._info().limit

    @max_bytes_per_second.setter
    def max_bytes_per_second(self, value: int | None) -> None:
        self._session._backend.set_limit(self._identifier, _check_rate(value))

    def resume(self) -> None:
        """Start (tasks are created suspended) or continue. Durable when it returns."""
        self._session._backend.resume([self._identifier])

    def suspend(self) -> None:
        """Pause; the partial data is kept and ``resume()`` continues with a Range request."""
        self._session._backend.suspend(self._identifier)

    def cancel(self) -> None:
        """End the task; ``task_did_complete`` gets a TransferError with code CANCELLED."""
        self._session._backend.cancel(self._identifier, False)

    def __await__(self) -> Generator[Any, None, TransferError | None]:
        """``error = await task``: waits until ``task_did_complete`` has been delivered for this task in this
        process and gives the error it was given (None: a response, whatever its status). Like a task-level block,
        the awaiting lives in this process only: after a relaunch the session-level hooks deliver the completion.
        Raises SessionInvalidatedError if the session closes first."""
        return cast("Generator[Any, None, TransferError | None]",
                    self._session._async.completion(self).__await__())

    def __repr__(self) -> str:
        info = self._cache
        return (f"<{type(self).__name__} {self._identifier} {info.state.name} "
                f"{info.request['url']!r} description={info.description!r}>")


class DownloadTask(Task):
    def cancel_producing_resume_data(self) -> bytes | None:
        """Cancel and return opaque resume data for ``download_task_with_resume_data`` (None if not resumable)."""
        return self._session._backend.cancel(self._identifier, True)


class UploadTask(Task):
    @property
    def response_data(self) -> bytes | None:
        """The server's response body, readable until ``task_did_complete`` returns."""
        path = self._info().body_path
        with contextlib.suppress(OSError), open(path or "", "rb") as f:
            return f.read()
        return None


_TASK_CLASSES = {"download": DownloadTask, "upload": UploadTask}


@dataclasses.dataclass(frozen=True)
class _Call:
    """Run *fn* on the delegate thread, in order with the events (besides them and ChallengeEvent,
    the only item of its queue)."""

    fn: Callable[[], None]


class _Delivery:
    """The delegate thread: runs hooks serially, in order, and acknowledges each after it returns.
    It is the session's _Sink: the engine (or the daemon client) posts to it, never blocking."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cond = threading.Condition()
        self.queue: collections.deque[Any] = collections.deque()
        self.busy = False
        self.stopping = False
        self.generation = 0  # bumped after every event, for waiters
        self.finish_pending = False
        self.held: set[int] = set()  # tasks whose hook raised: redelivered at the next launch
        self.queued: set[tuple[int, str]] = set()  # durable events taken in (a reconnect re-sends them)
        self.returned: set[tuple[int, str]] = set()  # hooks that returned, in case their ack was lost
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"bgsession-delegate-{session.configuration.identifier or 'default'}")

    # -- the _Sink side: called by the engine (possibly under its lock); never blocks ------------
    def post(self, event: Any) -> None:
        with self.cond:
            if isinstance(event, (FinishedEvent, CompletedEvent)):
                key = (event.task_id, "finish" if isinstance(event, FinishedEvent) else "complete")
                if key in self.returned:  # the hook returned before; only the ack was lost (daemon restart)
                    event = _Call(lambda: self.session._backend.ack(*key))
                elif key in self.queued:
                    return
                else:
                    self.queued.add(key)
            if isinstance(event, ProgressEvent) and self.queue:
                last = self.queue[-1]
                if isinstance(last, ProgressEvent) and last.task_id == event.task_id and last.upload == event.upload:
                    self.queue[-1] = dataclasses.replace(event, bytes_written=last.bytes_written + event.bytes_written)
                    return
            self.queue.append(event)
            self.cond.notify_all()

    def challenge(self, task_id: int, challenge: AuthChallenge, control: _Control | None = None) -> _Answer:
        """Ask the challenge hook (on the delegate thread) and wait for its answer."""
        waiter = _Waiter()
        self.post(ChallengeEvent(task_id, challenge, waiter.set))
        return cast(_Answer, waiter.wait(control, lambda: self.stopping))

    def renew(self, task_id: int, request: Request, control: _Control | None = None) -> _Renewal:
        """Ask task_will_begin_delayed_request (on the delegate thread) and wait for its answer."""
        waiter = _Waiter()
        self.post(DelayedRequestEvent(task_id, request, waiter.set))
        return cast(_Renewal, waiter.wait(control, lambda: self.stopping))

    def renews_requests(self) -> bool:
        """The delegate implements task_will_begin_delayed_request (told to the engine at attach)."""
        delegate = self.session.delegate
        if delegate is None:
            return False
        if isinstance(delegate, SessionDelegate):
            return delegate._renews_requests()
        return callable(getattr(delegate, "task_will_begin_delayed_request", None))

    # -- the thread --------------------------------------------------------------------------------
    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(30.0)

    def idle(self) -> bool:
        return not self.queue and not self.busy

    def _run(self) -> None:
        while not _delivery_gate.wait(0.5):
            if self.stopping:
                return
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    self.cond.notify_all()
                    return
                event = self.queue.popleft()
                self.busy = True
            try:
                self._dispatch(event)
            except Exception:  # pragma: no cover - _dispatch guards every hook itself
                log.exception("bgsession delegate thread: unexpected error")
            with self.cond:
                fire = self.finish_pending and not any(isinstance(e, (FinishedEvent, CompletedEvent))
                                                        for e in self.queue)
                if fire:
                    self.finish_pending = False
            if fire:
                self._hook("did_finish_events_for_background_session", self.session)
                _notify_backlog(self.session.identifier, "delivered")
            with self.cond:
                self.busy = False
                self.generation += 1
                self.cond.notify_all()
            self.session._after_event()

    def _hook(self, name: str, *args: Any) -> tuple[bool, Any]:
        """Run a hook (an ``async def`` one on the session's loop, waiting for it): (returned, its value). The
        hook is the running one (:func:`_running_hook`) until it returns."""
        delegate = self.session.delegate
        fn = getattr(delegate, name, None) if delegate is not None else None
        if fn is None:
            return True, None
        call = _HookCall()
        token = _current_hook.set(call)
        try:
            value = fn(*args)
            if isinstance(value, Awaitable):
                value = self.session._async.run(value, call, lambda: self.stopping)
            return True, value
        except _HookAbandoned as err:
            log.info("session hook %s did not return (%s); its event is delivered again at the next launch", name,
                     err)
            return False, None
        except Exception:
            log.exception("session hook %s raised; its event is not acknowledged and will be delivered "
                          "again when the session is next created", name)
            return False, None
        finally:
            _current_hook.reset(token)
            call.finish()

    def _dispatch(self, event: Any) -> None:
        session = self.session
        if isinstance(event, ProgressEvent):
            task = session._task_object(event.task_id)
            name = "task_did_send_body_data" if event.upload else "download_task_did_write_data"
            self._hook(name, session, task, event.bytes_written, event.total_written, event.total_expected)
        elif isinstance(event, (FinishedEvent, CompletedEvent)):
            self._deliver(event)
        elif isinstance(event, BacklogEnd):
            bg = _background_launch_identifier() == session.configuration.identifier
            if event.had_events or bg:
                self.finish_pending = True
        elif isinstance(event, ChallengeEvent):
            task = session._task_object(event.task_id)
            ok, value = self._hook("task_did_receive_challenge", session, task, event.challenge)
            event.reply(_checked_answer(value) if ok else (AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING, None))
        elif isinstance(event, DelayedRequestEvent):
            task = session._task_object(event.task_id)
            ok, value = self._hook("task_will_begin_delayed_request", session, task, event.request)
            event.reply(_checked_renewal(value if ok else None))
        elif isinstance(event, WaitingEvent):
            self._hook("task_is_waiting_for_connectivity", session, session._task_object(event.task_id, event.info,
                                                                                         final=False))
        elif isinstance(event, _Call):
            event.fn()

    def _deliver(self, event: FinishedEvent | CompletedEvent) -> None:
        """A durable event: run its hook; acknowledge it once the hook returned (else hold the task)."""
        if event.task_id in self.held:
            return
        session = self.session
        task = session._task_object(event.task_id, event.info)
        if isinstance(event, FinishedEvent):
            if not self._hand(event.location):
                log.warning("task %s: its finished file %s vanished before delivery; it is reported when the session "
                            "is next opened", event.task_id, event.location)
                self.held.add(event.task_id)
                return
            ok, _ = self._hook("download_task_did_finish_downloading", session, task, event.location)
            kind = "finish"
        else:
            ok, _ = self._hook("task_did_complete", session, task, event.error)
            kind = "complete"
        if not ok:
            self.held.add(event.task_id)
            session._async.complete(task, None, BGSessionError(  # `await task` learns it too
                f"a hook of task {event.task_id} raised; its events are delivered again at the next launch"))
            return
        self.returned.add((event.task_id, kind))
        session._backend.ack(event.task_id, kind)
        if kind == "complete":
            task._cache = dataclasses.replace(task._cache, phase=Phase.ACKNOWLEDGED, events=(), body_path=None)
            for k in ("finish", "complete"):
                self.returned.discard((event.task_id, k))
                self.queued.discard((event.task_id, k))
            session._async.complete(task, cast(CompletedEvent, event).error)  # `error = await task`
            session._forget(event.task_id)

    @staticmethod
    def _hand(location: str) -> bool:
        """Before the finish hook gets *location*: mark it handed (see _handed_name), so that the file gone later means
        the hook took it; False if the file is gone already (the engine reports it at the next attach). The marker is
        a hard link to the file: one system call on this serial thread, which also proves the file is there (an empty
        file where the file system has no hard links)."""
        marker = _handed_name(location)
        try:
            _vfs.link(location, marker)
            return True
        except FileExistsError:
            return os.path.exists(location)  # handed before (a redelivery)
        except FileNotFoundError:
            return False
        except OSError:
            pass
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _FILE_MODE))
        except OSError as err:  # then a hook that moves the file and dies before its ack reads as a vanished file
            log.warning("cannot mark %s as handed to the finish hook: %s", location, err)
        return os.path.exists(location)


class Session:
    """A session of transfers (``NSURLSession``).

    ``Session(Configuration.background("com.example.app"), delegate=MyDelegate())`` recovers the identifier's journal,
    resumes its unfinished transfers and, once constructed, delivers every event that waited (then
    ``did_finish_events_for_background_session``). One live session per identifier: another one, in any thread or
    process, raises TransferError BACKGROUND_SESSION_IN_USE until this one is closed or invalidated."""

    def __init__(self, configuration: Configuration, delegate: SessionDelegate | None = None, *,
                 _deferred: bool = False, _clock: _Clock | None = None) -> None:
        if not isinstance(configuration, Configuration):
            raise _invalid(f"configuration must be a bgsession.Configuration, not {type(configuration).__name__}")
        if configuration.ssl_context is not None and configuration.is_background and configuration.host == "daemon":
            raise _invalid("an ssl.SSLContext cannot reach the daemon whole (Python cannot read a client certificate "
                           "or other settings back out of it), and bgsession never weakens TLS silently: give "
                           "Configuration(tls=bgsession.TLS(cafile=..., certfile=..., minimum_version=...)) instead, "
                           "or use host='inprocess'")
        if configuration.tls is not None:
            _tls_context(configuration)  # a missing file or a wrong key password: a clear error now, not per task
        self.configuration = configuration
        self.delegate = delegate
        self._async = _AsyncBridge()  # the event loop this session was created on, if any
        async_hooks = _async_hooks(delegate, _HOOK_NAMES) if delegate is not None and self._async.loop is None else []
        if async_hooks:
            raise _invalid(f"{type(delegate).__name__} has async def hooks ({', '.join(async_hooks)}): create the "
                           "Session inside a running asyncio event loop, where they run")
        self._objects: dict[int, Task] = {}
        self._objects_lock = threading.Lock()
        self._invalidating: str | None = None
        self._invalid = False
        self._delivery = _Delivery(self)
        self._backend: _Backend = _open_backend(configuration, _clock)
        self._started = False
        if not _deferred:
            self._start_delivery()

    def _start_delivery(self) -> None:
        """Begin delivering events: called once construction (subclass ``__init__`` included) is complete."""
        if self._started:
            return
        self._started = True
        background = _background_launch_identifier() == self.identifier and self.identifier is not None
        if background:
            _notify_backlog(self.identifier, "delivering")
        self._delivery.thread.start()
        self._backend.attach(self._delivery, wait_for_active=background,
                             renews_requests=self._delivery.renews_requests())

    # -- tasks ----------------------------------------------------------------------
    @property
    def identifier(self) -> str | None:
        return self.configuration.identifier

    def _check_usable(self) -> None:
        if self._invalid or self._invalidating:
            raise SessionInvalidatedError(f"session {self.identifier!r} was invalidated; create a new Session")

    def _task_object(self, tid: int, info: TaskInfo | None = None, final: bool = True) -> Task:
        """The one Task object of *tid*. *info*: its state, known already (*final*: it will not
        change any more -- it came with the task's events)."""
        with self._objects_lock:
            obj = self._objects.get(tid)
        if obj is not None and info is not None:
            obj._cache = dataclasses.replace(info, description=obj._cache.description)
            obj._frozen = obj._frozen or final
        if obj is None:
            frozen = info is not None and final
            if info is None:
                info = self._backend.task_info(tid)
            obj = _TASK_CLASSES.get(info.kind, Task)(self, tid, info)
            obj._frozen = frozen
            with self._objects_lock:
                obj = self._objects.setdefault(tid, obj)
        return obj

    def _forget(self, tid: int) -> None:
        """The task completed and its events were delivered: the session no longer holds its Task object (the
        app may: it keeps its last state)."""
        with self._objects_lock:
            self._objects.pop(tid, None)

    def _new_task_object(self, kind: str, request: Request, description: str | None, **extra: Any) -> Task:
        info = self._backend.new_task(kind, request, description, **extra)
        return self._task_object(info.id, info, final=False)

    def download_task(self, request: str | Request, *, description: str | None = None) -> DownloadTask:
        """A download task, suspended: call ``resume()`` to start it."""
        self._check_usable()
        req = _coerce_request(request)
        if req.method not in ("GET",):
            raise _invalid(f"download tasks use GET, not {req.method}; use upload_task to send a body")
        return cast(DownloadTask, self._new_task_object("download", req, description))

    def upload_task(self, request: str | Request, from_file: Any = None, *,
                    description: str | None = None, **kwargs: Any) -> UploadTask:
        """An upload of a file's contents (PUT by default; POST if the Request says so).

        Background uploads come from a file only, as on iOS (which aborts on data uploads in background sessions): a
        file can be read again after a relaunch; bytes in this process's memory cannot. A body written by
        :func:`multipart_body` becomes the task's own: it is removed once the task's completion is acknowledged."""
        self._check_usable()
        if kwargs:
            raise _invalid(f"upload_task got unexpected arguments {sorted(kwargs)}; background uploads "
                           "come from a file only (from_file=path)")
        if isinstance(from_file, (bytes, bytearray, memoryview)) or hasattr(from_file, "read"):
            raise _invalid("upload_task needs from_file=<path>: uploads from bytes or streams are refused because "
                           "they cannot survive a relaunch (iOS aborts on them in background sessions too); "
                           "write the data to a file first")
        if not isinstance(from_file, (str, os.PathLike)):
            raise _invalid(f"from_file must be a path, not {type(from_file).__name__}")
        path = os.path.abspath(os.fspath(from_file))
        if not os.path.isfile(path):
            raise TransferError(ErrorCode.FILE_DOES_NOT_EXIST, f"upload source {path} does not exist or is not a "
                                                                "regular file")
        req = _coerce_request(request)
        if req.method == "GET":
            req = dataclasses.replace(req, method="PUT", headers=dict(req.headers.pairs()))
        with _unclaimed_lock:  # a body multipart_body() made is the task's own: removed after its completion
            owned = path in _unclaimed_bodies
            _unclaimed_bodies.discard(path)
        try:
            return cast(UploadTask, self._new_task_object("upload", req, description, upload_path=path,
                                                          remove_upload=owned))
        except BaseException:
            if owned:
                with _unclaimed_lock:
                    _unclaimed_bodies.add(path)
            raise

    def download_task_with_resume_data(self, resume_data: bytes, *, description: str | None = None) -> DownloadTask:
        """Continue a cancelled or failed download. Bad or stale data fails the task via ``task_did_complete``."""
        self._check_usable()
        if not isinstance(resume_data, (bytes, bytearray)):
            raise _invalid(f"resume_data must be bytes, not {type(resume_data).__name__}")
        parsed, problem = _parse_resume_data(bytes(resume_data))  # unusable: the task fails at resume()
        request = Request._from_record(parsed["request"]) if parsed else Request("http://invalid.invalid/")
        return cast(DownloadTask, self._new_task_object("download", request, description,
                                                        resume=parsed or {"invalid": problem}))

    def resume_all(self, tasks: Iterable[Task]) -> None:
        """``task.resume()`` for many tasks at once: the same guarantee (durable when it returns),
        one journal fsync (and, with the daemon host, one round trip) for all of them."""
        tasks = list(tasks)
        if not all(isinstance(task, Task) and task._session is self for task in tasks):
            raise _invalid("resume_all takes tasks of this session")
        self._backend.resume([task.identifier for task in tasks])

    def get_tasks(self) -> list[Task]:
        """Tasks not yet completed and delivered, including those re-created after a relaunch."""
        with _gc_paused():  # (objects of every task, 100,000 after a relaunch, none of them garbage)
            infos, fresh = self._backend.tasks(), {}
            with self._objects_lock:  # the Task objects of tasks seen for the first time, under one lock
                objects = self._objects
                for info in infos:
                    if info.id not in objects:
                        objects[info.id] = fresh[info.id] = _TASK_CLASSES.get(info.kind, Task)(self, info.id, info)
            return [task if (task := fresh.get(info.id)) is not None else self._task_object(info.id, info, final=False)
                    for info in infos]

    @property
    def max_bytes_per_second(self) -> int | None:
        """The bandwidth limit of the session's transfers together (bytes per second; None: none). It starts as
        ``Configuration.max_bytes_per_second``; set here, it applies to running transfers at once and holds --
        across relaunches and daemon restarts -- until an app configures a different limit."""
        return self._backend.session_limit()

    @max_bytes_per_second.setter
    def max_bytes_per_second(self, value: int | None) -> None:
        self._check_usable()
        self._backend.set_limit(None, _check_rate(value))

    # -- waiting and ending -------------------------------------------------------------------
    def _settled(self) -> bool:
        delivery = self._delivery
        if not delivery.idle():
            return False  # cheap local answer first: events are still being delivered
        return self._backend.outstanding(delivery.held) == 0 and delivery.idle()

    def _after_event(self) -> None:
        """On the delegate thread, after each event: finish an invalidation, resolve ``wait_async``."""
        if self._invalidating and not self._invalid and self._settled():
            self._become_invalid()
        if self._async.has_waiters():
            try:
                settled = self._invalid or self._settled()
            except BGSessionError as err:  # the daemon is out of reach: the next event asks again
                log.info("wait_async: cannot tell whether the session settled: %s", err)
                settled = False
            if settled:
                self._async.settle_waiters()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task has completed and its events were delivered. False on timeout.

        Suspended tasks count as not completed. A task whose hook raised counts as delivered for this process (it is
        delivered again at the next launch)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delivery = self._delivery
        while True:
            with delivery.cond:
                generation = delivery.generation
            # never call the backend while holding the delivery lock: a daemon reply may be
            # queued behind an event that needs it
            if self._invalid or self._settled():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            with delivery.cond:
                if delivery.generation == generation:
                    delivery.cond.wait(0.5 if remaining is None else min(0.5, remaining))

    async def wait_async(self, timeout: float | None = None) -> bool:
        """``wait()`` for asyncio: ``await session.wait_async(timeout)`` returns True once every task has completed
        and its events were delivered, False on timeout, without blocking the event loop (the delegate thread
        checks after every event and resolves the wait). Not from inside a hook: hooks are what it waits for
        (nor ``await task`` in a hook of that task)."""
        import asyncio
        if self._invalid:
            return True
        future = self._async.waiter()
        self._delivery.post(_Call(lambda: None))  # the delegate thread checks once now, then after every event
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._async.discard(future)
        return True

    def finish_tasks_and_invalidate(self) -> None:
        """No new tasks; running ones finish and are delivered; then ``did_become_invalid``."""
        if self._invalid or self._invalidating:
            return
        self._invalidating = "finish"
        self._delivery.post(_Call(self._after_event))

    def invalidate_and_cancel(self) -> None:
        """Cancel every task (CANCELLED); after their events, ``did_become_invalid``."""
        if self._invalid or self._invalidating:
            return
        self._invalidating = "cancel"
        for info in self._backend.tasks():
            if info.phase not in (Phase.DELIVERING, Phase.ACKNOWLEDGED):
                self._backend.cancel(info.id, False)
        self._delivery.post(_Call(self._after_event))

    def _become_invalid(self) -> None:
        self._invalid = True
        self._backend.detach(self._delivery)
        self._backend.close()  # first: when the hook runs, the identifier is free again
        self._delivery._hook("did_become_invalid", self, None)
        self._async.close()
        with self._delivery.cond:
            self._delivery.stopping = True
            self._delivery.cond.notify_all()

    def close(self) -> None:
        """Detach as if this process exited: transfers stop here and resume at the next launch
        (the daemon host keeps them running). Releases the identifier for another Session."""
        self._delivery.stop()  # joins the delegate thread (unless this is it)
        if not self._invalid:
            self._invalid = True
            self._backend.detach(self._delivery)
            self._backend.close()
        self._async.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.identifier!r} host={self.configuration.host}>"


@dataclasses.dataclass
class _TaskBlocks:
    """A SessionManager task's task-level blocks: in this process's memory only."""
    progress: Callable[..., Any] | None
    destination: Callable[..., Any] | None
    completion_handler: Callable[..., Any] | None
    file_path: str | None = None


_T = TypeVar("_T")
#: What a hook or block returns: its value, or (``async def``) an awaitable of it.
_MaybeAwaitable = Union[_T, Awaitable[_T]]
#: Where a finish block puts the file: a path, a directory, or None (no file).
_Destination = Union[str, "os.PathLike[str]", None]


class _ManagerMeta(type):
    """Starts delivery after the *whole* construction, a subclass ``__init__`` included."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        obj.session._start_delivery()
        return obj


class SessionManager(SessionDelegate, metaclass=_ManagerMeta):
    """AFURLSessionManager for Python: the Session's delegate, configured with blocks.

    Set the session-level blocks in ``__init__`` (of your subclass, as the seed does): delivery starts only after it
    returns, so no event can arrive before them. Task-level blocks given to :meth:`download_task` live in this
    process's memory only and die with it; after a relaunch only session-level blocks fire.

    The finish block returns a destination path (or None); the manager moves the
    file there. Check the status first, as the seed does::

        def destination(session, task, location):
            if task.response is None or task.response.status != 200:
                return None          # no file for a 404 page
            return os.path.join(documents, task.response.suggested_filename)
        manager.set_download_task_did_finish_downloading(destination)"""

    def __init__(self, configuration: Configuration | None = None) -> None:
        self._blocks: dict[str, Callable[..., Any] | None] = {}
        self._task_blocks: dict[int, _TaskBlocks] = {}
        self._task_blocks_lock = threading.Lock()
        self.session = Session(configuration or Configuration.default(), delegate=self, _deferred=True)

    # -- block setters (AFURLSessionManager names), typed with each hook's signature ----------
    def set_download_task_did_finish_downloading(
            self, fn: Callable[[Session, DownloadTask, str], _MaybeAwaitable[_Destination]] | None) -> None:
        """fn(session, task, location) -> where the file goes (moved there with :func:`move_to`, replacing a file
        of that name; a directory: the file keeps the response's suggested name), or None: no file."""
        self._set("finish", fn)

    def set_task_did_complete(self, fn: Callable[[Session, Task, TransferError | None], object] | None) -> None:
        """fn(session, task, error)."""
        self._set("complete", fn)

    def set_did_finish_events_for_background_session(self, fn: Callable[[Session], object] | None) -> None:
        """fn(session): call the completion handler saved by handle_events_for_background_url_session."""
        self._set("events", fn)

    def set_download_task_did_write_data(self, fn: Callable[[Session, DownloadTask, int, int, int], object] | None
                                         ) -> None:
        """fn(session, task, bytes_written, total_bytes_written, total_bytes_expected)."""
        self._set("write", fn)

    def set_task_did_send_body_data(self, fn: Callable[[Session, Task, int, int, int], object] | None) -> None:
        """fn(session, task, bytes_sent, total_bytes_sent, total_bytes_expected)."""
        self._set("send", fn)

    def set_task_did_receive_authentication_challenge(
            self, fn: Callable[[Session, Task, AuthChallenge], _MaybeAwaitable[_Answer]] | None) -> None:
        """fn(session, task, challenge) -> (AuthChallengeDisposition, Credential | None)."""
        self._set("challenge", fn)

    def set_session_did_become_invalid(self, fn: Callable[[Session, BaseException | None], object] | None
                                       ) -> None:
        """fn(session, error)."""
        self._set("invalid", fn)

    def set_task_is_waiting_for_connectivity(self, fn: Callable[..., None] | None) -> None:
        """fn(session, task): no response arrives; the task waits for connectivity (once per waiting period)."""
        self._set("waiting", fn)

    def set_task_will_begin_delayed_request(self, fn: Callable[..., Any] | None) -> None:
        """fn(session, task, request) -> (DelayedRequestDisposition, new request or None). Set it in ``__init__``:
        the engine asks only an app whose manager had it when the session started delivering."""
        self._set("renew", fn)

    def _renews_requests(self) -> bool:
        return self._blocks.get("renew") is not None

    def _set(self, name: str, fn: Callable[..., Any] | None) -> None:
        if fn is not None and not callable(fn):
            raise _invalid(f"expected a callable or None, not {type(fn).__name__}")
        if fn is not None and self.session._async.loop is None and _is_async_def(fn):
            raise _invalid(f"an async def block ({getattr(fn, '__name__', fn)!r}) needs the SessionManager created "
                           "inside a running asyncio event loop, where it runs")
        self._blocks[name] = fn

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a block; an ``async def`` one runs on the session's event loop while this (delegate) thread waits."""
        value = fn(*args)
        if isinstance(value, Awaitable):
            value = self.session._async.run(value, _running_hook(), lambda: self.session._delivery.stopping)
        return value

    def _block(self, name: str, *args: Any) -> Any:
        fn = self._blocks.get(name)
        return None if fn is None else self._call(fn, *args)

    # -- tasks ----------------------------------------------------------------------
    def _remember(self, task: Task, progress: Any, destination: Any, completion_handler: Any) -> None:
        given = [fn for fn in (progress, destination, completion_handler) if fn is not None]
        if not given:
            return
        if not all(callable(fn) for fn in given):
            raise _invalid(f"task blocks must be callables, not {[type(fn).__name__ for fn in given]}")
        if self.session.configuration.is_background:
            log.warning("task-level blocks given to background session %r live in this process only; after a "
                        "relaunch only the session-level blocks (set_...) fire", self.session.identifier)
        with self._task_blocks_lock:
            self._task_blocks[task.identifier] = _TaskBlocks(progress, destination, completion_handler)

    def download_task(self, request: str | Request, progress: Callable[[int, int], object] | None = None,
                      destination: Callable[[str, Response | None], _MaybeAwaitable[_Destination]] | None = None,
                      completion_handler: Callable[[Response | None, str | None,
                                                    TransferError | None], object] | None = None, *,
                      description: str | None = None) -> DownloadTask:
        """A suspended download task; optional task-level blocks (in memory only):
        progress(total_bytes_written, total_bytes_expected), destination(location, response) -> path,
        completion_handler(response, file_path, error)."""
        task = self.session.download_task(request, description=description)
        self._remember(task, progress, destination, completion_handler)
        return task

    def upload_task(self, request: str | Request, from_file: str | os.PathLike[str],
                    progress: Callable[[int, int], object] | None = None,
                    completion_handler: Callable[[Response | None, bytes | None,
                                                  TransferError | None], object] | None = None, *,
                    description: str | None = None) -> UploadTask:
        """A suspended upload task; completion_handler(response, response_data, error)."""
        task = self.session.upload_task(request, from_file, description=description)
        self._remember(task, progress, None, completion_handler)
        return task

    def _blocks_for(self, task: Task) -> _TaskBlocks | None:
        with self._task_blocks_lock:
            return self._task_blocks.get(task.identifier)

    # -- SessionDelegate, implemented with the blocks ------------------------------------------
    def download_task_did_finish_downloading(self, session: Session, task: DownloadTask, location: str) -> None:
        blocks = self._blocks_for(task)
        dest: Any = None
        if blocks is not None and blocks.destination is not None:
            dest = self._call(blocks.destination, location, task.response)
        elif self._blocks.get("finish") is not None:
            dest = self._block("finish", session, task, location)
        else:
            log.warning("task %s finished downloading but no destination block is set: the file is discarded "
                        "(set the session-level blocks in your SessionManager subclass's __init__, so that they "
                        "exist before the first event)", task.identifier)
        if dest is not None:
            response = task.response
            into_directory = os.path.isdir(dest) or os.fspath(dest).endswith(os.sep)
            dest = move_to(location, dest, exist_ok=True,
                           name=response.suggested_filename if response is not None and into_directory else None)
            if blocks is not None:
                blocks.file_path = dest

    def download_task_did_write_data(self, session: Session, task: DownloadTask, bytes_written: int,
                                     total_bytes_written: int, total_bytes_expected: int) -> None:
        blocks = self._blocks_for(task)
        if blocks is not None and blocks.progress is not None:
            self._call(blocks.progress, total_bytes_written, total_bytes_expected)
        self._block("write", session, task, bytes_written, total_bytes_written, total_bytes_expected)

    def task_did_send_body_data(self, session: Session, task: Task, bytes_sent: int,
                                total_bytes_sent: int, total_bytes_expected: int) -> None:
        blocks = self._blocks_for(task)
        if blocks is not None and blocks.progress is not None:
            self._call(blocks.progress, total_bytes_sent, total_bytes_expected)
        self._block("send", session, task, bytes_sent, total_bytes_sent, total_bytes_expected)

    def task_did_receive_challenge(self, session: Session, task: Task, challenge: AuthChallenge
                                   ) -> tuple[AuthChallengeDisposition, Credential | None]:
        answer = self._block("challenge", session, task, challenge)
        return (AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING, None) if answer is None else answer

    def task_did_complete(self, session: Session, task: Task, error: TransferError | None) -> None:
        with self._task_blocks_lock:
            blocks = self._task_blocks.pop(task.identifier, None)
        self._block("complete", session, task, error)
        if blocks is not None and blocks.completion_handler is not None:
            data = task.response_data if isinstance(task, UploadTask) else blocks.file_path
            self._call(blocks.completion_handler, task.response, data, error)

    def did_finish_events_for_background_session(self, session: Session) -> None:
        self._block("events", session)

    def did_become_invalid(self, session: Session, error: BaseException | None) -> None:
        self._block("invalid", session, error)

    def task_is_waiting_for_connectivity(self, session: Session, task: Task) -> None:
        self._block("waiting", session, task)

    def task_will_begin_delayed_request(self, session: Session, task: Task, request: Request
                                        ) -> tuple[DelayedRequestDisposition, Request | None]:
        answer = self._block("renew", session, task, request)
        return (DelayedRequestDisposition.CONTINUE_LOADING, None) if answer is None else answer


# ============================================================================
# 11. Wire: frames and codecs of the daemon socket
# ============================================================================
#
# daemon.sock carries JSON lines: requests {"op", "rid", args...} from the app, replies {"re": rid, "ok", "result" |
# "error"...} and events {"ev", ...} from the daemon. The operations and their arguments are _OPERATIONS (section 9);
# "hello", "ping", "shutdown" and "challenge_reply" are the socket's own.

#: Longest JSON-lines frame accepted on the daemon socket.
_MAX_FRAME = 64 << 20


def _proxy_to_wire(proxy: _Proxy | None) -> dict[str, Any] | None:
    if proxy is None:
        return None
    cred = proxy.credential  # over stdin or the 0700 socket into the daemon's memory, never to a disk
    return {"host": proxy.host, "port": proxy.port, "user": cred and cred.user, "password": cred and cred.password}


def _proxy_from_wire(wire: Mapping[str, Any] | None) -> _Proxy | None:
    if not wire:
        return None
    cred = Credential(wire["user"], wire["password"] or "") if wire.get("user") is not None else None
    return _Proxy(wire["host"], int(wire["port"]), cred)


def _config_to_wire(config: Configuration) -> dict[str, Any]:
    """A configuration as plain data, as the daemon receives it (on stdin, then in every hello): its proxies as the
    app resolved them, its TLS whole (a key password too: memory to memory). An ``ssl_context`` never travels:
    Session() refuses it with the daemon host."""
    wire = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    retry = {**dataclasses.asdict(config.retry), "status_forcelist": sorted(config.retry.status_forcelist)}
    del retry["attempts"]
    proxies = config.proxies
    wire.update(retry=retry, headers=[list(p) for p in config.headers.pairs()],
                relaunch_command=list(config.relaunch_command) if config.relaunch_command else None,
                ssl_context=None, tls=config.tls and dataclasses.asdict(config.tls),
                proxies=proxies and {"http": _proxy_to_wire(proxies.http), "https": _proxy_to_wire(proxies.https),
                                     "no": list(proxies.no_proxy)})
    return wire


def _config_from_wire(wire: Mapping[str, Any]) -> Configuration:
    values = {f.name: wire[f.name] for f in dataclasses.fields(Configuration) if f.name in wire}
    retry = dict(wire.get("retry") or {})
    retry["status_forcelist"] = frozenset(retry.get("status_forcelist", DEFAULT_RETRY_STATUSES))
    proxies, tls = wire.get("proxies"), wire.get("tls")
    values.update(retry=Retry(**retry), headers=Headers(tuple(p) for p in wire.get("headers", [])), ssl_context=None,
                  relaunch_command=tuple(wire["relaunch_command"]) if wire.get("relaunch_command") else None,
                  tls=TLS(**{**tls, "pinned_certificates_sha256": tuple(tls["pinned_certificates_sha256"])})
                  if tls else None,
                  proxies=_Proxies(_proxy_from_wire(proxies.get("http")), _proxy_from_wire(proxies.get("https")),
                                   tuple(proxies.get("no", ()))) if proxies else None,
                  secret_headers=_check_secret_names(wire.get("secret_headers"), "secret_headers"))
    return Configuration(**values)


def _event_to_wire(event: Any) -> dict[str, Any]:
    if isinstance(event, ProgressEvent):
        return {"ev": "progress", **event.__dict__}
    if isinstance(event, FinishedEvent):
        return {"ev": "finish", "id": event.task_id, "location": event.location,
                "info": event.info and event.info.to_wire()}
    if isinstance(event, CompletedEvent):
        err = event.error
        return {"ev": "complete", "id": event.task_id, "error": err and err._to_record(),
                "resume_data": err and _BYTES.encode(err.resume_data), "info": event.info and event.info.to_wire()}
    if isinstance(event, BacklogEnd):
        return {"ev": "backlog_end", "had_events": event.had_events}
    if isinstance(event, WaitingEvent):
        return {"ev": "waiting", "id": event.task_id, "info": event.info and event.info.to_wire()}
    raise TypeError(f"cannot send {event!r}")


def _event_from_wire(msg: Mapping[str, Any]) -> Any:
    ev = msg["ev"]
    info = TaskInfo.from_wire(msg["info"]) if msg.get("info") else None
    if ev == "progress":
        return ProgressEvent(msg["task_id"], msg["bytes_written"], msg["total_written"], msg["total_expected"],
                             msg.get("upload", False))
    if ev == "finish":
        return FinishedEvent(msg["id"], msg["location"], info)
    if ev == "complete":
        err = TransferError._from_record(msg["error"]) if msg.get("error") else None
        if err is not None:
            err.resume_data = _BYTES.decode(msg.get("resume_data"))
        return CompletedEvent(msg["id"], err, info)
    if ev == "backlog_end":
        return BacklogEnd(bool(msg["had_events"]))
    if ev == "waiting":
        return WaitingEvent(msg["id"], info)
    raise ValueError(f"unknown event {ev!r}")


def _challenge_to_wire(ch: AuthChallenge) -> dict[str, Any]:
    return {"space": dataclasses.asdict(ch.protection_space), "previous_failure_count": ch.previous_failure_count,
            "failure_response": ch.failure_response._to_record() if ch.failure_response else None}


def _challenge_from_wire(d: Mapping[str, Any]) -> AuthChallenge:
    return AuthChallenge(ProtectionSpace(**d["space"]), int(d["previous_failure_count"]),
                         Response._from_record(d.get("failure_response")))


def _answer_to_wire(answer: _Answer) -> dict[str, Any]:
    disposition, cred = answer
    wire: dict[str, Any] = {"disposition": disposition.value}
    if cred is not None:  # over the socket into the daemon's memory only
        wire["credential"] = {"user": cred.user, "password": cred.password, "persistence": cred.persistence.value}
    return wire


def _answer_from_wire(msg: Mapping[str, Any]) -> _Answer:
    try:
        disposition = AuthChallengeDisposition(msg["disposition"])
        c = msg.get("credential")
        cred = Credential(c["user"], c["password"], CredentialPersistence(c["persistence"])) if c else None
    except (KeyError, ValueError, TypeError, InvalidArgumentError):
        return AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING, None
    return disposition, cred


def _renewal_to_wire(answer: _Renewal) -> dict[str, Any]:
    disposition, request = answer  # a new request's secret headers go into the daemon's memory only
    return {"disposition": disposition.value, "request": _request_to_wire(request) if request is not None else None}


def _renewal_from_wire(msg: Mapping[str, Any]) -> _Renewal:
    try:
        request = _request_from_wire(msg["request"]) if msg.get("request") else None
        return _checked_renewal((DelayedRequestDisposition(msg["disposition"]), request))
    except (KeyError, ValueError, TypeError, BGSessionError):
        return DelayedRequestDisposition.CONTINUE_LOADING, None


def _error_to_wire(err: BaseException) -> dict[str, Any]:
    """A failed operation's reply fields: the error's class survives the socket."""
    if isinstance(err, TransferError):
        return {"error": "transfer", "code": int(err.code), "message": err.message}
    if isinstance(err, InvalidArgumentError):
        return {"error": "invalid", "message": str(err)}
    if isinstance(err, SessionInvalidatedError):
        return {"error": "closed", "message": str(err)}
    return {"error": "failed", "message": f"{type(err).__name__}: {err}"}


def _error_from_wire(reply: Mapping[str, Any]) -> BGSessionError:
    kind, message = reply.get("error"), reply.get("message", "")
    if kind == "transfer":
        return TransferError(ErrorCode(reply.get("code", -1)), message)
    if kind == "invalid":
        return InvalidArgumentError(message)
    if kind == "closed":
        return SessionInvalidatedError(message)
    return BGSessionError(f"daemon: {message}")


_MSG_DONTWAIT: int | None = getattr(socket, "MSG_DONTWAIT", None)


class _Connection:
    """One JSON-lines socket. ``send`` never blocks the caller: a frame goes out at once from the caller's thread when
    the socket takes it whole and nothing is queued before it (an acknowledgement's round trip then costs no thread
    hop); whatever the socket cannot take now, and everything behind it, goes out in order from a writer thread."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.settimeout(None)  # blocking (an app's socket.setdefaulttimeout must not reach it); sends below never wait
        self.sock = sock
        self.reader = sock.makefile("rb")
        self._out: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._sending = False  # a thread is writing to the socket: everything else waits in _out, in order
        self.closed = False
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-writer", daemon=True)
        self._writer.start()

    def send(self, msg: Mapping[str, Any]) -> None:
        data = _dumps(msg)
        with self._cond:
            if self.closed:
                raise _SinkGone()
            if self._out or self._sending or _MSG_DONTWAIT is None:
                self._out.append(data)
                self._cond.notify()
                return
            self._sending = True
        sent = 0
        try:
            sent = self.sock.send(data, _MSG_DONTWAIT)
        except OSError:  # full (BlockingIOError) or broken: the writer thread sends it, or meets the error
            pass
        finally:
            with self._cond:
                self._sending = False
                if sent < len(data):
                    self._out.appendleft(data[sent:])
                if self._out:
                    self._cond.notify()

    def read(self) -> dict[str, Any] | None:
        """The next frame, or None at end of stream."""
        try:
            line = self.reader.readline(_MAX_FRAME)
        except (OSError, ValueError):
            return None
        if not line or not line.endswith(b"\n"):
            return None
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("frame is not an object")
        return msg

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while (not self._out or self._sending) and not self.closed:
                    self._cond.wait()
                if self.closed and not self._out:
                    return
                batch = b"".join(self._out)
                self._out.clear()
                self._sending = True
            try:
                self.sock.sendall(batch)
            except OSError:
                self.close()
                return
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(OSError):
            self.reader.close()
        if threading.current_thread() is not self._writer:
            self._writer.join(5.0)  # owned: it exits once closed (its socket is shut down)


# ============================================================================
# 12. Daemon: the daemon host
# ============================================================================
#
# The engine runs in `bgsession.py daemon --session ID --directory DIR`, a detached interpreter started on
# demand; apps talk to it over daemon.sock in the 0700 session directory. It keeps transferring
# while no app is attached, relaunches the app when events wait, and exits when idle.

_SOCKET_NAME = "daemon.sock"
_PID_NAME = "daemon.pid"
_DAEMON_LOG = "daemon.log"
_APP_LOCK_NAME = "app.lock"
_START_LOCK_NAME = "daemon.start"
#: The daemon's process name (Linux comm: at most 15 characters).
DAEMON_PROCESS_NAME = "bgsessiond"
#: Seconds an app waits for a daemon it started to accept connections.
DAEMON_START_TIMEOUT = 15.0
#: Seconds a client keeps trying to reach a daemon that went away.
DAEMON_RECONNECT_TIMEOUT = 30.0
#: A finished task's events wait at most this long for other transfers to end before a relaunch (as iOS wakes an app
#: once its session's transfers are done), unless someone is watching: a client connected while no app is attached
#: (``bgsession wait``, ``download --wait``) gets its outcomes as they happen.
RELAUNCH_BATCH_WINDOW = 30.0
#: Relaunches of an app that acknowledged nothing back off: base * 2**(failures-1), capped.
DEFAULT_RELAUNCH_BACKOFF = 1.0
RELAUNCH_BACKOFF_MAX = 600.0
#: At most this many relaunches an hour.
RELAUNCH_MAX_PER_HOUR = 20
#: Relaunches in a row that acknowledge nothing before the daemon stops relaunching (a delivery that cannot succeed
#: must end, not loop): the events wait in the journal for the app's next start, and the daemon exits when idle.
RELAUNCH_MAX_FAILURES = 8
#: daemon.log is rotated past this size (the previous one kept as daemon.log.1): at most about twice this on disk.
DAEMON_LOG_MAX_BYTES = 1 << 20


def _process_start_token(pid: int) -> str | None:
    """Start time of *pid* in clock ticks since boot (Linux), to tell a live daemon from a reused pid."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
        return data[data.rindex(b")") + 2:].split()[19].decode("ascii")
    return None


def _pid_alive(pid: int, token: str | None = None) -> bool:
    """Proof, not guess: the pid exists, is not a zombie, and (where the OS tells) started when the pid file says."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # not ours: not our daemon
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        if data[data.rindex(b")") + 2:].startswith(b"Z"):
            # the main thread exited; the process is gone once its other threads are
            return len(os.listdir(f"/proc/{pid}/task")) > 1
    current = _process_start_token(pid)
    return token is None or current is None or current == token


def _read_pid_file(directory: str) -> tuple[int | None, str | None]:
    with contextlib.suppress(OSError, ValueError, IndexError), open(os.path.join(directory, _PID_NAME),
                                                                     encoding="ascii") as f:
        parts = f.read().split()
        return int(parts[0]), (parts[1] if len(parts) > 1 and parts[1] != "-" else None)
    return None, None


def _socket_address(directory: str) -> tuple[str, int | None]:
    """A connectable path for the daemon socket (sun_path is ~104 bytes; long directories go
    through /proc/self/fd on Linux). Returns (path, directory fd to close after connect)."""
    path = os.path.join(directory, _SOCKET_NAME)
    if len(path.encode()) < 100:
        return path, None
    if sys.platform.startswith("linux"):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        return f"/proc/self/fd/{fd}/{_SOCKET_NAME}", fd
    raise JournalError(f"session directory {directory} is too long for a Unix socket path; use a shorter one",
                       directory)


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process on the other end of a Unix socket, where the OS tells it."""
    if hasattr(socket, "SO_PEERCRED"):
        import struct
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    return None


class _RemoteSink:
    """The attached app, seen from the daemon's engine: events and questions (challenges, delayed
    requests) go over its connection; each answer comes back with the question's ``cid``."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self._waiters: dict[int, tuple[_Waiter, Callable[[Mapping[str, Any]], Any]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def post(self, event: Any) -> None:
        with contextlib.suppress(_SinkGone):  # durable events are sent again at the next attach
            self.conn.send(_event_to_wire(event))

    def challenge(self, task_id: int, challenge: AuthChallenge, control: _Control | None = None) -> _Answer:
        return cast(_Answer, self._ask(control, _answer_from_wire, lambda cid: {
            "ev": "challenge", "cid": cid, "id": task_id, "challenge": _challenge_to_wire(challenge)}))

    def renew(self, task_id: int, request: Request, control: _Control | None = None) -> _Renewal:
        return cast(_Renewal, self._ask(control, _renewal_from_wire, lambda cid: {
            "ev": "delayed_request", "cid": cid, "id": task_id, "request": _request_to_wire(request)}))

    def _ask(self, control: _Control | None, decode: Callable[[Mapping[str, Any]], Any],
             question: Callable[[int], Mapping[str, Any]]) -> Any:
        waiter = _Waiter()
        with self._lock:
            cid = next(self._ids)
            self._waiters[cid] = (waiter, decode)
        try:
            self.conn.send(question(cid))
            return waiter.wait(control, lambda: self.conn.closed)
        finally:
            with self._lock:
                self._waiters.pop(cid, None)

    def answer(self, cid: int, msg: Mapping[str, Any]) -> None:
        with self._lock:
            entry = self._waiters.get(cid)
        if entry is not None:
            waiter, decode = entry
            waiter.set(decode(msg))

    def gone(self) -> None:
        with self._lock:
            waiters = [waiter for waiter, _ in self._waiters.values()]
        for waiter in waiters:
            waiter.set(None)  # the worker treats it as gone


class _Relauncher:
    """Runs the app's ``relaunch_command`` (with BGSESSION_BACKGROUND_EVENTS) when events or a
    challenge wait and no app is attached or starting; backs off from an app that acknowledges
    nothing, and launches at most RELAUNCH_MAX_PER_HOUR times an hour."""

    def __init__(self, directory: str, engine: _Engine) -> None:
        self.directory, self.engine = directory, engine
        self.child: subprocess.Popen | None = None  # type: ignore[type-arg]
        self._child_acks = self._failures = 0
        self._next_at = 0.0
        self._times: collections.deque[float] = collections.deque()

    @property
    def gave_up(self) -> bool:
        return self._failures >= RELAUNCH_MAX_FAILURES

    def tick(self, watched: bool = False) -> None:
        """*watched*: a client is connected (an app attached, or an observer such as ``bgsession wait``)."""
        self._reap()
        if self._failures and self.child is None and self.engine.status().acks != self._child_acks:
            self._failures = 0  # an app (started by the user) acknowledged events: relaunching works again
        self._maybe_launch(watched)

    def _backoff(self) -> float:
        return min(RELAUNCH_BACKOFF_MAX, self.engine.config.relaunch_backoff * 2.0 ** (self._failures - 1))

    def _reap(self) -> None:
        child = self.child
        if child is None or child.poll() is None:
            return
        status = self.engine.status()
        log.info("relaunched app (pid %s) exited with %s", child.pid, child.returncode)  # (the test kit reads this)
        if status.acks == self._child_acks and not status.attached:
            self._failures += 1
            self._next_at = time.monotonic() + self._backoff()
            if self.gave_up:
                log.error("relaunched app (pid %s) exited with %s without acknowledging any event, %d times in a "
                          "row: no more relaunches; the events wait in the journal for the app's next start",
                          child.pid, child.returncode, self._failures)
            else:
                log.warning("relaunched app (pid %s) exited with %s without acknowledging any event; next "
                            "relaunch in %.1fs", child.pid, child.returncode, self._backoff())
        else:
            self._failures = 0
        self.child = None

    @staticmethod
    def _due(status: _EngineStatus, watched: bool = False) -> bool:
        """Events (once the other transfers ended, or waited long enough, or at once while someone watches) or a
        challenge wait, and no app is here."""
        waited = status.running == 0 or status.backlog_age >= RELAUNCH_BATCH_WINDOW or watched
        return not status.attached and (status.waiting_challenges > 0 or (status.backlog > 0 and waited))

    def _app_present(self) -> bool:
        """True while an app holds app.lock (it may be starting and about to attach)."""
        if fcntl is None:
            return False
        try:
            fd = os.open(os.path.join(self.directory, _APP_LOCK_NAME), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # (also drops the probe's lock)
        return False

    def _maybe_launch(self, watched: bool) -> None:
        config = self.engine.config
        cmd = config.relaunch_command
        now = time.monotonic()
        if not cmd or self.child is not None or now < self._next_at or self.gave_up:
            return
        # an app opening the session (holding app.lock) gets the events: no second app. Asked
        # last: the state answers "no" from memory on most ticks, without touching the lock file
        if not self._due(self.engine.status(), watched) or self._app_present():
            return
        while self._times and now - self._times[0] > 3600:
            self._times.popleft()
        if len(self._times) >= RELAUNCH_MAX_PER_HOUR:
            return
        env = {**os.environ, BACKGROUND_EVENTS_ENV: config.identifier or ""}
        import subprocess
        try:
            self.child = subprocess.Popen(list(cmd), env=env, cwd=config.working_directory or None,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            self._failures += 1
            self._next_at = now + self._backoff()
            log.error("cannot relaunch the app with %r: %s", cmd, err)
            return
        self._child_acks = self.engine.status().acks
        self._times.append(now)
        log.info("relaunched the app for background events: pid %s (%s)", self.child.pid, " ".join(cmd))


class _DaemonServer:
    """The daemon: owns the session's engine, serves apps on daemon.sock (one thread per
    connection, each joined on shutdown), relaunches the app, exits when idle."""

    def __init__(self, directory: str, config: Configuration) -> None:
        self.directory = directory
        self.engine = _Engine(config, durable_create=True)  # takes the session lock: one daemon per directory
        self.relauncher = _Relauncher(directory, self.engine)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.clients: dict[_Connection, threading.Thread] = {}
        self.idle_since: float | None = time.monotonic()
        self.sock_path = os.path.join(directory, _SOCKET_NAME)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _unlink_quietly(self.sock_path)  # stale: we hold the session lock, so its daemon is dead
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(_SOCKET_NAME if os.getcwd() == directory else self.sock_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.sock_path, _FILE_MODE)
        self.listener.listen(16)
        self.listener.settimeout(0.25)
        token = _process_start_token(os.getpid())
        _atomic_write(os.path.join(directory, _PID_NAME), f"{os.getpid()} {token or '-'}\n".encode())
        log.info("daemon %s serving %s (pid %s)", config.identifier, directory, os.getpid())

    def serve(self) -> int:
        try:
            while not self.stop.is_set():
                try:
                    self._accept(self.listener.accept()[0])
                except socket.timeout:
                    pass  # a tick: the relauncher and the idle timer run at least every 0.25 s
                except OSError as err:
                    if self.stop.is_set():
                        break
                    log.warning("accept failed: %s", err)
                    if err.errno in EXHAUSTED_ERRNOS:
                        self.stop.wait(0.25)  # out of descriptors: a pause, not a busy loop
                with self.lock:
                    watched = bool(self.clients)
                self.relauncher.tick(watched)
                self._rotate_log()
                if self._idle_expired():
                    log.info("idle for %.1fs with nothing to do: exiting", self.engine.config.daemon_idle_timeout)
                    break
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        if _read_pid_file(self.directory)[0] == os.getpid():
            _unlink_quietly(os.path.join(self.directory, _PID_NAME))
        if os.path.exists(self.sock_path):
            _unlink_quietly(self.sock_path)
        with self.lock:
            clients = list(self.clients.items())
        for conn, _ in clients:
            conn.close()  # its thread's read ends; a request it serves fails once the engine is closed
        self.engine.close()
        for _, thread in clients:
            thread.join(30.0)
        log.info("daemon exited")

    def _rotate_log(self) -> None:
        """Keep daemon.log (this process's stdout and stderr, which relaunched apps inherit) under
        DAEMON_LOG_MAX_BYTES: past it, it becomes daemon.log.1 (replacing the previous one) and a new one starts."""
        path = os.path.join(self.directory, _DAEMON_LOG)
        try:
            st = os.fstat(2)
            if st.st_size <= DAEMON_LOG_MAX_BYTES or not os.path.samestat(st, os.stat(path)):
                return  # small, or stderr is not the session's log (a daemon run by hand)
            sys.stdout.flush()
            sys.stderr.flush()
            os.replace(path, path + ".1")
            fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        except OSError as err:
            log.warning("cannot rotate %s: %s", path, err)
            return
        log.info("daemon.log rotated; the previous one is daemon.log.1")

    def _busy(self) -> bool:
        """Work only this daemon can do: transfers, tasks waiting for their earliest begin date (nobody else would start
        them), a challenge waiting for an answer, and events waiting for an app -- the last only with a
        relaunch_command it has not given up on. Without one it cannot bring an app: the events wait in the journal
        for the daemon the next attach starts (an idle daemon must not live on for an app that may never come
        back)."""
        status = self.engine.status()
        relaunches = bool(self.engine.config.relaunch_command) and not self.relauncher.gave_up
        return bool(status.running or status.scheduled or status.canceling or status.waiting_challenges
                    or (status.backlog and relaunches))

    def _idle_expired(self) -> bool:
        with self.lock:
            has_clients = bool(self.clients)
        if has_clients or self.relauncher.child is not None or self._busy():
            self.idle_since = None
            return False
        self.idle_since = self.idle_since or time.monotonic()
        return time.monotonic() - self.idle_since >= self.engine.config.daemon_idle_timeout

    def _accept(self, sock: socket.socket) -> None:
        uid = _peer_uid(sock)
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from uid %s", uid)
            sock.close()
            return
        sock.settimeout(None)
        conn = _Connection(sock, "bgsession-daemon-client")
        thread = threading.Thread(target=self._serve_client, args=(conn,), daemon=True, name="bgsession-daemon-client")
        with self.lock:
            self.clients[conn] = thread
        thread.start()

    def _serve_client(self, conn: _Connection) -> None:
        sink: _RemoteSink | None = None
        try:
            while not self.stop.is_set():
                try:
                    msg = conn.read()
                except ValueError as err:
                    log.warning("dropping a client that sent a bad frame: %s", err)
                    break
                if msg is None:
                    break
                op = msg.get("op")
                if op == "challenge_reply" or op == "delayed_request_reply":
                    if sink is not None:
                        sink.answer(int(msg["cid"]), msg)
                    continue
                try:
                    result, sink = self._handle(conn, sink, msg)
                    reply: dict[str, Any] = {"re": msg.get("rid"), "ok": True, "result": result}
                except (BGSessionError, OSError, KeyError, TypeError, ValueError) as err:
                    if not isinstance(err, (TransferError, InvalidArgumentError, SessionInvalidatedError)):
                        log.exception("request %r failed", msg.get("op"))
                    reply = {"re": msg.get("rid"), "ok": False, **_error_to_wire(err)}
                try:
                    conn.send(reply)
                except _SinkGone:
                    break
        finally:
            if sink is not None:
                self.engine.detach(sink)
                sink.gone()
            with self.lock:
                self.clients.pop(conn, None)
            conn.close()

    def _handle(self, conn: _Connection, sink: _RemoteSink | None, msg: Mapping[str, Any]
                ) -> tuple[Any, _RemoteSink | None]:
        """One request: the socket's own operations, or a row of _OPERATIONS served by the engine."""
        op = msg.get("op")
        if op == "hello":
            if msg.get("version") != JOURNAL_VERSION:
                raise InvalidArgumentError(f"client speaks protocol {msg.get('version')}, daemon {JOURNAL_VERSION}")
            if msg.get("config"):
                self.engine.configure(_config_from_wire(msg["config"]))
            return {"pid": os.getpid(), "version": __version__}, sink
        if op == "ping":
            return "pong", sink
        if op == "shutdown":
            self.stop.set()
            return None, sink
        if op == "attach":
            new_sink = _RemoteSink(conn)
            return _serve_operation(self.engine, op, msg, new_sink), new_sink
        if op == "detach":
            return _serve_operation(self.engine, op, msg, sink), None
        return _serve_operation(self.engine, op, msg, sink), sink


_SERVICE_CONFIG = "service.json"


def _config_at_rest(config: Configuration) -> dict[str, Any]:
    """What the login service keeps on disk of a configuration: everything but secrets (credential headers are
    renewed through the app, which is relaunched for a challenge, never stored)."""
    wire = _config_to_wire(config)
    wire["headers"] = [[k, v] for k, v in config.headers.pairs() if k.lower() not in _SECRET_HEADERS]
    return wire


def _read_config_at_rest(directory: str) -> Configuration:
    path = os.path.join(directory, _SERVICE_CONFIG)
    raw = _read_if_exists(path)
    if raw is None:
        raise FileNotFoundError(errno.ENOENT, f"no {_SERVICE_CONFIG}: is the login service installed?", path)
    return _config_from_wire(json.loads(raw))


def _name_process() -> None:
    """Give the daemon a name ``ps -e``, ``top`` and ``pgrep bgsessiond`` show (Linux; its command line already
    names bgsession.py, ``daemon`` and the session)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(DAEMON_PROCESS_NAME)


def _serve_in_foreground(directory: str, config: Configuration) -> int:
    """The login service's daemon: no fork (the service manager supervises it), log to stderr (the journal, or
    daemon.log under launchd); a daemon that already serves the session makes this one exit at once."""
    os.chdir(directory)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"bgsession-daemon[{os.getpid()}] %(levelname)s %(message)s")
    try:
        server = _DaemonServer(directory, config)
    except TransferError as err:
        if err.code is not ErrorCode.BACKGROUND_SESSION_IN_USE:
            raise
        log.info("another daemon serves %s; nothing to do", directory)
        return 0
    except JournalError as err:
        log.error("%s", err)
        return 4
    stop = server.stop

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    import signal
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return server.serve()


def _run_daemon(directory: str, config_fd: int | None = None, service: bool = False) -> int:
    """Entry of ``bgsession.py daemon --session ID --directory DIR``: read the configuration from stdin
    (never from argv: it may hold secrets), detach, serve until idle. *service*: started by the login
    service (``LoginService``): the configuration is the one it keeps at rest, without secrets, and
    the daemon stays in the foreground, as systemd and launchd expect."""
    directory = os.path.abspath(directory)
    _name_process()
    try:
        if service:
            config = _read_config_at_rest(directory)
        else:
            raw = sys.stdin.buffer.readline(_MAX_FRAME) if config_fd is None else os.read(config_fd, _MAX_FRAME)
            config = _config_from_wire(json.loads(raw))
    except (ValueError, KeyError, TypeError, OSError) as err:
        print(f"bgsession daemon: bad configuration {'in ' + directory if service else 'on stdin'}: {err}",
              file=sys.stderr)
        return 2
    if service:
        return _serve_in_foreground(directory, config)
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        # The starter waits for this parent, which exits once the daemon (reparented to init)
        # reports that it serves, or why it cannot: 0 ok, 4 unreadable session state, 1 other.
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            status = ready.read()
        if status.startswith(b"ok"):
            os._exit(0)
        sys.stderr.write(status.decode("utf-8", "replace") or "bgsession daemon died while starting\n")
        sys.stderr.flush()
        os._exit(4 if status.startswith(b"journal") else 1)
    os.close(ready_r)
    os.setsid()
    os.chdir(directory)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s bgsession-daemon[{os.getpid()}] %(levelname)s %(message)s")

    def report(status: str) -> None:
        with contextlib.suppress(OSError):
            os.write(ready_w, status.encode("utf-8") + b"\n")
            os.close(ready_w)

    try:
        server = _DaemonServer(directory, config)
    except (BGSessionError, OSError) as err:
        if isinstance(err, TransferError) and err.code is ErrorCode.BACKGROUND_SESSION_IN_USE:
            log.info("another daemon owns %s; exiting", directory)
            report("ok (another daemon serves)")
            return 0
        report(f"{'journal' if isinstance(err, JournalError) else 'error'}: {err}")
        return 1
    report("ok")

    def on_signal(signum: int, frame: Any) -> None:
        server.stop.set()  # handlers only record; the loop acts

    import signal
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return server.serve()


#: How a daemon loads this very file (wherever an app keeps it) as a module, from cached bytecode:
#: run as a script it would be compiled at every start (~60 ms and ~12 MiB more peak memory); run with
#: ``-m`` its directory would come before the standard library on sys.path, where an app's own
#: ``logging.py`` or ``http/`` would shadow it. One line, so that a service unit can hold it.
_DAEMON_BOOT = ("import sys, importlib.util as u; s = u.spec_from_file_location('bgsession', sys.argv[1]); "
                "m = u.module_from_spec(s); sys.modules['bgsession'] = m; s.loader.exec_module(m); "
                "sys.exit(m._main(sys.argv[2:]))")


def _self_command(*args: str) -> list[str]:
    """``bgsession.py <args>`` as a command line: this very file, through the cached-bytecode loader."""
    return [sys.executable, "-c", _DAEMON_BOOT, os.path.abspath(__file__), *args]


def _daemon_command(config: Configuration, service: bool = False) -> list[str]:
    """The daemon's command line; it names bgsession.py, the session and its directory, as ``ps`` shows them."""
    assert config.directory is not None
    return _self_command("daemon", "--session", config.identifier or "", "--directory", config.directory,
                         *(["--service"] if service else []))


def _try_connect(directory: str) -> socket.socket | None:
    """A connection to the daemon serving *directory*, or None. The daemon's uid is checked as it checks ours: a
    socket another user made (a planted one) never gets a request, which may carry secrets."""
    path, dir_fd = _socket_address(directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    uid = _peer_uid(sock)
    if uid is not None and uid != os.getuid():
        sock.close()
        raise TransferError(ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED, f"the process serving "
                            f"{os.path.join(directory, _SOCKET_NAME)} runs as uid {uid}, not as this user (uid "
                            f"{os.getuid()}): refusing to talk to it")
    return sock


def _connect_daemon(config: Configuration, start: bool = True) -> socket.socket:
    """Connect to the session's daemon, starting one if none runs (idempotent under a lock); *start* False: only
    to one that runs (else TransferError BACKGROUND_SESSION_WAS_DISCONNECTED)."""
    assert config.directory is not None
    directory = config.directory
    sock = _try_connect(directory)
    if sock is not None:
        return sock
    if not start:
        raise TransferError(ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED, f"no bgsession daemon serves {directory}")
    start_fd = _open_private(os.path.join(directory, _START_LOCK_NAME), os.O_RDWR | os.O_CREAT)
    try:
        if fcntl is not None:
            fcntl.flock(start_fd, fcntl.LOCK_EX)  # one starter at a time
        sock = _try_connect(directory)
        if sock is not None:
            return sock
        log_fd = _open_private(os.path.join(directory, _DAEMON_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        env = {k: v for k, v in os.environ.items() if k != BACKGROUND_EVENTS_ENV}
        import subprocess
        try:
            proc = subprocess.Popen(_daemon_command(config), stdin=subprocess.PIPE,
                                    stdout=log_fd, stderr=log_fd, env=env, cwd=directory, start_new_session=True)
        finally:
            os.close(log_fd)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.write(_dumps(_config_to_wire(config)))
            proc.stdin.close()
        code = proc.wait(DAEMON_START_TIMEOUT)  # returns when the daemon serves, or could not start
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        delay = 0.005
        while time.monotonic() < deadline:
            sock = _try_connect(directory)
            if sock is not None:
                return sock
            if code != 0:
                break
            time.sleep(delay)  # a daemon that just reported ready may still be listening on the old path
            delay = min(0.1, delay * 2)
        tail = ""
        with contextlib.suppress(OSError, IndexError), open(os.path.join(directory, _DAEMON_LOG), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 2000))
            tail = f.read().decode("utf-8", "replace").strip().splitlines()[-1:][0]
        if code == 4:
            raise JournalError(tail.split("journal: ", 1)[-1] or f"cannot read the session state in {directory}",
                               directory)
        raise TransferError(ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED, f"the bgsession daemon for {directory} did "
                            "not start" + (f": {tail}" if tail else f" (see {os.path.join(directory, _DAEMON_LOG)})"))
    finally:
        os.close(start_fd)


def _systemd_escape(text: str) -> str:
    """*text* where a unit file expands specifiers (%) and variables ($)."""
    return text.replace("%", "%%").replace("$", "$$")


def _systemd_quote(arg: str) -> str:
    """One argument of a unit's ExecStart or path setting: double-quoted, C escapes, specifiers escaped."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + _systemd_escape(escaped) + '"'


class LoginService:
    """Starts a background session's daemon at login, so that unfinished transfers resume after a reboot or a
    logout and the app is relaunched for their events with nothing else run: a systemd user unit on Linux, a
    launchd agent on macOS (the BITS job that outlives a logout). The daemon starts as ``bgsession.py daemon
    --service``: in the foreground, with the configuration kept at rest in the session directory
    (``service.json``, 0600, no secrets; an app that attaches brings its full configuration, as always). On
    Linux the user's units run at boot only with lingering enabled (``loginctl enable-linger``); otherwise at
    login. *home* and *platform* default to this user's and this machine's (tests set them)."""

    def __init__(self, configuration: Configuration, *, home: str | None = None,
                 platform: str | None = None) -> None:
        if configuration.host != "daemon" or not configuration.identifier or configuration.directory is None:
            raise InvalidArgumentError("a login service starts a daemon: it needs a background configuration with "
                                       "host='daemon'")
        self.configuration = configuration
        self.home = home or os.path.expanduser("~")
        self.platform = platform or sys.platform
        if not self.platform.startswith(("linux", "darwin")):
            raise InvalidArgumentError(f"no login service on {self.platform}: systemd (Linux) and launchd (macOS) "
                                       "are supported")
        #: The unit's (or the agent's) name: ``bgsession-<identifier>.service`` or ``org.bgsession.<identifier>``
        #: (an identifier is made of characters both allow).
        self.name = (f"org.bgsession.{configuration.identifier}" if self.launchd
                     else f"bgsession-{configuration.identifier}.service")

    @property
    def launchd(self) -> bool:
        return self.platform == "darwin"

    @property
    def path(self) -> str:
        """Where the unit (or the agent's property list) is written."""
        if self.launchd:
            return os.path.join(self.home, "Library", "LaunchAgents", self.name + ".plist")
        config_home = os.environ.get("XDG_CONFIG_HOME") if self.home == os.path.expanduser("~") else None
        return os.path.join(config_home or os.path.join(self.home, ".config"), "systemd", "user", self.name)

    @property
    def command(self) -> list[str]:
        """The command the service manager runs (systemd's ExecStart, launchd's ProgramArguments)."""
        return _daemon_command(self.configuration, service=True)

    def text(self) -> str:
        """The unit file (systemd) or property list (launchd) :meth:`install` writes."""
        directory = self.configuration.directory
        assert directory is not None
        if self.launchd:
            import plistlib  # (only here: an import every start would pay for)
            return plistlib.dumps({
                "Label": self.name, "ProgramArguments": self.command, "RunAtLoad": True,
                "WorkingDirectory": directory, "ProcessType": "Background",
                "StandardOutPath": os.path.join(directory, _DAEMON_LOG),
                "StandardErrorPath": os.path.join(directory, _DAEMON_LOG)}).decode("utf-8")
        return (f"# Written by bgsession {__version__} (`bgsession service install`): starts the daemon of\n"
                f"# background session {self.configuration.identifier!r} at login; it resumes unfinished transfers\n"
                "# and exits when idle. Remove with `bgsession service uninstall` (or LoginService(...).uninstall()).\n"
                "[Unit]\n"
                f"Description=bgsession daemon of session {_systemd_escape(self.configuration.identifier or '')}\n"
                "\n[Service]\nType=simple\n"
                f"WorkingDirectory={_systemd_escape(directory)}\n"  # (the rest of the line, unquoted)
                f"ExecStart={' '.join(_systemd_quote(arg) for arg in self.command)}\n"
                "Restart=on-failure\nRestartSec=30\n"
                "\n[Install]\nWantedBy=default.target\n")

    def install(self, enable: bool = True) -> list[str]:
        """Write the configuration at rest and the unit (durably), and with *enable* ask the service manager to
        start it at every login; returns what was done or could not be, one line each (a service manager that
        cannot be reached, as in a container, is reported, not raised: the unit is in place for the next login)."""
        directory = self.configuration.directory
        assert directory is not None
        _claim_session_dir(directory, self.configuration.identifier)
        _atomic_write(os.path.join(directory, _SERVICE_CONFIG), _dumps(_config_at_rest(self.configuration)))
        _makedirs(os.path.dirname(self.path), 0o755)
        _atomic_write(self.path, self.text().encode("utf-8"))
        done = [f"wrote {self.path}"]
        if enable:
            done.append(self._manage("enable"))
        return done

    def uninstall(self) -> list[str]:
        """Disable and remove the unit and the configuration at rest; the session and its transfers stay."""
        done = [self._manage("disable")] if os.path.exists(self.path) else []
        for path in (self.path, os.path.join(self.configuration.directory or "", _SERVICE_CONFIG)):
            with contextlib.suppress(FileNotFoundError):
                _vfs.unlink(path)
                done.append(f"removed {path}")
        return done or [f"no login service for session {self.configuration.identifier!r}"]

    def status(self) -> dict[str, Any]:
        """``installed`` (the unit is there), ``current`` (and is what :meth:`text` writes today), ``enabled``
        (the service manager's answer, or None if it cannot be asked), ``running`` (a daemon serves the session)."""
        current = _read_if_exists(self.path)
        directory = self.configuration.directory or ""
        sock = _try_connect(directory) if os.path.isdir(directory) else None
        if sock is not None:
            sock.close()
        enabled = None
        if current is not None:
            answer = self._run(["launchctl", "print", f"gui/{os.getuid()}/{self.name}"] if self.launchd
                               else ["systemctl", "--user", "is-enabled", self.name])
            enabled = None if answer is None else answer[0] == 0
        return {"name": self.name, "path": self.path, "installed": current is not None,
                "current": current == self.text().encode("utf-8"), "enabled": enabled, "running": sock is not None}

    def _manage(self, action: str) -> str:
        if self.launchd:
            target = f"gui/{os.getuid()}"
            argv = ["launchctl", "bootstrap" if action == "enable" else "bootout", target,
                    self.path if action == "enable" else f"{target}/{self.name}"]
        else:
            argv = ["systemctl", "--user", action, self.name]
            if action == "enable":
                self._run(["systemctl", "--user", "daemon-reload"])
        answer = self._run(argv)
        if answer is not None and answer[0] == 0:
            return f"{action}d {self.name}"
        why = "not found" if answer is None else (answer[1].strip().splitlines() or [f"exit {answer[0]}"])[-1]
        return f"could not {action} {self.name} ({' '.join(argv)}: {why}); run it in a login session"

    @staticmethod
    def _run(argv: list[str]) -> tuple[int, str] | None:
        import subprocess
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.returncode, done.stderr or done.stdout


class _Disconnected(Exception):
    """The daemon connection ended while a request waited for its reply."""


class _DaemonClient:
    """The app side of the daemon host: a _Backend whose operations (methods made from _OPERATIONS, below the class)
    travel over daemon.sock; attach and detach also bind the sink here. Its reader thread routes replies and events
    and reconnects (restarting the daemon) if it goes away."""

    def __init__(self, config: Configuration, observer: bool = False, start: bool = True) -> None:
        """*observer*: a client that never attaches (CLI status/enqueue): it takes no app lock. *start* False: only a
        daemon that runs already is asked, and nothing on disk is created or changed (read-only commands)."""
        assert config.directory is not None
        self.config, self.directory, self.observer, self.start = config, config.directory, observer, start
        if start:
            _claim_session_dir(self.directory, config.identifier)
        if not observer:
            _acquire_lock(self.directory, _APP_LOCK_NAME, config.identifier)
        self._sink: _Sink | None = None
        self._renews = False  # the attached app implements task_will_begin_delayed_request
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closed = False
        self._conn: _Connection | None = None
        try:
            self._connect_retrying()
        except BaseException:
            if not observer:
                _release_lock(self.directory, _APP_LOCK_NAME)
            raise
        self._reader = threading.Thread(target=self._read_loop, name="bgsession-client-reader", daemon=True)
        self._reader.start()

    # -- the interface ----------------------------------------------------------------------
    def _invoke(self, name: str, values: Mapping[str, Any]) -> Any:
        op = _OPERATIONS[name]
        return op.result.decode(self._call(name, op.resend, **op.encode_args(values)))

    def attach(self, sink: _Sink, wait_for_active: bool = False, renews_requests: bool = False) -> None:
        """Bind *sink* here; the daemon attaches this connection (its transfers run on regardless)."""
        if self.observer:
            raise BGSessionError("an observer client cannot attach")
        self._sink, self._renews = sink, renews_requests
        try:
            self._invoke("attach", {"renews_requests": renews_requests})
        except BaseException:
            self._sink = None
            raise

    def detach(self, sink: _Sink) -> None:
        if self._sink is sink:
            self._sink = None
            with contextlib.suppress(BGSessionError, OSError):
                self._invoke("detach", {})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn is not None:
            conn.close()
        with self._lock:
            for waiter in self._pending.values():
                waiter.event.set()
        if threading.current_thread() is not self._reader:
            self._reader.join(DAEMON_RECONNECT_TIMEOUT + 5.0)
        if not self.observer:
            _release_lock(self.directory, _APP_LOCK_NAME)

    # -- connection ---------------------------------------------------------------------
    def _connect(self) -> None:
        sock = _connect_daemon(self.config, self.start)
        conn = _Connection(sock, "bgsession-client")
        try:
            self._call_on(conn, "hello", version=JOURNAL_VERSION, config=_config_to_wire(self.config), pid=os.getpid())
            if self._sink is not None:
                self._call_on(conn, "attach", renews_requests=self._renews)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._conn = conn
            self._connected.set()

    def _connect_retrying(self, retry_on: tuple[type[BaseException], ...] = (_Disconnected, ConnectionError)) -> None:
        """Connect (starting a daemon if none serves), again with backoff while *retry_on* errors
        happen: a daemon that dies as we connect (its socket still accepting) is replaced."""
        deadline, delay = time.monotonic() + DAEMON_RECONNECT_TIMEOUT, 0.02
        while True:
            try:
                return self._connect()
            except retry_on as err:
                if self._closed or time.monotonic() > deadline:
                    raise TransferError(ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED, f"the bgsession daemon for "
                                        f"{self.directory} cannot be reached ({err!r})") from None
            time.sleep(delay)  # backoff: a daemon is exiting or starting
            delay = min(0.5, delay * 2)

    def _call_on(self, conn: _Connection, op: str, **args: Any) -> Any:
        """Send a request on *conn* and wait for its reply (the reader thread routes replies)."""
        rid = next(self._ids)
        waiter = _Waiter()
        with self._lock:
            self._pending[rid] = waiter
        try:
            conn.send({"op": op, "rid": rid, **args})
            if conn is not self._conn:
                # during (re)connect nobody else reads this connection: read the reply here
                while not waiter.event.is_set():
                    msg = conn.read()
                    if msg is None:
                        raise _Disconnected()
                    self._route(msg)
            else:
                while not waiter.event.wait(1.0):
                    if conn.closed:
                        raise _Disconnected()
        except _SinkGone:
            raise _Disconnected() from None
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        reply = waiter.value
        if reply is None:
            raise _Disconnected()
        if reply.get("ok"):
            return reply.get("result")
        raise _error_from_wire(reply)

    def _route(self, msg: Mapping[str, Any]) -> None:
        if "re" in msg:
            with self._lock:
                waiter = self._pending.get(msg["re"])
            if waiter is not None:
                waiter.set(msg)
            return
        sink = self._sink
        ev = msg.get("ev")
        if sink is None or ev is None:
            return
        cid = msg.get("cid")
        if ev == "challenge":
            sink.post(ChallengeEvent(int(msg["id"]), _challenge_from_wire(msg["challenge"]),
                                     lambda answer: self._reply(cid, "challenge_reply", _answer_to_wire(answer))))
        elif ev == "delayed_request":
            sink.post(DelayedRequestEvent(int(msg["id"]), _request_from_wire(msg["request"]),
                                          lambda answer: self._reply(cid, "delayed_request_reply",
                                                                     _renewal_to_wire(answer))))
        else:
            sink.post(_event_from_wire(msg))

    def _reply(self, cid: Any, op: str, answer: Mapping[str, Any]) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(_SinkGone):  # the daemon asks the next app
                conn.send({"op": op, "cid": cid, **answer})

    def _read_loop(self) -> None:
        while not self._closed:
            conn = self._conn
            msg = None
            if conn is not None:
                try:
                    msg = conn.read()
                except ValueError:
                    msg = None
            if msg is not None:
                self._route(msg)
                continue
            # the daemon went away: fail waiting calls, then restart it and re-attach
            with self._lock:
                self._connected.clear()
                for waiter in self._pending.values():
                    waiter.event.set()
            if conn is not None:
                conn.close()
            if self._closed:
                return
            try:
                log.info("daemon connection lost; reconnecting")
                self._connect_retrying((OSError, _Disconnected, BGSessionError))
            except BGSessionError as err:
                if not self._closed:
                    log.error("%s", err)
                self._closed = True
                return

    def _call(self, op: str, resend: bool = True, **args: Any) -> Any:
        deadline = time.monotonic() + DAEMON_RECONNECT_TIMEOUT
        while True:
            if self._closed:
                raise SessionInvalidatedError("the session is closed")
            if not self._connected.wait(1.0):
                if time.monotonic() > deadline:
                    raise TransferError(ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED,
                                        f"the bgsession daemon for {self.directory} cannot be reached")
                continue
            with self._lock:
                conn = self._conn
            assert conn is not None
            try:
                return self._call_on(conn, op, **args)
            except _Disconnected:
                if not resend or time.monotonic() > deadline:
                    raise TransferError(ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED,
                                        f"the bgsession daemon went away during {op!r}") from None
                with self._lock:
                    if self._conn is conn:  # the reader has not replaced it yet
                        self._connected.clear()


def _remote_operation(op: _Operation) -> Callable[..., Any]:
    """A _DaemonClient method for *op*: arguments by the order of its row, as the _Backend has them."""
    names = [name for name, _ in op.args]

    def call(self: _DaemonClient, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(op.name, {**dict(zip(names, args)), **kwargs})
    call.__name__ = call.__qualname__ = op.name
    call.__doc__ = f"The {op.name!r} operation of the app<->engine interface, served by the daemon."
    return call


for _op in _OPERATIONS.values():
    if not _op.binds_sink:
        setattr(_DaemonClient, _op.name, _remote_operation(_op))
del _op


def _daemon_host(config: Configuration, clock: _Clock | None = None) -> _Backend:
    return cast(_Backend, _DaemonClient(config))


_HOSTS["daemon"] = _daemon_host


# ============================================================================
# 13. CLI
# ============================================================================
#
# `python -m bgsession` (or the `bgsession` script) is a small background session app with wget's and aria2c's
# flags: `download` enqueues into a daemon-hosted session and returns; the daemon transfers, and relaunches
# `bgsession deliver` when files are ready, which moves them into the directory named at enqueue time (kept in the
# task's description) and writes each outcome into the CLI's history. `wait` and `download --wait` watch as
# observers (they never attach, so they never lock the delivery out) and print each outcome as it lands.

#: Session identifier the CLI uses unless --session says otherwise.
CLI_SESSION = "bgsession.cli"
#: Exit codes. What happened to the downloads uses wget's numbers (with wget's rule: of several failures, the
#: lowest number above 1 wins); what went wrong with bgsession itself has its own, above wget's.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FILE, EXIT_NETWORK, EXIT_TLS, EXIT_AUTH, EXIT_PROTOCOL, EXIT_SERVER = range(9)
EXIT_IN_USE, EXIT_JOURNAL, EXIT_UNREACHABLE = 9, 10, 11
#: Outcomes the CLI keeps in its history (the oldest are forgotten first).
CLI_HISTORY = 1000
#: Seconds between the plain progress lines of `wait` when its output is not a terminal.
CLI_PLAIN_PROGRESS_INTERVAL = 2.0
#: The environment variable `-u USER` takes the password from (else it is asked for on a terminal).
CLI_PASSWORD_ENV = "BGSESSION_HTTP_PASSWORD"
_CLI_PREFIX = "bgsession-cli:"
_CLI_SETTINGS = "cli.json"
_CLI_HISTORY_NAME = "cli-history.jsonl"
_CLI_EXIT_BY_CODE = {
    **dict.fromkeys((ErrorCode.CANNOT_CREATE_FILE, ErrorCode.CANNOT_OPEN_FILE, ErrorCode.CANNOT_WRITE_TO_FILE,
                     ErrorCode.CANNOT_REMOVE_FILE, ErrorCode.CANNOT_MOVE_FILE, ErrorCode.FILE_DOES_NOT_EXIST),
                    EXIT_FILE),
    **dict.fromkeys((ErrorCode.TIMED_OUT, ErrorCode.CANNOT_FIND_HOST, ErrorCode.CANNOT_CONNECT_TO_HOST,
                     ErrorCode.NETWORK_CONNECTION_LOST), EXIT_NETWORK),
    **dict.fromkeys((ErrorCode.SECURE_CONNECTION_FAILED, ErrorCode.SERVER_CERTIFICATE_UNTRUSTED), EXIT_TLS),
    **dict.fromkeys((ErrorCode.USER_AUTHENTICATION_REQUIRED, ErrorCode.USER_CANCELLED_AUTHENTICATION), EXIT_AUTH),
    **dict.fromkeys((ErrorCode.BAD_SERVER_RESPONSE, ErrorCode.HTTP_TOO_MANY_REDIRECTS, ErrorCode.CANNOT_RESUME),
                    EXIT_PROTOCOL)}


class _CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(outcomes: Iterable[Mapping[str, Any]]) -> int:
    """wget's exit status for these outcomes: 0 if all were saved; else the lowest code above 1 among the
    failures, or 1 (a failure wget has no number for: a cancel, a checksum mismatch)."""
    codes = {int(o.get("exit", EXIT_FAILED)) for o in outcomes if o.get("state") != "saved"}
    return min((c for c in codes if c > EXIT_FAILED), default=EXIT_FAILED if codes else EXIT_OK)


def _outcome_exit(status: int | None, code: ErrorCode | None) -> int:
    """wget's exit code for one failure: an HTTP status (401, 407: 6; other errors: 8; a response that is neither
    a success nor an error: 7), else the transfer error's code."""
    if status is not None:
        return EXIT_AUTH if status in (401, 407) else EXIT_SERVER if status >= 400 else EXIT_PROTOCOL
    return _CLI_EXIT_BY_CODE.get(code, EXIT_FAILED) if code is not None else EXIT_FAILED


def _cli_directory(args: argparse.Namespace) -> str:
    return os.path.abspath(args.state_dir) if args.state_dir else default_directory(args.session)


def _cli_settings(directory: str) -> dict[str, Any]:
    """The session-wide options the CLI keeps (-j, -x, --tries, --timeout): every CLI run brings the session its
    configuration, so an option meant to last is read from here, not from one run's flags."""
    raw = _read_if_exists(os.path.join(directory, _CLI_SETTINGS))
    try:
        settings = json.loads(raw) if raw else {}
    except ValueError:
        settings = {}
    return settings if isinstance(settings, dict) else {}


def _cli_config(args: argparse.Namespace) -> Configuration:
    directory = _cli_directory(args)
    relaunch = _self_command("deliver", "--session", args.session, "--state-dir", directory)
    settings = _cli_settings(directory)
    tries = settings.get("tries")  # (given: it bounds every attempt, a host that cannot be reached too, as wget's)
    return Configuration.background(
        args.session, directory=directory, host="daemon", relaunch_command=relaunch,
        waits_for_connectivity=not tries,
        max_concurrent_transfers=settings.get("jobs", DEFAULT_MAX_CONCURRENT_TRANSFERS),
        max_connections_per_task=settings.get("split", 1),
        timeout_for_request=settings.get("timeout", 60.0),
        retry=Retry() if tries is None else Retry(total=None if tries == 0 else tries - 1))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_RATE_RE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?\s*\Z", re.I)
_RELATIVE_RE = re.compile(r"\A\+(\d+(?:\.\d+)?)\s*([smhd])\Z")
_CLOCK_RE = re.compile(r"\A(\d{1,2}):(\d{2})(?::(\d{2}))?\Z")
#: The finer states `status` shows (the others are the public TaskState's names).
_CLI_STATES = {Phase.SCHEDULED: "scheduled", Phase.QUEUED: "queued", Phase.WAITING_RETRY: "retrying",
               Phase.DELIVERING: "delivering"}


def _parse_rate(text: str) -> int | None:
    """A bandwidth limit as curl, wget and aria2 write it: bytes per second, with K, M or G (1K = 1024); "0" or
    "none": no limit."""
    if text.strip().lower() in ("0", "none", "unlimited"):
        return None
    m = _RATE_RE.match(text)
    if not m:
        raise _CliError(f"bad rate {text!r}: bytes per second, with K, M or G (512K, 2M, 1.5G), or 0 for no limit")
    return _check_rate(round(float(m.group(1)) * 1024 ** " kmg".index(m.group(2).lower() or " ")), "rate")


def _parse_number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _CliError(f"{what} must be a number, not {text!r}") from None


def _parse_count(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _CliError(f"{what} must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise _CliError(f"{what} must be within {low}..{high}, not {value}")
    return value


def _parse_when(text: str, now: float) -> float:
    """A moment for ``--not-before``, as POSIX time: "+30m" (from *now*: s, m, h or d), "22:00" (the next time the
    local clock shows it), an ISO 8601 date and time ("2026-12-01T22:00", local time unless it has an offset or Z),
    or "@1767225600" (POSIX time)."""
    import datetime
    text = text.strip()
    relative, clock = _RELATIVE_RE.match(text), _CLOCK_RE.match(text)
    if relative:
        return now + float(relative.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[relative.group(2)]
    if text.startswith("@"):
        return _parse_number(text[1:], "--not-before @TIME")
    try:
        if clock:
            hour, minute, second = (int(g or 0) for g in clock.groups())
            when = datetime.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=second, microsecond=0)
            if when.timestamp() <= now:  # (naive: local time, whatever the day's UTC offset)
                when += datetime.timedelta(days=1)
            return when.timestamp()
        return datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text).timestamp()
    except ValueError as err:
        raise _CliError(f"bad time {text!r} ({err}): use +30m, 22:00, 2026-12-01T22:00[+01:00] or @POSIXTIME") from None


def _parse_checksum(text: str) -> str:
    """aria2c's ``--checksum=sha-256=HEX`` (or a bare HEX): the expected SHA-256, lower case."""
    algo, _, digest = text.rpartition("=")
    if algo.lower() not in ("", "sha-256", "sha256") or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise _CliError(f"bad checksum {text!r}: sha-256=<64 hex digits> (SHA-256 is the one bgsession checks)")
    return digest.lower()


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise _CliError(f"bad header {text!r}: 'Name: value'")
    return name.strip(), value.strip()


# -- what one URL asks for: -i files, credentials -----------------------------------------------------------------


@dataclasses.dataclass
class _Order:
    """One download as the command line (or a line of an -i file) asked for it."""
    url: str
    directory: str
    name: str | None = None  # -O / -o / out=: the name to save as (else the server's or the URL's)
    sha256: str | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _read_input_file(path: str, directory: str) -> list[_Order]:
    """URLs from an ``-i`` file (``-``: standard input), one per line, as wget reads them; lines indented under a
    URL give its options as aria2c's input files do: ``out=NAME``, ``dir=DIR``, ``checksum=sha-256=HEX``,
    ``header=Name: value``. Blank lines and ``#`` comments are skipped."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise _CliError(f"cannot read the input file {path}: {err}") from None
    orders: list[_Order] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            orders.append(_Order(line.strip().split()[0], directory))
            continue
        key, sep, value = line.strip().partition("=")
        if not orders or not sep or key not in ("out", "dir", "checksum", "header"):
            raise _CliError(f"{path}, line {number}: expected a URL, or an indented out=, dir=, checksum= or "
                            f"header= under one, not {line.strip()!r}")
        order = orders[-1]
        if key == "out":
            order.name = value
        elif key == "dir":
            order.directory = os.path.abspath(value)
        elif key == "checksum":
            order.sha256 = _parse_checksum(value)
        else:
            order.headers.append(_parse_header(value))
    return orders


def _credential_header(args: argparse.Namespace, url: str) -> tuple[str, str] | None:
    """``-u USER`` (password from $BGSESSION_HTTP_PASSWORD, --http-password or a prompt) or ``--netrc``: an
    Authorization header. The session keeps it in memory only (never in its journal), sends it to the URL's
    origin only, and loses it when its daemon stops: a transfer that then meets a 401 fails with exit 6, and
    ``bgsession resume ID -u USER`` continues it."""
    import urllib.parse
    user, password = args.http_user, args.http_password
    if user is None and (args.netrc or args.netrc_file):
        import netrc  # (only here: most runs never read it)
        try:
            entry = netrc.netrc(args.netrc_file).authenticators(urllib.parse.urlsplit(url).hostname or "")
        except (OSError, netrc.NetrcParseError) as err:
            raise _CliError(f"cannot read the netrc file: {err}") from None
        if entry is None:
            return None
        user, password = entry[0], entry[2] or ""
    if user is None:
        return None
    if password is None:
        password = os.environ.get(CLI_PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            raise _CliError(f"-u {user}: no password (set ${CLI_PASSWORD_ENV}, or run on a terminal to be asked)")
        import getpass
        password = getpass.getpass(f"password for {user}: ")
    return "Authorization", _basic_authorization(Credential(user, password))


# -- the CLI's own files: settings and the history of outcomes ----------------------------------------------------


class _History:
    """The outcomes of the CLI's downloads (saved, failed, cancelled): ``cli-history.jsonl`` in the session
    directory, one JSON line each. The delivering process appends a line and fsyncs it before its hook returns,
    so an acknowledged event always has its line (an event delivered again writes it again: the last line of an
    ID wins). At most CLI_HISTORY outcomes are kept; ``bgsession clear`` forgets them."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, _CLI_HISTORY_NAME)
        self._lock_path = self.path + ".lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = _open_private(self._lock_path, os.O_RDWR | os.O_CREAT)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """The outcomes, one per task, oldest first."""
        raw = _read_if_exists(self.path) or b""
        found: dict[int, dict[str, Any]] = {}
        for line in raw.splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                entry = json.loads(line)
                found.pop(int(entry["id"]), None)  # (a redelivered outcome moves to the end)
                found[int(entry["id"])] = entry
        return list(found.values())

    def add(self, entry: Mapping[str, Any]) -> None:
        with self._locked():
            fd = _open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                _write_all(fd, _dumps(entry))
                _fsync(fd)
            finally:
                _vfs.close(fd)
            size = os.path.getsize(self.path)
            if size > 4096 and size > 2 * CLI_HISTORY * 256:  # (~256 bytes a line) keep the newest
                self._rewrite(self.entries()[-CLI_HISTORY:])

    def forget(self, ids: Iterable[int] | None) -> int:
        """Forget the outcomes of *ids* (None: all); how many were forgotten."""
        with self._locked():
            entries = self.entries()
            keep = [] if ids is None else [e for e in entries if int(e["id"]) not in set(ids)]
            if len(keep) != len(entries):
                self._rewrite(keep)
            return len(entries) - len(keep)

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        _atomic_write(self.path, b"".join(_dumps(e) for e in entries))


def _update_settings(directory: str, changes: Mapping[str, Any]) -> None:
    settings = {**_cli_settings(directory), **changes}
    _claim_session_dir(directory, None)
    _atomic_write(os.path.join(directory, _CLI_SETTINGS), _dumps({k: v for k, v in settings.items() if v is not None}))


def _cli_meta(info: TaskInfo) -> dict[str, Any]:
    desc = info.description or ""
    try:
        meta = json.loads(desc[len(_CLI_PREFIX):]) if desc.startswith(_CLI_PREFIX) else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}


def _cli_state(info: TaskInfo) -> str:
    return "waiting" if info.waiting else _CLI_STATES.get(info.phase, info.state.name.lower())


def _last_error_text(info: TaskInfo) -> str | None:
    """Why a task that goes on is not moving: its last attempt's error, and when it tries next."""
    if not info.last_error:
        return None
    retry_in = f"; next try in {max(0, round(info.next_retry - time.time()))} s" if info.next_retry else ""
    return f"{info.last_error.get('message', '')}{retry_in}"


def _task_notes(info: TaskInfo) -> list[str]:
    """A task's notes for `status`: its date (until it starts), priority and limit if set, and while it waits to try
    again, why (the last attempt's error) and when."""
    import datetime
    notes = []
    if info.begin is not None and info.phase in (Phase.SUSPENDED, Phase.QUEUED, Phase.SCHEDULED):
        notes.append(f"not before {datetime.datetime.fromtimestamp(info.begin):%Y-%m-%d %H:%M:%S}")
    if info.priority != DEFAULT_PRIORITY:
        notes.append(f"priority {info.priority:g}")
    if info.limit is not None:
        notes.append(f"limit {_human(info.limit)}/s")
    error = _last_error_text(info)  # why it waits: the last attempt's error, and when the next one starts
    if error:
        notes.append(error)
    return notes


def _task_line(info: TaskInfo, width: int = 100) -> str:
    state = _cli_state(info)
    got, total = info.received, info.expected
    if info.kind == "upload":
        got, total = info.sent, info.expected_send
    pct = f"{100 * got / total:5.1f}%" if total and total > 0 else "    ?%"
    rate = info.rate
    eta = _eta((total - got) / rate) if rate > 0 and total and total > got else "-:--:--"
    name = info.current_url or info.request["url"]
    notes = _task_notes(info)
    line = (f"{info.id:>5} {state:<10} {pct} {_human(got):>10} / {_human(total) if total >= 0 else '?':>10} "
            f"{_human(rate) + '/s':>12} {eta}  {name}" + (f"  [{', '.join(notes)}]" if notes else ""))
    return line[:width]


def _outcome_line(entry: Mapping[str, Any], width: int = 200) -> str:
    """One outcome as `status` and `wait` show it: saved (as what), or why it failed."""
    if entry.get("state") == "saved" and not entry.get("saved_as"):
        text = f"{entry['id']:>5} saved      ({entry.get('note')})  {entry.get('url')}"
    elif entry.get("state") == "saved":  # (the name first: a narrow terminal cuts the directory, not the name)
        directory, name = os.path.split(str(entry.get("saved_as")))
        text = f"{entry['id']:>5} saved      {name} ({_human(entry.get('bytes') or 0)}) in {directory}"
    else:
        text = f"{entry['id']:>5} {entry.get('state', 'failed'):<10} {entry.get('error')}  {entry.get('url')}"
    return text[:width]


class _CliApp(SessionDelegate):
    """The CLI's delegate (`bgsession deliver`, relaunched by the daemon): moves each finished file into the
    directory chosen at enqueue time, never over another file (name.1, name.2 ... as wget does), and writes every
    outcome into the history before its hook returns. A task that lost its secret headers (they lived in the
    memory of a daemon that stopped) is cancelled rather than sent without them: its partial data is kept, and
    ``bgsession resume ID`` with the headers (or -u) continues it."""

    def __init__(self, out: Any, tty: bool) -> None:
        self.out, self.tty, self.lock = out, tty, threading.Lock()
        self.results: dict[int, str | None] = {}  # task id -> None (ok) or a reason
        self.notes: dict[int, str] = {}  # task id -> why this process cancelled it

    def _say(self, text: str) -> None:
        with self.lock:
            print(text, file=self.out, flush=True)

    def task_will_begin_delayed_request(self, session: Session, task: Task, request: Request
                                        ) -> tuple[DelayedRequestDisposition, Request | None]:
        """A task asks before it sends again: with every header it was given, it goes on; one that lost a secret
        header (it lived in the memory of a daemon that stopped) is cancelled with its partial data kept, rather
        than sent without it (`resume ID` with the header continues it). A 401/403 to a request that had them
        stands."""
        names = _cli_meta(task._info()).get("headers") or []
        missing = [name for name in names if name not in request.headers]
        if not missing:
            return DelayedRequestDisposition.CONTINUE_LOADING, None
        self.notes[task.identifier] = (f"its {', '.join(missing)} header lived in the memory of a daemon that "
                                       f"stopped: `bgsession resume {task.identifier}` with it continues")
        return DelayedRequestDisposition.CANCEL, None

    def _record(self, session: Session, task: Task, **outcome: Any) -> None:
        directory = session.configuration.directory
        assert directory is not None
        meta = _cli_meta(task._info())
        entry = {"id": task.identifier, "url": task.original_request.url, "dir": meta.get("dir"),
                 "name": meta.get("name"), "ended": time.time(), **outcome}
        _History(directory).add(entry)
        self.results[task.identifier] = None if outcome["state"] == "saved" else str(outcome.get("error"))
        if not self.tty:
            self._say(_outcome_line(entry))

    def download_task_did_finish_downloading(self, session: Session, task: DownloadTask, location: str) -> None:
        response = task.response
        meta = _cli_meta(task._info())
        if response is None or not 200 <= response.status < 300:
            status = response.status if response else None
            self._record(session, task, state="failed", status=status, error=f"HTTP {status or 'no response'}",
                         exit=_outcome_exit(status, ErrorCode.BAD_SERVER_RESPONSE))
            return
        dest_dir = meta.get("dir") or os.getcwd()
        name = sanitize_filename(meta.get("name") or response.suggested_filename)  # fits in 255 bytes with a .N
        size = os.path.getsize(location)
        n, target = 0, None
        try:
            while target is None:  # never over another file: name.1, name.2 ... (as wget does), even one with
                candidate = os.path.join(dest_dir, f"{name}.{n}" if n else name)  # the same bytes (another task's)
                n += 1
                if not os.path.lexists(candidate):
                    with contextlib.suppress(FileExistsError):
                        target = move_to(location, candidate)
        except TransferError as err:
            cause = err.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise  # may succeed later: the file stays in the session for the next delivery
            # cannot succeed (a name or directory the destination refuses): report it and let the file go,
            # rather than have the daemon relaunch this delivery again and again
            self._record(session, task, state="failed", status=response.status, exit=EXIT_FILE,
                         error=f"cannot deliver to {dest_dir}: {err.message}")
            return
        self._record(session, task, state="saved", status=response.status, saved_as=target, bytes=size, exit=0)

    def task_did_complete(self, session: Session, task: Task, error: TransferError | None) -> None:
        if error is None:  # the finish hook recorded it -- unless a kill came between its move and its line
            directory = session.configuration.directory or ""
            if all(int(e["id"]) != task.identifier for e in _History(directory).entries()):
                self._record(session, task, state="saved", saved_as=None, bytes=None, exit=0,
                             note="moved by a delivery that was interrupted before it wrote its line")
            return
        cancelled = error.code is ErrorCode.CANCELLED
        note = self.notes.pop(task.identifier, None)
        self._record(session, task, state="cancelled" if cancelled else "failed",
                     error=f"cancelled: {note}" if note else str(error),
                     code=int(error.code), exit=_outcome_exit(None, error.code),
                     resume_data=base64.b64encode(error.resume_data).decode("ascii") if error.resume_data else None)


def _cli_observer(args: argparse.Namespace) -> _Backend:
    """A client of the session's daemon that never attaches (enqueue, status, wait, task operations)."""
    return cast(_Backend, _DaemonClient(_cli_config(args), observer=True))


# -- watching: wait and download --wait ------------------------------------------------------------------------


class _Watch:
    """What `wait` and `download --wait` show. An observer of the daemon, never attached: the daemon's own
    delivery (`bgsession deliver`) moves the files and writes the history, and neither locks the other out. Until
    every task it watches has its outcome in the history: progress redrawn in place on a terminal, or plain lines
    every CLI_PLAIN_PROGRESS_INTERVAL seconds otherwise (as wget's dot progress); each outcome as it lands; then
    wget's closing summary line. *ids*: the tasks to watch (None: every task, including ones added meanwhile, and
    the outcomes that landed after *since*, the previous `wait`, so that a failure is reported once)."""

    def __init__(self, client: _Backend, history: _History, out: Any, *, ids: Iterable[int] | None,
                 since: tuple[float, Iterable[int]] | None = None, quiet: bool = False, verbose: bool = False) -> None:
        self.client, self.history, self.out = client, history, out
        self.tty = out.isatty() and not quiet
        self.ids, self.quiet, self.verbose = None if ids is None else set(ids), quiet, verbose
        self.watched: set[int] = set(self.ids or ())
        self.shown: dict[int, dict[str, Any]] = {}  # the outcomes printed, by task
        self.drawn, self.last_plain, self.started = 0, 0.0, time.monotonic()
        self.last_error: dict[int, str] = {}
        if since is not None:  # (when, and the outcomes already reported of those that ended after it)
            after, reported = since[0], set(since[1])
            self.watched |= {int(e["id"]) for e in history.entries()
                             if float(e.get("ended") or 0) > after and int(e["id"]) not in reported}
        self.read_at = time.time()  # when the tasks and the history were last read

    def run(self) -> int:
        while True:
            self.read_at = time.time()
            infos = [i for i in self.client.tasks() if self.ids is None or i.id in self.ids]
            live = {i.id for i in infos}
            self.watched |= live
            # read after the tasks: a task acknowledged meanwhile already has its line (written before the ack)
            outcomes = {int(e["id"]): e for e in self.history.entries()}
            fresh = []
            for tid in sorted(self.watched - set(self.shown)):
                entry = outcomes.get(tid)
                if entry is None and tid not in live:  # ended, and its outcome forgotten (`clear`) before seen
                    entry = {"id": tid, "state": "ended", "error": "(its outcome was forgotten)", "exit": EXIT_FAILED}
                if entry is not None:
                    self.shown[tid] = entry
                    fresh.append(entry)
            active = [i for i in infos if i.id not in self.shown]
            self._draw(active, fresh)
            if not active and self.watched <= set(self.shown):
                break
            time.sleep(0.2 if self.tty else 0.1)  # a display's refresh: nothing announces a daemon's progress
        self._summary()
        return _exit_code(self.shown.values())

    def _draw(self, active: list[TaskInfo], fresh: list[dict[str, Any]]) -> None:
        import shutil
        if self.quiet:
            for entry in fresh:
                if entry.get("state") != "saved":
                    print(_outcome_line(entry), file=sys.stderr, flush=True)
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            frame = [_outcome_line(e, width) for e in self.shown.values()] + [_task_line(i, width) for i in active]
            buf = ("\x1b[%dF" % self.drawn if self.drawn else "") + "".join("\x1b[2K" + ln + "\n" for ln in frame)
            if self.drawn > len(frame):
                buf += "\x1b[2K\n" * (self.drawn - len(frame)) + "\x1b[%dF" % (self.drawn - len(frame))
            self.out.write(buf)
            self.out.flush()
            self.drawn = len(frame)
            return
        for entry in fresh:
            print(_outcome_line(entry), file=self.out, flush=True)
        now = time.monotonic()
        for info in active:
            error = _last_error_text(info)
            if self.verbose and error and self.last_error.get(info.id) != error:
                self.last_error[info.id] = error
                print(f"{info.id:>5} {_cli_state(info)}: {error}", file=self.out, flush=True)
        if active and now - self.last_plain >= CLI_PLAIN_PROGRESS_INTERVAL:
            self.last_plain = now
            for info in active:
                print(_task_line(info, 200), file=self.out, flush=True)

    def _summary(self) -> None:
        """wget's closing line: ``Downloaded: 3 files, 12.0 MiB in 4.2s (2.9 MiB/s); 1 failed``."""
        if not self.shown:
            print("nothing to wait for", file=sys.stderr if self.quiet else self.out, flush=True)
            return
        saved = [e for e in self.shown.values() if e.get("state") == "saved"]
        failed = len(self.shown) - len(saved)
        size, took = sum(int(e.get("bytes") or 0) for e in saved), time.monotonic() - self.started
        rate = f" ({_human(size / took)}/s)" if took >= 0.5 else ""  # (not for outcomes that were there already)
        line = (f"Downloaded: {len(saved)} file{'s' * (len(saved) != 1)}, {_human(size)} in {took:.1f}s{rate}"
                + (f"; {failed} failed" if failed else ""))
        print(line, file=sys.stderr if self.quiet else self.out, flush=True)


# -- commands ----------------------------------------------------------------------------------------------------


def _orders(args: argparse.Namespace) -> list[_Order]:
    """The downloads `download` (or a `resume` of a failed one) asks for, each checked before anything is queued."""
    directory = os.path.abspath(args.dir or os.getcwd())
    orders = [_Order(url, directory) for url in args.urls]
    if args.input_file:
        orders += _read_input_file(args.input_file, directory)
    if not orders:
        raise _CliError("no URL: give one or more, or -i FILE")
    output = args.output_document or args.out
    if output is not None:
        if len(orders) != 1:
            raise _CliError("-O/-o name one file: give a single URL (or out= under each URL of an -i file)")
        if output == "-" or output.endswith(os.sep):
            raise _CliError(f"-O/-o {output!r}: name a file (bgsession delivers into files, not to stdout)")
        # wget's -O FILE is relative to the current directory, aria2c's -o NAME to -d
        full = os.path.join(os.getcwd() if args.output_document else directory, output)
        orders[0].directory, orders[0].name = os.path.split(os.path.abspath(full))
    checksum = args.checksum or args.sha256
    if checksum is not None:
        if len(orders) != 1:
            raise _CliError("--checksum/--sha256 apply to a single URL (or checksum= under each URL of an -i file)")
        orders[0].sha256 = _parse_checksum(checksum)
    for order in orders:
        order.headers = [_parse_header(h) for h in args.header] + order.headers
        credential = _credential_header(args, order.url)
        if credential is not None:
            order.headers.append(credential)
        if order.name is not None and sanitize_filename(order.name) != order.name:
            raise _CliError(f"cannot save as {order.name!r}: a file name without / or control characters")
        try:
            os.makedirs(order.directory, exist_ok=True)  # -d NEWDIR is made (and made again at delivery)
        except OSError as err:
            raise _CliError(f"cannot create the directory {order.directory}: {err.strerror or err}") from None
        if not os.path.isdir(order.directory) or not os.access(order.directory, os.W_OK | os.X_OK):
            raise _CliError(f"cannot write to {order.directory}")
    return orders


def _enqueue(client: _Backend, requests: list[tuple[Request, _Order]], rate: int | None,
             resume: Mapping[str, Any] | None = None) -> list[tuple[TaskInfo, _Order]]:
    queued: list[tuple[TaskInfo, _Order]] = []
    try:
        for req, order in requests:
            meta = {"dir": order.directory, **({"name": order.name} if order.name else {}),  # header names only:
                    **({"headers": sorted({k for k, _ in order.headers})} if order.headers else {})}  # values: memory
            desc = _CLI_PREFIX + json.dumps(meta, separators=(",", ":"))
            queued.append((client.new_task("download", req, desc, None, resume), order))
            if rate is not None:
                client.set_limit(queued[-1][0].id, rate)
    finally:
        client.resume([info.id for info, _ in queued])  # what was created runs, even if a later create failed
    return queued


def _cmd_download(args: argparse.Namespace, out: Any) -> int:
    priority = None if args.priority is None else _parse_number(args.priority, "--priority")
    begin = None if args.not_before is None else _parse_when(args.not_before, time.time())
    rate = None if args.limit_rate is None else _parse_rate(args.limit_rate)
    settings = {"jobs": None if args.jobs is None else _parse_count(args.jobs, "-j", 1, MAX_CONCURRENT_TRANSFERS),
                "tries": None if args.tries is None else _parse_count(args.tries, "--tries", 0, 1000),
                "timeout": None if args.timeout is None else _parse_number(args.timeout, "--timeout"),
                "split": None if args.split is None else _parse_count(args.split, "-x", 1, MAX_CONNECTIONS_PER_TASK)}
    if settings["timeout"] is not None:
        _check_seconds("--timeout", settings["timeout"])
    orders = _orders(args)
    # bad URLs and options fail here, before any enqueue
    requests = [(Request(o.url, headers=dict(o.headers), sha256=o.sha256, priority=priority,
                         earliest_begin_date=begin), o) for o in orders]
    if any(v is not None for v in settings.values()):
        _update_settings(_cli_directory(args), {k: v for k, v in settings.items() if v is not None})
    client = _cli_observer(args)
    try:
        queued = _enqueue(client, requests, rate)
        if not args.wait:
            if not args.quiet:
                for info, order in queued:
                    print(f"queued {info.id} {order.url} -> {order.directory}", file=out, flush=True)
            return EXIT_OK
        return _Watch(client, _History(_cli_directory(args)), out, ids=[i.id for i, _ in queued],
                      quiet=args.quiet, verbose=args.verbose).run()
    finally:
        client.close()


def _cmd_wait(args: argparse.Namespace, out: Any) -> int:
    """Every task until it ends, and every outcome since the previous `wait`: a failure while nobody watched is
    reported (and sets the exit code) once."""
    directory = _cli_directory(args)
    settings = _cli_settings(directory)
    client = _cli_observer(args)
    try:
        watch = _Watch(client, _History(directory), out, ids=None, quiet=args.quiet, verbose=args.verbose,
                       since=(float(settings.get("waited", 0.0)), settings.get("waited_ids", ())))
        code = watch.run()
    finally:
        client.close()
    # The next `wait` reports what ended after the history was read last -- from 2 s earlier (an outcome whose
    # line was still being written then), leaving out those this one reported.
    after = watch.read_at - 2.0
    _update_settings(directory, {"waited": after, "waited_ids": sorted(
        t for t, e in watch.shown.items() if float(e.get("ended") or 0) > after)})
    return code


def _cmd_deliver(args: argparse.Namespace, out: Any) -> int:
    """The daemon's relaunch of the CLI: attach, receive every event that waited, write the outcomes, exit."""
    app = _CliApp(out, tty=False)
    try:
        session = Session(_cli_config(args), app)
    except TransferError as err:
        if err.code is ErrorCode.BACKGROUND_SESSION_IN_USE:
            raise _CliError(f"session {args.session!r} is being delivered by another process", EXIT_IN_USE) from None
        raise
    try:
        session.wait()
    finally:
        session.close()
    return EXIT_FAILED if any(r is not None for r in app.results.values()) else EXIT_OK


def _status_json(infos: list[TaskInfo], outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import datetime
    active = [{"id": i.id, "state": _cli_state(i), "url": i.request["url"], "received": i.received,
               "expected": i.expected, "sent": i.sent, "rate": i.rate, "destination": _cli_meta(i).get("dir"),
               "description": i.description, "error": i.error["message"] if i.error else None,
               "waiting": i.waiting, "last_error": i.last_error["message"] if i.last_error else None,
               "next_retry": i.next_retry, "priority": i.priority,
               "not_before": None if i.begin is None else datetime.datetime.fromtimestamp(
                   i.begin, datetime.timezone.utc).isoformat(), "limit": i.limit} for i in infos]
    ended = [{"id": e["id"], "state": e.get("state"), "url": e.get("url"), "destination": e.get("dir"),
              "saved_as": e.get("saved_as"), "status": e.get("status"), "error": e.get("error"),
              "bytes": e.get("bytes"), "exit": e.get("exit")} for e in outcomes]
    return sorted(ended + active, key=lambda e: int(e["id"]))


def _read_only_tasks(config: Configuration) -> tuple[list[TaskInfo], int | None]:
    """The session's tasks and bandwidth limit without changing anything: from its daemon if one serves (live bytes
    and rates), else from the journal as it is (no daemon started, no recovery, nothing written)."""
    assert config.directory is not None
    if not _is_session_dir(config.directory):
        raise _CliError(f"{config.directory} is not a bgsession session directory")
    try:
        client = cast(_Backend, _DaemonClient(config, observer=True, start=False))
    except TransferError as err:
        if err.code is not ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED or "no bgsession daemon" not in err.message:
            raise
        state = Journal(config.directory).state()
        limit = state.session_limit[0] if state.session_limit else None
        return [_task_info(t, None) for t in state.tasks.values() if t.phase is not Phase.ACKNOWLEDGED], limit
    try:
        return client.tasks(), client.session_limit()
    finally:
        client.close()


def _cmd_status(args: argparse.Namespace, out: Any) -> int:
    directory = _cli_directory(args)
    infos: list[TaskInfo] = []
    session_limit = None
    if os.path.lexists(directory):
        infos, session_limit = _read_only_tasks(_cli_config(args))
    live = {i.id for i in infos}
    outcomes = [e for e in _History(directory).entries() if int(e["id"]) not in live]
    if args.json:
        json.dump(_status_json(infos, outcomes), out, indent=1)
        out.write("\n")
        return EXIT_OK
    if session_limit is not None:
        print(f"session limit {_human(session_limit)}/s", file=out)
    if not infos and not outcomes:
        print(f"no tasks in session {args.session!r}", file=out)
        return EXIT_OK
    shown = outcomes if args.all else outcomes[-20:]
    if len(shown) < len(outcomes):
        print(f"({len(outcomes) - len(shown)} older outcomes: `status --all`; `bgsession clear` forgets them)",
              file=out)
    for entry in shown:
        print(_outcome_line(entry), file=out)
    if infos:
        print(f"{'id':>5} {'state':<10} {'done':>6} {'received':>10}   {'of':>10} {'rate':>12} eta      url", file=out)
    for info in infos:
        print(_task_line(info, 200), file=out)
    return EXIT_OK


def _download_again(args: argparse.Namespace, client: _Backend, ended: Mapping[str, Any], out: Any) -> int:
    order = _Order(ended["url"], ended.get("dir") or os.getcwd(), name=ended.get("name"))
    order.headers = [_parse_header(h) for h in args.header]
    credential = _credential_header(args, order.url)
    if credential is not None:
        order.headers.append(credential)
    resume = None
    if ended.get("resume_data"):
        resume, _ = _parse_resume_data(base64.b64decode(ended["resume_data"]))  # (None: expired, from the start)
    ((info, _),) = _enqueue(client, [(Request(order.url, headers=dict(order.headers)), order)], None, resume)
    _History(_cli_directory(args)).forget([int(ended["id"])])
    print(f"resume {ended['id']}: again as {info.id}" + (" (from its partial data)" if resume else ""), file=out)
    return EXIT_OK


def _cmd_task_op(args: argparse.Namespace, out: Any) -> int:
    """`cancel`, `suspend`, `resume` ID: on a task that runs; `resume` of a failed or cancelled one downloads it
    again (from its resume data when the server allows it) as a new task."""
    client = _cli_observer(args)
    try:
        if args.id not in {i.id for i in client.tasks()}:
            ended = {int(e["id"]): e for e in _History(_cli_directory(args)).entries()}.get(args.id)
            if ended is None:
                raise _CliError(f"no task {args.id} in session {args.session!r} (see `bgsession status --all`)")
            if args.command != "resume" or ended.get("state") == "saved":
                raise _CliError(f"task {args.id} has ended ({_outcome_line(ended).split(None, 1)[1]})")
            return _download_again(args, client, ended, out)
        act: dict[str, Callable[[], Any]] = {"cancel": lambda: client.cancel(args.id),
                                             "suspend": lambda: client.suspend(args.id),
                                             "resume": lambda: client.resume([args.id])}
        act[args.command]()
    finally:
        client.close()
    print(f"{args.command} {args.id}", file=out)
    return EXIT_OK


def _cmd_clear(args: argparse.Namespace, out: Any) -> int:
    count = _History(_cli_directory(args)).forget(args.ids or None)
    print(f"forgot {count} outcome{'s' * (count != 1)}", file=out)
    return EXIT_OK


def _cmd_option(args: argparse.Namespace, out: Any) -> int:
    """`limit [ID] RATE` (no ID: the session's) and `priority ID P`: change a scheduling option while it runs."""
    if args.command == "limit":
        value: Any = _parse_rate(args.rate)
        shown = "none" if value is None else f"{_human(value)}/s"
    else:
        value = _check_priority(_parse_number(args.priority, "priority"))
        shown = f"{value:g}"
    client = _cli_observer(args)
    try:
        if args.id is not None and args.id not in {i.id for i in client.tasks()}:
            raise _CliError(f"no task {args.id} in session {args.session!r} (see `bgsession status`)")
        if args.command == "limit":
            client.set_limit(args.id, value)
        else:
            client.set_priority(args.id, value)
    finally:
        client.close()
    print(f"{args.command} {'session' if args.id is None else args.id} {shown}", file=out)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, out: Any) -> int:
    directory = args.directory or _cli_directory(args)
    if not os.path.isdir(directory):
        raise _CliError(f"{directory}: no such session directory")
    problems = Journal(directory).check()
    for line in problems:
        print(line, file=out)
    print("clean" if not problems else f"{len(problems)} problem(s)", file=out)
    return EXIT_OK if not problems else EXIT_FAILED


def _cmd_service(args: argparse.Namespace, out: Any) -> int:
    """`service install|uninstall|status`: the login service that resumes the session's transfers after a reboot."""
    service = LoginService(_cli_config(args))
    if args.action == "status":
        st = service.status()
        enabled = {None: "unknown (no service manager reachable)", True: "yes", False: "no"}[st["enabled"]]
        print(f"{st['name']}: {'installed' if st['installed'] else 'not installed'} ({st['path']})"
              + ("" if st["current"] or not st["installed"] else "; written by another version: install again"),
              f"enabled at login: {enabled}", f"daemon running: {'yes' if st['running'] else 'no'}", sep="\n", file=out)
        return EXIT_OK if st["installed"] else EXIT_FAILED
    lines = service.install(enable=not args.no_enable) if args.action == "install" else service.uninstall()
    print("\n".join(lines), file=out)
    if args.action == "install" and sys.platform.startswith("linux"):
        print("(to start it at boot rather than at login: loginctl enable-linger)", file=out)
    return EXIT_OK


def _session_options(top: bool) -> argparse.ArgumentParser:
    """--session and --state-dir, accepted before the command or after it (after: without defaults of their own,
    so that they do not undo what was given before)."""
    import argparse
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--session", default=CLI_SESSION if top else argparse.SUPPRESS,
                         help=f"session identifier (default {CLI_SESSION})")
    options.add_argument("--state-dir", default=None if top else argparse.SUPPRESS,
                         help="session directory (default: the per-user state directory)")
    return options


def _auth_options() -> argparse.ArgumentParser:
    import argparse
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--header", "-H", action="append", default=[], metavar="'NAME: VALUE'",
                         help="a request header (repeat for more)")
    options.add_argument("-u", "--http-user", metavar="USER", help=f"HTTP user; the password comes from "
                         f"${CLI_PASSWORD_ENV}, --http-password or a prompt, and is never stored")
    options.add_argument("--http-password", metavar="PASS", help="(visible to other users in ps: prefer the "
                         "environment variable)")
    options.add_argument("--netrc", action="store_true", help="user and password for the URL's host from ~/.netrc")
    options.add_argument("--netrc-file", metavar="FILE", help="... from this netrc file")
    return options


def _output_options() -> argparse.ArgumentParser:
    import argparse
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    options.add_argument("-v", "--verbose", action="store_true", help="also print each retry's reason")
    return options


_EXIT_HELP = ("exit codes (wget's for the downloads): 0 all saved; 1 a failure wget has no number for (a cancel, a "
              "checksum mismatch); 2 bad input; 3 file I/O error; 4 network failure; 5 TLS failure; 6 authentication "
              "failure; 7 protocol error; 8 the server answered with an error (404...); 9 session in use; 10 "
              "unreadable session state; 11 daemon unreachable")


def _parser() -> argparse.ArgumentParser:
    import argparse
    parser = argparse.ArgumentParser(
        prog="bgsession", parents=[_session_options(top=True)], epilog=_EXIT_HELP,
        description="Downloads that survive the process that started them, a logout, a reboot: enqueue into a "
                    "background session; a daemon transfers, resumes after crashes, and delivers the files.")
    common, auth, output = _session_options(top=False), _auth_options(), _output_options()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("download", parents=[common, auth, output], epilog=_EXIT_HELP,
                       help="enqueue downloads (returns at once unless --wait)")
    p.add_argument("urls", nargs="*", metavar="URL")
    p.add_argument("-d", "--dir", "-P", "--directory-prefix", dest="dir",
                   help="where finished files go (default: the current directory; made if missing)")
    p.add_argument("-O", "--output-document", metavar="FILE", help="save the (single) download as FILE")
    p.add_argument("-o", "--out", metavar="NAME", help="save the (single) download as NAME in -d")
    p.add_argument("-i", "--input-file", metavar="FILE", help="URLs from FILE (- for standard input), one a line; "
                   "indented out=, dir=, checksum=, header= lines under a URL apply to it")
    p.add_argument("--wait", action="store_true", help="stay, show progress and outcomes until done")
    p.add_argument("--checksum", metavar="sha-256=HEX", help="expected SHA-256 of the (single) file")
    p.add_argument("--sha256", metavar="HEX", help=argparse.SUPPRESS)  # (the 0.2 spelling)
    p.add_argument("--priority", metavar="P", help="0.0 (lowest) to 1.0 (highest), default 0.5")
    p.add_argument("--not-before", metavar="WHEN", help="start no earlier than WHEN: +30m, 22:00, "
                   "2026-12-01T22:00[+01:00], @POSIXTIME")
    p.add_argument("--limit-rate", metavar="RATE", help="bandwidth limit of each download: 512K, 2M ...")
    p.add_argument("-x", "--split", metavar="N", help=f"up to N connections per download "
                   f"(1-{MAX_CONNECTIONS_PER_TASK}; aria2c's -x/--split): a file whose server allows it is fetched in "
                   "N segments at once (kept)")
    p.add_argument("-j", "--max-concurrent-downloads", dest="jobs", metavar="N",
                   help=f"transfers at once in the session (default {DEFAULT_MAX_CONCURRENT_TRANSFERS}; kept)")
    p.add_argument("-t", "--tries", metavar="N", help="attempts without progress before a download fails "
                   "(0: no limit but the resource timeout; kept for the session)")
    p.add_argument("-T", "--timeout", metavar="SECONDS", help="connect and read timeout (default 60; kept)")
    p = sub.add_parser("status", parents=[common], help="list tasks: running ones with bytes, rate, ETA and last "
                       "error; ended ones with their outcome")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-a", "--all", action="store_true", help="every outcome kept, not only the last 20")
    sub.add_parser("wait", parents=[common, output], epilog=_EXIT_HELP,
                   help="show progress and outcomes until every task has ended")
    for name, text in (("cancel", "cancel a task"), ("suspend", "pause a task"),
                       ("resume", "continue a task (a failed or cancelled one: download it again)")):
        p = sub.add_parser(name, parents=[common, auth] if name == "resume" else [common], help=text)
        p.add_argument("id", type=int, metavar="ID")
    p = sub.add_parser("clear", parents=[common], help="forget ended tasks' outcomes (all, or the IDs given)")
    p.add_argument("ids", type=int, nargs="*", metavar="ID")
    p = sub.add_parser("limit", parents=[common], help="set the bandwidth limit of a task, or of the session")
    p.add_argument("id", type=int, nargs="?", metavar="ID", help="a task (default: the whole session)")
    p.add_argument("rate", metavar="RATE", help="bytes per second: 512K, 2M ...; 0 or none: no limit")
    p = sub.add_parser("priority", parents=[common], help="set a task's priority")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("priority", metavar="P", help="0.0 (lowest) to 1.0 (highest)")
    p = sub.add_parser("service", parents=[common], help="start the session's daemon at login (systemd, launchd), "
                       "so that transfers resume after a reboot")
    p.add_argument("action", choices=("install", "uninstall", "status"))
    p.add_argument("--no-enable", action="store_true", help="write the unit, do not ask the service manager")
    p = sub.add_parser("check", parents=[common], help="check a session directory's journal")
    p.add_argument("directory", nargs="?", help="session directory (default: the CLI session's)")
    return parser


def _hidden_parser() -> argparse.ArgumentParser:
    """The commands bgsession runs itself, kept out of --help: `deliver` (the daemon's relaunch of the CLI) and
    `daemon` (the daemon)."""
    import argparse
    parser = argparse.ArgumentParser(prog="bgsession", parents=[_session_options(top=True)])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("deliver", parents=[_session_options(top=False)])
    p = sub.add_parser("daemon", parents=[_session_options(top=False)])  # (--session: shown by ps)
    p.add_argument("--directory", required=True)
    p.add_argument("--service", action="store_true")
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bgsession`` and the ``bgsession`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = (_hidden_parser() if argv[:1] in (["deliver"], ["daemon"]) else _parser()).parse_args(argv)
    out = sys.stdout
    if args.command == "daemon":
        return _run_daemon(args.directory, service=args.service)
    deliver = args.command == "deliver"  # (its log lines say what it moved)
    logging.basicConfig(level=logging.INFO if deliver else logging.WARNING,
                        format=f"bgsession{' deliver' if deliver else ''}: %(message)s")
    commands: dict[str, Callable[[argparse.Namespace, Any], int]] = {
        "download": _cmd_download, "status": _cmd_status, "wait": _cmd_wait, "check": _cmd_check,
        "deliver": _cmd_deliver, "cancel": _cmd_task_op, "suspend": _cmd_task_op, "resume": _cmd_task_op,
        "clear": _cmd_clear, "limit": _cmd_option, "priority": _cmd_option, "service": _cmd_service}
    try:
        return commands[args.command](args, out)
    except _CliError as err:
        print(f"bgsession: error: {err}", file=sys.stderr)
        return err.code
    except JournalError as err:
        print(f"bgsession: error: {err}", file=sys.stderr)
        return EXIT_JOURNAL
    except TransferError as err:
        code = EXIT_UNREACHABLE if err.code is ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED else (
            EXIT_IN_USE if err.code is ErrorCode.BACKGROUND_SESSION_IN_USE else EXIT_USAGE)
        print(f"bgsession: error: {err.message}", file=sys.stderr)
        return code
    except (BGSessionError, OSError) as err:
        print(f"bgsession: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bgsession: interrupted (transfers go on in the background; `bgsession status` shows them)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_main())
