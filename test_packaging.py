"""The distribution as a user gets it: ``python -m build`` makes a wheel and an sdist that ``twine check`` passes;
installed (offline, into a fresh venv), ``bgsession`` and ``appdelegate`` are typed packages for mypy --strict and
pyright, a hook of the wrong shape is named by mypy, and the ``bgsession`` command works and starts its daemon
from the installed package.

The build runs on a copy of the sources in a temp directory, so it leaves nothing in the work tree."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import venv
import zipfile

import pytest

import bgsession as bg
from testkit import *

#: What the sdist is built from (the files setup.py and pyproject.toml name).
SOURCES = ("bgsession.py", "appdelegate.py", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in")
#: A user's program, typed strictly, using the API as the README does.
USER_PROGRAM = textwrap.dedent('''
    # pyright: strict
    from __future__ import annotations

    import os

    import appdelegate
    import bgsession


    class Manager(bgsession.SessionManager):
        def __init__(self) -> None:
            super().__init__(bgsession.Configuration.background("com.example.typed"))
            self.set_download_task_did_finish_downloading(self.destination)
            self.set_task_did_complete(self.completed)
            self.handler: appdelegate.CompletionHandler | None = None

        def destination(self, session: bgsession.Session, task: bgsession.DownloadTask, location: str) -> str | None:
            response = task.response
            return None if response is None or response.status != 200 else os.path.join("Documents", "x")

        def completed(self, session: bgsession.Session, task: bgsession.Task,
                      error: bgsession.TransferError | None) -> None:
            print(task.description, error)


    def upload(manager: Manager) -> bgsession.UploadTask:
        path, content_type = bgsession.multipart_body({"title": "x"}, {"photo": "cat.jpg"})
        request = bgsession.Request("https://example.com/upload", method="POST", headers={"Content-Type": content_type})
        return manager.session.upload_task(request, from_file=path)
''')
#: The same program with a completion block of the wrong shape (the mistake mypy must name), at this line.
MISTAKE = ("    def completed(self, session: bgsession.Session, task: bgsession.Task,\n"
           "                  error: bgsession.TransferError | None) -> None:\n"
           "        print(task.description, error)\n",
           "    def completed(self, session: bgsession.Session, task: bgsession.Task) -> None:\n"
           "        print(task.description)\n")


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run outside the work tree, without PYTHONPATH: only what is installed can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    kwargs.setdefault("cwd", tempfile.gettempdir())
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, **kwargs)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> str:
    """The wheel and the sdist, built offline (no isolated build env) from a copy of the sources."""
    pytest.importorskip("build", reason="python -m build is not installed (.ci/run installs it)")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        shutil.copy(os.path.join(HERE, name), src / name)
    out = str(tmp_path_factory.mktemp("dist"))
    built = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, str(src)])
    assert built.returncode == 0, built.stdout + built.stderr
    return out


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> str:
    """A fresh venv with the wheel installed offline; returns its python."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(str(env_dir))  # this pip installs into it (--python): seconds faster
    python = str(env_dir / "bin" / "python")
    wheel = glob.glob(os.path.join(dist, "*.whl"))
    pip = _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--no-index", *wheel])
    assert pip.returncode == 0, pip.stderr
    return python


def test_wheel_holds_typed_packages_and_twine_check_passes(dist):
    """The wheel installs bgsession and appdelegate as packages with py.typed; twine check passes on both files."""
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"bgsession/__init__.py", "bgsession/py.typed", "appdelegate/__init__.py", "appdelegate/py.typed"} <= names
    assert not {"bgsession.py", "appdelegate.py"} & names
    pytest.importorskip("twine", reason="twine is not installed (.ci/run installs it)")
    check = _run([sys.executable, "-m", "twine", "check", "--strict", *glob.glob(os.path.join(dist, "*"))])
    assert check.returncode == 0, check.stdout + check.stderr


def test_mypy_strict_sees_the_installed_types_and_names_a_wrong_hook(installed, tmp_path):
    """mypy --strict on a user's program against the installed wheel: clean as written; a completion block of
    the wrong shape is reported at its line, naming the setter."""
    pytest.importorskip("mypy", reason="mypy is not installed")
    good = tmp_path / "good.py"
    good.write_text(USER_PROGRAM)
    bad = tmp_path / "bad.py"
    bad.write_text(USER_PROGRAM.replace(*MISTAKE))
    checked = _run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-executable", installed,
                    "good.py", "bad.py"], cwd=str(tmp_path))
    line = USER_PROGRAM.splitlines().index("        self.set_task_did_complete(self.completed)") + 1
    errors = [out for out in checked.stdout.splitlines() if ": error:" in out]
    assert checked.returncode == 1 and len(errors) == 1, checked.stdout  # good.py is clean
    assert errors[0].startswith(f"bad.py:{line}: error") and "set_task_did_complete" in errors[0], checked.stdout
    assert "untyped" not in checked.stdout and "stubs" not in checked.stdout


def test_pyright_strict_sees_the_installed_types(installed, tmp_path):
    """pyright (strict) resolves the installed packages as typed: no error on the user's program."""
    if shutil.which("pyright") is None or _run(["pyright", "--version"]).returncode != 0:
        pytest.skip("pyright is not installed or cannot start (.ci/run installs it)")
    good = tmp_path / "good.py"
    good.write_text(USER_PROGRAM)
    checked = _run(["pyright", "--pythonpath", installed, str(good)], cwd=str(tmp_path))
    assert checked.returncode == 0 and "0 errors" in checked.stdout, checked.stdout


def test_installed_command_downloads_and_starts_its_daemon(installed, tmp_path, server):
    """The installed ``bgsession`` command (and ``python -m bgsession``) works; its daemon is started from the
    installed package (it re-executes ``bgsession/__init__.py``) and delivers the file."""
    exe = os.path.join(os.path.dirname(installed), "bgsession")
    for command in ([exe], [installed, "-m", "bgsession"]):
        help_text = _run([*command, "--help"])
        assert help_text.returncode == 0 and "download" in help_text.stdout, help_text.stderr
    server.add_blob("/v.bin", size=1000)
    state = str(tmp_path / "state")
    try:
        run = _run([exe, "download", "--state-dir", state, "-d", str(tmp_path), server.url("/v.bin")])
        assert run.returncode == 0, run.stderr
        wait_until(lambda: (tmp_path / "v.bin").exists(), LONG, "the daemon to deliver the file")
        assert (tmp_path / "v.bin").stat().st_size == 1000
        with open(os.path.join(state, "daemon.log"), encoding="utf-8") as f:
            assert "daemon bgsession.cli serving" in f.read()
        program = "import bgsession, appdelegate; print(bgsession.__file__, bgsession.__version__)"
        where = _run([installed, "-c", program], cwd=str(tmp_path))
        path, version = where.stdout.split()
        assert path.endswith(os.path.join("site-packages", "bgsession", "__init__.py")) and version == bg.__version__
    finally:
        stop_daemon(state)
