"""The daemon host with real processes: transfers that go on while no app runs, relaunch of the
app through relaunch_command (with backoff for an app that keeps crashing), a daemon killed
mid-download, socket permissions, and idle exit."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, SHORT, Ledger, MiB, Recorder, download, received, sha, stop_daemon, wait_until

if bg.fcntl is None:  # pragma: no cover
    pytest.skip("the daemon host needs POSIX", allow_module_level=True)

APP = textwrap.dedent('''
    import hashlib, json, os, sys, threading
    sys.path.insert(0, {here!r})
    import bgsession as bg

    directory, ledger_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    urls = sys.argv[4:]
    background = os.environ.get(bg.BACKGROUND_EVENTS_ENV)

    def ledger(**rec):
        rec["pid"] = os.getpid()
        with open(ledger_path, "a") as f:
            f.write(json.dumps(rec) + "\\n")
            f.flush()
            os.fsync(f.fileno())

    ledger(event="launch", background=background, mode=mode)
    if mode == "crash" and background:
        os._exit(3)  # a broken app: dies before acknowledging anything

    done = threading.Event()

    class App(bg.SessionDelegate):
        def download_task_did_finish_downloading(self, session, task, location):
            with open(location, "rb") as f:
                ledger(event="finish", id=task.identifier, desc=task.description,
                       sha=hashlib.sha256(f.read()).hexdigest())

        def task_did_complete(self, session, task, error):
            ledger(event="complete", id=task.identifier, error=str(error) if error else None)

        def task_did_receive_challenge(self, session, task, challenge):
            ledger(event="challenge", id=task.identifier)
            return bg.AuthChallengeDisposition.USE_CREDENTIAL, bg.Credential("ann", "pw")

        def did_finish_events_for_background_session(self, session):
            ledger(event="handler")
            done.set()

    relaunch = [sys.executable, sys.argv[0], directory, ledger_path, mode]
    config = bg.Configuration.background("test.daemon", directory=directory, host="daemon",
                                         relaunch_command=relaunch, daemon_idle_timeout=1.0,
                                         relaunch_backoff=0.2)
    session = bg.Session(config, App())
    if urls:
        for i, url in enumerate(urls):
            session.download_task(url, description="file:%d" % i).resume()
        ledger(event="resumed")
        threading.Event().wait()  # the foreground app lives until the test kills it
    if background:
        done.wait(60)
        session.wait(60)
    session.close()
    ledger(event="exit")
''')


class App:
    """The test app, started by the test or relaunched by the daemon; reads its fsynced ledger."""

    def __init__(self, tmp_path) -> None:
        self.script = tmp_path / "app.py"
        self.script.write_text(APP.format(here=HERE))
        self.directory = str(tmp_path / "session")
        self.ledger = str(tmp_path / "ledger.jsonl")
        self.procs: list[subprocess.Popen] = []

    def start(self, mode: str, *urls: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != bg.BACKGROUND_EVENTS_ENV}
        proc = subprocess.Popen([sys.executable, str(self.script), self.directory, self.ledger, mode, *urls],
                                env=env)
        self.procs.append(proc)
        return proc

    def entries(self) -> list[dict]:
        return Ledger(self.ledger).read()

    def events(self, name: str) -> list[dict]:
        return [e for e in self.entries() if e["event"] == name]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for e in self.events("launch"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(e["pid"], signal.SIGKILL)
        stop_daemon(self.directory)


@pytest.fixture
def app(tmp_path):
    a = App(tmp_path)
    try:
        yield a
    finally:
        a.close()


def daemon_pid(directory: str):
    pid, _ = bg._read_pid_file(directory)
    return pid


def alive(pid: int) -> bool:
    return bg._pid_alive(pid)


def test_download_finishes_while_no_app_runs_then_app_is_relaunched(server, app):
    """App SIGKILLed right after resume(): the daemon finishes, relaunches the app, hooks and handler run once."""
    data = fs.blob_bytes(2 * MiB, seed=51)
    server.add_blob("/photo.jpg", data, default_fault=fs.Fault(throttle=4 * MiB))
    hold = server.hold_at("/photo.jpg", 0)
    p = app.start("normal", server.url("/photo.jpg"))
    wait_until(lambda: app.events("resumed"), what="resume() to return")
    p.kill()
    p.wait()
    assert hold.wait(LONG)
    served_before = server.bytes_served("/photo.jpg")
    hold.release()
    wait_until(lambda: app.events("exit"), what="the relaunched app to finish")
    assert served_before == 0 and server.bytes_served("/photo.jpg") == len(data)  # all served after the kill
    launches = app.events("launch")
    assert [e["background"] for e in launches] == [None, "test.daemon"]
    assert [e["sha"] for e in app.events("finish")] == [sha(data)]
    assert len(app.events("complete")) == 1
    assert len(app.events("handler")) == 1
    wait_until(lambda: not os.path.exists(os.path.join(app.directory, "daemon.sock")), what="idle daemon exit")
    assert bg.Journal(app.directory).check() == []


def test_crashing_app_is_relaunched_with_growing_delays(server, app):
    """A relaunched app that dies without acknowledging is relaunched after growing delays, not in a loop."""
    server.add_blob("/x.bin", size=1000)
    hold = server.hold_at("/x.bin", 0)  # nothing completes while the first app is alive
    p = app.start("crash", server.url("/x.bin"))
    wait_until(lambda: app.events("resumed"), what="resume() to return")
    p.kill()
    p.wait()
    hold.release()
    wait_until(lambda: len([e for e in app.events("launch") if e["background"]]) >= 4, what="four relaunches")
    with open(os.path.join(app.directory, "daemon.log")) as f:
        log = f.read()
    delays = [float(x.split("next relaunch in ")[1].split("s")[0]) for x in log.splitlines()
              if "next relaunch in" in x]
    assert delays[:3] == [0.2, 0.4, 0.8]  # relaunch_backoff * 2**(failures-1)
    launched = [e["pid"] for e in app.events("launch") if e["background"]]
    assert len(set(launched)) == len(launched)  # one process per relaunch, none while another runs


def test_daemon_killed_mid_download_is_restarted_and_resumes(server, daemons):
    """SIGKILL of the daemon at random offsets: the client restarts it, the transfer resumes by Range, byte-exact."""
    data = fs.blob_bytes(6 * MiB, seed=52)
    rng = random.Random(52)
    stops = [rng.randrange(256 * 1024, 1 * MiB) for _ in range(3)]  # bytes into each response
    server.add_blob("/big.bin", data, faults=[fs.Fault(stall_after=n) for n in stops])
    rec = Recorder()
    s = daemons.open(rec)
    task = download(s, server.url("/big.bin"))
    on_disk = []
    for stop in stops:
        assert server.wait_stalled(1, LONG)
        on_disk.append((on_disk[-1] if on_disk else 0) + stop)  # asserted below via the Range headers
        wait_until(received(task, on_disk[-1]), what="the stalled response's bytes on disk")
        pid = daemon_pid(s.configuration.directory)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda pid=pid: not alive(pid), what="daemon death")
        server.release_stalls()
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    ranges = [r.header("range") for r in server.requests("/big.bin")]
    # each restart asks for exactly what was not on disk: nothing is downloaded twice
    assert ranges == [None] + [f"bytes={n}-" for n in on_disk]


def test_daemon_exits_when_idle_and_cleans_up(server, daemons):
    """With no task, backlog or client for daemon_idle_timeout, the daemon exits and removes socket and pid file."""
    server.add_blob("/i.bin", size=1000)
    rec = Recorder()
    s = daemons.open(rec)
    download(s, server.url("/i.bin"))
    assert s.wait(LONG)
    d = s.configuration.directory
    pid = daemon_pid(d)
    assert pid is not None and alive(pid)
    daemons.close_all()
    wait_until(lambda: not alive(pid), timeout=SHORT, what="idle exit")
    assert not os.path.exists(os.path.join(d, "daemon.sock"))
    assert not os.path.exists(os.path.join(d, "daemon.pid"))


def test_events_without_relaunch_command_wait_in_the_journal_not_in_a_daemon(server, daemons):
    """Transfers done, no app attached, no relaunch_command: the daemon cannot bring an app, so it exits
    when idle; the events wait in the journal and the next attach (a new daemon) delivers them once."""
    data = fs.blob_bytes(30_000, seed=57)
    server.add_blob("/w.bin", data, faults=[fs.Fault(stall_after=10_000)])
    s = daemons.open(None)
    d = s.configuration.directory
    download(s, server.url("/w.bin"))
    assert server.wait_stalled(1, LONG)
    pid = daemon_pid(d)
    daemons.close_all()  # the app goes away while the transfer runs
    server.release_stalls()
    wait_until(lambda: not alive(pid), timeout=LONG, what="the daemon's idle exit with an event waiting")
    assert [t["phase"] for t in bg.Journal(d).tasks()] == ["finished_awaiting_delivery"]
    assert not os.path.exists(os.path.join(d, "daemon.sock"))
    rec = Recorder()
    s2 = daemons.open(rec)
    assert s2.wait(LONG)
    assert list(map(sha, rec.files.values())) == [sha(data)]
    assert [c[0] for c in rec.calls] == ["finish", "complete", "did_finish_events"]  # the backlog, once


def test_daemon_keeps_running_while_a_client_is_attached(server, daemons):
    """An attached app keeps an otherwise idle daemon alive (it does not exit under the app)."""
    s = daemons.open(Recorder())
    pid = daemon_pid(s.configuration.directory)
    # idle timeout is 0.5 s: after several of them the daemon must still serve us
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert s.get_tasks() == []
        time.sleep(0.1)  # spacing requests over several idle periods, not synchronisation
    assert alive(pid)


def _as_nobody(fn):
    """Run fn in a forked child with uid/gid 65534; return its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(65534)
            os.setuid(65534)
            os._exit(fn())
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_reach_the_socket(server, daemons):
    """Another uid can neither open the 0700 directory's socket nor, with the directory opened up, be served."""
    import tempfile
    outer = tempfile.mkdtemp(prefix="bgs-perm-")  # pytest's own tmp dirs are 0700: use a traversable one
    os.chmod(outer, 0o711)
    d = os.path.join(outer, "s")
    daemons.directories.add(d)
    s = bg.Session(bg.Configuration.background("test.perm", directory=d, daemon_idle_timeout=0.5))
    daemons.opened.append(s)
    path = os.path.join(d, "daemon.sock")

    def try_connect():
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(path)
        except PermissionError:
            return 10
        try:
            c.sendall(b'{"op":"tasks","rid":1}\n')
            c.settimeout(5)
            data = c.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return 20
        return 20 if data == b"" else 30

    assert _as_nobody(try_connect) == 10  # the directory is 0700
    os.chmod(d, 0o755)
    os.chmod(path, 0o777)
    try:
        assert _as_nobody(try_connect) == 20  # reached the socket: the daemon hangs up on a foreign uid
    finally:
        os.chmod(d, 0o700)
        os.chmod(path, 0o600)
    assert s.get_tasks() == []
    daemons.close_all()
    stop_daemon(d)
    import shutil
    shutil.rmtree(outer)
    daemons.directories.discard(d)


