"""Hostile servers, hostile neighbours, damaged state, scarce resources (issue 18's probe, each finding a test).

The server faults that end in a file or an error are rows of the fault matrix (``test_faults.py``, ``HOSTILE``);
here are the pure decisions behind them as tables, and everything that is not a server fault: other local users,
folders and files that are not bgsession's, crafted or damaged state, out of descriptors, memory, log size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import urllib.parse

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, SHORT, MiB, Recorder, download, read_pid_file, sha, stop_daemon, wait_until

BGSESSION = os.path.join(HERE, "bgsession.py")


def H(**fields: str) -> bg.Headers:
    """Headers from keyword arguments: Content_Range= -> Content-Range."""
    return bg.Headers([(name.replace("_", "-"), value) for name, value in fields.items()])


def tree(root: str) -> dict[str, tuple]:
    """Everything about the files under *root* that a change would alter: names, modes, sizes, mtimes, contents."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in [""] + dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error", BGSESSION, *args], capture_output=True, text=True,
                          timeout=LONG)


# ---------------------------------------------------------------------------
# hostile servers: the pure decisions, as tables
# ---------------------------------------------------------------------------

HELD = {"etag": '"a"'}


@pytest.mark.parametrize("offset, headers, validator, action", [
    (1000, H(Content_Range="bytes 1000-4999/5000", Content_Length="4000", ETag='"a"'), HELD, "write"),
    (1000, H(Content_Range="bytes 0-4999/5000", Content_Length="5000", ETag='"a"'), HELD, "write"),  # early
    (1000, H(Content_Range="bytes 0-99/5000", Content_Length="100", ETag='"a"'), HELD, "rerequest"),  # ends before
    (1000, H(Content_Range="bytes 500-999/5000", Content_Length="500", ETag='"a"'), HELD, "rerequest"),
    (1000, H(Content_Range="bytes 1000-4999/5000", Content_Length="0", ETag='"a"'), HELD, "rerequest"),  # no body
    (1000, H(Content_Range="bytes 1000-4999/5000", Content_Length="4000", ETag='"b"'), HELD, "rerequest"),  # other
    (1000, H(Content_Range="bytes 1000-4999/5000", Content_Length="4000", ETag='W/"a"'), HELD, "rerequest"),
    (1000, H(Content_Range="bytes 1000-4999/5000", Content_Length="4000"), HELD, "write"),  # none: If-Range holds
    (1000, H(Content_Range="bytes 1000-4999/5000", Last_Modified="Mon, 02 Jan 2023 00:00:00 GMT"),
     {"last_modified": "Sun, 01 Jan 2023 00:00:00 GMT"}, "rerequest"),
    (1000, H(Content_Range="bytes 1000-4999/5000", Last_Modified="Sun, 01 Jan 2023 00:00:00 GMT"),
     {"last_modified": "Sun, 01 Jan 2023 00:00:00 GMT"}, "write"),
])
def test_plan_response_takes_only_a_206_that_advances_the_same_entity(offset, headers, validator, action):
    """A 206 that ends before the offset, contradicts its own length, or is of another entity is asked again."""
    assert bg.plan_response(offset, True, 206, headers, 5000, validator).action == action


@pytest.mark.parametrize("before, after, total, resumable, outcome", [
    (0, 100, 100, True, bg._Complete),
    (0, 100, None, True, bg._Complete),  # chunked: the end of the body is the end of the entity
    (0, 101, 100, True, bg._Failed),
    (50, 50, 100, True, bg._Interrupted),  # no new byte: the attempt ends (Retry counts it), no loop
    (50, 10, 100, True, bg._Interrupted),  # went backwards (an early 206 cut short)
    (50, 60, 100, False, bg._Interrupted),  # advanced, but nothing to resume with
    (50, 60, 100, True, bg._AskRest),
])
def test_after_body_asks_for_the_rest_only_after_progress(before, after, total, resumable, outcome):
    """A body that ended early asks for the rest in the same attempt only if it advanced the file."""
    assert type(bg.after_body(before, after, total, resumable)) is outcome


def test_unusable_ranges_end_the_attempt_after_a_few_requests():
    """A server that keeps answering unusable 206s is asked a bounded number of times, then the attempt ends."""
    ex = bg._Exchange("download", "GET", "http://h/f", bg.Retry(), offset=1000, validator=HELD, known_total=5000)
    bad = H(Content_Range="bytes 0-99/5000", Content_Length="100", ETag='"a"')
    steps = []
    for _ in range(10):
        step = bg.next_step(ex, 206, bad)
        steps.append(type(step))
        if not isinstance(step, bg._AskAgain):
            break
        ex = bg.dataclasses.replace(ex, rerequests=ex.rerequests + 1)
    assert steps == [bg._AskAgain] * bg._MAX_REREQUESTS + [bg._Interrupted]


