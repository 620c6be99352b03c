"""The command-line tool, driven as a subprocess: enqueue, status, wait, cancel, bad input,
the TTY progress display (under a pseudo-terminal), and `pip install .` giving a `bgsession` command."""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, MiB, read_pid_file, sha, stop_daemon, wait_until

BGSESSION = os.path.join(HERE, "bgsession.py")
#: How far ahead a test schedules a download: room for three CLI runs (each a new interpreter) on a busy machine.
SCHEDULE_AHEAD = 8.0


class Cli:
    def __init__(self, tmp_path) -> None:
        self.state = str(tmp_path / "state")
        self.out = tmp_path / "out"
        self.out.mkdir()

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        command = args[0]
        extra = ["--state-dir", self.state] if command not in ("daemon",) else []
        proc = subprocess.run([sys.executable, "-W", "error", BGSESSION, command, *extra, *args[1:]],
                              capture_output=True, text=True, timeout=LONG)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def status(self) -> list:
        return json.loads(self.run("status", "--json", check=True).stdout)


@pytest.fixture
def cli(tmp_path):
    c = Cli(tmp_path)
    yield c
    stop_daemon(c.state)


def test_download_enqueues_and_the_daemon_delivers_the_file(server, cli):
    """`download` returns at once; the daemon downloads and relaunches the CLI to move the file into -d."""
    data = fs.blob_bytes(1 * MiB, seed=61)
    server.add_blob("/files/report.pdf", data)
    proc = cli.run("download", "-d", str(cli.out), server.url("/files/report.pdf"), check=True)
    assert proc.stdout.startswith("queued 1 ")
    target = cli.out / "report.pdf"
    wait_until(lambda: target.exists(), what="the delivered file")
    assert sha(target.read_bytes()) == sha(data)
    wait_until(lambda: [t["state"] for t in cli.status()] == ["saved"], what="the task's outcome")
    assert cli.status()[0]["saved_as"] == str(target) and cli.status()[0]["exit"] == 0
    assert target.stat().st_mode & 0o777 == 0o666 & ~bg._umask()  # normal permissions outside the session


def test_download_split_fetches_a_file_on_parallel_connections(server, cli):
    """`download -x 4` (aria2c's name; also --split) fetches a file in 4 segments at once; -x 17 is refused."""
    data = fs.blob_bytes(4 * bg.MIN_SEGMENT_SIZE, seed=62)
    server.add_blob("/big.bin", data)
    cli.run("download", "--wait", "-x", "4", "-d", str(cli.out), server.url("/big.bin"), check=True)
    assert sha((cli.out / "big.bin").read_bytes()) == sha(data)
    assert [r.range_header is None for r in server.requests("/big.bin")] == [True, False, False, False]
    proc = cli.run("download", "--split", "17", "-d", str(cli.out), server.url("/big.bin"))
    assert proc.returncode == 2 and "-x must be within 1..16, not 17" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_wait_shows_plain_lines_when_not_a_tty_and_exit_code_reflects_failures(server, cli):
    """`download --wait` without a TTY prints one line per outcome and wget's summary; a 404 makes the exit code
    wget's 8."""
    server.add_blob("/a.bin", size=1000)
    server.add_status("/missing.bin", 404, b"no")
    proc = cli.run("download", "--wait", "-d", str(cli.out), server.url("/a.bin"), server.url("/missing.bin"))
    assert proc.returncode == bg.EXIT_SERVER == 8
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["1", "saved", "a.bin", "(1000", "B)", "in", str(cli.out)] in lines
    assert ["2", "failed", "HTTP", "404", server.url("/missing.bin")] in lines
    assert proc.stdout.splitlines()[-1].startswith("Downloaded: 1 file, 1000 B in ") and "; 1 failed" in proc.stdout
    assert (cli.out / "a.bin").exists() and not (cli.out / "missing.bin").exists()


