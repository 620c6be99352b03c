"""README samples are tests: every program in README.md runs here against a local server, so none can rot.

A ```python block whose first line is a comment naming a file (``# photos.py: ...``) is a program: each is written
under its name into one working directory and run by its scenario below, with ``HOME`` and ``XDG_STATE_HOME`` in
the test's temp directory (the sessions' default directories land there) and the URLs on its command line. A
program without a scenario fails ``test_every_program_has_a_scenario``. Any other ```python block is a fragment:
it must compile, and every ``bgsession.``/``appdelegate.`` name it uses must exist."""

from __future__ import annotations

import ast
import email.parser
import email.policy
import glob
import os
import re
import signal
import subprocess
import sys

import pytest

import appdelegate
import bgsession as bg
import fake_server as fs
from testkit import *

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as _f:
    README = _f.read()

BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)
_NAMED = re.compile(r"\A# ([\w.-]+\.py): ")
#: The programs of the README, by file name.
PROGRAMS = {m.group(1): code for code in BLOCKS if (m := _NAMED.match(code))}
#: The fragments (blocks that are not whole programs).
FRAGMENTS = [code for code in BLOCKS if not _NAMED.match(code)]
#: The programs that have a scenario here (kept equal to PROGRAMS by a test).
SCENARIOS = {"photos.py", "photos_app.py", "async_photos.py", "upload.py", "test_photos_app.py"}


class Sandbox:
    """The README's programs in one directory, run as a user would, in a home of their own."""

    def __init__(self, root) -> None:
        self.root = root
        self.work = root / "work"
        self.work.mkdir()
        for name, code in PROGRAMS.items():
            (self.work / name).write_text(code, encoding="utf-8")
        self.home = root / "home"
        self.env = {**os.environ, "HOME": str(self.home), "XDG_STATE_HOME": str(self.home / ".local" / "state"),
                    "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for name in (bg.BACKGROUND_EVENTS_ENV, appdelegate.HANDLER_TIMEOUT_ENV):
            self.env.pop(name, None)

    def run(self, *args: str, env: dict | None = None, timeout: float = LONG) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=str(self.work), env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def session_directory(self, identifier: str) -> str:
        return str(self.home / ".local" / "state" / "bgsession" / identifier)

    def stop_daemons(self) -> None:
        for pid_file in glob.glob(str(self.root / "**" / "daemon.pid"), recursive=True):
            stop_daemon(os.path.dirname(pid_file))


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path)
    try:
        yield box
    finally:
        box.stop_daemons()


def test_every_program_has_a_scenario():
    """Each README program is run by a test here; none is left out, none is tested that the README dropped."""
    assert set(PROGRAMS) == SCENARIOS


@pytest.mark.parametrize("index", range(len(FRAGMENTS)))
def test_fragments_compile_and_use_names_that_exist(index):
    """A README fragment compiles, and every bgsession./appdelegate. name in it exists."""
    tree = ast.parse(FRAGMENTS[index])
    modules = {"bgsession": bg, "appdelegate": appdelegate}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            assert hasattr(modules[node.value.id], node.attr), f"{node.value.id}.{node.attr}"


def test_photos_script_resumes_after_a_kill_and_never_enqueues_twice(server, sandbox):
    """photos.py: killed mid-download and run again with the same URLs, the photo is downloaded once (one GET:
    the daemon went on; the second run found the task in get_tasks()), saved whole in Documents/ with the user's
    mode; the 404 page is no file."""
    photo = fs.blob_bytes(2 * MiB, seed=1)
    server.add_blob("/cat.jpg", photo)
    server.add_status("/missing.jpg", 404, b"no such photo")
    urls = [server.url("/cat.jpg"), server.url("/missing.jpg")]
    with fs.AppController([sys.executable, "photos.py", *urls], env=sandbox.env, cwd=str(sandbox.work)) as ctl:
        ctl.kill_when(server, "/cat.jpg", 256 * 1024)
        ctl.launch()
        assert ctl.wait(LONG) == -signal.SIGKILL
    again = sandbox.run("photos.py", *urls)
    assert again.returncode == 0, again.stderr
    saved = sandbox.work / "Documents" / "cat.jpg"
    assert f"saved {saved}" in again.stdout
    assert sha(saved.read_bytes()) == sha(photo)
    assert os.listdir(sandbox.work / "Documents") == ["cat.jpg"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(saved).st_mode & 0o777 == 0o666 & ~umask
    assert len([r for r in server.requests("/cat.jpg") if r.method == "GET"]) == 1


def test_photos_app_test_kit_example_passes(sandbox):
    """test_photos_app.py, the README's test-kit example, passes: photos_app.py is SIGKILLed mid-download,
    relaunched by the daemon in the background, and saves the photo once."""
    run = sandbox.run("-W", "error", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_photos_app.py",
                      timeout=LONG * 3)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


def test_photos_app_exit_code_reaches_the_shell(server, sandbox):
    """photos_app.py passes main's code on (sys.exit(appdelegate.main(App))): a background launch whose
    completion handler is never called exits 3, not 0."""
    launched = sandbox.run("photos_app.py", env={bg.BACKGROUND_EVENTS_ENV: "com.example.no-such-session",
                                                 appdelegate.HANDLER_TIMEOUT_ENV: "0.3"})
    assert launched.returncode == appdelegate.EXIT_COMPLETION_HANDLER_NOT_CALLED, launched.stderr
    assert "completion handler" in launched.stderr


def test_async_photos_app_downloads_and_exits(server, sandbox):
    """async_photos.py: async hooks save the photo, the 404 is no file, `await task` gives no error, exit 0."""
    photo = fs.blob_bytes(300_000, seed=2)
    server.add_blob("/cat.jpg", photo)
    server.add_status("/missing.jpg", 404, b"no")
    run = sandbox.run("async_photos.py", server.url("/cat.jpg"), server.url("/missing.jpg"))
    assert run.returncode == 0, run.stderr
    assert "errors: []" in run.stdout and run.stdout.count("done ") == 2
    assert sha((sandbox.work / "Documents" / "cat.jpg").read_bytes()) == sha(photo)
    assert os.listdir(sandbox.work / "Documents") == ["cat.jpg"]


def test_upload_sends_the_form_and_removes_its_body(server, sandbox):
    """upload.py: the server receives the multipart form (as the email parser reads it) and the body file the
    upload owned is gone afterwards."""
    server.add_upload("/form")
    photo = sandbox.work / "cat.jpg"
    photo.write_bytes(fs.blob_bytes(100_000, seed=3))
    run = sandbox.run("upload.py", server.url("/form"), "cat.jpg")
    assert run.returncode == 0, run.stderr
    assert "uploaded: 201" in run.stdout
    (record,) = server.requests("/form")
    (body,) = server.uploads("/form")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {record.header('Content-Type')}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.iter_parts()}
    assert parts == {"title": b"My cat", "photo": photo.read_bytes()}
    assert os.listdir(sandbox.home / ".local" / "state" / "bgsession-multipart") == []
