"""The rest of the NSURLSession task surface, on both hosts: uploads, authentication challenges,
resume data, suspend/resume, invalidation, connection limits, integrity, headers and redirects."""

from __future__ import annotations

import base64
import json
import os
import threading

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import LONG, MiB, Recorder, download, received, sha, wait_until

D = bg.AuthChallengeDisposition


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ---------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------


class UploadRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple] = []
        self.bodies: dict = {}

    def task_did_send_body_data(self, session, task, sent, total, expected):
        self.sent.append((sent, total, expected))

    def task_did_complete(self, session, task, error):
        if isinstance(task, bg.UploadTask):
            self.bodies[task.identifier] = task.response_data
        super().task_did_complete(session, task, error)


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_upload_from_file_sends_it_and_reports_the_response(server, sessions, tmp_path, method):
    """An upload sends the file's bytes, reports send progress, and hands the response to task_did_complete."""
    data = fs.blob_bytes(700_000, seed=31)
    server.add_upload("/up")
    rec = UploadRecorder()
    s = sessions.open(rec)
    task = s.upload_task(bg.Request(server.url("/up"), method=method), write(tmp_path / "src.bin", data))
    task.resume()
    assert s.wait(LONG)
    assert server.uploads("/up") == [data]
    assert rec.errors[task.identifier] is None
    assert task.response.status == 201
    assert json.loads(rec.bodies[task.identifier])["sha256"] == sha(data)
    assert rec.sent[-1][1] == len(data) and rec.sent[-1][2] == len(data)
    assert sum(x[0] for x in rec.sent) == len(data)
    assert task.count_of_bytes_sent == len(data)


def test_interrupted_upload_is_sent_again_from_the_start(server, sessions, tmp_path):
    """An upload cut mid-body is retried from the first byte; the server gets one whole body."""
    data = fs.blob_bytes(500_000, seed=32)
    server.add_upload("/up", faults=[fs.Fault(cut_after=200_000)])
    rec = UploadRecorder()
    s = sessions.open(rec)
    task = s.upload_task(server.url("/up"), write(tmp_path / "src.bin", data))
    task.resume()
    assert s.wait(LONG)
    assert server.uploads("/up") == [data]
    assert len(server.requests("/up")) == 2


def test_upload_source_changed_midway_fails_without_a_mix(server, sessions, tmp_path):
    """A source rewritten during the upload fails the task (SOURCE_FILE_CHANGED); the server stores nothing."""
    data = fs.blob_bytes(32 * MiB, seed=33)  # larger than the socket buffers: the sender must wait
    path = write(tmp_path / "src.bin", data)
    server.add_upload("/up")
    hold = server.hold_at("/up", 100_000)
    rec = UploadRecorder()
    s = sessions.open(rec)
    task = s.upload_task(server.url("/up"), path)
    task.resume()
    assert hold.wait(LONG)
    write(path, fs.blob_bytes(32 * MiB, seed=34))  # same size, new content
    os.utime(path, ns=(1, 1))  # and a different mtime, whatever the clock granularity
    hold.release()
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.SOURCE_FILE_CHANGED
    assert server.uploads("/up") == []


def test_upload_source_removed_before_start_fails_clearly(server, sessions, tmp_path):
    """A source deleted after the task was created fails with FILE_DOES_NOT_EXIST when it runs."""
    path = write(tmp_path / "gone.bin", b"x" * 100)
    server.add_upload("/up")
    rec = UploadRecorder()
    s = sessions.open(rec)
    task = s.upload_task(server.url("/up"), path)
    os.unlink(path)
    task.resume()
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.FILE_DOES_NOT_EXIST


# ---------------------------------------------------------------------------
# authentication challenges
# ---------------------------------------------------------------------------


