"""Files handed out of and into tasks: ``move_to`` (a finished download to where the app keeps it),
``multipart_body`` (an RFC 7578 upload body, streamed into a file that the upload task owns), and the
``relaunch_command`` check of ``Configuration.background``."""

from __future__ import annotations

import email.parser
import email.policy
import errno
import logging
import os
import stat
import sys
import tracemalloc

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *

#: Bytes that trip naive encoders: every byte value, CRLFs, dashes, a fake delimiter.
AWKWARD = bytes(range(256)) * 64 + b"\r\n--\r\n--bgsession-\r\n\r\n" + b"\x00" * 1000


@pytest.fixture
def umask_027():
    """Run with umask 027, so that "the user's normal mode" (0666 & ~umask = 0640) is told from 0600 and 0644."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _location(tmp_path, data: bytes = b"photo bytes", name: str = "17.done") -> str:
    """A file standing in for a finished download in a session's private tmp/ (0600)."""
    d = tmp_path / "session-tmp"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / name
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


# ---------------------------------------------------------------------------
# move_to
# ---------------------------------------------------------------------------


def test_move_to_creates_directories_and_gives_the_users_mode(tmp_path, umask_027):
    """Missing directories are created; the moved file has 0666 minus the umask, not the session's 0600."""
    src = _location(tmp_path)
    dest = tmp_path / "Documents" / "2026" / "cat.jpg"
    assert bg.move_to(src, str(dest)) == str(dest)
    assert dest.read_bytes() == b"photo bytes" and not os.path.exists(src)
    assert _mode(dest) == umask_027


def test_move_to_a_directory_uses_the_given_name(tmp_path):
    """A directory (existing, or named with a trailing separator) receives the file as *name*, sanitised."""
    src = _location(tmp_path)
    (tmp_path / "Documents").mkdir()
    assert bg.move_to(src, str(tmp_path / "Documents"), name="../cat.jpg") == str(tmp_path / "Documents" / "cat.jpg")
    src = _location(tmp_path, b"dog")
    new = bg.move_to(src, str(tmp_path / "Other") + os.sep, name="dog.jpg")
    assert new == str(tmp_path / "Other" / "dog.jpg") and (tmp_path / "Other" / "dog.jpg").read_bytes() == b"dog"


@pytest.mark.parametrize("how", ["other file system", "rename refused"])
def test_move_to_works_across_file_systems(tmp_path, umask_027, how, monkeypatch):
    """Across file systems (here tmpfs /dev/shm -> the test's disk, or a rename refused with EXDEV) the file is
    copied, fsynced and put in place whole; the location goes; the mode is the user's."""
    if how == "other file system":
        if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no second file system here")
        src = os.path.join("/dev/shm", f"bgsession-test-{os.getpid()}.done")
        with open(src, "wb") as f:
            f.write(AWKWARD)
    else:
        src = _location(tmp_path, AWKWARD)
        for op in ("replace", "link"):  # neither a rename nor a hard link can cross file systems
            real = getattr(bg._vfs, op)

            def cross_device(a, b, real=real):
                if a == src:
                    raise OSError(errno.EXDEV, "Invalid cross-device link")
                return real(a, b)
            monkeypatch.setattr(bg._vfs, op, cross_device)
    try:
        dest = tmp_path / "Documents" / "cat.jpg"
        bg.move_to(src, str(dest))
        assert sha(dest.read_bytes()) == sha(AWKWARD) and not os.path.exists(src)
        assert _mode(dest) == umask_027
        assert os.listdir(tmp_path / "Documents") == ["cat.jpg"]  # no temp file left beside it
    finally:
        if os.path.exists(src):
            os.unlink(src)