def test_status_lists_tasks_and_cancel_and_resume_act_on_them(server, cli):
    """`status --json` shows a held task; `suspend`, `resume`, `cancel ID` act on it."""
    server.add_blob("/slow.bin", size=4 * MiB)
    hold = server.hold_at("/slow.bin", 100_000)
    cli.run("download", "-d", str(cli.out), server.url("/slow.bin"), check=True)
    assert hold.wait(LONG)
    (task,) = cli.status()
    assert task["state"] == "running" and task["url"] == server.url("/slow.bin")
    assert task["destination"] == str(cli.out)
    cli.run("suspend", "1", check=True)
    assert cli.status()[0]["state"] == "suspended"
    text = cli.run("status", check=True).stdout
    assert "suspended" in text and server.url("/slow.bin") in text
    hold.release()
    cli.run("resume", "1", check=True)
    wait_until(lambda: (cli.out / "slow.bin").exists(), what="the resumed task's file")
    assert sha((cli.out / "slow.bin").read_bytes()) == sha(server.route("/slow.bin").data)
    server.add_blob("/slow2.bin", size=4 * MiB)
    hold2 = server.hold_at("/slow2.bin", 100_000)
    cli.run("download", "-d", str(cli.out), server.url("/slow2.bin"), check=True)
    assert hold2.wait(LONG)
    cli.run("cancel", "2", check=True)
    hold2.release()
    wait_until(lambda: [t["state"] for t in cli.status()] == ["saved", "cancelled"], what="the cancel's outcome")
    assert not (cli.out / "slow2.bin").exists()