class Challenger(Recorder):
    """Answers challenges from a script: a list of (disposition, credential) consumed in order."""

    def __init__(self, answers) -> None:
        super().__init__()
        self.answers = list(answers)
        self.challenges: list[bg.AuthChallenge] = []

    def task_did_receive_challenge(self, session, task, challenge):
        self.challenges.append(challenge)
        return self.answers.pop(0) if self.answers else (D.PERFORM_DEFAULT_HANDLING, None)


AUTHS = {
    "basic": lambda: fs.BasicAuth("ann", "s3cret-pw", realm="photos"),
    "digest-md5": lambda: fs.DigestAuth("ann", "s3cret-pw", realm="photos", algorithm="MD5"),
    "digest-sha256": lambda: fs.DigestAuth("ann", "s3cret-pw", realm="photos", algorithm="SHA-256"),
}


@pytest.mark.parametrize("scheme", sorted(AUTHS))
def test_challenge_answered_with_credential_downloads(server, sessions, scheme):
    """A 401 reaches task_did_receive_challenge with the protection space; USE_CREDENTIAL gets the file."""
    data = fs.blob_bytes(50_000, seed=35)
    server.add_blob("/private.jpg", data, auth=AUTHS[scheme]())
    rec = Challenger([(D.USE_CREDENTIAL, bg.Credential("ann", "s3cret-pw"))])
    s = sessions.open(rec)
    task = download(s, server.url("/private.jpg"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    (ch,) = rec.challenges
    space = ch.protection_space
    assert (space.host, space.port, space.realm, space.scheme) == \
        ("127.0.0.1", server.port, "photos", scheme.split("-")[0])
    assert ch.previous_failure_count == 0
    assert ch.failure_response.status == 401


def test_wrong_credential_counts_failures_then_cancel_fails_task(server, sessions):
    """A rejected credential comes back with previous_failure_count 1; cancelling fails the task clearly."""
    server.add_blob("/p.jpg", size=100, auth=fs.BasicAuth("ann", "right"))
    rec = Challenger([(D.USE_CREDENTIAL, bg.Credential("ann", "wrong")), (D.CANCEL_AUTHENTICATION_CHALLENGE, None)])
    s = sessions.open(rec)
    task = download(s, server.url("/p.jpg"))
    assert s.wait(LONG)
    assert [c.previous_failure_count for c in rec.challenges] == [0, 1]
    err = rec.errors[task.identifier]
    assert err.code is bg.ErrorCode.USER_CANCELLED_AUTHENTICATION
    assert task.identifier not in rec.files


@pytest.mark.parametrize("disposition", [D.PERFORM_DEFAULT_HANDLING, D.REJECT_PROTECTION_SPACE])
def test_default_handling_without_credential_completes_with_401(server, sessions, disposition):
    """With no stored credential, default handling (or rejecting the space) makes the 401 the response."""
    server.add_blob("/p.jpg", size=100, auth=fs.BasicAuth("ann", "pw"))
    rec = Challenger([(disposition, None)])
    s = sessions.open(rec)
    task = download(s, server.url("/p.jpg"))
    assert s.wait(LONG)
    assert rec.statuses[task.identifier] == 401
    assert rec.errors[task.identifier] is None


def test_for_session_credential_is_reused_without_asking(server, sessions):
    """A FOR_SESSION credential answers later challenges of the same space without calling the delegate."""
    server.add_blob("/a.jpg", size=100, auth=fs.BasicAuth("ann", "pw"))
    server.add_blob("/b.jpg", size=200, auth=fs.BasicAuth("ann", "pw"))
    rec = Challenger([(D.USE_CREDENTIAL, bg.Credential("ann", "pw", bg.CredentialPersistence.FOR_SESSION))])
    s = sessions.open(rec)
    download(s, server.url("/a.jpg"))
    assert s.wait(LONG)
    download(s, server.url("/b.jpg"))
    assert s.wait(LONG)
    assert len(rec.challenges) == 1
    assert sorted(len(v) for v in rec.files.values()) == [100, 200]


def test_credential_persistence_none_is_not_reused(server, sessions):
    """A credential with persistence NONE is used once; the next task is challenged again."""
    server.add_blob("/a.jpg", size=100, auth=fs.BasicAuth("ann", "pw"))
    cred = bg.Credential("ann", "pw", bg.CredentialPersistence.NONE)
    rec = Challenger([(D.USE_CREDENTIAL, cred), (D.USE_CREDENTIAL, cred)])
    s = sessions.open(rec)
    download(s, server.url("/a.jpg"))
    assert s.wait(LONG)
    download(s, server.url("/a.jpg"))
    assert s.wait(LONG)
    assert len(rec.challenges) == 2


def test_credentials_never_reach_any_file(server, sessions):
    """Neither the password nor the base64 Authorization value is in any file of the session directory."""
    server.add_blob("/a.jpg", size=5000, auth=fs.BasicAuth("ann", "Pa55-w0rd-xyz"))
    server.add_blob("/b.jpg", size=5000)
    rec = Challenger([(D.USE_CREDENTIAL, bg.Credential("ann", "Pa55-w0rd-xyz"))])
    s = sessions.open(rec)
    download(s, server.url("/a.jpg"))
    token = base64.b64encode(b"ann:Pa55-w0rd-xyz").decode()
    explicit = s.download_task(bg.Request(server.url("/b.jpg"), headers={"Authorization": "Bearer tok-SECRET-123"}))
    explicit.resume()
    assert s.wait(LONG)
    assert len(rec.files) == 2
    assert server.requests("/b.jpg")[0].header("authorization") == "Bearer tok-SECRET-123"
    sessions.close_all()
    for root, _, files in os.walk(s.configuration.directory):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or name.endswith(".sock"):
                continue
            with open(path, "rb") as f:
                content = f.read()
            for secret in (b"Pa55-w0rd-xyz", token.encode(), b"tok-SECRET-123"):
                assert secret not in content, (name, secret)


def test_authorization_dropped_on_cross_origin_redirect(server, sessions):
    """Authorization is sent to the original origin, kept on a same-origin redirect, dropped cross-origin."""
    with fs.FakeServer() as other:
        other.add_blob("/target.bin", size=1000)
        server.add_blob("/same.bin", size=1000)
        server.add_redirect("/to-same", "/same.bin")
        server.add_redirect("/to-other", other.url("/target.bin"))
        rec = Recorder()
        rec.expect = 2
        s = sessions.open(rec)
        headers = {"Authorization": "Bearer only-for-origin"}
        a = s.download_task(bg.Request(server.url("/to-same"), headers=headers))
        b = s.download_task(bg.Request(server.url("/to-other"), headers=headers))
        a.resume()
        b.resume()
        assert s.wait(LONG)
        assert server.requests("/same.bin")[0].header("authorization") == "Bearer only-for-origin"
        assert other.requests("/target.bin")[0].header("authorization") is None
        assert b.current_request.url == other.url("/target.bin")
        assert b.original_request.url == server.url("/to-other")


# ---------------------------------------------------------------------------
# resume data
# ---------------------------------------------------------------------------


def test_cancel_producing_resume_data_then_resume_from_it(server, sessions):
    """cancel_producing_resume_data returns bytes; a new task from them continues with Range, byte-exact."""
    data = fs.blob_bytes(3 * MiB, seed=36)
    server.add_blob("/r.bin", data)
    hold = server.hold_at("/r.bin", 1 * MiB)
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec)
    task = download(s, server.url("/r.bin"), "photo:9")
    assert hold.wait(LONG)
    wait_until(received(task, 1 * MiB), what="1 MiB on disk")
    resume_data = task.cancel_producing_resume_data()
    hold.release()
    assert isinstance(resume_data, bytes)
    new = s.download_task_with_resume_data(resume_data, description="photo:9")
    new.resume()
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANCELLED
    assert sha(rec.files[new.identifier]) == sha(data)
    ranges = [r.header("range") for r in server.requests("/r.bin")]
    assert ranges[0] is None and ranges[1] is not None
    assert server.bytes_served("/r.bin") <= len(data) + 256 * 1024


def test_failed_download_carries_resume_data(server, sessions):
    """A download that fails after partial data (a session that does not wait for connectivity, the server gone)
    offers TransferError.resume_data, which completes it later."""
    data = fs.blob_bytes(1 * MiB, seed=37)
    server.add_blob("/f.bin", data, faults=[fs.Fault(cut_after=400_000)])
    server.on_bytes("/f.bin", 400_000, lambda path, served: threading.Thread(target=server.stop).start())
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec, retry=bg.Retry(total=1, backoff_factor=0.01), waits_for_connectivity=False)
    task = download(s, server.url("/f.bin"))
    assert s.wait(LONG)
    err = rec.errors[task.identifier]
    assert err is not None and err.resume_data
    server.start()  # same port again
    new = s.download_task_with_resume_data(err.resume_data)
    new.resume()
    assert s.wait(LONG)
    assert sha(rec.files[new.identifier]) == sha(data)
    assert server.requests("/f.bin")[-1].header("range") is not None