@pytest.mark.parametrize("iri, uri", [
    ("http://例え.jp/パス?q=値#f", "http://xn--r8jz45g.jp/%E3%83%91%E3%82%B9?q=%E5%80%A4#f"),
    ("http://h/ä%20b", "http://h/%C3%A4%20b"),  # an existing escape stays as it is
    ("http://u:pä@h:81/x", "http://u:p%C3%A4@h:81/x"),
    ("https://h/plain?x=1", "https://h/plain?x=1"),
])
def test_non_ascii_urls_become_uris(iri, uri):
    """A URL with non-ASCII characters is percent-encoded (the host IDNA-encoded) when the Request is made."""
    assert bg._iri_to_uri(iri) == uri
    assert bg.Request(iri).url == uri


def test_a_host_idna_cannot_write_is_refused_at_creation():
    """A non-ASCII host that has no IDNA form is a clear BAD_URL when the Request is made, not a failed task."""
    with pytest.raises(bg.TransferError) as info:
        bg.Request("http://" + "é" * 70 + ".example/x")
    assert info.value.code is bg.ErrorCode.BAD_URL


@pytest.mark.parametrize("location, target", [
    ("/ünï.bin".encode().decode("latin-1"), "http://h/%C3%BCn%C3%AF.bin"),  # UTF-8 bytes, as http.client reads them
    ("/\xe9.bin", "http://h/%E9.bin"),  # a Latin-1 byte that is no UTF-8: kept as that byte
    ("http://bob:pw@other/x", "http://other/x"),  # userinfo: never in the URL kept
])
def test_redirect_targets_become_uris_without_userinfo(location, target):
    """A redirect's Location is percent-encoded and loses its userinfo (which becomes a credential in memory)."""
    step = bg._redirect_step(bg._Exchange("download", "GET", "http://h/f", bg.Retry()), 302, location)
    assert isinstance(step, bg._FollowRedirect) and step.url == target
    assert (step.credential is not None) == ("bob:" in location)


def test_a_206_that_never_advances_is_bounded_by_retry(server, sessions):
    """A server whose every resumed 206 ends before its first byte costs a few attempts (Retry), never a loop."""
    retry = bg.Retry(total=3, backoff_factor=0.001, backoff_max=0.01)
    server.add_blob("/f", size=1 * MiB, faults=[fs.Fault(cut_after=1000)], default_fault=fs.Fault(cut_after=0))
    rec = Recorder()
    s = sessions.open(rec, retry=retry)
    task = download(s, server.url("/f"))
    assert s.wait(LONG)
    error = rec.errors[task.identifier]
    assert error is not None and error.code is bg.ErrorCode.NETWORK_CONNECTION_LOST and error.resume_data
    assert len(server.requests("/f")) <= retry.total + 2
    with open(os.path.join(s.configuration.directory, "journal.jsonl"), "rb") as f:
        assert f.read().count(b"\n") < 40


def test_a_clean_close_in_a_huge_body_resumes_with_range(server, sessions):
    """A body announced as 32 GiB and closed cleanly after 512 KiB resumes with Range (no MemoryError)."""
    data = fs.blob_bytes(1 * MiB, seed=185)
    server.add_blob("/huge", data, faults=[fs.Fault(claim_length=32 << 30, cut_after=512 << 10)])
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/huge"))
    assert s.wait(LONG)
    assert rec.errors[task.identifier] is None and sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/huge")[1].range_header == f"bytes={512 << 10}-"


# ---------------------------------------------------------------------------
# secrets: the values (the scan of every file is test_secrets.py)
# ---------------------------------------------------------------------------


def test_userinfo_and_marked_headers_never_reach_the_stored_request():
    """A URL's userinfo becomes an in-memory credential; marked headers stay out of the stored form; repr hides both."""
    request = bg.Request("http://ann:p%40ss@h/x", headers={"X-Api-Key": "k1", "X-Other": "o"},
                         secret_headers=["x-api-key"])
    record = request._to_record(secret=["X-Other"])
    assert record["url"] == "http://h/x" and record["headers"] == [] and record["secret_headers"] == ["x-api-key"]
    assert request._credential() == bg.Credential("ann", "p@ss", bg.CredentialPersistence.NONE)
    assert dict(request._secret_headers(["X-Other"])) == {"X-Api-Key": "k1", "X-Other": "o"}
    assert "p%40ss" not in repr(request) and "k1" not in repr(request)
    response = bg.Response("http://h/x", 200, H(Set_Cookie="s=1", X_Token="t", ETag='"e"'))
    assert response._to_record(["x-token"])["headers"] == [["ETag", '"e"']]


