"""The login service (`bgsession service install|uninstall|status`, `LoginService`): a systemd user unit or a
launchd agent that starts a session's daemon at login, so that unfinished transfers resume after a reboot with
nothing else run; and the daemon's identity in `ps`."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, read_pid_file, sha, stop_daemon, wait_until

BGSESSION = os.path.join(HERE, "bgsession.py")


def cli_config(state: str, identifier: str = bg.CLI_SESSION) -> bg.Configuration:
    """The configuration the CLI uses for a session in *state* (its relaunch command included)."""
    return bg._cli_config(bg._parser().parse_args(["status", "--session", identifier, "--state-dir", state]))


def exec_start(unit: str) -> tuple[list[str], str]:
    """ExecStart= and WorkingDirectory= of a unit, as systemd reads them: specifiers (%%) and variables ($$) are
    unescaped, then the arguments split by its quoting rules (double quotes, backslash escapes)."""
    values = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    unescape = lambda text: text.replace("%%", "%").replace("$$", "$")  # noqa: E731
    return shlex.split(unescape(values["ExecStart"])), unescape(values["WorkingDirectory"])


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def run_cli(home: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": home}
    env.pop("XDG_CONFIG_HOME", None)
    return subprocess.run([sys.executable, "-W", "error", BGSESSION, *args], capture_output=True, text=True,
                          timeout=LONG, env=env)


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    """The generated unit is one systemd accepts (`systemd-analyze verify`), with a directory that needs escaping
    (spaces, % and $)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs systemd)")
    state = str(tmp_path / "my 100% $HOME state")
    service = bg.LoginService(cli_config(state, "photos_sync-2.b"), home=str(tmp_path), platform="linux")
    assert service.install(enable=False) == [f"wrote {service.path}"]
    assert service.path == str(tmp_path / ".config/systemd/user/bgsession-photos_sync-2.b.service")
    check = subprocess.run([tool, "verify", service.path], capture_output=True, text=True, timeout=LONG)
    assert check.returncode == 0, check.stderr
    command, directory = exec_start(read(service.path))
    assert command == service.command and directory == state


def test_the_launchd_agent_parses_and_runs_the_same_command(tmp_path):
    """On macOS the agent's property list parses with plistlib: its label, the same command as the unit's
    ExecStart, started at load, logging into the session's daemon.log."""
    config = cli_config(str(tmp_path / "state"))
    agent = bg.LoginService(config, home=str(tmp_path), platform="darwin")
    agent.install(enable=False)
    assert agent.path == str(tmp_path / f"Library/LaunchAgents/org.bgsession.{config.identifier}.plist")
    with open(agent.path, "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == agent.name and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"] == bg.LoginService(config, home=str(tmp_path), platform="linux").command
    assert plist["StandardErrorPath"] == os.path.join(config.directory, "daemon.log")


def test_no_secret_reaches_the_disk(tmp_path):
    """The configuration kept at rest for the service has every setting but credentials: an Authorization or
    Cookie header is renewed through the app, never written."""
    config = bg.Configuration.background("s", directory=str(tmp_path / "state"), host="daemon",
                                         headers={"Authorization": "Bearer s3cr3t", "Cookie": "id=s3cr3t",
                                                  "User-Agent": "photos/1.0"}, max_bytes_per_second=1 << 20)
    bg.LoginService(config, home=str(tmp_path), platform="linux").install(enable=False)
    raw = (tmp_path / "state" / "service.json").read_bytes()
    assert b"s3cr3t" not in raw
    kept = bg._read_config_at_rest(str(tmp_path / "state"))
    assert dict(kept.headers) == {"User-Agent": "photos/1.0"} and kept.max_bytes_per_second == 1 << 20
    assert (tmp_path / "state" / "service.json").stat().st_mode & 0o777 == 0o600


def test_install_status_uninstall_through_the_cli(tmp_path):
    """`service install --no-enable` writes the unit; `status` says installed and current; `uninstall` removes the
    unit and the configuration at rest and leaves the session; `status` then exits 1."""
    home, state = str(tmp_path / "home"), str(tmp_path / "state")
    os.mkdir(home)
    done = run_cli(home, "service", "install", "--no-enable", "--session", "photos", "--state-dir", state)
    assert done.returncode == 0, done.stderr
    unit = os.path.join(home, ".config/systemd/user/bgsession-photos.service")
    assert done.stdout.splitlines()[0] == f"wrote {unit}" and os.path.exists(unit)
    status = run_cli(home, "service", "status", "--session", "photos", "--state-dir", state)
    assert status.returncode == 0 and f"installed ({unit})" in status.stdout and "another version" not in status.stdout
    gone = run_cli(home, "service", "uninstall", "--session", "photos", "--state-dir", state)
    assert gone.returncode == 0 and f"removed {unit}" in gone.stdout
    assert not os.path.exists(unit) and not os.path.exists(os.path.join(state, "service.json"))
    assert os.path.isdir(state)
    assert run_cli(home, "service", "status", "--session", "photos", "--state-dir", state).returncode == 1