def test_move_to_existing_name(tmp_path):
    """Same bytes there: taken as this file (a redelivery after a kill), the location goes. Other bytes:
    FileExistsError and the location stays; exist_ok=True replaces them."""
    dest = tmp_path / "cat.jpg"
    dest.write_bytes(b"photo bytes")
    src = _location(tmp_path)
    assert bg.move_to(src, str(dest)) == str(dest) and not os.path.exists(src)
    dest.write_bytes(b"another photo")
    src = _location(tmp_path)
    with pytest.raises(FileExistsError):
        bg.move_to(src, str(dest))
    assert os.path.exists(src) and dest.read_bytes() == b"another photo"
    bg.move_to(src, str(dest), exist_ok=True)
    assert dest.read_bytes() == b"photo bytes" and not os.path.exists(src)


@pytest.mark.parametrize("cross", [False, True], ids=["same file system", "across file systems"])
def test_move_to_never_replaces_a_name_taken_at_the_last_moment(tmp_path, monkeypatch, cross):
    """Another process creates the destination between move_to's start and its new name (here: just before the
    link is made): its file is never replaced; FileExistsError, and the location stays."""
    src = _location(tmp_path)
    dest = tmp_path / "cat.jpg"
    real_link, real_replace = bg._vfs.link, bg._vfs.replace

    def racing_link(a, b):
        if a == src and cross:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if b == str(dest):
            dest.write_bytes(b"the other process's photo")
        return real_link(a, b)

    def cross_device(a, b):
        if a == src and cross:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(a, b)
    monkeypatch.setattr(bg._vfs, "link", racing_link)
    monkeypatch.setattr(bg._vfs, "replace", cross_device)
    with pytest.raises(FileExistsError):
        bg.move_to(src, str(dest))
    assert dest.read_bytes() == b"the other process's photo" and os.path.exists(src)
    assert sorted(os.listdir(tmp_path)) == ["cat.jpg", "session-tmp"]  # no temp file left beside it


def test_move_to_works_where_hard_links_do_not(tmp_path, monkeypatch):
    """On a file system without hard links (link: EPERM) the name is checked, then the file renamed."""
    def no_links(a, b):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(bg._vfs, "link", no_links)
    src, dest = _location(tmp_path, AWKWARD), tmp_path / "Documents" / "cat.jpg"
    assert bg.move_to(src, str(dest)) == str(dest) and not os.path.exists(src)
    assert sha(dest.read_bytes()) == sha(AWKWARD)
    src = _location(tmp_path)
    with pytest.raises(FileExistsError):
        bg.move_to(src, str(dest))
    assert os.path.exists(src)


def test_move_to_failures_are_clear_and_keep_the_location(tmp_path):
    """Bad arguments are InvalidArgumentError; a move that cannot be made is TransferError CANNOT_MOVE_FILE naming
    the destination, and the location stays (the event is delivered again)."""
    src = _location(tmp_path)
    for args, kwargs in [((None, "x"), {}), ((src, 3), {}), ((src, ""), {}),
                         ((src, str(tmp_path / "f.jpg")), {"name": "x.jpg"})]:
        with pytest.raises(bg.InvalidArgumentError):
            bg.move_to(*args, **kwargs)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(bg.TransferError) as info:
        bg.move_to(src, str(tmp_path / "file" / "dest.jpg"))
    assert info.value.code is bg.ErrorCode.CANNOT_MOVE_FILE and "dest.jpg" in info.value.message
    assert os.path.exists(src)
    with pytest.raises(bg.TransferError):
        bg.move_to(str(tmp_path / "gone.done"), str(tmp_path / "x.jpg"))


def test_manager_destination_directory_gets_the_suggested_name(server, sessions, tmp_path):
    """A SessionManager's finish block may return a directory: the file goes there under the response's
    suggested name (Content-Disposition, else the URL's last component)."""
    data = fs.blob_bytes(5000, seed=3)
    server.add_blob("/photos/cat%20one.jpg", data)
    documents = tmp_path / "Documents"

    class Manager(bg.SessionManager):
        def __init__(self) -> None:
            super().__init__(sessions.config())
            self.set_download_task_did_finish_downloading(lambda session, task, location: str(documents) + os.sep)

    manager = Manager()
    sessions.opened.append(manager.session)
    manager.download_task(server.url("/photos/cat%20one.jpg")).resume()
    assert manager.session.wait(LONG)
    assert sha((documents / "cat one.jpg").read_bytes()) == sha(data)