@pytest.mark.parametrize("kwargs", [
    dict(secret_headers="X-Api-Key"), dict(secret_headers=["bad name"]), dict(headers={"X-A": "€"}),
    dict(headers={"X-A": "x" * (bg.MAX_HEADER_BYTES + 1)}),
])
def test_bad_secret_names_and_unsendable_headers_are_refused(kwargs):
    """Secret header names must be header names; header values must be sendable (Latin-1) and bounded."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.Request("http://h/x", **kwargs)
    with pytest.raises(bg.InvalidArgumentError):
        bg.Configuration.default(**{"secret_headers": kwargs["secret_headers"]} if "secret_headers" in kwargs
                                 else {"headers": kwargs["headers"]})


def test_a_description_too_long_for_the_journal_is_refused(sessions):
    """A description is bounded (it is journaled): a huge one is a clear error, and nothing is created."""
    s = sessions.open()
    with pytest.raises(bg.InvalidArgumentError, match="description"):
        s.download_task("http://127.0.0.1:9/x", description="x" * (bg.MAX_DESCRIPTION_BYTES + 1))
    assert s.get_tasks() == []


# ---------------------------------------------------------------------------
# local files and neighbours
# ---------------------------------------------------------------------------


def test_crafted_resume_data_cannot_take_a_file_outside_the_session(server, sessions, tmp_path):
    """Resume data naming a file of the user (absolute path, ../, or a made-up name) fails; the file is untouched."""
    server.add_blob("/x.bin", size=10_000)
    victim = tmp_path / "private.txt"
    victim.write_bytes(b"the user's own data\n" * 100)
    before = sha(victim.read_bytes())
    request = {"url": server.url("/x.bin"), "method": "GET", "headers": []}
    crafted = [b"bgsession-resume-data/1\n" + json.dumps({"request": request, "file": str(victim), "size": 10,
                                                          "validator": {"etag": '"e"'}}).encode(),
               b"bgsession-resume-data/2\n" + json.dumps({"request": request, "file": "../../private.txt", "size": 10,
                                                          "validator": {"etag": '"e"'}}).encode(),
               b"bgsession-resume-data/2\n" + json.dumps({"request": request, "file": "resume-1-0123456789ab.part",
                                                          "size": 10, "validator": {"etag": '"e"'}}).encode()]
    rec = Recorder()
    rec.expect = len(crafted)
    s = sessions.open(rec)
    tasks = [s.download_task_with_resume_data(data) for data in crafted]
    s.resume_all(tasks)
    assert s.wait(LONG)
    assert [rec.errors[t.identifier].code for t in tasks] == [bg.ErrorCode.CANNOT_RESUME] * len(crafted)
    assert rec.files == {} and sha(victim.read_bytes()) == before


def test_resume_data_names_its_partial_file_inside_the_session(server, sessions):
    """Resume data refers to its partial file by a name in the session's tmp/, never by a path."""
    server.add_blob("/r.bin", size=2 * MiB)
    hold = server.hold_at("/r.bin", 1 * MiB)
    s = sessions.open(Recorder())
    task = download(s, server.url("/r.bin"))
    assert hold.wait(LONG)
    wait_until(lambda: task.count_of_bytes_received >= 1 * MiB, what="1 MiB on disk")
    data = task.cancel_producing_resume_data()
    hold.release()
    name = json.loads(data.split(b"\n", 1)[1])["file"]
    assert "/" not in name and os.path.exists(os.path.join(s.configuration.directory, "tmp", name))
    assert s.configuration.directory.encode() not in data