@pytest.mark.parametrize("data", [b"garbage", b"bgsession-resume-data/1\n{not json"], ids=["garbage", "malformed"])
def test_bad_resume_data_fails_the_task_through_complete(sessions, data):
    """Unusable resume data makes a task that fails with CANNOT_RESUME via task_did_complete."""
    rec = Recorder()
    s = sessions.open(rec)
    task = s.download_task_with_resume_data(data)
    task.resume()
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANNOT_RESUME
    assert "resume data" in rec.errors[task.identifier].message


def test_stale_resume_data_fails_the_task_through_complete(server, sessions):
    """Resume data whose partial file is gone fails the new task with CANNOT_RESUME."""
    server.add_blob("/st.bin", size=2 * MiB)
    hold = server.hold_at("/st.bin", 1 * MiB)
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec)
    task = download(s, server.url("/st.bin"))
    assert hold.wait(LONG)
    wait_until(received(task, 1 * MiB), what="1 MiB on disk")
    resume_data = task.cancel_producing_resume_data()
    hold.release()
    name = json.loads(resume_data.split(b"\n", 1)[1])["file"]  # a name inside the session's tmp/
    os.unlink(os.path.join(s.configuration.directory, "tmp", name))
    new = s.download_task_with_resume_data(resume_data)
    new.resume()
    assert s.wait(LONG)
    assert rec.errors[new.identifier].code is bg.ErrorCode.CANNOT_RESUME