def test_challenge_with_no_app_attached_waits_for_the_next_attach(server, daemons):
    """A 401 while no app is attached (and no relaunch command) waits; the next attach answers it."""
    data = fs.blob_bytes(5000, seed=53)
    # a 503 asking for a 2 s pause first: the 401 comes once no app is attached
    server.add_blob("/p.jpg", data, auth=fs.BasicAuth("ann", "pw"), faults=[fs.Fault(status=503, retry_after="2")])
    s = daemons.open(None)
    download(s, server.url("/p.jpg"))
    daemons.close_all()

    class Answer(Recorder):
        def task_did_receive_challenge(self, session, task, challenge):
            return bg.AuthChallengeDisposition.USE_CREDENTIAL, bg.Credential("ann", "pw")

    rec = Answer()
    s2 = daemons.open(rec)
    assert s2.wait(LONG)
    assert list(map(sha, rec.files.values())) == [sha(data)]


def test_challenge_with_no_app_attached_relaunches_the_app(server, app):
    """A 401 while no app runs makes the daemon relaunch the app, which answers; the file arrives once."""
    data = fs.blob_bytes(20_000, seed=54)
    # the first answer is a 503 asking for a 2 s pause: the app is long dead when the 401 comes
    server.add_blob("/private.jpg", data, auth=fs.BasicAuth("ann", "pw"),
                    faults=[fs.Fault(status=503, retry_after="2")])
    p = app.start("normal", server.url("/private.jpg"))
    wait_until(lambda: app.events("resumed"), what="resume() to return")
    p.kill()
    p.wait()
    wait_until(lambda: app.events("exit"), what="the relaunched app to finish")
    background = [e["pid"] for e in app.events("launch") if e["background"]]
    assert [e["pid"] for e in app.events("challenge")] == background[:1]  # answered by the relaunched app
    assert [e["sha"] for e in app.events("finish")] == [sha(data)]
    assert len(app.events("handler")) == 1