def test_status_shows_a_task_waiting_for_connectivity_with_its_last_error(cli):
    """A server that cannot be reached: `status` shows the task waiting, with the last error and the next try."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli.run("download", "-d", str(cli.out), f"http://127.0.0.1:{port}/later.bin", check=True)
    wait_until(lambda: cli.status()[0]["waiting"], what="the task to wait for connectivity")
    (task,) = cli.status()
    assert task["state"] == "waiting" and "connection refused" in task["last_error"] and task["next_retry"]
    text = cli.run("status", check=True).stdout
    assert "waiting" in text and "connection refused" in text and "next try in" in text
    cli.run("cancel", "1", check=True)
    wait_until(lambda: [t["state"] for t in cli.status()] == ["cancelled"], what="the cancel's outcome")


def test_a_secret_header_lost_with_its_daemon_is_never_sent_without_and_resume_continues(server, cli):
    """`download --wait -H "Authorization: ..."`: the daemon that held the token in memory is SIGKILLed; the task
    asks before its next request, nobody can give the value back, so it is cancelled (exit 1, a line saying why)
    with its partial data kept; `resume 1 -H ...` continues it from there (a Range request). No request ever went
    without the token, and the file is byte-exact."""
    data = fs.blob_bytes(2 * MiB, seed=64)
    server.add_blob("/private.bin", data, auth=fs.BearerAuth("cli-token-51"))
    hold = server.hold_at("/private.bin", 300_000)
    proc = subprocess.Popen([sys.executable, "-W", "error", BGSESSION, "download", "--state-dir", cli.state, "--wait",
                             "-d", str(cli.out), "-H", "Authorization: Bearer cli-token-51",
                             server.url("/private.bin")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hold.wait(LONG)
        partial = os.path.join(cli.state, "tmp", "1.part")  # what the daemon wrote before the kill is kept
        wait_until(lambda: os.path.exists(partial) and os.path.getsize(partial) > 0, what="bytes in the partial file")
        daemon = read_pid_file(cli.state)
        assert daemon is not None and daemon.kill()
        hold.release()
        out, err = proc.communicate(timeout=LONG)
        assert proc.returncode == 1, out + err
    finally:
        hold.release()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()  # (communicate() may not have run: a failed assertion)
        proc.stderr.close()
    assert "1 cancelled  cancelled: its Authorization header lived in the memory of a daemon that stopped" in out
    again = cli.run("resume", "1", "-H", "Authorization: Bearer cli-token-51", check=True)
    assert again.stdout.strip() == "resume 1: again as 2 (from its partial data)"
    assert cli.run("wait").returncode == 0
    assert sha((cli.out / "private.bin").read_bytes()) == sha(data)
    requests = server.requests("/private.bin")
    assert {r.header("authorization") for r in requests} == {"Bearer cli-token-51"}
    assert requests[-1].header("range") is not None and requests[-1].header("range") != "bytes=0-"


@pytest.mark.parametrize("args, code, words", [
    (["download", "ftp://example.com/x"], 2, "unsupported"),
    (["download", "http://exa mple.com/x"], 2, "control characters"),
    (["download", "-d", "/dev/null/dir", "http://127.0.0.1:9/x"], 2, "cannot create the directory"),
    (["cancel", "42"], 2, "no task 42"),
    (["check", "/nonexistent/session"], 2, "no such session directory"),
    (["download", "--sha256", "xyz", "http://127.0.0.1:9/x"], 2, "checksum"),
    (["download", "--checksum", "md5=" + "0" * 32, "http://127.0.0.1:9/x"], 2, "sha-256"),
    (["download"], 2, "no URL"),
    (["download", "-O", "a", "http://127.0.0.1:9/x", "http://127.0.0.1:9/y"], 2, "single URL"),
    (["download", "-O", "-", "http://127.0.0.1:9/x"], 2, "name a file"),
    (["download", "-i", "/nonexistent.txt"], 2, "cannot read the input file"),
    (["download", "-j", "0", "http://127.0.0.1:9/x"], 2, "-j must be within"),
    (["download", "--tries", "many", "http://127.0.0.1:9/x"], 2, "whole number"),
    (["download", "--timeout", "-1", "http://127.0.0.1:9/x"], 2, "--timeout"),
    (["download", "--header", "NoColon", "http://127.0.0.1:9/x"], 2, "bad header"),
    (["download", "-H", "no colon", "http://127.0.0.1:9/x"], 2, "Name: value"),
    (["resume", "9"], 2, "no task 9"),
    (["download", "--priority", "2", "http://127.0.0.1:9/x"], 2, "priority"),
    (["download", "--not-before", "someday", "http://127.0.0.1:9/x"], 2, "bad time"),
    (["download", "--limit-rate", "fast", "http://127.0.0.1:9/x"], 2, "bad rate"),
    (["limit", "7", "1M"], 2, "no task 7"),
    (["limit", "0.5"], 2, "rate"),
    (["priority", "7", "0.5"], 2, "no task 7"),
    (["priority", "7", "high"], 2, "number"),
])
def test_bad_input_is_one_line_and_non_zero(cli, args, code, words):
    """Bad input gives one readable error line on stderr (no traceback) and a documented exit code."""
    proc = cli.run(*args)
    assert proc.returncode == code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bgsession: error: ") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_scheduled_download_shows_in_status_and_waits_across_a_daemon_kill(server, cli):
    """`download --not-before` a few seconds ahead (with --priority, --limit-rate): status shows it scheduled with its
    options; the daemon SIGKILLed, status (read-only: it reads the journal) still shows it scheduled, and the next
    command that needs the daemon starts one that recovers it; it does not start before its time; then status shows
    it running, and the file is delivered."""
    data = fs.blob_bytes(200_000, seed=62)
    server.add_blob("/later.bin", data)
    hold = server.hold_at("/later.bin", 0)
    when = datetime.datetime.fromtimestamp(time.time() + SCHEDULE_AHEAD, datetime.timezone.utc).isoformat()
    begin = datetime.datetime.fromisoformat(when).timestamp()
    cli.run("download", "-d", str(cli.out), "--not-before", when, "--priority", "0.8", "--limit-rate", "2M",
            server.url("/later.bin"), check=True)
    (task,) = cli.status()
    assert (task["state"], task["priority"], task["limit"]) == ("scheduled", 0.8, 2 * MiB)
    assert datetime.datetime.fromisoformat(task["not_before"]).timestamp() == pytest.approx(begin, abs=1e-5)
    daemon = read_pid_file(cli.state)
    assert daemon is not None and daemon.kill()
    text = cli.run("status", check=True).stdout  # from the journal: still scheduled
    if time.time() < begin:  # (a machine so loaded that the date came meanwhile may show it running: no claim then)
        assert "scheduled" in text and "not before" in text and "priority 0.8" in text and "limit 2.0 MiB/s" in text
    cli.run("limit", "1", "2M", check=True)  # a command for the daemon: a new one starts and recovers the task
    text = cli.run("status", check=True).stdout
    if time.time() < begin:
        assert "scheduled" in text
    assert hold.wait(LONG)
    (request,) = server.requests("/later.bin")
    assert request.time >= begin
    assert cli.status()[0]["state"] == "running"
    hold.release()
    target = cli.out / "later.bin"
    wait_until(lambda: target.exists(), what="the delivered file")
    assert sha(target.read_bytes()) == sha(data)


def test_limit_and_priority_change_a_running_session(server, cli):
    """`limit RATE` sets the session's limit, `limit ID RATE` and `priority ID P` a task's; status shows them."""
    cli.run("download", "-d", str(cli.out), "--not-before", "+1h", server.url("/never.bin"), check=True)
    assert cli.run("limit", "512K", check=True).stdout == "limit session 512.0 KiB/s\n"
    assert cli.run("limit", "1", "1.5M", check=True).stdout == "limit 1 1.5 MiB/s\n"
    assert cli.run("priority", "1", "0.9", check=True).stdout == "priority 1 0.9\n"
    (task,) = cli.status()
    assert (task["limit"], task["priority"], task["state"]) == (1536 * 1024, 0.9, "scheduled")
    assert cli.run("status", check=True).stdout.startswith("session limit 512.0 KiB/s\n")
    assert cli.run("limit", "none", check=True).stdout == "limit session none\n"
    assert "session limit" not in cli.run("status", check=True).stdout
    cli.run("cancel", "1", check=True)


@pytest.mark.parametrize("text, expected", [
    ("+90s", 1_800_000_090.0), ("+30m", 1_800_001_800.0), ("+1.5h", 1_800_005_400.0), ("+2d", 1_800_172_800.0),
    ("@1767225600", 1_767_225_600.0), ("2027-01-15T08:00:00+00:00", 1_800_000_000.0),
    ("2027-01-15T09:00:00+01:00", 1_800_000_000.0), ("2027-01-15T08:00:00Z", 1_800_000_000.0),
    ("2027-01-20T10:30", datetime.datetime(2027, 1, 20, 10, 30).timestamp()),  # no offset: local time
])
def test_not_before_forms(text, expected):
    """--not-before takes a relative time, POSIX time, or ISO 8601 (local time unless it says its offset)."""
    assert bg._parse_when(text, 1_800_000_000.0) == expected


def test_not_before_clock_time_is_the_next_one():
    """--not-before HH:MM is the next time the local clock shows it: today if still ahead, else tomorrow."""
    now = datetime.datetime(2027, 3, 10, 21, 0).timestamp()
    assert bg._parse_when("22:00", now) == datetime.datetime(2027, 3, 10, 22, 0).timestamp()
    assert bg._parse_when("20:15:30", now) == datetime.datetime(2027, 3, 11, 20, 15, 30).timestamp()


@pytest.mark.parametrize("text, expected", [("2M", 2 * MiB), ("512k", 512 << 10), ("1.5MiB/s", 1536 << 10),
                                            ("100", 100), ("1G", 1 << 30), ("0", None), ("none", None)])
def test_rate_forms(text, expected):
    """Rates as curl, wget and aria2 write them: bytes per second with K, M, G (1024-based); 0 or none: no limit."""
    assert bg._parse_rate(text) == expected


def test_unwritable_destination_is_refused(cli, tmp_path):
    """A destination the user cannot write to is refused before anything is enqueued."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(str(locked), os.W_OK):
        pytest.skip("running as root: permissions are not enforced")
    proc = cli.run("download", "-d", str(locked), "http://127.0.0.1:9/x")
    assert proc.returncode == 2 and "cannot write" in proc.stderr


