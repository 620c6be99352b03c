"""Shared test fixtures and helpers: the fake server, a recording delegate, sessions on both
hosts that are closed and journal-checked at teardown, a virtual clock.

Test modules do ``from testkit import *`` so that pytest sees the fixtures.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import pytest

import bgsession as bg
import fake_server as fs

__all__ = [
    "HERE",
    "LONG",
    "PROXY_VARIABLES",
    "SHORT",
    "FakeClock",
    "Ledger",
    "MiB",
    "Recorder",
    "Sessions",
    "TinyProxy",
    "daemons",
    "download",
    "file_sha",
    "host",
    "inproc",
    "read_pid_file",
    "received",
    "server",
    "sessions",
    "sha",
    "stop_daemon",
    "tinyproxy",
    "wait_until",
]

#: Generous bound for things that happen in well under a second.
SHORT = 15.0
#: Bound for whole transfers and child processes.
LONG = 60.0
MiB = 1 << 20

HERE = os.path.dirname(os.path.abspath(__file__))

#: Proxy variables (any case). The tests talk to loopback only: a proxy set on the machine (CI behind a
#: corporate proxy) must not catch their requests, so they are removed here, for the tests and their children;
#: a test that wants one sets it (monkeypatch.setenv).
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
for _name in [n for n in os.environ if n.lower() in PROXY_VARIABLES]:
    del os.environ[_name]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (files in the crash tests reach gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


Ledger = fs.Ledger  # the test kit's (fake_server.py): the app's own fsynced record of what its hooks did


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
def server():
    with fs.FakeServer() as srv:
        yield srv


class Recorder(bg.SessionDelegate):
    """Records every hook call in order; keeps a copy of each finished file's bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.files: dict[int, bytes] = {}
        self.statuses: dict[int, int | None] = {}
        self.errors: dict[int, bg.TransferError | None] = {}
        self.progress: dict[int, list[tuple]] = {}
        self.completed = threading.Event()
        self.finished_events = 0
        self.lock = threading.Lock()
        self.expect = 1

    def download_task_did_finish_downloading(self, session, task, location):
        with open(location, "rb") as f:
            data = f.read()
        with self.lock:
            self.calls.append(("finish", task.identifier))
            self.files[task.identifier] = data
            self.statuses[task.identifier] = task.response.status if task.response else None

    def download_task_did_write_data(self, session, task, written, total, expected):
        with self.lock:
            self.progress.setdefault(task.identifier, []).append((written, total, expected))

    def task_did_complete(self, session, task, error):
        with self.lock:
            self.calls.append(("complete", task.identifier))
            self.errors[task.identifier] = error
            if sum(1 for c in self.calls if c[0] == "complete") >= self.expect:
                self.completed.set()

    def did_finish_events_for_background_session(self, session):
        with self.lock:
            self.calls.append(("did_finish_events",))
            self.finished_events += 1


class Sessions:
    """Opens sessions for a test, closes them at teardown, checks the journal, reaps daemons."""

    def __init__(self, tmp_path, host: str) -> None:
        self.tmp_path = tmp_path
        self.host = host
        self.opened: list[bg.Session] = []
        self.directories: set = set()
        self.check_journal = True
        self.counter = 0

    def config(self, name: str = "s", **kwargs: Any) -> bg.Configuration:
        directory = str(self.tmp_path / name)
        self.directories.add(directory)
        kwargs.setdefault("host", self.host)
        kwargs.setdefault("daemon_idle_timeout", 0.5)
        kwargs.setdefault("retry", bg.Retry(backoff_factor=0.01, backoff_max=0.05))
        return bg.Configuration.background(f"test.{name}", directory=directory, **kwargs)

    def open(self, delegate: bg.SessionDelegate | None = None, name: str = "s", **kwargs: Any) -> bg.Session:
        session = bg.Session(self.config(name, **kwargs), delegate)
        self.opened.append(session)
        return session

    def close_all(self) -> None:
        for s in self.opened:
            s.close()
        self.opened.clear()

    def teardown(self) -> None:
        self.close_all()
        for d in self.directories:
            stop_daemon(d)
        if self.check_journal:
            for d in self.directories:
                if os.path.isdir(d):
                    assert bg.Journal(d).check() == [], d


def read_pid_file(directory: str) -> fs.ProcessRef | None:
    """The daemon that ``<directory>/daemon.pid`` names (``"<pid> <start token>\\n"``), or None."""
    try:
        with open(os.path.join(directory, "daemon.pid"), encoding="ascii") as f:
            parts = f.read().split()
        return fs.ProcessRef(int(parts[0]), parts[1] if len(parts) > 1 and parts[1] != "-" else None)
    except (OSError, ValueError, IndexError):
        return None


def stop_daemon(directory: str) -> None:
    """SIGTERM the session's daemon, if it runs, and wait for it to exit (SIGKILL after SHORT)."""
    daemon = read_pid_file(directory)
    if daemon is not None and daemon.send(signal.SIGTERM) and not daemon.wait_exit(SHORT):
        daemon.kill()


@pytest.fixture(params=["inprocess", "daemon"])
def host(request):
    return request.param


@pytest.fixture
def sessions(tmp_path, host):
    s = Sessions(tmp_path, host)
    yield s
    s.teardown()


@pytest.fixture
def daemons(tmp_path):
    s = Sessions(tmp_path, "daemon")
    yield s
    s.teardown()


@pytest.fixture
def inproc(tmp_path):
    s = Sessions(tmp_path, "inprocess")
    yield s
    s.teardown()


def download(session: bg.Session, url: str, description: str | None = None) -> bg.DownloadTask:
    task = session.download_task(url, description=description)
    task.resume()
    return task


class FakeClock(bg._Clock):
    """Virtual time: waits return at once and are recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        with self.lock:
            return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.monotonic()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        if timeout is not None:
            with self.lock:
                self.waits.append(timeout)
                self.now += timeout
        return event.is_set()


def wait_until(predicate, timeout: float = LONG, what: str = "condition") -> None:
    """Wait for a condition that no event announces (a counter in another thread or process).

    Polls every 10 ms up to *timeout*; the assertion names what never happened.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def received(task, n: int):
    """Predicate: *task* has written at least *n* bytes to its partial file."""
    return lambda: task.count_of_bytes_received >= n


class TinyProxy:
    """A real HTTP proxy (tinyproxy from the distribution) on 127.0.0.1, configured in a temp dir:
    absolute-form requests and CONNECT to any port, optionally Basic credentials."""

    def __init__(self, directory, auth: tuple[str, str] | None = None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.conf = os.path.join(str(directory), "tinyproxy.conf")
        self.log = os.path.join(str(directory), "tinyproxy.log")
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "Allow 127.0.0.1", "MaxClients 64",
                 "LogLevel Connect", f"LogFile \"{self.log}\""]
        if auth is not None:
            lines.append("BasicAuth %s %s" % auth)
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def url(self, user: str | None = None, password: str | None = None) -> str:
        credentials = f"{user}:{password}@" if user is not None else ""
        return f"http://{credentials}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged ("GET http://host:port/path HTTP/1.1", "CONNECT host:port ...")."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return [line.split("): ", 1)[1].strip() for line in f if "Request (file descriptor" in line]
        except FileNotFoundError:
            return []

    def start(self) -> None:
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "tinyproxy exited at start"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(accepting, SHORT, "tinyproxy to accept connections")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SHORT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def tinyproxy(tmp_path):
    """A running tinyproxy (skipped where the distribution's tinyproxy is not installed; .ci/run installs it)."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("needs tinyproxy (apt-get install tinyproxy-bin)")
    proxy = TinyProxy(tmp_path)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