MOVE_THEN_DIE = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {here!r})
    import bgsession
    url, session_dir, dest, ledger, mode = sys.argv[1:6]
    if mode == "first":
        real_move = bgsession.move_to
        def move_then_die(*args, **kwargs):
            real_move(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # after the move, before the acknowledgement
        bgsession.move_to = move_then_die

    def note(text):
        with open(ledger, "a") as f:
            f.write(text + "\\n")

    class Manager(bgsession.SessionManager):
        def __init__(self):
            super().__init__(bgsession.Configuration.background("test.moved", directory=session_dir,
                                                                daemon_idle_timeout=5.0))
            self.set_download_task_did_finish_downloading(lambda s, t, loc: note("finish") or dest)
            self.set_task_did_complete(lambda s, t, e: note(f"complete {{e}}"))

    m = Manager()
    if mode == "first":
        m.session.download_task(url).resume()
    m.session.wait(30)
    m.session.close()
''')


def test_file_moved_then_app_killed_is_not_delivered_again(server, tmp_path):
    """App killed after the manager moved the file, before its ack: the daemon acknowledges it at the next
    attach (the file is gone: it was consumed) and delivers complete; the finish block runs once."""
    data = fs.blob_bytes(100_000, seed=55)
    server.add_blob("/f.bin", data)
    script = tmp_path / "mover.py"
    script.write_text(MOVE_THEN_DIE.format(here=HERE))
    session, dest, ledger = str(tmp_path / "s"), str(tmp_path / "f.bin"), str(tmp_path / "ledger")
    try:
        first = subprocess.run([sys.executable, str(script), server.url("/f.bin"), session, dest, ledger, "first"],
                               timeout=LONG)
        assert first.returncode == -signal.SIGKILL
        assert daemon_pid(session) is not None and alive(daemon_pid(session))  # the daemon outlived the app
        second = subprocess.run([sys.executable, str(script), server.url("/f.bin"), session, dest, ledger,
                                 "second"], timeout=LONG)
        assert second.returncode == 0
        with open(ledger) as f:
            assert f.read().splitlines() == ["finish", "complete None"]
        with open(dest, "rb") as f:
            assert sha(f.read()) == sha(data)
        assert bg.Journal(session).tasks() == []
    finally:
        stop_daemon(session)


def test_daemon_does_not_relaunch_while_an_app_holds_the_session(server, daemons):
    """Events wait and no app is attached, but an app holds app.lock (it is opening the session): no relaunch."""
    server.add_blob("/x.bin", size=1000)
    marker = daemons.tmp_path / "relaunched"
    config = daemons.config(relaunch_command=[sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"])
    s = bg.Session(config, None, _deferred=True)  # holds app.lock, never attaches: events wait
    daemons.opened.append(s)
    download(s, server.url("/x.bin"))
    d = s.configuration.directory
    wait_until(lambda: s.get_tasks()[0].state is bg.TaskState.COMPLETED, what="the backlog")
    server_pid = daemon_pid(d)
    deadline = time.monotonic() + 1.5  # several of the daemon's 0.25 s relaunch checks
    while time.monotonic() < deadline:
        assert not marker.exists()
        time.sleep(0.05)  # observing that nothing happens over a bounded time
    assert alive(server_pid)
    daemons.close_all()  # app.lock released: now the daemon relaunches
    wait_until(marker.exists, what="the relaunch once the app is gone")


@pytest.mark.parametrize("running, age, watched, attached, due", [
    (0, 0.0, False, False, True),  # the session's transfers are done: relaunch
    (1, 0.0, False, False, False),  # another transfer runs: the events wait for it (as iOS batches a wake-up)...
    (1, bg.RELAUNCH_BATCH_WINDOW, False, False, True),  # ...for the batch window at most
    (1, 0.0, True, False, True),  # someone watches (bgsession wait): at once
    (0, 0.0, True, True, False),  # an app is attached: it gets the events itself
])
def test_when_the_daemon_relaunches_the_app_for_events(running, age, watched, attached, due):
    """The relaunch decision (pure): events wait for the other transfers, at most RELAUNCH_BATCH_WINDOW, unless a
    client is connected to watch them."""
    status = bg._EngineStatus(running=running, scheduled=0, canceling=0, backlog=1, backlog_age=age,
                              attached=attached, waiting_challenges=0, acks=0)
    assert bg._Relauncher._due(status, watched) is due