def test_corrupt_journal_is_one_line_error(server, cli):
    """A session whose journal is from a future version gives one line and exit code 10, not a traceback."""
    server.add_blob("/a.bin", size=10)
    cli.run("download", "--wait", "-d", str(cli.out), server.url("/a.bin"), check=True)
    stop_daemon(cli.state)
    wait_until(lambda: not os.path.exists(os.path.join(cli.state, "daemon.sock")), what="daemon exit")
    with open(os.path.join(cli.state, "journal.jsonl"), "wb") as f:
        f.write(b'{"v":99,"t":"header","generation":9}\n')
    proc = cli.run("download", "--wait", "-d", str(cli.out), server.url("/a.bin"))
    assert proc.returncode == bg.EXIT_JOURNAL == 10
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    check = cli.run("check")
    assert check.returncode == 1 and "newer bgsession" in check.stdout


def test_session_in_use_is_reported(server, cli):
    """The CLI's delivery while another app is attached to its session gets exit code 9 and one line."""
    config = bg._cli_config(bg._parser().parse_args(["status", "--state-dir", cli.state]))
    with bg.Session(config, bg.SessionDelegate()):
        proc = cli.run("deliver")
    assert proc.returncode == bg.EXIT_IN_USE == 9 and "delivered by another process" in proc.stderr