def test_resume_data_of_non_bytes_is_rejected(sessions):
    """Resume data must be bytes: anything else is a clear argument error."""
    s = sessions.open()
    with pytest.raises(bg.InvalidArgumentError):
        s.download_task_with_resume_data("text")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# suspend / resume
# ---------------------------------------------------------------------------


def test_suspend_then_resume_continues_with_range(server, sessions):
    """suspend() pauses a transfer; resume() continues from where it was with a Range request."""
    data = fs.blob_bytes(2 * MiB, seed=38)
    server.add_blob("/s.bin", data)
    hold = server.hold_at("/s.bin", 1 * MiB)
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/s.bin"))
    assert hold.wait(LONG)
    wait_until(received(task, 1 * MiB), what="1 MiB on disk")
    task.suspend()
    assert task.state is bg.TaskState.SUSPENDED
    hold.release()
    task.resume()
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    assert server.requests("/s.bin")[1].header("range") is not None
    assert server.bytes_served("/s.bin") <= len(data) + 256 * 1024


def test_suspended_task_stays_suspended_after_relaunch(server, sessions):
    """A task suspended before the app went away is still suspended when the session is re-created."""
    data = fs.blob_bytes(2 * MiB, seed=39)
    server.add_blob("/s.bin", data)
    hold = server.hold_at("/s.bin", 512 * 1024)
    s = sessions.open()
    task = download(s, server.url("/s.bin"), "keep-me")
    assert hold.wait(LONG)
    wait_until(received(task, 512 * 1024), what="512 KiB on disk")
    task.suspend()
    sessions.close_all()
    # The first answer stays held until the check below: released, its handler would go on writing into the closed
    # connection for a moment (bytes the server counts as served, whenever its thread runs).
    served = server.bytes_served("/s.bin")
    rec = Recorder()
    s2 = sessions.open(rec)
    (again,) = s2.get_tasks()
    assert again.state is bg.TaskState.SUSPENDED and again.description == "keep-me"
    assert server.bytes_served("/s.bin") == served and len(server.requests("/s.bin")) == 1
    hold.release()
    again.resume()
    assert s2.wait(LONG)
    assert sha(rec.files[again.identifier]) == sha(data)


