"""Local faults and security, on both hosts where they apply: a disk that fills up, a destination
the finish hook cannot write, damaged journals kept aside, TLS verification, hostile names and
header injection."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import LONG, MiB, Recorder, download, sha, stop_daemon

# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_server(certificate):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*certificate)
    with fs.FakeServer(tls=ctx) as srv:
        yield srv


def test_tls_is_verified_by_default(tls_server, sessions):
    """A self-signed HTTPS server is refused (SERVER_CERTIFICATE_UNTRUSTED) with the default configuration."""
    tls_server.add_blob("/secret.bin", size=1000)
    rec = Recorder()
    s = sessions.open(rec)
    task = download(s, tls_server.url("/secret.bin"))
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.SERVER_CERTIFICATE_UNTRUSTED
    assert task.identifier not in rec.files


def test_tls_with_a_trusting_ssl_context_downloads_in_process(tls_server, inproc, certificate):
    """An ssl.SSLContext that trusts the certificate downloads in-process (the daemon host refuses one: it cannot
    receive it whole; test_networks.py)."""
    data = fs.blob_bytes(300_000, seed=81)
    tls_server.add_blob("/secret.bin", data)
    rec = Recorder()
    s = inproc.open(rec, ssl_context=ssl.create_default_context(cafile=certificate[0]))
    task = download(s, tls_server.url("/secret.bin"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)


def test_tls_with_a_trusting_tls_value_downloads(tls_server, sessions, certificate):
    """TLS(cafile=...) that trusts the certificate downloads, on both hosts."""
    data = fs.blob_bytes(300_000, seed=82)
    tls_server.add_blob("/secret.bin", data)
    rec = Recorder()
    s = sessions.open(rec, tls=bg.TLS(cafile=certificate[0]))
    task = download(s, tls_server.url("/secret.bin"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)


# ---------------------------------------------------------------------------
# a disk that fills up
# ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted for the test (needs root and mount rights)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mount_point)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        stop_daemon(str(mount_point / "session"))
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_fails_clearly_then_resumes_after_freeing_space(server, small_disk, host):
    """The disk fills mid-download: CANNOT_WRITE_TO_FILE with resume data; after freeing space it completes."""
    data = fs.blob_bytes(4 * MiB, seed=82)
    server.add_blob("/big.bin", data)
    directory = str(small_disk / "session")
    config = bg.Configuration.background("test.disk", directory=directory, host=host, daemon_idle_timeout=0.5)
    rec = Recorder()
    rec.expect = 2
    s = bg.Session(config, rec)
    try:
        filler = small_disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (3 * MiB))  # leaves well under 4 MiB
        task = download(s, server.url("/big.bin"))
        assert s.wait(LONG)
        err = rec.errors[task.identifier]
        assert err is not None and err.code is bg.ErrorCode.CANNOT_WRITE_TO_FILE
        assert err.resume_data
        assert bg.Journal(directory).check() == []  # the journal is readable and consistent
        os.unlink(filler)
        again = s.download_task_with_resume_data(err.resume_data)
        again.resume()
        assert s.wait(LONG)
        assert sha(rec.files[again.identifier]) == sha(data)
        assert server.requests("/big.bin")[-1].header("range") is not None  # resumed, not restarted
    finally:
        s.close()
    assert bg.Journal(directory).check() == []


# ---------------------------------------------------------------------------
# a destination the finish hook cannot write
# ---------------------------------------------------------------------------


def test_unwritable_destination_keeps_the_file_deliverable(server, sessions, tmp_path):
    """If the manager cannot move the file, the error is clear and the file is delivered again next launch."""
    data = fs.blob_bytes(200_000, seed=83)
    server.add_blob("/photo.jpg", data)
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    good = tmp_path / "Documents"

    class Manager(bg.SessionManager):
        def __init__(self, destination_dir):
            super().__init__(sessions.config())  # blocks set in __init__: none can miss an event
            self.set_download_task_did_finish_downloading(
                lambda s, t, loc: os.path.join(str(destination_dir), t.response.suggested_filename))

    def make_manager(destination_dir):
        m = Manager(destination_dir)
        sessions.opened.append(m.session)
        return m

    m = make_manager(blocker)  # "<file>/photo.jpg": the move must fail
    task = m.download_task(server.url("/photo.jpg"))
    task.resume()
    assert m.session.wait(LONG)
    (still,) = m.session.get_tasks()  # delivered, not acknowledged: still listed
    assert still.identifier == task.identifier and still.state is bg.TaskState.COMPLETED
    sessions.close_all()
    (record,) = bg.Journal(m.session.configuration.directory).tasks()
    assert record["acked"] == []  # neither event acknowledged: both are owed again
    m2 = make_manager(good)
    assert m2.session.wait(LONG)
    assert sha((good / "photo.jpg").read_bytes()) == sha(data)


def test_move_error_is_a_clear_transfer_error(tmp_path):
    """The manager's move raises TransferError CANNOT_MOVE_FILE naming the destination."""
    src = tmp_path / "src"
    src.write_bytes(b"x")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(bg.TransferError) as info:
        bg.move_to(str(src), str(tmp_path / "file" / "dest.jpg"))
    assert info.value.code is bg.ErrorCode.CANNOT_MOVE_FILE
    assert "dest.jpg" in info.value.message and src.exists()