def test_wait_and_the_daemons_delivery_never_lock_each_other_out(server, cli):
    """Two `wait`s and a `download --wait` run while the daemon relaunches `bgsession deliver`: all of them end
    with the outcome, none is refused, and the file is delivered once."""
    server.add_blob("/h.bin", size=1 * MiB)
    hold = server.hold_at("/h.bin", 1000)
    cli.run("download", "-d", str(cli.out), server.url("/h.bin"), check=True)
    assert hold.wait(LONG)
    command = [sys.executable, "-W", "error", BGSESSION]
    watchers = [subprocess.Popen(command + ["wait", "--state-dir", cli.state], stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    server.add_blob("/i.bin", size=1000)
    also = cli.run("download", "--wait", "-d", str(cli.out), server.url("/i.bin"))
    hold.release()
    outputs = [w.communicate(timeout=LONG)[0] for w in watchers]
    assert also.returncode == 0 and f"saved      i.bin (1000 B) in {cli.out}" in also.stdout
    for w, text in zip(watchers, outputs):
        assert w.returncode == 0 and f"1 saved      h.bin (1.0 MiB) in {cli.out}" in text, text
    assert sorted(os.listdir(cli.out)) == ["h.bin", "i.bin"]


def test_check_reports_clean(server, cli):
    """`check` runs Journal.check() and prints clean."""
    server.add_blob("/a.bin", size=10)
    cli.run("download", "--wait", "-d", str(cli.out), server.url("/a.bin"), check=True)
    proc = cli.run("check", check=True)
    assert proc.stdout.strip() == "clean"


def test_tty_progress_is_redrawn_in_place(server, cli):
    """On a TTY, --wait draws one line per task with percent and rate, redrawn in place, ending at 100%."""
    server.add_blob("/t.bin", size=3 * MiB, default_fault=fs.Fault(throttle=3 * MiB))
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execv(sys.executable, [sys.executable, BGSESSION, "download", "--state-dir", cli.state, "--wait",
                                  "-d", str(cli.out), server.url("/t.bin")])
    output = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], LONG)
            assert ready, "no output from the CLI"
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    text = output.decode("utf-8", "replace")
    assert "\x1b[2K" in text and "\x1b[1F" in text  # lines are cleared and the cursor moves up to redraw
    frames = [f for f in text.split("\x1b[2K") if "running" in f]
    assert len(frames) >= 2  # drawn more than once
    assert any("%" in f and "/s" in f for f in frames)
    assert "1 saved      t.bin (3.0 MiB) in " in text  # the name it was saved as
    assert text.rstrip().splitlines()[-1].startswith("Downloaded: 1 file, 3.0 MiB in ")
    assert (cli.out / "t.bin").stat().st_size == 3 * MiB


# -- issue 19: outcomes, wget's and aria2c's flags, identity ------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failures_are_visible_without_wait(server, cli):
    """`download` of a 404 and a good URL returns at once; the next `wait` prints the failure and wget's summary
    and exits 8; a second `wait` has nothing new; `status` keeps both outcomes; `resume` downloads the failed one
    again as a new task; `clear` forgets the outcomes."""
    server.add_blob("/ok.bin", size=2000)
    server.add_status("/gone.bin", 404, b"no")
    cli.run("download", "-d", str(cli.out), server.url("/ok.bin"), server.url("/gone.bin"), check=True)
    first = cli.run("wait")
    assert first.returncode == 8, first.stdout + first.stderr
    assert f"2 failed     HTTP 404  {server.url('/gone.bin')}" in first.stdout
    assert "Downloaded: 1 file, 2.0 KiB in" in first.stdout and "; 1 failed" in first.stdout
    again = cli.run("wait")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to wait for"
    text = cli.run("status", check=True).stdout
    assert "1 saved      ok.bin" in text and "2 failed     HTTP 404" in text
    assert [(t["id"], t["state"], t["exit"]) for t in cli.status()] == [(1, "saved", 0), (2, "failed", 8)]
    server.add_blob("/gone.bin", size=500)  # the server has it now
    assert cli.run("resume", "2", check=True).stdout.strip() == "resume 2: again as 3"
    assert cli.run("wait").returncode == 0
    assert [(t["id"], t["state"]) for t in cli.status()] == [(1, "saved"), (3, "saved")]
    assert cli.run("resume", "1").returncode == 2  # saved: nothing to resume
    assert cli.run("clear", check=True).stdout.strip() == "forgot 2 outcomes"
    assert cli.run("status", check=True).stdout.strip() == f"no tasks in session {bg.CLI_SESSION!r}"


