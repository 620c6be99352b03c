"""asyncio: ``async def`` hooks run on the loop the session was created on, one at a time, in order, each
acknowledged after its coroutine returned; ``await session.wait_async()``; ``error = await task``; both hosts.
An asyncio app survives a SIGKILL and a background relaunch; the event loop stays responsive (a heartbeat's lag)
during 1,000 downloads, because no blocking work runs on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *

#: The lag bound of the heartbeat test: a coroutine that asks to wake every HEARTBEAT seconds is never late by more.
MAX_LAG = 0.050
HEARTBEAT = 0.010


class AsyncRecorder(bg.SessionDelegate):
    """async def hooks that record what ran, where, and whether two ever overlapped."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.running = 0
        self.overlaps = 0
        self.threads: set[str] = set()
        self.loops: set[int] = set()
        self.fail_complete_of: set[str] = set()

    async def _enter(self, name: str, task: bg.Task | None) -> None:
        self.running += 1
        self.overlaps += self.running > 1
        self.threads.add(threading.current_thread().name)
        self.loops.add(id(asyncio.get_running_loop()))
        for _ in range(3):
            await asyncio.sleep(0)  # give an overlapping hook every chance to start
        self.calls.append((name, task.description if task is not None else None))
        self.running -= 1

    async def download_task_did_finish_downloading(self, session, task, location):
        with open(location, "rb") as f:
            self.calls.append(("bytes", task.description, sha(f.read())))
        await self._enter("finish", task)

    async def task_did_complete(self, session, task, error):
        await self._enter("complete", task)
        if task.description in self.fail_complete_of:
            raise RuntimeError("this hook fails on purpose")


def test_async_hooks_run_on_the_sessions_loop_one_at_a_time_in_order(server, sessions):
    """Each task's finish then complete, on the creating loop's thread, never two at once; every event
    acknowledged once the coroutine returned (nothing is owed afterwards)."""
    files = {f"f{i}": fs.blob_bytes(3000 + i, seed=i) for i in range(6)}
    for name, data in files.items():
        server.add_blob(f"/{name}", data)
    rec = AsyncRecorder()

    async def main() -> bool:
        session = sessions.open(rec)
        tasks = [session.download_task(server.url(f"/{name}"), description=name) for name in files]
        session.resume_all(tasks)
        return await session.wait_async(LONG)

    assert asyncio.run(main())
    assert rec.overlaps == 0 and rec.threads == {threading.current_thread().name} and len(rec.loops) == 1
    for name, data in files.items():
        mine = [c for c in rec.calls if c[1] == name]
        assert mine == [("bytes", name, sha(data)), ("finish", name), ("complete", name)]
    sessions.close_all()
    assert bg.Journal(sessions.config().directory).tasks() == []


def test_await_task_gives_the_completion_error(server, sessions):
    """``error = await task``: None for a response (a 404 too), TransferError CANCELLED for a cancelled task;
    awaiting a task already completed returns at once."""
    server.add_blob("/ok", size=1000)
    server.add_status("/missing", 404, b"no")
    server.add_blob("/slow", size=4 * MiB)
    hold = server.hold_at("/slow", 64 * 1024)

    async def main() -> tuple:
        session = sessions.open(Recorder())
        ok, missing, slow = (session.download_task(server.url(p)) for p in ("/ok", "/missing", "/slow"))
        session.resume_all([ok, missing, slow])
        first = await ok
        second = await missing
        assert await asyncio.to_thread(hold.wait, LONG)
        slow.cancel()
        hold.release()
        third = await slow
        return first, second, await ok, third, missing.response.status

    first, second, again, third, status = asyncio.run(main())
    assert first is None and second is None and again is None and status == 404
    assert isinstance(third, bg.TransferError) and third.code is bg.ErrorCode.CANCELLED


def test_async_hook_that_raises_is_delivered_again_and_await_says_so(server, sessions):
    """A coroutine hook that raises is not acknowledged: ``await task`` raises, and the event is delivered again
    when the session is next created."""
    server.add_blob("/x", size=2000)
    rec = AsyncRecorder()
    rec.fail_complete_of = {"x"}

    async def first() -> None:
        session = sessions.open(rec)
        task = session.download_task(server.url("/x"), description="x")
        task.resume()
        with pytest.raises(bg.BGSessionError, match="raised"):
            await task
        assert await session.wait_async(LONG)

    asyncio.run(first())
    sessions.close_all()
    again = Recorder()
    session = sessions.open(again)
    assert session.wait(LONG)
    assert [c for c in again.calls if c[0] == "complete"] == [("complete", 1)]