def _foreign_folder(root) -> str:
    d = root / "photos"
    (d / "tmp").mkdir(parents=True)
    (d / "tmp" / "1.part").write_bytes(b"not bgsession's")
    (d / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    os.chmod(d, 0o755)
    return str(d)


def test_a_foreign_folder_is_refused_untouched(tmp_path, host):
    """A session directory that is an ordinary, non-empty folder is refused with a clear error; nothing changes."""
    d = _foreign_folder(tmp_path)
    before = tree(d)
    with pytest.raises(bg.InvalidArgumentError, match="not a bgsession session directory"):
        bg.Session(bg.Configuration.background("test.foreign", directory=d, host=host))
    assert tree(d) == before


def test_read_only_commands_change_nothing_in_a_foreign_folder(tmp_path):
    """`status` and `check` on an ordinary folder refuse it and change nothing (no deletion, no chmod)."""
    d = _foreign_folder(tmp_path)
    before = tree(d)
    status = cli("status", "--state-dir", d)
    assert status.returncode == 2 and "not a bgsession session directory" in status.stderr
    check = cli("check", d)
    assert check.returncode == 1 and "not a bgsession session directory" in check.stdout
    assert tree(d) == before


def test_read_only_commands_change_nothing_in_a_session(server, tmp_path):
    """`status` of a session whose daemon is gone reads the journal: it starts no daemon and changes no file."""
    state, out = str(tmp_path / "state"), tmp_path / "out"
    out.mkdir()
    server.add_blob("/slow.bin", size=4 * MiB, default_fault=fs.Fault(throttle=1 * MiB))
    assert cli("download", "--state-dir", state, "-d", str(out), server.url("/slow.bin")).returncode == 0
    wait_until(lambda: server.bytes_served("/slow.bin") > 0, what="the download to start")
    stop_daemon(state)
    wait_until(lambda: not os.path.exists(os.path.join(state, "daemon.sock")), what="the daemon to exit")
    before = tree(state)  # (a journal with records and a snapshot: an open would recover and compact them)
    status = cli("status", "--json", "--state-dir", state)
    assert status.returncode == 0, status.stderr
    assert [t["state"] for t in json.loads(status.stdout)] == ["running"]
    assert cli("check", state).returncode in (0, 1)
    assert tree(state) == before and read_pid_file(state) is None


def test_a_corrupt_snapshot_is_reported_by_check_not_moved(tmp_path):
    """`check` of a session with a corrupt snapshot reports it and leaves it where it is."""
    d = str(tmp_path / "s")
    bg.Session(bg.Configuration.background("test.cs", directory=d, host="inprocess")).close()
    with open(os.path.join(d, "snapshot.json"), "wb") as f:
        f.write(b'{"v":1,"t":"snapshot","generation":"x"}\n')
    before = tree(d)
    problems = bg.Journal(d).check()
    assert any("corrupt" in p for p in problems) and tree(d) == before


def test_a_symlinked_session_directory_is_refused(tmp_path, host):
    """A session directory that is a symbolic link is refused; what it points to is left alone."""
    real = tmp_path / "elsewhere"
    real.mkdir()
    os.chmod(real, 0o755)
    link = tmp_path / "session"
    link.symlink_to(real)
    with pytest.raises(bg.InvalidArgumentError, match="symbolic link"):
        bg.Session(bg.Configuration.background("test.link", directory=str(link), host=host))
    assert os.listdir(real) == [] and stat.S_IMODE(os.stat(real).st_mode) == 0o755


def test_parents_of_the_default_directory_are_private_even_with_umask_000(tmp_path):
    """With umask 000, the directories bgsession creates above the default session directory are 0700."""
    base = tmp_path / "home"
    base.mkdir()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {HERE!r})
        os.umask(0)
        os.environ["XDG_STATE_HOME"] = {str(base / "a" / "state")!r}
        import bgsession as bg
        bg.Session(bg.Configuration.background("test.umask", host="inprocess")).close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=LONG)
    created = [base / "a", base / "a" / "state", base / "a" / "state" / "bgsession",
               base / "a" / "state" / "bgsession" / "test.umask"]
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in created] == [oct(0o700)] * len(created)


@pytest.mark.skipif(os.geteuid() != 0 or not hasattr(socket, "SO_PEERCRED"), reason="needs root and SO_PEERCRED")
def test_the_client_refuses_a_daemon_socket_of_another_uid(tmp_path):
    """A daemon.sock served by another user is refused by the client before it sends anything."""
    d = str(tmp_path / "s")
    bg.Session(bg.Configuration.background("test.peer", directory=d, host="inprocess")).close()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(d, "daemon.sock"))
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: a planted "daemon" of uid 65534
        code = 99
        try:
            os.setgid(65534)
            os.setuid(65534)
            listener.listen(1)  # the peer credentials are the listener's at listen()
            os.write(ready_w, b"x")
            listener.settimeout(LONG)
            conn, _ = listener.accept()
            conn.settimeout(SHORT)
            code = 0 if conn.recv(100) == b"" else 1  # 0: the client sent nothing
        finally:
            os._exit(code)
    os.close(ready_w)
    listener.close()
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(bg.TransferError, match="uid 65534") as info:
            bg.Session(bg.Configuration.background("test.peer", directory=d, host="daemon"))
        assert info.value.code is bg.ErrorCode.BACKGROUND_SESSION_WAS_DISCONNECTED
    finally:
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_finished_file_that_vanished_before_delivery_is_an_error(server, sessions):
    """A finished file removed from tmp/ before any hook saw it is FILE_DOES_NOT_EXIST, not a success."""
    server.add_blob("/v.bin", size=100_000)
    bg._delivery_gate.clear()  # no hook runs in the first session
    try:
        s = sessions.open(Recorder())
        task = download(s, server.url("/v.bin"))
        wait_until(lambda: task.state is bg.TaskState.COMPLETED, what="the download to finish")
        sessions.close_all()
    finally:
        bg._delivery_gate.set()
    tmp = os.path.join(s.configuration.directory, "tmp")
    (finished,) = [n for n in os.listdir(tmp) if n.endswith(".done")]
    os.unlink(os.path.join(tmp, finished))  # a temp-file cleaner
    rec = Recorder()
    again = sessions.open(rec)
    assert again.wait(LONG)
    error = rec.errors[task.identifier]
    assert error is not None and error.code is bg.ErrorCode.FILE_DOES_NOT_EXIST and "vanished" in error.message
    assert [c for c in rec.calls if c[0] != "did_finish_events"] == [("complete", task.identifier)]