@pytest.mark.parametrize("case, code", [("ok", 0), ("404", 8), ("401", 6), ("refused", 4), ("checksum", 1)])
def test_exit_codes_are_wgets(server, cli, case, code):
    """`download --wait` exits as wget would: 0 saved, 8 an error response, 6 an authentication failure, 4 a
    network failure (with --tries 1), and 1 for a failure wget has no number for (a checksum mismatch)."""
    server.add_blob("/f.bin", size=1000)
    server.add_blob("/secret.bin", size=1000, auth=fs.BasicAuth("ann", "pw"))
    server.add_status("/missing.bin", 404, b"no")
    args = {"ok": [server.url("/f.bin")], "404": [server.url("/missing.bin")], "401": [server.url("/secret.bin")],
            "refused": ["--tries", "1", f"http://127.0.0.1:{closed_port()}/x"],
            "checksum": ["--checksum", "sha-256=" + "0" * 64, server.url("/f.bin")]}[case]
    proc = cli.run("download", "--wait", "-d", str(cli.out), *args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    (task,) = cli.status()
    assert task["exit"] == code


def test_session_options_before_or_after_the_command(server, cli, tmp_path):
    """--session and --state-dir work before the command (as the README's usage line shows) and after it."""
    state = str(tmp_path / "other")
    server.add_blob("/s.bin", size=100)
    command = [sys.executable, "-W", "error", BGSESSION]
    before = subprocess.run(command + ["--session", "photos", "--state-dir", state, "download", "--wait", "-d",
                                       str(cli.out), server.url("/s.bin")], capture_output=True, text=True,
                            timeout=LONG)
    try:
        assert before.returncode == 0, before.stderr
        after = subprocess.run(command + ["status", "--json", "--session", "photos", "--state-dir", state],
                               capture_output=True, text=True, timeout=LONG)
        assert [t["state"] for t in json.loads(after.stdout)] == ["saved"]
        mixed = subprocess.run(command + ["--session", "photos", "status", "--state-dir", state],
                               capture_output=True, text=True, timeout=LONG)
        assert "saved      s.bin" in mixed.stdout
    finally:
        stop_daemon(state)


def test_help_lists_only_the_commands_people_type(cli):
    """--help lists the commands, not the daemon's own (deliver, daemon) nor argparse's ==SUPPRESS== marks."""
    text = subprocess.run([sys.executable, BGSESSION, "--help"], capture_output=True, text=True, timeout=LONG).stdout
    assert "download" in text and "service" in text and "exit codes" in text
    assert "SUPPRESS" not in text and not re.search(r"^\s+(deliver|daemon)\b", text, re.M), text


def test_task_numbers_stay_small_and_sequential_across_daemon_restarts(server, cli):
    """Task numbers are 1, 2, 3... in a CLI session, across a SIGKILLed daemon and a daemon that exited."""
    server.add_blob("/n.bin", size=10)
    url = server.url("/n.bin")
    cli.run("download", "-d", str(cli.out), url, url, check=True)
    daemon = read_pid_file(cli.state)
    assert daemon is not None and daemon.kill()
    assert cli.run("download", "-d", str(cli.out), url, check=True).stdout.startswith("queued 3 ")
    assert cli.run("wait").returncode == 0
    stop_daemon(cli.state)
    assert cli.run("download", "-d", str(cli.out), url, check=True).stdout.startswith("queued 4 ")


def test_output_names_input_file_and_headers(server, cli, tmp_path):
    """-O FILE and -o NAME name the file (-d made if missing); -i reads URLs with aria2c's indented out=, dir=,
    checksum= and header= options; --header reaches the server; a name taken gets .1 (never clobbered)."""
    data = {name: fs.blob_bytes(3000 + i, seed=70 + i) for i, name in enumerate("abcd")}
    for name, body in data.items():
        server.add_blob(f"/{name}.bin", body)
    new_dir = cli.out / "new" / "nested"
    cli.run("download", "--wait", "-O", str(cli.out / "first.dat"), server.url("/a.bin"), check=True)
    cli.run("download", "--wait", "-d", str(new_dir), "-o", "second.dat", "--header", "X-Trace: 42",
            server.url("/b.bin"), check=True)
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# two files\n{server.url('/c.bin')}\n  out=third.dat\n  header=X-Trace: 43\n"
                       f"{server.url('/d.bin')}\n  dir={cli.out / 'other'}\n  checksum=sha-256={sha(data['d'])}\n\n"
                       f"{server.url('/a.bin')}\n  out=first.dat\n")
    proc = cli.run("download", "--wait", "-d", str(cli.out), "-i", str(listing))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sha((cli.out / "first.dat").read_bytes()) == sha(data["a"])
    assert sha((new_dir / "second.dat").read_bytes()) == sha(data["b"])
    assert sha((cli.out / "third.dat").read_bytes()) == sha(data["c"])
    assert sha((cli.out / "other" / "d.bin").read_bytes()) == sha(data["d"])
    assert sha((cli.out / "first.dat.1").read_bytes()) == sha(data["a"])
    assert "saved      first.dat.1 " in proc.stdout
    assert server.requests("/b.bin")[0].headers.get("x-trace") == "42"
    assert server.requests("/c.bin")[0].headers.get("x-trace") == "43"