def test_wait_async_times_out_without_blocking_the_loop(server, sessions):
    """``wait_async(timeout)`` returns False at the timeout while other coroutines keep running; True once settled."""
    server.add_blob("/x", size=1000)

    async def main() -> tuple:
        session = sessions.open(Recorder())
        task = session.download_task(server.url("/x"))  # suspended: never completes until resumed
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        timed_out = await session.wait_async(0.3)
        task.resume()
        settled = await session.wait_async(LONG)
        ticking.cancel()
        return timed_out, settled, ticks

    timed_out, settled, ticks = asyncio.run(main())
    assert timed_out is False and settled is True and ticks >= 5


def test_async_hooks_need_a_loop(tmp_path):
    """async def hooks (or blocks) for a session created outside a running event loop are refused at once."""
    config = bg.Configuration.background("t.noloop", directory=str(tmp_path / "s"), host="inprocess")
    with pytest.raises(bg.InvalidArgumentError, match="event loop"):
        bg.Session(config, AsyncRecorder())
    manager = bg.SessionManager(config)
    try:
        async def block(session, task, error):
            pass
        with pytest.raises(bg.InvalidArgumentError, match="event loop"):
            manager.set_task_did_complete(block)
    finally:
        manager.session.close()


def test_session_manager_async_blocks(server, sessions, tmp_path):
    """A SessionManager made inside the loop takes async def blocks; the destination a coroutine returns is
    where the manager moves the file (the move itself runs off the loop)."""
    data = fs.blob_bytes(7000, seed=9)
    server.add_blob("/cat.jpg", data)
    seen: list[str] = []

    async def main() -> bool:
        loop_thread = threading.current_thread().name

        class Manager(bg.SessionManager):
            def __init__(self) -> None:
                super().__init__(sessions.config())

                async def destination(session, task, location):
                    seen.append(threading.current_thread().name)
                    return str(tmp_path / "Documents" / "cat.jpg")

                async def complete(session, task, error):
                    seen.append(threading.current_thread().name)
                self.set_download_task_did_finish_downloading(destination)
                self.set_task_did_complete(complete)

        manager = Manager()
        sessions.opened.append(manager.session)
        manager.download_task(server.url("/cat.jpg")).resume()
        settled = await manager.session.wait_async(LONG)
        assert seen == [loop_thread, loop_thread]
        return settled

    assert asyncio.run(main())
    assert sha((tmp_path / "Documents" / "cat.jpg").read_bytes()) == sha(data)


# ---------------------------------------------------------------------------
# an asyncio app through SIGKILL and a background relaunch
# ---------------------------------------------------------------------------

ASYNC_APP = textwrap.dedent('''
    import asyncio, hashlib, json, os, sys
    import appdelegate, bgsession

    STATE = os.path.dirname(os.path.abspath(__file__))

    def note(**line):
        with open(os.path.join(STATE, "ledger.jsonl"), "a") as f:
            f.write(json.dumps({**line, "pid": os.getpid()}) + "\\n")
            f.flush()
            os.fsync(f.fileno())

    class Photos(bgsession.SessionDelegate):
        def __init__(self, app):
            self.app = app

        async def download_task_did_finish_downloading(self, session, task, location):
            await asyncio.sleep(0)
            path = bgsession.move_to(location, os.path.join(STATE, "Documents", "photo.bin"))
            with open(path, "rb") as f:
                note(event="finish", sha=hashlib.sha256(f.read()).hexdigest())

        async def task_did_complete(self, session, task, error):
            note(event="complete", error=str(error) if error else None)

        async def did_finish_events_for_background_session(self, session):
            note(event="events")
            self.app.handler()

    class App(appdelegate.AppDelegate):
        handler = None

        async def did_finish_launching(self, app, launch_options):
            note(event="launch", background=app.is_background_launch)
            config = bgsession.Configuration.background(
                "test.asyncapp", directory=os.path.join(STATE, "session"), host=sys.argv[1],
                relaunch_command=[sys.executable, os.path.abspath(__file__), sys.argv[1]])
            self.session = bgsession.Session(config, Photos(self))
            if len(sys.argv) > 2 and not self.session.get_tasks():
                self.session.download_task(sys.argv[2]).resume()
                note(event="resumed")

        def handle_events_for_background_url_session(self, app, identifier, completion_handler):
            self.handler = completion_handler

        async def run(self, app):
            await self.session.wait_async()

        async def will_terminate(self, app):
            self.session.close()

    sys.exit(appdelegate.main(App))
''')