def test_a_vanished_record_is_format_3_which_an_older_bgsession_refuses(server, sessions, tmp_path, monkeypatch):
    """The ``vanished`` record came with journal format 3: a journal holding one (as a kill leaves it, before any
    compaction) is refused by a bgsession that reads format 2, with its clear error, instead of failing on a record
    type it does not know."""
    import shutil
    server.add_blob("/v.bin", size=100_000)
    bg._delivery_gate.clear()  # no hook runs: the event and its record stay
    try:
        s = sessions.open(Recorder())
        task = download(s, server.url("/v.bin"))
        wait_until(lambda: task.state is bg.TaskState.COMPLETED, what="the download to finish")
        sessions.close_all()
        sessions.open(Recorder())  # an open that folds the journal into the snapshot (nothing new to record)
        sessions.close_all()
        tmp = os.path.join(s.configuration.directory, "tmp")
        (finished,) = [n for n in os.listdir(tmp) if n.endswith(".done")]
        os.unlink(os.path.join(tmp, finished))  # a temp-file cleaner
        sessions.open(Recorder())  # recovery records that the file vanished (a journal of its header: no folding)

        def vanished() -> list[int]:  # (the daemon host records it when the app attaches: wait for it)
            with open(os.path.join(s.configuration.directory, "journal.jsonl"), "rb") as f:
                return [r["v"] for r in map(json.loads, f) if r["t"] == "vanished"]
        wait_until(lambda: vanished() != [], what="the vanished record")
        assert vanished() == [3]
        copy = str(tmp_path / "copy")
        shutil.copytree(s.configuration.directory, copy, ignore=shutil.ignore_patterns("*.sock"))  # as a kill leaves it
    finally:
        bg._delivery_gate.set()
    monkeypatch.setattr(bg, "JOURNAL_VERSION", 2)  # what the bgsession before it reads
    cfg = bg.Configuration.background(s.identifier, directory=copy, host="inprocess")
    with pytest.raises(bg.JournalError, match="newer than this bgsession"):
        bg.Session(cfg)