def _transferring(session_dir: str) -> bool:
    """The daemon took the response (its record, with the validator a resume needs, is in the journal: a SIGKILL
    keeps what was written) and wrote bytes of the body."""
    with open(os.path.join(session_dir, "journal.jsonl"), "rb") as f:
        accepted = b'"t":"response"' in f.read()
    tmp = os.path.join(session_dir, "tmp")
    return accepted and any(name.endswith(".part") and os.path.getsize(os.path.join(tmp, name)) > 0
                            for name in os.listdir(tmp))


def test_the_unit_alone_resumes_a_killed_transfer_and_delivers(tmp_path, server):
    """A download enqueued with the CLI; every bgsession process SIGKILLed mid-transfer (the reboot); then only the
    unit's ExecStart, run as systemd would (its working directory, a bare environment): the transfer resumes, the
    daemon relaunches the CLI's delivery, the file lands byte-exact in -d; stopped, the daemon exits cleanly."""
    data = fs.blob_bytes(3_000_000, seed=91)
    server.add_blob("/episode.mp3", data)
    hold = server.hold_at("/episode.mp3", 1_000_000)
    home, state, out = tmp_path / "home", str(tmp_path / "state"), tmp_path / "out"
    home.mkdir()
    out.mkdir()
    assert run_cli(str(home), "service", "install", "--no-enable", "--state-dir", state).returncode == 0
    queued = run_cli(str(home), "download", "-d", str(out), "--state-dir", state, server.url("/episode.mp3"))
    assert queued.returncode == 0, queued.stderr
    assert hold.wait(LONG)  # (the server sent 1 MB: the daemon may not have read a byte of it yet)
    wait_until(lambda: _transferring(state), what="the daemon's response record and first bytes")
    daemon = read_pid_file(state)
    assert daemon is not None and daemon.kill()  # SIGKILL: nothing of the first boot survives
    hold.release()
    command, directory = exec_start(read(str(home / ".config/systemd/user/bgsession-bgsession.cli.service")))
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    with open(tmp_path / "service.log", "wb") as log:  # (systemd: the journal)
        service = subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=log)
    try:
        target = out / "episode.mp3"
        wait_until(lambda: target.exists(), what="the file delivered by the relaunched CLI")
        assert sha(target.read_bytes()) == sha(data)
        ranges = [r.headers.get("range") for r in server.requests("/episode.mp3")]
        assert len(ranges) == 2 and ranges[1] is not None and ranges[1].startswith("bytes=")  # resumed, not restarted
        service.terminate()  # systemctl stop: SIGTERM, and the daemon ends cleanly (else Restart=on-failure)
        assert service.wait(LONG) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        stop_daemon(state)
    text = (tmp_path / "service.log").read_text()
    assert "relaunch" in text.lower(), text


def test_the_daemon_is_recognisable_in_ps(tmp_path, server):
    """The daemon's process name is bgsessiond (ps -e, top, pgrep) and its command line names bgsession.py,
    `daemon` and the session."""
    if not os.path.exists("/proc/self/comm"):
        pytest.skip("process names are read from /proc (Linux)")
    state = str(tmp_path / "state")
    server.add_blob("/x.bin", size=10)
    done = run_cli(str(tmp_path), "download", "--session", "ps-check", "--state-dir", state, "-d", str(tmp_path),
                   server.url("/x.bin"))
    assert done.returncode == 0, done.stderr
    daemon = read_pid_file(state)
    try:
        assert daemon is not None
        with open(f"/proc/{daemon.pid}/comm") as f:
            assert f.read().strip() == bg.DAEMON_PROCESS_NAME
        with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert os.path.abspath(BGSESSION) in argv
        assert argv[argv.index(os.path.abspath(BGSESSION)) + 1:][:3] == ["daemon", "--session", "ps-check"]
    finally:
        stop_daemon(state)