def test_asyncio_app_survives_a_kill_and_a_background_relaunch(server, tmp_path, host):
    """An appdelegate app with async def lifecycle methods and hooks is SIGKILLed mid-download; it is relaunched
    in the background (by the daemon, or by the test for the in-process host): the file arrives once, whole, the
    completion handler is called from an async hook, and the relaunch exits 0."""
    data = fs.blob_bytes(3 * MiB, seed=21)
    server.add_blob("/photo.bin", data)
    script = tmp_path / "app.py"
    script.write_text(ASYNC_APP)
    ledger = Ledger(str(tmp_path / "ledger.jsonl"))
    env = {"PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "BGSESSION_HANDLER_TIMEOUT": "20"}
    with fs.AppController([sys.executable, str(script), host], identifier="test.asyncapp", env=env,
                          cwd=str(tmp_path)) as ctl:
        try:
            ctl.kill_when(server, "/photo.bin", MiB)
            ctl.launch(extra_args=[server.url("/photo.bin")])
            assert ctl.wait(LONG) == -signal.SIGKILL
            if host == "inprocess":
                ctl.launch(background=True)
                assert ctl.wait(LONG) == 0
            else:
                wait_until(lambda: any(r["event"] == "events" for r in ledger.read()), what="the relaunch")
                relaunched = [r["pid"] for r in ledger.read() if r["event"] == "launch" and r["background"]]
                assert len(relaunched) == 1
                fs.ProcessRef.of(relaunched[0]).wait_exit(LONG)
        finally:
            stop_daemon(str(tmp_path / "session"))
    events = [r["event"] for r in ledger.read()]
    assert events.count("finish") == 1 and events.count("complete") == 1 and events.count("events") == 1
    finish = next(r for r in ledger.read() if r["event"] == "finish")
    assert finish["sha"] == sha(data) == file_sha(str(tmp_path / "Documents" / "photo.bin"))
    assert bg.Journal(str(tmp_path / "session")).check() == []


KILLED_IN_HOOK = textwrap.dedent('''
    import asyncio, json, os, sys
    import bgsession

    directory, host, ledger, mode = sys.argv[1:5]

    def note(**line):
        with open(ledger, "a") as f:
            f.write(json.dumps({**line, "pid": os.getpid()}) + "\\n")
            f.flush()
            os.fsync(f.fileno())

    class Hooks(bgsession.SessionDelegate):
        async def download_task_did_finish_downloading(self, session, task, location):
            note(event="finish", phase="started")
            if mode == "block":
                await asyncio.Event().wait()  # the test kills the process in here
            await asyncio.sleep(0)
            note(event="finish", phase="returned")

        async def task_did_complete(self, session, task, error):
            note(event="complete", error=str(error) if error else None)

    async def main():
        config = bgsession.Configuration.background("test.killedinhook", directory=directory, host=host,
                                                    daemon_idle_timeout=0.5)
        session = bgsession.Session(config, Hooks())
        if len(sys.argv) > 5:
            session.download_task(sys.argv[5]).resume()
        await session.wait_async()
        session.close()

    asyncio.run(main())
''')


def test_kill_inside_an_async_hook_redelivers_the_event_once(server, tmp_path, host):
    """SIGKILL while an async def finish hook awaits: the next launch runs it again; once it has returned (and
    been acknowledged) no later launch runs it: exactly-once, as for plain hooks."""
    server.add_blob("/f.bin", size=50_000)
    script = tmp_path / "app.py"
    script.write_text(KILLED_IN_HOOK)
    directory, ledger = str(tmp_path / "session"), Ledger(str(tmp_path / "ledger.jsonl"))
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, str(script), directory, host, ledger.path]
    try:
        first = subprocess.Popen([*argv, "block", server.url("/f.bin")], env=env)
        try:
            wait_until(lambda: any(r["event"] == "finish" for r in ledger.read()), what="the hook to start")
        finally:
            first.kill()
            first.wait()
        for _ in range(2):  # the second launch delivers again; the third finds nothing owed
            assert subprocess.run([*argv, "return"], env=env, timeout=LONG).returncode == 0
    finally:
        stop_daemon(directory)
    lines = [(r["event"], r.get("phase"), r["pid"]) for r in ledger.read()]
    assert [(e, p) for e, p, _ in lines] == [("finish", "started"), ("finish", "started"), ("finish", "returned"),
                                             ("complete", None)]
    assert lines[0][2] == first.pid and len({pid for _, _, pid in lines[1:]}) == 1
    assert bg.Journal(directory).check() == [] and bg.Journal(directory).tasks() == []