# ---------------------------------------------------------------------------
# invalidation
# ---------------------------------------------------------------------------


class Invalidation(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.invalid = threading.Event()
        self.order: list[str] = []

    def task_did_complete(self, session, task, error):
        self.order.append("complete")
        super().task_did_complete(session, task, error)

    def did_become_invalid(self, session, error):
        self.order.append("invalid")
        self.invalid.set()


def test_finish_tasks_and_invalidate_lets_running_tasks_finish(server, sessions):
    """finish_tasks_and_invalidate: running tasks complete, then did_become_invalid; new tasks are refused."""
    data = fs.blob_bytes(1 * MiB, seed=40)
    server.add_blob("/i.bin", data)
    rec = Invalidation()
    s = sessions.open(rec)
    task = download(s, server.url("/i.bin"))
    s.finish_tasks_and_invalidate()
    with pytest.raises(bg.SessionInvalidatedError):
        s.download_task(server.url("/i.bin"))
    assert rec.invalid.wait(LONG)
    assert rec.order == ["complete", "invalid"]
    assert sha(rec.files[task.identifier]) == sha(data)
    sessions.open(name="s")  # the identifier is free again


def test_invalidate_and_cancel_cancels_then_invalidates(server, sessions):
    """invalidate_and_cancel: every task ends with CANCELLED, then did_become_invalid; identifier reusable."""
    server.add_blob("/i.bin", size=2 * MiB)
    hold = server.hold_at("/i.bin", 100_000)
    rec = Invalidation()
    s = sessions.open(rec)
    running = download(s, server.url("/i.bin"))
    idle = s.download_task(server.url("/i.bin"))
    assert hold.wait(LONG)
    s.invalidate_and_cancel()
    hold.release()
    assert rec.invalid.wait(LONG)
    assert {rec.errors[t.identifier].code for t in (running, idle)} == {bg.ErrorCode.CANCELLED}
    assert rec.order[-1] == "invalid"
    s2 = sessions.open(name="s")
    assert s2.get_tasks() == []


# ---------------------------------------------------------------------------
# limits, integrity, headers, redirects
# ---------------------------------------------------------------------------


def test_max_connections_per_host_is_honoured(server, sessions):
    """With max_connections_per_host=2, a third transfer starts only when one of two running ones ends."""
    holds = []
    for i in range(3):
        server.add_blob(f"/c{i}", size=1000, seed=i)
        holds.append(server.hold_at(f"/c{i}", 0))
    rec = Recorder()
    rec.expect = 3
    s = sessions.open(rec, max_connections_per_host=2)
    for i in range(3):
        download(s, server.url(f"/c{i}"))
    assert holds[0].wait(LONG) and holds[1].wait(LONG)
    assert not holds[2].reached.is_set()
    assert len(server.requests()) == 2
    holds[0].release()
    assert holds[2].wait(LONG)
    holds[1].release()
    holds[2].release()
    assert s.wait(LONG)
    assert len(rec.files) == 3


def test_expected_sha256_is_verified(server, sessions):
    """Request(sha256=...) is checked before the finish hook: a mismatch fails with no file handed over."""
    data = fs.blob_bytes(100_000, seed=41)
    server.add_blob("/ok.bin", data)
    server.add_blob("/bad.bin", data)
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec)
    good = s.download_task(bg.Request(server.url("/ok.bin"), sha256=sha(data)))
    bad = s.download_task(bg.Request(server.url("/bad.bin"), sha256="0" * 64))
    good.resume()
    bad.resume()
    assert s.wait(LONG)
    assert rec.errors[good.identifier] is None and sha(rec.files[good.identifier]) == sha(data)
    assert rec.errors[bad.identifier].code is bg.ErrorCode.INTEGRITY_MISMATCH
    assert bad.identifier not in rec.files