def test_credentials_from_the_environment_or_netrc_are_never_stored(server, cli, tmp_path):
    """-u USER with $BGSESSION_HTTP_PASSWORD, and --netrc-file, authenticate; the password is in no file of the
    session directory."""
    server.add_blob("/private.bin", size=5000, auth=fs.BasicAuth("ann", "hunter2-secret"))
    env = {**os.environ, bg.CLI_PASSWORD_ENV: "hunter2-secret"}
    proc = subprocess.run([sys.executable, "-W", "error", BGSESSION, "download", "--wait", "--state-dir", cli.state,
                           "-d", str(cli.out), "-u", "ann", server.url("/private.bin")], capture_output=True,
                          text=True, timeout=LONG, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login ann password hunter2-secret\n")
    netrc.chmod(0o600)
    cli.run("download", "--wait", "-d", str(cli.out), "--netrc-file", str(netrc), server.url("/private.bin"),
            check=True)
    assert (cli.out / "private.bin").exists() and (cli.out / "private.bin.1").exists()
    for root, _, files in os.walk(cli.state):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):  # (not the daemon's socket)
                with open(path, "rb") as f:
                    content = f.read()
                assert b"hunter2" not in content and b"aHVudGVyMi1zZWNyZXQ" not in content, name
    no_password = subprocess.run([sys.executable, BGSESSION, "download", "--state-dir", cli.state, "-u", "ann",
                                  server.url("/private.bin")], capture_output=True, text=True, timeout=LONG,
                                 stdin=subprocess.DEVNULL, env={k: v for k, v in os.environ.items()
                                                                if k != bg.CLI_PASSWORD_ENV})
    assert no_password.returncode == 2 and bg.CLI_PASSWORD_ENV in no_password.stderr


def test_jobs_are_kept_for_the_session(server, cli):
    """-j 1 holds the session to one transfer at a time, and stays so for later runs that do not repeat it."""
    for name in "xyz":
        server.add_blob(f"/{name}.bin", size=200_000, default_fault=fs.Fault(throttle=2_000_000))
    cli.run("download", "-j", "1", "-d", str(cli.out), server.url("/x.bin"), check=True)
    cli.run("download", "-d", str(cli.out), server.url("/y.bin"), server.url("/z.bin"), check=True)
    assert cli.run("wait").returncode == 0
    assert server.peak_requests == 1
    with open(os.path.join(cli.state, "cli.json")) as f:
        assert json.load(f)["jobs"] == 1


def test_plain_progress_lines_and_quiet(server, cli):
    """Without a terminal, --wait prints a plain progress line per running task every few seconds (as wget's dot
    progress); -q prints only the summary, on stderr."""
    server.add_blob("/p.bin", size=3 * MiB, default_fault=fs.Fault(throttle=1 * MiB))
    proc = cli.run("download", "--wait", "-d", str(cli.out), server.url("/p.bin"))
    assert proc.returncode == 0
    progress = [line for line in proc.stdout.splitlines() if line.split()[1:2] == ["running"]]
    assert len(progress) >= 2 and all("%" in line and "/s" in line for line in progress), proc.stdout
    quiet = cli.run("download", "--wait", "-q", "-d", str(cli.out), server.url("/p.bin"))
    assert quiet.returncode == 0 and quiet.stdout == ""
    assert quiet.stderr.startswith("Downloaded: 1 file, 3.0 MiB")