# ---------------------------------------------------------------------------
# the loop stays responsive
# ---------------------------------------------------------------------------


HEARTBEAT_APP = textwrap.dedent('''
    import asyncio, json, os, sys, time
    import bgsession

    base, directory, host, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    done = {"finish": 0, "complete": 0}


    def runqueue_waits():
        """Per thread of this process: seconds spent runnable but waiting for a CPU (Linux schedstat)."""
        waits = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                    waits[tid] = int(f.read().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                pass  # the thread ended
        return waits


    def machine_delay(before, after):
        """The longest any thread of this process waited for a CPU between two readings: the loop's thread, or
        the one holding the GIL it waited for. That is the machine's load, which no code here can give back."""
        return max((after[t] - before[t] for t in before.keys() & after.keys()), default=0.0)


    class Hooks(bgsession.SessionDelegate):
        async def download_task_did_finish_downloading(self, session, task, location):
            done["finish"] += 1

        async def task_did_complete(self, session, task, error):
            done["complete"] += 1


    async def main():
        loop = asyncio.get_running_loop()
        config = bgsession.Configuration.background("test.heartbeat", directory=directory, host=host,
                                                    max_connections_per_host=16, daemon_idle_timeout=0.5)
        session = bgsession.Session(config, Hooks())
        tasks = await loop.run_in_executor(None, lambda: [
            session.download_task(f"{base}/blob/10240?seed={i}") for i in range(count)])
        lags, raw, stop = [], [], asyncio.Event()

        async def heartbeat():
            while not stop.is_set():
                asked, waits = time.monotonic(), runqueue_waits()
                await asyncio.sleep(HEARTBEAT)
                late = time.monotonic() - asked - HEARTBEAT
                raw.append(late)
                lags.append(late - machine_delay(waits, runqueue_waits()))

        beating = asyncio.ensure_future(heartbeat())
        await loop.run_in_executor(None, session.resume_all, tasks)
        settled = await session.wait_async(120)
        stop.set()
        await beating
        await loop.run_in_executor(None, session.close)
        print(json.dumps({"settled": settled, "done": done, "lags": lags, "raw": raw}))


    asyncio.run(main())
''').replace("HEARTBEAT", repr(HEARTBEAT))


@pytest.fixture
def server_process():
    """A FakeServer in a process of its own, so that its threads do not compete with the app's for the GIL."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_server.py"), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(SHORT)
        if proc.stdout is not None:
            proc.stdout.close()


def _raised_priority() -> None:
    """In the child: ask for a larger share of the CPU than the machine's other work (root only), so that what is
    measured is this process, not the neighbours' test runs."""
    with contextlib.suppress(OSError):
        os.nice(-20)


def test_heartbeat_lag_stays_low_during_a_thousand_downloads(server_process, tmp_path, host):
    """During 1,000 small downloads whose hooks are async def, a heartbeat coroutine asking to wake every 10 ms is
    never late by 50 ms or more: journal, socket and file work stay off the loop.

    The app runs as a process of its own (at a raised priority where allowed) against a server in another one, and
    each beat's lateness leaves out the longest time a thread of the app waited for a CPU meanwhile (schedstat: the
    loop's thread, or the one holding the GIL): on a shared 2-core machine that is the neighbours' load, not this
    code. Unloaded, nothing is left out, and a 60 ms blocking call on the loop fails the test."""
    directory = str(tmp_path / "session")
    script = tmp_path / "heartbeat.py"
    script.write_text(HEARTBEAT_APP)
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        run = subprocess.run([sys.executable, "-W", "error", str(script), server_process, directory, host, "1000"],
                             capture_output=True, text=True, env=env, timeout=300, preexec_fn=_raised_priority)
    finally:
        stop_daemon(directory)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["settled"] and result["done"] == {"finish": 1000, "complete": 1000}
    lags, raw = sorted(result["lags"]), sorted(result["raw"])
    print(f"heartbeat lag over {len(lags)} beats ({host}): median {lags[len(lags) // 2] * 1000:.1f} ms, "
          f"max {lags[-1] * 1000:.1f} ms (wall clock: p99 {raw[int(len(raw) * 0.99)] * 1000:.1f} ms, "
          f"max {raw[-1] * 1000:.1f} ms)")
    assert lags[-1] < MAX_LAG
    assert bg.Journal(directory).check() == []