# ---------------------------------------------------------------------------
# multipart_body
# ---------------------------------------------------------------------------


def _parse(content_type: str, body: bytes) -> list[tuple[str | None, str | None, str | None, bytes]]:
    """(name, filename, content type, payload) of each part, as the standard library's email parser reads them."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("ascii") + body)
    assert msg.get_content_type() == "multipart/form-data" and not msg.defects
    return [(part.get_param("name", header="content-disposition"), part.get_filename(),
             part.get_content_type() if part.get_filename() else None, part.get_payload(decode=True))
            for part in msg.iter_parts()]


def test_multipart_body_is_rfc_7578_as_the_email_parser_reads_it(tmp_path):
    """Text fields (any Unicode), binary files, non-ASCII and awkward names: each part comes back exact."""
    photo = tmp_path / "kätze \"1\".jpg"
    photo.write_bytes(AWKWARD)
    notes = tmp_path / "notes.bin"
    notes.write_bytes(b"")
    path, content_type = bg.multipart_body(
        [("caption", "Grüße aus Köln ☕"), ("caption", "second value\r\nwith CRLF"), ("ä\"b", "x")],
        [("photo", str(photo)), ("notes", str(notes), "ノート.bin", "application/x-notes")],
        directory=str(tmp_path / "bodies"))
    with open(path, "rb") as f:
        body = f.read()
    assert content_type.startswith("multipart/form-data; boundary=")
    assert _parse(content_type, body) == [
        ("caption", None, None, "Grüße aus Köln ☕".encode()),
        ("caption", None, None, b"second value\r\nwith CRLF"),
        ("ä%22b", None, None, b"x"),
        ("photo", "kätze %221%22.jpg", "image/jpeg", AWKWARD),
        ("notes", "ノート.bin", "application/x-notes", b""),
    ]
    assert _mode(path) == 0o600 and _mode(tmp_path / "bodies") == 0o700
    assert os.listdir(tmp_path / "bodies") == [os.path.basename(path)]  # no temp file left


def test_multipart_boundary_found_in_the_data_is_replaced(tmp_path, monkeypatch):
    """A boundary that occurs in a file is never used: another one is drawn and the body is written again."""
    first = b"\x01" * 16
    unlucky = tmp_path / "unlucky.bin"
    unlucky.write_bytes(b"prefix --bgsession-" + first.hex().encode() + b" suffix")
    draws = iter([first, b"\x02" * 16])
    real_urandom = os.urandom
    monkeypatch.setattr(bg.os, "urandom", lambda n: next(draws) if n == 16 else real_urandom(n))
    path, content_type = bg.multipart_body({}, {"f": str(unlucky)}, directory=str(tmp_path / "b"))
    assert first.hex() not in content_type and (b"\x02" * 16).hex() in content_type
    with open(path, "rb") as f:
        assert _parse(content_type, f.read())[0][3] == unlucky.read_bytes()


def test_multipart_body_is_streamed_not_held_in_memory(tmp_path):
    """A 16 MiB file part is copied in blocks: the peak of Python allocations stays far below its size."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for i in range(16):
            f.write(bytes([i]) * MiB)
    tracemalloc.start()
    try:
        path, _ = bg.multipart_body({"a": "b"}, {"big": str(big)}, directory=str(tmp_path / "b"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(path) > 16 * MiB
    assert peak < 2 * MiB, f"peak {peak} bytes: the body was held in memory"


@pytest.mark.parametrize("fields, files", [
    ("a=b", None), ([("a",)], None), ([("a", 3)], None), (None, [("f",)]), (None, {"f": "/no/such/file"}),
    (None, [("f", __file__, 3)]), (None, "f"),
])
def test_multipart_bad_input_is_refused_before_anything_is_written(tmp_path, fields, files):
    """Malformed fields or files raise InvalidArgumentError and write nothing."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.multipart_body(fields, files, directory=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_multipart_upload_reaches_the_server_and_its_body_file_is_removed(server, sessions, tmp_path):
    """upload_task(request, from_file=body): the server receives the exact body with its Content-Type; the body
    file, the task's own, is gone once the completion is acknowledged. A file of the app's own is never removed."""
    server.add_upload("/form")
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(AWKWARD)
    body, content_type = bg.multipart_body({"title": "Kätzchen"}, {"photo": str(photo)},
                                           directory=str(tmp_path / "bodies"))
    session = sessions.open(Recorder())
    request = bg.Request(server.url("/form"), method="POST", headers={"Content-Type": content_type})
    task = session.upload_task(request, from_file=body)
    own = session.upload_task(bg.Request(server.url("/form"), method="POST"), from_file=str(photo))
    session.resume_all([task, own])
    assert session.wait(LONG)
    assert task.response.status == 201
    received = server.uploads("/form")
    assert len(received) == 2
    multipart = [r for r in server.requests("/form") if r.header("Content-Type") == content_type]
    assert len(multipart) == 1
    parts = _parse(content_type, next(b for b in received if b != AWKWARD))
    assert [(p[0], p[1], p[3]) for p in parts] == [("title", None, "Kätzchen".encode()), ("photo", "cat.jpg", AWKWARD)]
    assert not os.path.exists(body)
    assert photo.read_bytes() == AWKWARD


def test_an_upload_body_left_by_a_kill_after_the_acknowledgement_is_removed_at_the_next_open(server, tmp_path,
                                                                                           monkeypatch):
    """The process ends after the completion's acknowledgement was durable but before the task's own body file was
    removed (here: the removal never runs): the next open of the session removes it; the app's own file stays."""
    server.add_upload("/form")
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(AWKWARD)
    body, content_type = bg.multipart_body({}, {"photo": str(photo)}, directory=str(tmp_path / "bodies"))
    config = bg.Configuration.background("test.bodies", directory=str(tmp_path / "session"), host="inprocess")
    with monkeypatch.context() as patch:
        patch.setattr(bg._Store, "release_files", lambda self, task, event: None)
        session = bg.Session(config, Recorder())
        task = session.upload_task(bg.Request(server.url("/form"), method="POST",
                                              headers={"Content-Type": content_type}), from_file=body)
        own = session.upload_task(bg.Request(server.url("/form"), method="POST"), from_file=str(photo))
        session.resume_all([task, own])
        assert session.wait(LONG)
        session.close()
    assert os.path.exists(body)
    bg.Session(config, Recorder()).close()
    assert not os.path.exists(body) and photo.read_bytes() == AWKWARD
    assert bg.Journal(config.directory).check() == []


# ---------------------------------------------------------------------------
# relaunch_command
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("program", ["no-such-program-bgsession", "/nonexistent/bin/python3", "./missing-app.sh"])
def test_relaunch_command_whose_program_does_not_exist_is_refused(tmp_path, program):
    """A relaunch_command that could never start is refused when the Configuration is made (InvalidArgumentError
    naming the program), not discovered later in daemon.log."""
    with pytest.raises(bg.InvalidArgumentError, match="does not exist") as info:
        bg.Configuration.background("ok", directory=str(tmp_path / "s"), relaunch_command=[program, "app.py"])
    assert program in str(info.value)
    bg.Configuration.background("ok", directory=str(tmp_path / "s"), relaunch_command=[sys.executable, "app.py"])


def test_relaunch_command_with_another_python_is_warned_about(tmp_path, monkeypatch, caplog):
    """``python3`` found on PATH that is not this interpreter (an unactivated venv) gets a warning."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent) + os.pathsep + os.environ.get("PATH", ""))
    with caplog.at_level(logging.WARNING, logger="bgsession"):
        bg.Configuration.background("ok", directory=str(tmp_path / "s"), relaunch_command=["python3", "app.py"])
    assert "sys.executable" in caplog.text and str(fake) in caplog.text