class Calls(bg.SessionDelegate):
    """Records hook calls only: a finish hook that never opens the file (a status check, say)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.errors: dict[int, bg.TransferError | None] = {}

    def download_task_did_finish_downloading(self, session, task, location):
        self.calls.append(("finish", task.identifier))

    def task_did_complete(self, session, task, error):
        self.calls.append(("complete", task.identifier))
        self.errors[task.identifier] = error


def test_a_file_that_vanished_after_its_event_was_posted_is_an_error(server, sessions):
    """A finished file removed after its event reached the app, before the hook ran: no hook, and an error later."""
    server.add_blob("/p.bin", size=100_000)
    bg._delivery_gate.clear()  # the events wait in the delegate's queue
    try:
        hooks = Calls()
        s = sessions.open(hooks)
        task = download(s, server.url("/p.bin"))
        wait_until(lambda: task.state is bg.TaskState.COMPLETED, what="the download to finish")
        tmp = os.path.join(s.configuration.directory, "tmp")
        (finished,) = [n for n in os.listdir(tmp) if n.endswith(".done")]
        os.unlink(os.path.join(tmp, finished))
    finally:
        bg._delivery_gate.set()
    assert s.wait(LONG)  # (the task is held: reported at the next open)
    sessions.close_all()
    assert hooks.calls == []
    again = Calls()
    assert sessions.open(again).wait(LONG)
    assert again.calls == [("complete", task.identifier)]
    assert again.errors[task.identifier].code is bg.ErrorCode.FILE_DOES_NOT_EXIST


def test_a_file_the_finish_hook_moved_before_a_kill_is_not_an_error(server, sessions, tmp_path):
    """The handed marker tells a file the finish hook took (then the app died) from one that vanished."""
    server.add_blob("/m.bin", size=50_000)

    class MovesThenDies(Recorder):
        def download_task_did_finish_downloading(self, session, task, location):
            os.replace(location, tmp_path / "kept.bin")
            raise RuntimeError("killed before the acknowledgement")  # (held: as if the process died here)

    s = sessions.open(MovesThenDies())
    task = download(s, server.url("/m.bin"))
    assert s.wait(LONG)
    sessions.close_all()
    rec = Recorder()
    assert sessions.open(rec).wait(LONG)
    assert rec.errors[task.identifier] is None
    assert [c for c in rec.calls if c[0] != "did_finish_events"] == [("complete", task.identifier)]
    assert (tmp_path / "kept.bin").stat().st_size == 50_000


@pytest.mark.parametrize("name, most", [("😀" * 150 + ".jpg", 240), ("a" * 300, 240), ("é" * 200, 240)])
def test_long_names_are_shortened_to_fit_in_bytes(name, most):
    """sanitize_filename bounds names in bytes of UTF-8 (file systems allow 255), keeping a short extension."""
    fitted = bg.sanitize_filename(name)
    assert 0 < len(fitted.encode()) <= most
    assert fitted.endswith(".jpg") == name.endswith(".jpg")
    assert name.startswith(fitted.rsplit(".", 1)[0])


def test_the_cli_delivers_a_file_whose_server_name_is_too_long(server, tmp_path):
    """A server file name of 600 bytes is shortened; the delivery ends (no relaunch loop) and the daemon exits."""
    state, out = str(tmp_path / "state"), tmp_path / "out"
    out.mkdir()
    name = "😀" * 150
    data = fs.blob_bytes(5000, seed=183)
    server.add_blob("/" + name, data)
    try:
        assert cli("download", "--state-dir", state, "-d", str(out), server.url("/" + urllib.parse.quote(name))
                   ).returncode == 0
        wait_until(lambda: os.listdir(out), what="the delivered file")
        (delivered,) = os.listdir(out)
        assert len(delivered.encode()) <= 255 and (out / delivered).read_bytes() == data
        wait_until(lambda: [t["state"] for t in json.loads(cli("status", "--json", "--state-dir", state).stdout)]
                   == ["saved"], what="the delivery to be acknowledged: nothing left to relaunch for")
    finally:
        stop_daemon(state)


def test_the_cli_reports_a_delivery_that_cannot_succeed(server, tmp_path):
    """A destination that refuses the file for good is a reported failure: no redelivery loop, the daemon exits."""
    state, out = str(tmp_path / "state"), tmp_path / "out"
    out.mkdir()
    server.add_blob("/r.bin", size=5000)
    hold = server.hold_at("/r.bin", 0)
    try:
        assert cli("download", "--state-dir", state, "-d", str(out), server.url("/r.bin")).returncode == 0
        assert hold.wait(LONG)
        out.rmdir()
        out.write_bytes(b"a file where the directory was")  # the destination cannot succeed any more
        hold.release()
        wait_until(lambda: [t["state"] for t in json.loads(cli("status", "--json", "--state-dir", state).stdout)]
                   == ["failed"], what="the failed delivery to be acknowledged: nothing left to relaunch for")
        with open(os.path.join(state, "daemon.log")) as f:
            log = f.read()
        assert re.search(r"\b1 failed +cannot deliver to ", log) and log.count("relaunched the app") == 1
    finally:
        stop_daemon(state)


GIVE_UP_APP = textwrap.dedent('''
    import os, sys, threading
    sys.path.insert(0, {here!r})
    import bgsession as bg
    directory, ledger, url = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(ledger, "a") as f:
        f.write("launch\\n")
    done = threading.Event()

    class App(bg.SessionDelegate):
        def download_task_did_finish_downloading(self, session, task, location):
            raise OSError("the destination refuses the file, every time")

        def did_finish_events_for_background_session(self, session):
            done.set()

    config = bg.Configuration.background("test.giveup", directory=directory, host="daemon",
                                         relaunch_command=[sys.executable] + sys.argv, daemon_idle_timeout=0.5,
                                         relaunch_backoff=0.01)
    session = bg.Session(config, App())
    if not os.environ.get(bg.BACKGROUND_EVENTS_ENV):
        session.download_task(url).resume()
    else:
        done.wait(60)
    session.close()
''')


def test_the_daemon_stops_relaunching_an_app_whose_delivery_cannot_succeed(server, tmp_path):
    """An app that never acknowledges is relaunched RELAUNCH_MAX_FAILURES times, then the daemon gives up and exits."""
    script, ledger, d = tmp_path / "app.py", tmp_path / "ledger", str(tmp_path / "s")
    script.write_text(GIVE_UP_APP.format(here=HERE))
    server.add_blob("/g.bin", size=1000)
    try:
        subprocess.run([sys.executable, str(script), d, str(ledger), server.url("/g.bin")], check=True,
                       timeout=LONG)
        wait_until(lambda: read_pid_file(d) is None, what="the daemon to give up and exit")
        with open(os.path.join(d, "daemon.log")) as f:
            assert "no more relaunches" in f.read()
        assert ledger.read_text().count("launch") == 1 + bg.RELAUNCH_MAX_FAILURES
        assert [t["phase"] for t in bg.Journal(d).tasks()] == ["finished_awaiting_delivery"]  # still owed
    finally:
        stop_daemon(d)


# ---------------------------------------------------------------------------
# damaged state
# ---------------------------------------------------------------------------


def test_a_huge_garbage_journal_is_streamed_and_set_aside_once(tmp_path):
    """A 2 GiB journal of garbage opens in bounded memory, is kept aside once, and the next open is clean."""
    d = str(tmp_path / "s")
    config = bg.Configuration.background("test.huge", directory=d, host="inprocess")
    bg.Session(config).close()
    with open(os.path.join(d, "journal.jsonl"), "r+b") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB of NUL bytes, no newline, no disk used
    tracemalloc.start()
    try:
        s = bg.Session(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    s.close()
    assert peak < 64 * MiB
    (aside,) = [n for n in os.listdir(d) if n.startswith("journal.jsonl.corrupt-")]
    assert os.path.getsize(os.path.join(d, aside)) == 2 << 30  # kept whole, never cut
    assert bg.Journal(d).check() == []
    bg.Session(config).close()
    assert len([n for n in os.listdir(d) if n.startswith("journal.jsonl.corrupt-")]) == 1


def test_many_unreadable_lines_are_counted_not_listed(tmp_path):
    """A journal of 100,000 garbage lines reports a bounded list of problems."""
    d = str(tmp_path / "s")
    bg.Session(bg.Configuration.background("test.lines", directory=d, host="inprocess")).close()
    with open(os.path.join(d, "journal.jsonl"), "ab") as f:
        f.write(b"garbage {\n" * 100_000 + b'{"v":1,"t":"reserve","upto":5}\n')
    problems = bg.Journal(d).check()
    assert 1 < len(problems) <= bg._MAX_PROBLEMS + 2 and "more unreadable lines" in problems[-1]


BAD_RECORDS = [
    {"v": 1, "t": "response", "id": 1, "response": "not an object"},
    {"v": 1, "t": "progress", "id": 1, "offset": "big"},
    {"v": 1, "t": "task", "id": "2", "request": {"url": "http://h/2"}},
    {"v": 1, "t": "task", "id": 3, "request": {"url": 3}},
    {"v": 1, "t": "redirect", "id": 1, "url": ["x"]},
    {"v": "1", "t": "describe", "id": 1, "description": "x"},
    {"v": 1, "t": "resume", "id": 1, "at": "soon"},
    ["not", "an", "object"],
    {"v": 1, "t": "reserve", "upto": 2048},  # (a damaged *last* line would be a torn append, not damage)
]


def test_records_of_the_wrong_type_are_skipped_reported_and_set_aside_once(tmp_path, host):
    """Records and snapshot tasks with wrong field types are skipped and reported; the session opens; once."""
    d = str(tmp_path / "s")
    config = bg.Configuration.background("test.types", directory=d, host="inprocess")
    s = bg.Session(config)
    s.download_task("http://127.0.0.1:9/good", description="good")
    s.close()
    with open(os.path.join(d, "snapshot.json"), "rb") as f:
        snap = json.loads(f.read())
    snap["tasks"].append({"id": 7, "request": ["not", "a", "request"], "phase": "suspended"})
    snap["tasks"].append({"id": 8, "request": {"url": "http://h/8"}, "phase": "finished_awaiting_delivery",
                          "file": "../../etc/passwd"})
    with open(os.path.join(d, "snapshot.json"), "wb") as f:
        f.write(bg._dumps(snap))
    with open(os.path.join(d, "journal.jsonl"), "ab") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in BAD_RECORDS))
    problems = bg.Journal(d).check()
    assert len([p for p in problems if "skipped" in p]) == len(BAD_RECORDS) - 1 + 2, problems
    config = bg.Configuration.background("test.types", directory=d, host=host, daemon_idle_timeout=0.5)
    try:
        s = bg.Session(config)
        assert [t.description for t in s.get_tasks()] == ["good"]
        s.close()
        stop_daemon(d)
        assert bg.Journal(d).check() == []
        s = bg.Session(config)
        s.close()
    finally:
        stop_daemon(d)
    assert len([n for n in os.listdir(d) if ".corrupt-" in n]) == 2  # the journal and the snapshot, once each


def test_snapshot_tasks_of_a_shape_seen_before_are_checked_as_strictly(tmp_path):
    """Snapshot tasks are checked by shape (field names and value types) once a shape passed: a task of the same
    shape whose value has the wrong form is still skipped, with the error of the field-by-field check."""
    d = str(tmp_path / "s")
    config = bg.Configuration.background("test.shapes", directory=d, host="inprocess")
    s = bg.Session(config)
    s.download_task("http://127.0.0.1:9/good", description="good")
    s.close()
    bg.Session(config).close()  # folds the task into the snapshot
    with open(os.path.join(d, "snapshot.json"), "rb") as f:
        snap = json.loads(f.read())
    (good,) = snap["tasks"]
    delivered = {**good, "phase": "finished_awaiting_delivery", "file": "1.part", "resume_file": None}
    bad = [{**good, "id": 0}, {**good, "kind": "sideways"}, {**good, "phase": "bogus"},
           {**good, "request": {"url": 3}}, {**good, "durable_offset": -1}, {**good, "acked": ["nope"]},
           {**delivered, "file": "../../etc/passwd"}, {**delivered, "file": "1.part/../../x"}]
    tasks = [{**good, "id": 2}, {**delivered, "id": 3}]  # each shape passes once first
    tasks += [t if t["id"] == 0 else {**t, "id": 10 + i} for i, t in enumerate(bad)]
    snap["tasks"] = [good] + tasks
    with open(os.path.join(d, "snapshot.json"), "wb") as f:
        f.write(bg._dumps(snap))
    problems = bg.Journal(d).state().problems
    skipped = [p for p in problems if p.startswith("snapshot task skipped")]
    expected = []
    for t in tasks[2:]:
        with pytest.raises(bg.JournalError) as err:
            bg._check_fields(t, ("id", "request"))
        expected.append(f"snapshot task skipped: {err.value} in {t!r}"[:500])
    assert skipped == expected and len(skipped) == len(bad)
    assert sorted(bg.Journal(d).state().tasks) == [1, 2, 3]


def test_a_failed_open_releases_the_session_lock(tmp_path, monkeypatch):
    """An open that fails after the session lock was taken releases it: the next open works."""
    config = bg.Configuration.background("test.fail", directory=str(tmp_path / "s"), host="inprocess")
    s = bg.Session(config)
    s.download_task("http://127.0.0.1:9/x")
    s.close()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while opening")
    with monkeypatch.context() as patch:
        patch.setattr(bg._Live, "__init__", broken)
        with pytest.raises(RuntimeError):
            bg.Session(config)
    bg.Session(config).close()  # not BACKGROUND_SESSION_IN_USE


# ---------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------


class _Seen(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 2)) - used)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit and /proc are Linux's")
def test_out_of_file_descriptors_is_transient(server, sessions, tmp_path):
    """EMFILE (too many open files) makes a task wait and retry, not fail; it completes once descriptors are free."""
    data = fs.blob_bytes(64 << 10, seed=184)
    server.add_blob("/e.bin", data)
    rec = Recorder()
    s = sessions.open(rec, retry=bg.Retry(total=None, backoff_factor=0.01, backoff_max=0.05))
    pid = os.getpid() if sessions.host == "inprocess" else read_pid_file(s.configuration.directory).pid
    journal = os.path.join(s.configuration.directory, "journal.jsonl")
    seen = _Seen("out of a system resource")
    logging.getLogger("bgsession").addHandler(seen)
    level = logging.getLogger("bgsession").level
    logging.getLogger("bgsession").setLevel(logging.DEBUG)
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    task = s.download_task(server.url("/e.bin"))
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(pid) - (pid == os.getpid()), old[1]))
        task.resume()
        if sessions.host == "inprocess":
            assert seen.event.wait(LONG)  # (this process cannot open a file now: the log tells)
        else:
            def backoff() -> bool:
                with open(journal, "rb") as f:
                    return b'"t":"backoff"' in f.read()
            wait_until(backoff, what="a retry after EMFILE")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        logging.getLogger("bgsession").removeHandler(seen)
        logging.getLogger("bgsession").setLevel(level)
    assert s.wait(LONG)
    assert rec.errors[task.identifier] is None and sha(rec.files[task.identifier]) == sha(data)


def _memory_growth(s: bg.Session, first: int, then: int) -> int:
    """Bytes of Python memory more after *then* create/cancel cycles than after the *first* ones."""
    def cycles(n: int) -> None:
        for i in range(n):
            s.download_task(f"http://127.0.0.1:9/{i}").cancel()
        assert s.wait(LONG)

    tracemalloc.start()
    try:
        cycles(first)
        base = tracemalloc.get_traced_memory()[0]
        cycles(then)
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def test_finished_tasks_are_released(tmp_path):
    """10,000 create/cancel cycles: memory does not grow with the number of tasks that ever existed."""
    s = bg.Session(bg.Configuration.default())
    try:
        grown = _memory_growth(s, 2000, 8000)
        done = s.download_task("http://127.0.0.1:9/last")
        done.cancel()
        assert s.wait(LONG)
        done.resume()  # a forgotten task still answers as a completed one: nothing happens
        done.suspend()
        done.cancel()
        assert done.state is bg.TaskState.COMPLETED and done.error.code is bg.ErrorCode.CANCELLED
    finally:
        s.close()
    assert grown < 1 * MiB, f"{grown} bytes more after 8,000 more tasks"


@pytest.mark.soak
def test_finished_tasks_are_released_by_a_background_session(tmp_path):
    """The same with a journal (compaction bounds what the engine keeps): 10,000 cycles, in-process host."""
    s = bg.Session(bg.Configuration.background("test.mem", directory=str(tmp_path / "s"), host="inprocess"))
    try:
        grown = _memory_growth(s, 5000, 5000)
    finally:
        s.close()
    assert grown < 8 * MiB, f"{grown} bytes more after 5,000 more tasks"


def test_daemon_log_is_rotated(server, daemons):
    """daemon.log past DAEMON_LOG_MAX_BYTES becomes daemon.log.1 and a new one starts: the log stays bounded."""
    s = daemons.open()
    d = s.configuration.directory
    daemons.close_all()
    stop_daemon(d)
    log_path = os.path.join(d, "daemon.log")
    with open(log_path, "ab") as f:
        f.write(b"old line\n" * (bg.DAEMON_LOG_MAX_BYTES // 9 + 1))
    s = daemons.open()
    wait_until(lambda: os.path.exists(log_path + ".1"), what="the rotation")
    assert os.path.getsize(log_path) < bg.DAEMON_LOG_MAX_BYTES
    assert os.path.getsize(log_path + ".1") < 2 * bg.DAEMON_LOG_MAX_BYTES
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
    assert s.get_tasks() == []