# ---------------------------------------------------------------------------
# damaged state is kept aside, never deleted, never a crash loop
# ---------------------------------------------------------------------------


def test_corrupt_journal_line_is_skipped_and_the_journal_kept_aside(tmp_path):
    """An unreadable line inside the journal is reported, skipped, and the damaged journal kept as a copy."""
    config = bg.Configuration.background("test.corrupt", directory=str(tmp_path / "s"), host="inprocess")
    s = bg.Session(config)
    s.download_task("http://127.0.0.1:9/a", description="first")
    s.download_task("http://127.0.0.1:9/b", description="second")
    s.close()
    path = os.path.join(config.directory, "journal.jsonl")
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines.insert(2, b"\x00\x00garbage that is not json\n")
    with open(path, "wb") as f:
        f.writelines(lines)
    assert any("unreadable line" in p for p in bg.Journal(config.directory).check())
    s = bg.Session(config)  # opens: no crash loop
    assert sorted(t.description for t in s.get_tasks()) == ["first", "second"]
    for t in s.get_tasks():
        t.cancel()
    assert s.wait(LONG)
    s.close()
    kept = [n for n in os.listdir(config.directory) if n.startswith("journal.jsonl.corrupt-")]
    assert len(kept) == 1
    with open(os.path.join(config.directory, kept[0]), "rb") as f:
        assert b"garbage that is not json" in f.read()


# ---------------------------------------------------------------------------
# hostile input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("disposition, expected", [
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ("attachment; filename*=UTF-8''..%2F..%2Fevil.sh", "evil.sh"),
    ('attachment; filename="a\\\\b\\\\c.txt"', "c.txt"),
    ('attachment; filename="ok.jpg"', "ok.jpg"),
    ('attachment; filename=".."', "download"),
    ('attachment; filename="\x01\x02x.png"', "__x.png"),
])
def test_content_disposition_names_are_sanitised(disposition, expected):
    """suggested_filename from Content-Disposition never escapes the directory or carries control characters."""
    response = bg.Response("http://h/x", 200, bg.Headers([("Content-Disposition", disposition)]))
    assert response.suggested_filename == expected


@pytest.mark.parametrize("headers", [
    {"X-A": "1\r\nInjected: yes"}, {"X-A": "1\nInjected: yes"}, {"X-A": "a\x00b"}, {"Bad Name": "1"},
    {"X-A\r\nB": "1"}, {"": "1"},
])
def test_header_injection_is_refused(headers):
    """CR, LF or NUL in header values, and bad header names, are refused when the Request is made."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.Request("http://127.0.0.1/x", headers=headers)


@pytest.mark.parametrize("method", ["GET X", "", "GE\r\nT", None])
def test_bad_method_is_refused(method):
    """A method must be an HTTP token."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.Request("http://127.0.0.1/x", method=method)