def test_configuration_headers_are_sent_on_every_request(server, sessions):
    """Configuration headers reach every request; a Request's own header wins on conflict."""
    server.add_blob("/h1", size=10)
    server.add_blob("/h2", size=10)
    rec = Recorder()
    rec.expect = 2
    s = sessions.open(rec, headers={"X-App": "photos", "X-Mode": "config"})
    download(s, server.url("/h1"))
    s.download_task(bg.Request(server.url("/h2"), headers={"X-Mode": "request"})).resume()
    assert s.wait(LONG)
    r1, r2 = server.requests("/h1")[0], server.requests("/h2")[0]
    assert r1.header("x-app") == r2.header("x-app") == "photos"
    assert (r1.header("x-mode"), r2.header("x-mode")) == ("config", "request")


def test_redirects_are_followed_to_the_final_url(server, sessions):
    """A chain of redirects is followed; current_request shows the final URL."""
    data = fs.blob_bytes(10_000, seed=42)
    server.add_blob("/final.bin", data)
    server.add_redirect("/r2", "/final.bin", status=307)
    server.add_redirect("/r1", server.url("/r2"), status=301)
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/r1"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    assert task.current_request.url == server.url("/final.bin")


@pytest.mark.parametrize("location, code", [
    ("/loop", bg.ErrorCode.HTTP_TOO_MANY_REDIRECTS),
    ("ftp://127.0.0.1/file", bg.ErrorCode.UNSUPPORTED_URL),
    ("file:///etc/passwd", bg.ErrorCode.UNSUPPORTED_URL),
])
def test_bad_redirects_fail_clearly(server, sessions, location, code):
    """A redirect loop fails after 16 hops; a redirect to a non-HTTP scheme is refused."""
    server.add_redirect("/loop", location)
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, server.url("/loop"))
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is code
    if code is bg.ErrorCode.HTTP_TOO_MANY_REDIRECTS:
        assert len(server.requests("/loop")) == bg.MAX_REDIRECTS + 1


def test_resume_all_resumes_every_task_durably(server, sessions):
    """resume_all starts many tasks with one journal fsync; each is in the journal when it returns."""
    for i in range(20):
        server.add_blob(f"/m{i}", size=2000 + i, seed=i)
    rec = Recorder()
    rec.expect = 20
    s = sessions.open(rec)
    tasks = [s.download_task(server.url(f"/m{i}"), description=f"n{i}") for i in range(20)]
    s.resume_all(tasks)
    state = bg.Journal(s.configuration.directory).state()  # what a kill right now would recover
    assert {t.id for t in state.tasks.values() if t.phase is not bg.Phase.SUSPENDED} == {t.identifier for t in tasks}
    assert s.wait(LONG)
    assert sorted(len(v) for v in rec.files.values()) == [2000 + i for i in range(20)]
    with pytest.raises(bg.InvalidArgumentError):
        s.resume_all(["not a task"])  # type: ignore[list-item]
