#!/usr/bin/env python3
"""bgsession benchmark: one command, against a private nginx on 127.0.0.1.

    python bench/run.py [--quick] [--rows 1,2,3,4,5,6,7] [--repeat N] [--allow-missing]

Installs nothing. It needs nginx, curl, wget and aria2c; when one is missing it
says how to install them and exits with status 2 (``--allow-missing`` skips the
missing contenders instead, with a note; nginx is always required).

It starts nginx on a free 127.0.0.1 port with a generated config in a temp dir,
generates the files, runs every contender of a row several times *alternately*
(A B C A B C ...), each in a fresh process, and reports medians and the median
of per-round ratios (only ratios inside one run mean anything on a noisy
machine). Results go to ``bench/results/`` as Markdown and CSV; the Markdown is
printed. See bench/README.md for what each row measures and why.

Standard library only (the contenders are external programs).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import glob
import grp
import hashlib
import json
import os
import platform
import pwd
import py_compile
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "worker.py")
RESULTS = os.path.join(HERE, "results")

#: The external programs the bench compares against, and the Debian package of each.
TOOLS = {"nginx": "nginx", "curl": "curl", "wget": "wget", "aria2c": "aria2"}
INSTALL_HINT = "apt-get install nginx curl wget aria2"
#: Exit status when a required program is missing.
EXIT_MISSING = 2
#: Exit status of worker.py meaning "this contender cannot run here".
EXIT_SKIP = 3

MiB = 1 << 20
KiB = 1 << 10


@dataclasses.dataclass(frozen=True)
class Sizes:
    big: int  # rows 1, 4, 6 (large)
    small_n: int  # row 2: count of files
    small_size: int
    medium_n: int  # row 3
    medium_size: int
    queue_n: int  # row 5
    rss_small: int  # row 6: the smaller file, to show RSS is flat in size
    split: int  # row 7: the file fetched in segments from a server that limits each connection


FULL = Sizes(big=1 << 30, small_n=1000, small_size=10 * KiB, medium_n=100, medium_size=MiB,
             queue_n=10_000, rss_small=64 * MiB, split=64 * MiB)
QUICK = Sizes(big=64 * MiB, small_n=200, small_size=10 * KiB, medium_n=20, medium_size=MiB,
              queue_n=1_000, rss_small=16 * MiB, split=16 * MiB)

#: Row 7's contenders: bgsession with one connection (the row's baseline), and with four.
SPLIT_ONE, SPLIT_FOUR = "bgsession inprocess, 1 connection", "bgsession inprocess, 4 connections"
#: The contender of each kind of row every "÷ bare" ratio divides by: the bare urllib one (row 7: bgsession on
#: one connection, so that its "speed vs bare" column is the speed-up of four connections over one).
BASELINES = ("urllib bare loop", "urllib 16-thread pool", SPLIT_ONE)
#: Seconds a single child may run before the bench kills it and records a failure.
CHILD_TIMEOUT = 900.0
#: Poll period (seconds) while watching a file grow in row 4.
POLL = 0.001
#: Poll period (seconds) of an external program's VmHWM.
RSS_POLL = 0.01
#: Environment of every child: BENCH_LIB points the workers (and a daemon they start) at the frozen library copy.
CHILD_ENV = dict(os.environ)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================
# Prerequisites and machine description
# ============================================================================


def find_tool(name: str) -> str | None:
    path = shutil.which(name)
    if path is None:
        for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
            cand = os.path.join(d, name)
            if os.access(cand, os.X_OK):
                return cand
    return path


def tool_version(name: str, path: str) -> str:
    argv = [path, "-v"] if name == "nginx" else [path, "--version"]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (p.stdout or "") + (p.stderr or "")
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else "?"


def check_tools(allow_missing: bool) -> dict[str, str]:
    found = {name: find_tool(name) for name in TOOLS}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}. Install them with:\n\n    {INSTALL_HINT}\n\n"
              "(the bench installs nothing itself)", file=sys.stderr)
        if "nginx" in missing:
            print("bench: nginx serves every row; it cannot be skipped.", file=sys.stderr)
            sys.exit(EXIT_MISSING)
        if not allow_missing:
            print("bench: or pass --allow-missing to skip the missing contenders.", file=sys.stderr)
            sys.exit(EXIT_MISSING)
    return {n: p for n, p in found.items() if p is not None}


def machine_info(tools: dict[str, str], workdir: str, lib_path: str) -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = "?"
    try:
        best = ""
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt, kind = line.split()[:3]
                if (workdir + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                    best, fs = mnt, f"{kind} ({dev} on {mnt})"
    except OSError:
        pass
    with open(lib_path, "rb") as f:
        lib_hash = hashlib.sha256(f.read()).hexdigest()[:12]
    git = "?"
    try:
        git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "no commit"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fs": fs,
        "tools": ", ".join(f"{n} {tool_version(n, p)}" for n, p in sorted(tools.items())),
        "bgsession": f"bgsession.py sha256 {lib_hash} (project git {git})",
    }


# ============================================================================
# Children: run, time, reap with rusage
# ============================================================================


@dataclasses.dataclass
class Child:
    rc: int
    wall: float  # seconds from spawn to reap
    rss_kib: int  # ru_maxrss of the child (KiB on Linux)
    out: str
    err: str

    def result(self) -> dict[str, Any]:
        """The worker's JSON result line (last line of stdout)."""
        for line in reversed(self.out.splitlines()):  # py-spy may print after the worker
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    pass
        return {}


def run_child(argv: list[str], timeout: float = CHILD_TIMEOUT, cwd: str | None = None,
              watch_rss: bool = False) -> Child:
    """Spawn, wait with os.wait4, kill on timeout.

    ``rss_kib`` is the child's VmHWM polled from /proc every RSS_POLL seconds
    when *watch_rss* (external programs), else ``ru_maxrss`` from wait4 -- which
    on Linux also counts this (parent) process's RSS at the child's exec, so
    Python workers report their own VmHWM instead (see worker.py).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=CHILD_ENV)
        timer = threading.Timer(timeout, _kill_quietly, (p.pid,))
        timer.start()
        hwm = [0]
        done = threading.Event()
        watcher = None
        if watch_rss:
            watcher = threading.Thread(target=_watch_hwm, args=(p.pid, hwm, done), daemon=True)
            watcher.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
            done.set()
        wall = time.perf_counter() - t0
        if watcher is not None:
            watcher.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(p.returncode, wall, hwm[0] if watch_rss else ru.ru_maxrss,
                     out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))


def _watch_hwm(pid: int, hwm: list[int], done: threading.Event) -> None:
    path = f"/proc/{pid}/status"
    while not done.is_set():
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]))
                        break
        except (OSError, ValueError):
            pass
        done.wait(RSS_POLL)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def worker_argv(spec: dict[str, Any], profile: str | None = None) -> list[str]:
    argv = [sys.executable, WORKER, json.dumps(spec)]
    if profile:
        argv = ["py-spy", "record", "--idle", "--threads", "--subprocesses", "-r", "200", "--format", "raw",
                "-o", profile, "--", *argv]
    return argv


class Skip(Exception):
    """This contender cannot run here; the message says why."""


class Failed(Exception):
    """This trial failed; the message says how (the run goes on)."""


# ============================================================================
# Servers: nginx with a generated config, and a black hole
# ============================================================================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in the foreground on a free 127.0.0.1 port; its pid is ours to stop."""

    def __init__(self, binary: str, workdir: str, docroot: str, kill_rate: str, split_rate: str = "3m") -> None:
        self.binary = binary
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(self.dir, exist_ok=True)
        self.docroot = docroot
        self.kill_rate = kill_rate
        self.split_rate = split_rate
        self.count_log = os.path.join(self.dir, "count.log")
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def _config(self) -> str:
        d = self.dir
        user = ""
        if os.geteuid() == 0:  # workers drop root; the docroot is made world-readable
            try:
                nobody = pwd.getpwnam("nobody")
                user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
            except KeyError:
                user = "user root root;"
        return f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format bench '$request_uri $status $body_bytes_sent "$http_range" $msec';
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {self.docroot};
        location /slow/ {{
            alias {self.docroot}/;
            limit_rate {self.kill_rate};
            access_log {self.count_log} bench;
        }}
        location /limited/ {{
            alias {self.docroot}/;
            limit_rate {self.split_rate};
        }}
    }}
}}
"""

    def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            conf = os.path.join(self.dir, "nginx.conf")
            with open(conf, "w", encoding="utf-8") as f:
                f.write(self._config())
            argv = [self.binary, "-p", self.dir + "/", "-c", conf]
            if tuple(int(x) for x in (tool_version("nginx", self.binary).split(".") + ["0"])[:2]) >= (1, 19):
                argv += ["-e", os.path.join(self.dir, "error.log")]
            with open(os.path.join(self.dir, "stderr.log"), "ab") as stderr:  # the child keeps its own copy
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=stderr)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        return
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise SystemExit(f"bench: nginx did not start; see {self.dir}/error.log and stderr.log")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def count_lines(self) -> list[tuple[str, int, int, str]]:
        """(request_uri, status, body_bytes_sent, range) for every counted request so far."""
        out = []
        try:
            with open(self.count_log, encoding="utf-8") as f:
                for line in f:
                    m = re.match(r'(\S+) (\d+) (\d+) "([^"]*)" (\S+)', line)
                    if m:
                        out.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)))
        except FileNotFoundError:
            pass
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful; then by force
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def session_file_sizes(session: str) -> dict[str, int]:
    """The sizes of a session's journal and snapshot (0: absent)."""
    out = {}
    for name in ("journal.jsonl", "snapshot.json"):
        try:
            out[name] = os.path.getsize(os.path.join(session, name))
        except OSError:
            out[name] = 0
    return out


class BlackHole:
    """Accepts connections, reads nothing, answers nothing: the honest "queued" server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.held.append(conn)

    def reset(self) -> None:
        with self.lock:
            for c in self.held:
                c.close()
            self.held.clear()

    def close(self) -> None:
        self.reset()
        self.sock.close()


# ============================================================================
# Files
# ============================================================================


def write_random(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    os.chmod(path, 0o644)
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(4 * MiB)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def empty_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def settle() -> None:
    """Between trials: no dirty pages of one contender are written back during the next."""
    os.sync()
    time.sleep(0.2)


# ============================================================================
# The bench
# ============================================================================


@dataclasses.dataclass
class Trial:
    row: str
    contender: str
    round: int
    primary: float | None  # seconds (the row's timed interval); None when failed/skipped
    rss_kib: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""


@dataclasses.dataclass
class Contender:
    name: str
    run: Callable[[int], Trial]
    baseline: bool = False  # the bare urllib contender of its row
    info: str = ""  # shown in the notes column


class Bench:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str]) -> None:
        self.args = args
        self.tools = tools
        self.sizes = QUICK if args.quick else FULL
        base = args.workdir or tempfile.gettempdir()
        self.work = tempfile.mkdtemp(prefix="bgsession-bench-", dir=base)
        os.chmod(self.work, 0o755)  # nginx workers (not root) read the docroot
        self.docroot = os.path.join(self.work, "www")
        self.out = os.path.join(self.work, "out")
        self.sessions = os.path.join(self.work, "sessions")
        for d in (self.docroot, self.out, self.sessions):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.docroot, 0o755)
        # The lead edits bgsession.py while benches run: measure one frozen copy of it.
        lib = os.path.join(self.work, "lib")
        os.makedirs(lib)
        shutil.copy2(args.lib or os.path.join(ROOT, "bgsession.py"), os.path.join(lib, "bgsession.py"))
        # Compiled once, as an installed module would be (PYTHONDONTWRITEBYTECODE may be set here):
        # otherwise every worker would pay ~40 ms and ~8 MiB of RSS compiling the source.
        py_compile.compile(os.path.join(lib, "bgsession.py"), doraise=True)
        CHILD_ENV["BENCH_LIB"] = lib
        self.logs = os.path.join(RESULTS, "logs")
        self.lib_b = None
        if args.compare_lib:  # a second bgsession.py measured in the same run, as "bgsession ... [B]"
            self.lib_b = os.path.join(self.work, "lib-b")
            os.makedirs(self.lib_b)
            shutil.copy2(args.compare_lib, os.path.join(self.lib_b, "bgsession.py"))
            py_compile.compile(os.path.join(self.lib_b, "bgsession.py"), doraise=True)
        self.machine = machine_info(tools, self.work, os.path.join(lib, "bgsession.py"))
        if self.lib_b:
            with open(os.path.join(self.lib_b, "bgsession.py"), "rb") as f:
                self.machine["bgsession"] += (f"; [B] = {args.compare_lib} sha256 "
                                              f"{hashlib.sha256(f.read()).hexdigest()[:12]}")
        self.trials: list[Trial] = []
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}  # contender name -> reason
        self.hashes: dict[str, str] = {}
        self.nginx: Nginx | None = None
        self.blackhole: BlackHole | None = None
        self.daemon_skip: str | None = None
        self.profile_dir = os.path.join(RESULTS, "profiles") if args.profile else None
        self.stamp = time.strftime("%Y%m%d-%H%M%S")

    # -- setup ---------------------------------------------------------------------------
    def generate(self) -> None:
        s = self.sizes
        rows = self.args.rows
        log(f"generating files in {self.docroot}")
        if rows & {1, 4, 6}:
            self.hashes["big.bin"] = write_random(os.path.join(self.docroot, "big.bin"), s.big)
        if 6 in rows:
            self.hashes["rss-small.bin"] = write_random(os.path.join(self.docroot, "rss-small.bin"), s.rss_small)
        if 7 in rows:
            self.hashes["split.bin"] = write_random(os.path.join(self.docroot, "split.bin"), s.split)
        for key, n, size in (("small", s.small_n, s.small_size), ("medium", s.medium_n, s.medium_size)):
            if (key == "small" and 2 not in rows) or (key == "medium" and 3 not in rows):
                continue
            d = os.path.join(self.docroot, key)
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
            for i in range(n):
                write_random(os.path.join(d, f"{i:05d}.bin"), size)
        self.kill_rate = self.args.kill_rate

    def start_servers(self) -> None:
        self.nginx = Nginx(self.tools["nginx"], self.work, self.docroot, self.kill_rate, self.args.split_rate)
        self.nginx.start()
        log(f"nginx on 127.0.0.1:{self.nginx.port} (config {self.nginx.dir}/nginx.conf)")
        if 5 in self.args.rows:
            self.blackhole = BlackHole()

    def probe_daemon(self) -> None:
        """The daemon host is skipped (with the library's own reason) until it exists."""
        d = os.path.join(self.sessions, "probe")
        child = run_child(worker_argv({"mode": "probe", "session": d, "host": "daemon"}), timeout=60)
        res = child.result()
        if child.rc == EXIT_SKIP:
            self.daemon_skip = res.get("skip", "not available")
        elif child.rc != 0:
            self.daemon_skip = f"probe failed (exit {child.rc}): {child.err.strip()[-300:]}"
        self._cleanup_session(d)
        if self.daemon_skip:
            log(f"daemon host skipped: {self.daemon_skip}")
            self.notes.append(f"bgsession daemon host skipped in every row: {self.daemon_skip}")

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        if self.blackhole is not None:
            self.blackhole.close()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")

    def _cleanup_session(self, d: str) -> None:
        """Remove a session directory; first let (or make) a daemon of it exit."""
        pid_file = os.path.join(d, "daemon.pid")
        try:
            with open(pid_file, encoding="ascii") as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid > 0:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        shutil.rmtree(d, ignore_errors=True)

    # -- generic trial plumbing ------------------------------------------------------------
    def _profile_path(self, row: str, name: str, rnd: int) -> str | None:
        if not self.profile_dir or "bgsession" not in name:
            return None
        os.makedirs(self.profile_dir, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"row{row}-{name}-r{rnd}").strip("-")
        return os.path.join(self.profile_dir, slug + ".txt")

    def _py_trial(self, row: str, name: str, rnd: int, spec: dict[str, Any]) -> Trial:
        child = run_child(worker_argv(spec, self._profile_path(row, name, rnd)))
        res = child.result()
        if child.rc == EXIT_SKIP:
            raise Skip(res.get("skip", "skipped"))
        noisy = re.search(r"WARNING|ERROR|Traceback|retry", child.err)
        kept = self._keep_log(row, name, rnd, child.err) if noisy else ""
        if child.rc != 0 or "t" not in res:
            raise Failed(f"exit {child.rc}: {child.err.strip()[-300:]} (log {kept})")
        if res.get("n_errors"):
            raise Failed(f"{res['n_errors']} task errors, e.g. {res.get('errors')} (log {kept})")
        rss = res.get("rss_kib") or child.rss_kib
        res["app_rss_kib"] = rss
        if res.get("daemon_rss_kib"):
            rss = rss + res["daemon_rss_kib"]  # the transfer runs in the daemon: count both processes
        extra = {k: v for k, v in res.items() if k not in ("t", "rss_kib", "errors")}
        extra["process_wall"] = child.wall
        note = f"log: {kept}" if kept else ""
        if res.get("resume_api") == "Session.resume_all" and row in ("2", "3"):
            note = (note + "; " if note else "") + "tasks started with Session.resume_all"
        return Trial(row, name, rnd, res["t"], rss, extra, note=note)

    def _tool_trial(self, row: str, name: str, rnd: int, argv: list[str], cwd: str | None = None) -> Trial:
        child = run_child(argv, cwd=cwd, watch_rss=True)
        if child.rc != 0:
            raise Failed(f"{argv[0]} exit {child.rc}: {(child.err or child.out).strip()[-400:]}")
        return Trial(row, name, rnd, child.wall, child.rss_kib, {"process_wall": child.wall})

    def _keep_log(self, row: str, name: str, rnd: int, text: str) -> str:
        """Keep a bgsession worker's log when it says something (retries, warnings, errors)."""
        os.makedirs(self.logs, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.stamp}-row{row}-{name}-r{rnd}").strip("-")
        path = os.path.join(self.logs, slug + ".log")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return os.path.relpath(path, HERE)

    def alternate(self, row: str, contenders: list[Contender], rounds: int,
                  check: Callable[[Contender], None], reset: Callable[[], None]) -> None:
        """Run every contender once per round, alternating (A B C, B C A, C A B, ... -- the start rotates
        each round unless --fixed-order); reset and sync before each trial. A skipped contender is
        noted once and not retried."""
        active = list(contenders)
        for rnd in range(1, rounds + 1):
            k = 0 if self.args.fixed_order or not active else (rnd - 1) % len(active)
            for c in active[k:] + active[:k]:
                if c not in active:
                    continue
                reset()
                settle()
                log(f"row {row} round {rnd}/{rounds}: {c.name}")
                try:
                    trial = c.run(rnd)
                    check(c)
                except Skip as skip:
                    self.skipped[f"{row}:{c.name}"] = str(skip)
                    self.trials.append(Trial(row, c.name, rnd, None, note=f"skipped: {skip}"))
                    active.remove(c)
                    continue
                except Failed as fail:
                    log(f"  FAILED: {fail}")
                    self.trials.append(Trial(row, c.name, rnd, None, note=f"failed: {fail}"))
                    continue
                self.trials.append(trial)
                log(f"  {trial.primary:.3f} s, rss {fmt_mib(trial.rss_kib)} MiB {trial.note}")
            reset()

    # -- rows 1 and 6: one big file ----------------------------------------------------------
    def _single_contenders(self, row: str, fname: str, with_tools: bool) -> list[Contender]:
        url = self.nginx.url(fname)
        dest = os.path.join(self.out, fname)
        sess = os.path.join(self.sessions, f"row{row}")
        cs: list[Contender] = [
            Contender("urllib bare loop", lambda r: self._py_trial(row, "urllib bare loop", r, {
                "mode": "bare-single", "url": url, "dest": dest}), baseline=True,
                info="readinto a reused 1 MiB buffer, write; no fsync"),
        ]
        if with_tools:
            cs.append(Contender("urllib bare loop 256 KiB", lambda r: self._py_trial(
                row, "urllib bare loop 256 KiB", r, {"mode": "bare-single", "url": url, "dest": dest,
                                                     "buffer": 256 * KiB})))
            cs.append(Contender("urllib bare loop + fsync", lambda r: self._py_trial(
                row, "urllib bare loop + fsync", r, {"mode": "bare-single", "url": url, "dest": dest, "fsync": 1}),
                info="the same, one fsync at the end (durable like bgsession)"))
            tool_cmds = {
                "curl": [self.tools.get("curl", "curl"), "-sS", "-o", dest, url],
                "wget": [self.tools.get("wget", "wget"), "-q", "-O", dest, url],
                "aria2c -x1": [self.tools.get("aria2c", "aria2c"), "-q", "-x1", "--allow-overwrite=true",
                               "--auto-file-renaming=false", "-d", self.out, "-o", fname, url],
            }
            infos = {"aria2c -x1": "-x1 is aria2c's default; default file allocation (prealloc) kept"}
            for name, argv in tool_cmds.items():
                if argv[0].split("/")[-1] not in self.tools:
                    self.skipped[f"{row}:{name}"] = f"{argv[0]} not installed (--allow-missing)"
                    continue
                cs.append(Contender(name, (lambda n, a: lambda r: self._tool_trial(row, n, r, a))(name, argv),
                                    info=infos.get(name, "")))
        cs += self._bg_contenders(row, {"mode": "bg-transfer", "url": url, "outdir": self.out, "session": sess})
        return cs

    def _bg_contenders(self, row: str, base: dict[str, Any]) -> list[Contender]:
        """bgsession on each host, and again with the --compare-lib copy ("[B]") when given."""
        cs = []
        for lib, suffix in [(None, "")] + ([(self.lib_b, " [B]")] if self.lib_b else []):
            for host in ("inprocess", "daemon"):
                name = f"bgsession {host}{suffix}"
                if host == "daemon" and self.daemon_skip:
                    self.skipped[f"{row}:{name}"] = self.daemon_skip
                    continue
                spec = dict(base, host=host)
                if lib:
                    spec["lib"] = lib
                cs.append(Contender(name, (lambda n, sp: lambda r: self._py_trial(row, n, r, sp))(name, spec)))
        return cs

    def _single_reset(self, row: str) -> Callable[[], None]:
        def reset() -> None:
            empty_dir(self.out)
            self._cleanup_session(os.path.join(self.sessions, f"row{row}"))
        return reset

    def _single_check(self, fname: str, size: int) -> Callable[[Contender], None]:
        def check(c: Contender) -> None:
            path = os.path.join(self.out, fname)
            try:
                got = os.path.getsize(path)
            except OSError:
                raise Failed(f"{c.name}: no output file {path}") from None
            if got != size:
                raise Failed(f"{c.name}: output has {got} bytes, not {size}")
            if self.args.verify and sha256_file(path) != self.hashes[fname]:
                raise Failed(f"{c.name}: SHA-256 mismatch")
        return check

    def row1(self) -> None:
        cs = self._single_contenders("1", "big.bin", with_tools=True)
        self.alternate("1", cs, self.args.repeat, self._single_check("big.bin", self.sizes.big),
                       self._single_reset("1"))

    def row6(self) -> None:
        """Peak RSS, fresh process per trial, at two file sizes (flat in size?)."""
        rounds = min(self.args.repeat, 3)
        for label, fname, size in (("6a", "rss-small.bin", self.sizes.rss_small), ("6b", "big.bin", self.sizes.big)):
            cs = self._single_contenders(label, fname, with_tools=False)
            self.alternate(label, cs, rounds, self._single_check(fname, size), self._single_reset(label))

    # -- rows 2 and 3: many files ------------------------------------------------------------
    def _many(self, row: str, key: str, n: int, size: int) -> None:
        urls = [self.nginx.url(f"{key}/{i:05d}.bin") for i in range(n)]
        lists = os.path.join(self.work, f"lists-{key}")
        os.makedirs(lists, exist_ok=True)
        url_list = os.path.join(lists, "urls.txt")
        with open(url_list, "w", encoding="utf-8") as f:
            f.write("\n".join(urls) + "\n")
        curl_cfg = os.path.join(lists, "curl.cfg")
        with open(curl_cfg, "w", encoding="utf-8") as f:
            for u in urls:
                f.write(f'url = "{u}"\noutput = "{os.path.join(self.out, u.rsplit("/", 1)[-1])}"\n')
        aria_list = os.path.join(lists, "aria2.txt")
        with open(aria_list, "w", encoding="utf-8") as f:
            for u in urls:
                f.write(f"{u}\n  out={u.rsplit('/', 1)[-1]}\n")
        sess = os.path.join(self.sessions, f"row{row}")
        cs: list[Contender] = [Contender("urllib 16-thread pool", lambda r: self._py_trial(
            row, "urllib 16-thread pool", r, {"mode": "bare-pool", "list": url_list, "outdir": self.out,
                                              "threads": 16}), baseline=True,
            info="naive: one urlopen (one connection) per file, 16 threads")]
        tool_cmds = {
            "curl --parallel 16": ([self.tools.get("curl", "curl"), "-sS", "--parallel", "--parallel-max", "16",
                                    "-K", curl_cfg], "one config file of url/output pairs"),
            "aria2c -j16": ([self.tools.get("aria2c", "aria2c"), "-q", "-j16", "-i", aria_list, "-d", self.out,
                             "--allow-overwrite=true", "--auto-file-renaming=false"], "-i list, out= per URL"),
            "wget -i (sequential)": ([self.tools.get("wget", "wget"), "-q", "-i", url_list, "-P", self.out],
                                     "informational: one connection, keep-alive, no parallelism"),
        }
        # the durable peer: curl, then an fsync of each file it wrote and of their directory (coreutils `sync FILE...`),
        # which any downloader that survives a power loss must pay
        outputs = [os.path.join(self.out, u.rsplit("/", 1)[-1]) for u in urls]
        tool_cmds["curl --parallel 16 + fsync"] = (
            ["sh", "-c", '"$1" -sS --parallel --parallel-max 16 -K "$2" && shift 2 && exec sync -- "$@"', "sh",
             self.tools.get("curl", "curl"), curl_cfg, *outputs, self.out],
            "curl --parallel 16, then `sync FILE...`: one fsync per file and one of the directory")
        for name, (argv, info) in tool_cmds.items():
            tool = argv[4] if argv[0] == "sh" else argv[0]
            if tool.split("/")[-1] not in self.tools:
                self.skipped[f"{row}:{name}"] = f"{argv[0]} not installed (--allow-missing)"
                continue
            cs.append(Contender(name, (lambda nm, a: lambda r: self._tool_trial(row, nm, r, a))(name, argv),
                                info=info))
        cs += self._bg_contenders(row, {"mode": "bg-transfer", "list": url_list, "outdir": self.out,
                                        "session": sess, "conns": 16})

        def reset() -> None:
            empty_dir(self.out)
            self._cleanup_session(sess)

        def check(c: Contender) -> None:
            names = os.listdir(self.out)
            if len(names) != n:
                raise Failed(f"{c.name}: {len(names)} files in the output, not {n}")
            bad = [x for x in names if os.path.getsize(os.path.join(self.out, x)) != size]
            if bad:
                raise Failed(f"{c.name}: {len(bad)} files of the wrong size, e.g. {bad[0]}")

        self.alternate(row, cs, self.args.repeat, check, reset)

    def row2(self) -> None:
        self._many("2", "small", self.sizes.small_n, self.sizes.small_size)

    def row3(self) -> None:
        self._many("3", "medium", self.sizes.medium_n, self.sizes.medium_size)

    # -- row 7: one file in segments, from a server that limits each connection ---------------------
    def row7(self) -> None:
        """nginx's /limited/ location (``limit_rate`` per connection): bgsession on one connection and on four
        (``max_connections_per_task``, both hosts), and aria2c -x4 -s4, each output checked by SHA-256."""
        fname = "split.bin"
        url = self.nginx.url(f"limited/{fname}")
        sess = os.path.join(self.sessions, "row7")
        base = {"mode": "bg-transfer", "url": url, "outdir": self.out, "session": sess}
        cs = [Contender(SPLIT_ONE, lambda r: self._py_trial("7", SPLIT_ONE, r, dict(base, host="inprocess",
                                                                                     split=1)), baseline=True),
              Contender(SPLIT_FOUR, lambda r: self._py_trial("7", SPLIT_FOUR, r, dict(base, host="inprocess",
                                                                                       split=4)))]
        daemon = "bgsession daemon, 4 connections"
        if self.daemon_skip:
            self.skipped[f"7:{daemon}"] = self.daemon_skip
        else:
            cs.append(Contender(daemon, lambda r: self._py_trial("7", daemon, r, dict(base, host="daemon", split=4))))
        for name, extra in (("aria2c -x4 -s4", []), ("aria2c -x4 -s4 -k1M", ["-k1M"])):
            if "aria2c" not in self.tools:
                self.skipped[f"7:{name}"] = "aria2c not installed (--allow-missing)"
                continue
            argv = [self.tools["aria2c"], "-q", "-x4", "-s4", *extra, "--allow-overwrite=true",
                    "--auto-file-renaming=false", "-d", self.out, "-o", fname, url]
            cs.append(Contender(name, (lambda n, a: lambda r: self._tool_trial("7", n, r, a))(name, argv)))

        def check(c: Contender) -> None:
            path = os.path.join(self.out, fname)
            if not os.path.exists(path) or sha256_file(path) != self.hashes[fname]:
                raise Failed(f"{c.name}: the output is missing or differs from the source (SHA-256)")
        log(f"row 7: {fmt_bytes(self.sizes.split)} at {self.args.split_rate}/s per connection")
        before = os.getloadavg()
        self.alternate("7", cs, self.args.repeat, check, self._single_reset("7"))
        self.notes.append("row 7: load average (1, 5, 15 min) {:.2f} {:.2f} {:.2f} before, {:.2f} {:.2f} {:.2f} after "
                          "(the machine is shared)".format(*before, *os.getloadavg()))

    # -- row 4: SIGKILL at 50 % and relaunch --------------------------------------------------
    def row4(self) -> None:
        size = self.sizes.big
        rounds = self.args.repeat
        contenders = [("bgsession inprocess", self._kill_bg)]
        if "curl" in self.tools:
            contenders.append(("curl -C -", self._kill_curl))
        else:
            self.skipped["4:curl -C -"] = "curl not installed (--allow-missing)"
        for rnd in range(1, rounds + 1):
            for name, fn in contenders:
                empty_dir(self.out)
                log(f"row 4 round {rnd}/{rounds}: {name}")
                tag = re.sub(r"[^a-z0-9]+", "-", name.lower()) + f"-{rnd}"
                try:
                    extra = fn(self.nginx.url(f"slow/big.bin?trial={tag}"), tag, size)
                except Failed as fail:
                    log(f"  FAILED: {fail}")
                    self.trials.append(Trial("4", name, rnd, None, note=f"failed: {fail}"))
                    continue
                self.trials.append(Trial("4", name, rnd, extra["relaunch_to_first_byte"], None, extra))
                log(f"  twice {extra['bytes_twice']} B (not on disk {extra['in_flight']} B, "
                    f"re-fetched from disk {extra['refetched_on_disk']} B), relaunch->first new byte "
                    f"{extra['relaunch_to_first_byte'] * 1000:.0f} ms")
                settle()
        empty_dir(self.out)

    def _watch(self, paths: Callable[[], list[str]], proc: subprocess.Popen, threshold: int,
               timeout: float = 600.0) -> int:
        """Poll until a watched file reaches *threshold* bytes; return its size then (or raise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in paths():
                try:
                    n = os.path.getsize(p)
                except OSError:
                    continue
                if n >= threshold:
                    return n
            if proc.poll() is not None:
                raise Failed(f"the child exited (status {proc.returncode}) before {threshold} bytes")
            time.sleep(POLL)
        raise Failed(f"no file reached {threshold} bytes in {timeout:.0f} s")

    def _kill_and_relaunch(self, first: list[str], second: list[str], watched: Callable[[], list[str]],
                           tag: str, size: int, final: str) -> dict[str, Any]:
        with open(os.path.join(self.work, f"row4-{tag}.log"), "wb") as errlog:
            proc = subprocess.Popen(first, stdout=errlog, stderr=errlog, stdin=subprocess.DEVNULL)
            try:
                self._watch(watched, proc, size // 2)
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.wait()
            at_kill = max((os.path.getsize(p) for p in watched() if os.path.exists(p)), default=0)
            t0 = time.perf_counter()
            proc2 = subprocess.Popen(second, stdout=errlog, stderr=errlog, stdin=subprocess.DEVNULL)
            try:
                self._watch(watched, proc2, at_kill + 1)
                first_byte = time.perf_counter() - t0
                proc2.wait(CHILD_TIMEOUT)
            except (Failed, subprocess.TimeoutExpired):
                proc2.kill()
                proc2.wait()
                raise
            total = time.perf_counter() - t0
            if proc2.returncode != 0:
                raise Failed(f"relaunched child exit {proc2.returncode} (see {errlog.name})")
        if not os.path.exists(final) or sha256_file(final) != self.hashes["big.bin"]:
            raise Failed(f"the resumed file {final} is missing or differs from the source (SHA-256)")
        lines = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # nginx logs the killed request once it notices
            lines = [ln for ln in self.nginx.count_lines() if f"trial={tag}" in ln[0]]
            if len(lines) >= 2 and sum(ln[2] for ln in lines) >= size:
                break
            time.sleep(0.05)
        served = sum(ln[2] for ln in lines)
        first_sent = lines[0][2] if lines else 0
        resume_at = None
        for _, _status, _, rng in lines[1:]:
            m = re.match(r"bytes=(\d+)-", rng)
            resume_at = int(m.group(1)) if m else 0
            break
        resume_at = 0 if resume_at is None else resume_at
        return {
            "requests": len(lines), "statuses": [ln[1] for ln in lines], "served": served,
            "bytes_twice": served - size, "at_kill_on_disk": at_kill, "first_request_sent": first_sent,
            "in_flight": first_sent - at_kill, "resume_offset": resume_at,
            "refetched_on_disk": at_kill - resume_at, "relaunch_to_first_byte": first_byte,
            "relaunch_to_done": total,
        }

    def _kill_bg(self, url: str, tag: str, size: int) -> dict[str, Any]:
        sess = os.path.join(self.sessions, f"row4-{tag}")
        spec = {"mode": "bg-transfer", "url": url, "outdir": self.out, "session": sess, "host": "inprocess",
                "names": ["big.bin"]}
        relaunch = {"mode": "bg-recover", "outdir": self.out, "session": sess, "host": "inprocess"}
        try:
            return self._kill_and_relaunch(
                worker_argv(spec), worker_argv(relaunch),
                lambda: glob.glob(os.path.join(sess, "tmp", "*.part")), tag, size,
                os.path.join(self.out, "big.bin"))
        finally:
            self._cleanup_session(sess)

    def _kill_curl(self, url: str, tag: str, size: int) -> dict[str, Any]:
        dest = os.path.join(self.out, "big.bin")
        curl = self.tools["curl"]
        return self._kill_and_relaunch([curl, "-sS", "-o", dest, url], [curl, "-sS", "-C", "-", "-o", dest, url],
                                       lambda: [dest], tag, size, dest)

    # -- row 5: 10,000 queued tasks --------------------------------------------------------------
    def row5(self) -> None:
        n = self.sizes.queue_n
        rounds = min(self.args.repeat, 3)
        bh = self.blackhole
        assert bh is not None
        for rnd in range(1, rounds + 1):
            sess = os.path.join(self.sessions, "row5")
            self._cleanup_session(sess)
            bh.reset()
            spec = {"session": sess, "host": "inprocess", "n": n,
                    "prefix": f"http://127.0.0.1:{bh.port}/queued/"}
            log(f"row 5 round {rnd}/{rounds}: create + resume {n} tasks")
            child = run_child(worker_argv(dict(spec, mode="bg-queue-create")))
            res = child.result()
            if child.rc != 0:
                self.trials.append(Trial("5", "create", rnd, None, note=f"failed: {child.err.strip()[-300:]}"))
                continue
            before = session_file_sizes(sess)
            self.trials.append(Trial("5", "create + resume + close", rnd, res["t"], res.get("rss_kib"),
                                     dict(res, **{f"before_{k}": v for k, v in before.items()})))
            for label in ("open #1 (replays the journal)", "open #2 (snapshot only)"):
                bh.reset()
                prof = None
                if self.args.profile and label.startswith("open #1"):
                    os.makedirs(self.profile_dir, exist_ok=True)
                    prof = os.path.join(self.profile_dir, f"row5-open1-r{rnd}.cprofile")
                child = run_child(worker_argv(dict(spec, mode="bg-queue-open", cprofile=prof)))
                r = child.result()
                if child.rc != 0 or r.get("tasks") != n:
                    self.trials.append(Trial("5", label, rnd, None,
                                             note=f"failed: exit {child.rc}, {r.get('tasks')} tasks; "
                                                  f"{child.err.strip()[-300:]}"))
                    continue
                after = session_file_sizes(sess)
                self.trials.append(Trial("5", label, rnd, r["t"], r["rss_kib"],
                                         dict(r, **{f"after_{k}": v for k, v in after.items()})))
                log(f"  {label}: {r['t']:.3f} s, rss {r['rss_kib'] / 1024:.1f} MiB, journal {after}")
            self._cleanup_session(sess)
            settle()
        bh.reset()

    # -- driver -----------------------------------------------------------------------------------
    def run(self) -> None:
        self.generate()
        self.start_servers()
        self.probe_daemon()
        for row in sorted(self.args.rows):
            getattr(self, f"row{row}")()


# ============================================================================
# Statistics and reports
# ============================================================================


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt_mib(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.2f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


class Report:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.trials = bench.trials

    def by(self, row: str) -> dict[str, list[Trial]]:
        out: dict[str, list[Trial]] = {}
        for t in self.trials:
            if t.row == row:
                out.setdefault(t.contender, []).append(t)
        return out

    def ok(self, trials: list[Trial]) -> list[Trial]:
        return [t for t in trials if t.primary is not None]

    def ratio(self, row: str, a: str, b: str) -> float | None:
        """Median over rounds of time(a) / time(b), both measured in the same round."""
        ta = {t.round: t.primary for t in self.ok(self.by(row).get(a, []))}
        tb = {t.round: t.primary for t in self.ok(self.by(row).get(b, []))}
        rs = [ta[r] / tb[r] for r in ta if tb.get(r)]
        return med(rs)

    def median_of(self, row: str, name: str, field: str = "primary") -> float | None:
        trials = self.ok(self.by(row).get(name, []))
        if field == "primary":
            return med([t.primary for t in trials])
        if field == "rss":
            return med([t.rss_kib for t in trials if t.rss_kib])
        return med([t.extra[field] for t in trials if field in t.extra])

    def timing_table(self, rows: list[tuple[str, str, int | None]]) -> list[str]:
        """rows: (row id, title, bytes per trial or None)."""
        out = ["| row | contender | runs ok | median s | min–max s | MB/s | peak RSS MiB | time ÷ bare "
               "| speed vs bare | note |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row, title, nbytes in rows:
            groups = self.by(row)
            if not groups:
                continue
            base = next((n for n in groups if n in BASELINES), None)
            for name, trials in groups.items():
                good = self.ok(trials)
                m = med([t.primary for t in good])
                lo = min((t.primary for t in good), default=None)
                hi = max((t.primary for t in good), default=None)
                rss = med([t.rss_kib for t in good if t.rss_kib])
                r = self.ratio(row, name, base) if base and name != base else None
                thr = f"{nbytes / m / 1e6:.0f}" if nbytes and m else "—"
                notes = sorted({t.note for t in trials if t.note})
                note = "; ".join(n[:160] for n in notes) or self._info(row, name)
                out.append(f"| {row} {title} | {name} | {len(good)}/{len(trials)} | {fmt_s(m)} | "
                           f"{fmt_s(lo)}–{fmt_s(hi)} | {thr} | {fmt_mib(rss)} | "
                           f"{fmt_ratio(r) if r else ('1.00× (baseline)' if name == base else '—')} | "
                           f"{fmt_ratio(1 / r) if r else '—'} | {note} |")
            for key, why in self.b.skipped.items():
                krow, kname = key.split(":", 1)
                if krow == row and kname not in groups:
                    out.append(f"| {row} {title} | {kname} | 0/0 | — | — | — | — | — | — | skipped: {why[:160]} |")
        return out

    def _info(self, row: str, name: str) -> str:
        infos = {
            "urllib bare loop": "readinto a reused 1 MiB buffer, write; no fsync",
            "urllib bare loop + fsync": "the same + one fsync at the end (durable, like bgsession)",
            "urllib bare loop 256 KiB": "informational: the same loop with a 256 KiB buffer",
            "aria2c -x1": "-x1 is aria2c's default (so: default); prealloc kept",
            "bgsession inprocess": "resume() → wait(); finish hook os.replace()s the file",
            "bgsession daemon": "resume() → wait(); finish hook os.replace()s the file",
            "urllib 16-thread pool": "naive: one urlopen (connection) per file",
            "curl --parallel 16": "--parallel --parallel-max 16 -K config",
            "curl --parallel 16 + fsync": "the same, then `sync FILE...`: each file and the directory fsynced",
            "aria2c -j16": "-j16 -i list",
            "wget -i (sequential)": "informational: 1 connection, keep-alive",
            SPLIT_ONE: "max_connections_per_task=1 (the default): the row's baseline",
            SPLIT_FOUR: "max_connections_per_task=4",
            "bgsession daemon, 4 connections": "max_connections_per_task=4",
            "aria2c -x4 -s4": "its defaults otherwise: min-split-size 20M (a 64 MiB file: 3 segments, 16 MiB: 1)",
            "aria2c -x4 -s4 -k1M": "min-split-size 1M, as bgsession's smallest segment: 4 segments",
        }
        return infos.get(name.replace(" [B]", ""), "") + (" — with --compare-lib" if name.endswith("[B]") else "")

    def pairwise(self, row: str) -> list[str]:
        names = [n for n, ts in self.by(row).items() if self.ok(ts)]
        if len(names) < 2:
            return []
        out = [f"| time(row) ÷ time(col), row {row} | " + " | ".join(names) + " |",
               "|---|" + "---|" * len(names)]
        for a in names:
            cells = []
            for b in names:
                cells.append("1" if a == b else fmt_ratio(self.ratio(row, a, b)))
            out.append(f"| {a} | " + " | ".join(cells) + " |")
        return out

    def row4_table(self) -> list[str]:
        groups = self.by("4")
        if not groups:
            return []
        out = ["| contender | runs ok | served − size (downloaded twice) | of which never reached disk "
               "(in flight at kill) | of which re-fetched although on disk | relaunch → first new byte ms | "
               "relaunch → done s | requests | note |", "|---|---|---|---|---|---|---|---|---|"]
        for name, trials in groups.items():
            good = self.ok(trials)

            def m(field: str, good: list[Trial] = good) -> float | None:
                return med([t.extra[field] for t in good])
            reqs = sorted({str(t.extra["statuses"]) for t in good})
            notes = "; ".join(sorted({t.note[:160] for t in trials if t.note}))
            first = m("relaunch_to_first_byte") if good else None
            out.append(f"| {name} | {len(good)}/{len(trials)} | {fmt_bytes(m('bytes_twice')) if good else '—'} "
                       f"(max {fmt_bytes(max((t.extra['bytes_twice'] for t in good), default=None))}) | "
                       f"{fmt_bytes(m('in_flight')) if good else '—'} | "
                       f"{fmt_bytes(m('refetched_on_disk')) if good else '—'} "
                       f"(max {fmt_bytes(max((t.extra['refetched_on_disk'] for t in good), default=None))}) | "
                       f"{'—' if first is None else f'{first * 1000:.0f}'} | "
                       f"{fmt_s(m('relaunch_to_done')) if good else '—'} | {', '.join(reqs)} | {notes} |")
        return out

    def row5_table(self) -> list[str]:
        groups = self.by("5")
        if not groups:
            return []
        out = ["| step | runs ok | median s | min–max s | peak RSS MiB | journal.jsonl | snapshot.json | detail |",
               "|---|---|---|---|---|---|---|---|"]
        for name, trials in groups.items():
            good = self.ok(trials)
            pre = "before_" if name.startswith("create") else "after_"
            j = med([t.extra.get(pre + "journal.jsonl", 0) for t in good])
            s = med([t.extra.get(pre + "snapshot.json", 0) for t in good])
            if name.startswith("create"):
                detail = (f"create {fmt_s(med([t.extra['create'] for t in good]))} s, resume "
                          f"{fmt_s(med([t.extra['resume_loop'] for t in good]))} s "
                          f"({good[0].extra.get('resume_api', '?') if good else '?'}), close "
                          f"{fmt_s(med([t.extra['close'] for t in good]))} s; sizes after close")
            else:
                detail = (f"Session() {fmt_s(med([t.extra['construct'] for t in good]))} s + get_tasks() "
                          f"{fmt_s(med([t.extra['get_tasks'] for t in good]))} s; states "
                          f"{good[0].extra.get('states') if good else '—'}; sizes after this open")
            notes = "; ".join(sorted({t.note[:160] for t in trials if t.note}))
            out.append(f"| {name} | {len(good)}/{len(trials)} | {fmt_s(med([t.primary for t in good]))} | "
                       f"{fmt_s(min((t.primary for t in good), default=None))}–"
                       f"{fmt_s(max((t.primary for t in good), default=None))} | "
                       f"{fmt_mib(med([t.rss_kib for t in good if t.rss_kib]))} | {fmt_bytes(j)} | {fmt_bytes(s)} | "
                       f"{detail}{'; ' + notes if notes else ''} |")
        return out

    def row6_table(self) -> list[str]:
        a, b = self.by("6a"), self.by("6b")
        if not a and not b:
            return []
        s = self.b.sizes

        def cell(trials: list[Trial]) -> tuple[float | None, str]:
            good = self.ok(trials)
            total = med([t.rss_kib for t in good if t.rss_kib])
            daemon = med([t.extra.get("daemon_rss_kib", 0) for t in good])
            if not daemon:
                return total, fmt_mib(total)
            app = med([t.extra.get("app_rss_kib", 0) for t in good])
            return total, f"{fmt_mib(total)} (app {fmt_mib(app)} + daemon {fmt_mib(daemon)})"
        out = [f"| contender | peak RSS MiB at {fmt_bytes(s.rss_small)} | peak RSS MiB at {fmt_bytes(s.big)} | "
               "growth MiB | runs ok |", "|---|---|---|---|---|"]
        for name in list(dict.fromkeys(list(a) + list(b))):
            ra, ta = cell(a.get(name, []))
            rb, tb = cell(b.get(name, []))
            growth = f"{(rb - ra) / 1024:+.1f}" if ra and rb else "—"
            out.append(f"| {name} | {ta} | {tb} | {growth} | "
                       f"{len(self.ok(a.get(name, [])))}+{len(self.ok(b.get(name, [])))} |")
        for key, why in self.b.skipped.items():
            if key.startswith("6b:"):
                out.append(f"| {key[3:]} | — | — | — | skipped: {why[:160]} |")
        return out

    def targets(self) -> list[tuple[str, str, str]]:
        """(target, measured, verdict)."""
        out = []
        s = self.b.sizes
        for sfx in ("", " [B]"):
            bg = f"bgsession inprocess{sfx}"
            if sfx and not self.by("1").get(bg) and not self.by("2").get(bg):
                continue
            if self.by("1").get(bg):
                r = self.ratio("1", bg, "urllib bare loop")
                rf = self.ratio("1", bg, "urllib bare loop + fsync")
                out.append((f"{fmt_bytes(s.big)}: bgsession{sfx} ≥ 0.95× the bare urllib loop + fsync",
                            f"{fmt_ratio(1 / rf) if rf else '—'} (vs the bare loop without fsync: "
                            f"{fmt_ratio(1 / r) if r else '—'})", verdict(rf is not None and 1 / rf >= 0.95, rf)))
            if self.by("2").get(bg):
                ra = self.ratio("2", bg, "aria2c -j16")
                rc = self.ratio("2", bg, "curl --parallel 16 + fsync")
                out.append((f"{s.small_n} × {fmt_bytes(s.small_size)}: bgsession{sfx} wall ≤ 0.8× aria2c -j16",
                            f"{fmt_ratio(ra)} of aria2c", verdict(ra is not None and ra <= 0.8, ra)))
                out.append((f"{s.small_n} × {fmt_bytes(s.small_size)}: bgsession{sfx} wall ≤ 1.5× curl --parallel 16 "
                            "+ fsync", f"{fmt_ratio(rc)} of curl + fsync", verdict(rc is not None and rc <= 1.5, rc)))
            for row in ("1", "2", "3"):
                if self.by(row).get(bg):
                    rd = self.ratio(row, f"bgsession daemon{sfx}", bg)
                    out.append((f"daemon{sfx} ≤ 1.10× in-process (row {row})",
                                fmt_ratio(rd) if rd else (self.b.daemon_skip or "—")[:120],
                                verdict(rd is not None and rd <= 1.10, rd, skip=bool(self.b.daemon_skip))))
        if self.by("7"):
            speedup = self.ratio("7", SPLIT_ONE, SPLIT_FOUR)
            out.append(("segmented, per-connection-limited server: 4 connections ≥ 3.5× one",
                        f"{fmt_ratio(speedup)} as fast", verdict(speedup is not None and speedup >= 3.5, speedup)))
            rd = self.ratio("7", "bgsession daemon, 4 connections", SPLIT_FOUR)
            if rd is not None:
                out.append(("daemon ≤ 1.10× in-process (row 7, 4 connections)", fmt_ratio(rd),
                            verdict(rd <= 1.10, rd)))
            for peer in ("aria2c -x4 -s4", "aria2c -x4 -s4 -k1M"):
                vs = self.ratio("7", SPLIT_FOUR, peer)
                out.append((f"segmented: 4 connections no slower than {peer}", f"{fmt_ratio(vs)} of its time",
                            verdict(vs is not None and vs <= 1.0, vs)))
        if self.by("4"):
            good = self.ok(self.by("4").get("bgsession inprocess", []))
            worst = max((t.extra["refetched_on_disk"] for t in good), default=None)
            first = med([t.extra["relaunch_to_first_byte"] for t in good])
            out.append(("relaunch → first new byte ≤ 60 ms (in-process)",
                        f"{first * 1000:.0f} ms (median of {len(good)})" if first is not None else "—",
                        verdict(first is not None and first <= 0.060, first)))
            out.append(("SIGKILL: bytes downloaded twice = 0 beyond what had not reached the disk",
                        f"re-fetched although on disk: max {fmt_bytes(worst)} over {len(good)} runs "
                        f"(total twice, median {fmt_bytes(med([t.extra['bytes_twice'] for t in good]))})",
                        verdict(worst is not None and worst <= 0, worst)))
        if self.by("5"):
            g = self.ok(self.by("5").get("open #1 (replays the journal)", []))
            g2 = self.ok(self.by("5").get("open #2 (snapshot only)", []))
            t1 = med([t.primary for t in g])
            t2 = med([t.primary for t in g2])
            worst = max([t.primary for t in g + g2], default=None)
            out.append((f"{s.queue_n} queued: open + recover ≤ 1 s",
                        f"first open {fmt_s(t1)} s, later open {fmt_s(t2)} s (median)",
                        verdict(worst is not None and max(t1 or 0, t2 or 0) <= 1.0, t1)))
            rss = max([t.rss_kib for t in g + g2 if t.rss_kib], default=None)
            out.append((f"{s.queue_n} queued: peak RSS ≤ 100 MiB", f"{fmt_mib(rss)} MiB (worst)",
                        verdict(rss is not None and rss <= 100 * 1024, rss)))
            c = self.ok(self.by("5").get("create + resume + close", []))
            jb = med([t.extra.get("before_journal.jsonl", 0) for t in c])
            sb = med([t.extra.get("before_snapshot.json", 0) for t in c])
            ja = med([t.extra.get("after_journal.jsonl", 0) for t in g])
            sa = med([t.extra.get("after_snapshot.json", 0) for t in g])
            n = s.queue_n
            out.append((f"{s.queue_n} queued: journal size bounded by compaction",
                        f"after create+close: journal {fmt_bytes(jb)} + snapshot {fmt_bytes(sb)}; after the first "
                        f"open: journal {fmt_bytes(ja)} + snapshot {fmt_bytes(sa)} ({sa / n:.0f} B/task)"
                        if None not in (jb, sb, ja, sa) else "—",
                        verdict(ja is not None and ja <= 4 * KiB, ja)))
        if self.by("6b"):
            for host in ("bgsession inprocess", "bgsession daemon"):
                if host == "bgsession daemon" and self.b.daemon_skip:
                    out.append((f"peak RSS downloading {fmt_bytes(s.big)} ≤ 40 MiB, flat ({host})",
                                self.b.daemon_skip[:120], "skipped"))
                    continue
                # The process that downloads is judged: the app (inprocess) or the daemon (daemon host).
                field = "daemon_rss_kib" if host == "bgsession daemon" else "app_rss_kib"
                ra = self.median_of("6a", host, field)
                rb = self.median_of("6b", host, field)
                if rb is None:
                    continue
                flat = ra is not None and rb - ra <= 2 * 1024
                what = "daemon process" if field == "daemon_rss_kib" else "app process"
                out.append((f"peak RSS downloading {fmt_bytes(s.big)} ≤ 40 MiB, flat in size ({host})",
                            f"{what}: {fmt_mib(rb)} MiB at {fmt_bytes(s.big)}, {fmt_mib(ra)} MiB at "
                            f"{fmt_bytes(s.rss_small)}", verdict(rb <= 40 * 1024 and flat, rb)))
        return out

    def markdown(self) -> str:
        b = self.b
        m = b.machine
        s = b.sizes
        lines = [f"# bgsession bench — {m['date']}", "",
                 f"**machine:** nproc {m['nproc']}, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}, "
                 f"workdir fs {m['fs']}; {m['tools']}; {m['bgsession']}", "",
                 f"**mode:** {'quick' if b.args.quick else 'full'}, rows {','.join(map(str, sorted(b.args.rows)))}, "
                 f"{b.args.repeat} rounds (rows 5 and 6: up to 3), contenders alternate within each round; "
                 f"row 4 throttled to {b.kill_rate}/s per connection; every contender is a fresh process.", ""]
        timing_rows = [("1", f"{fmt_bytes(s.big)} file", s.big),
                       ("2", f"{s.small_n} × {fmt_bytes(s.small_size)}", s.small_n * s.small_size),
                       ("3", f"{s.medium_n} × {fmt_bytes(s.medium_size)}", s.medium_n * s.medium_size)]
        lines += ["## Rows 1–3: transfers (median of rounds; ratios are medians of per-round ratios)", ""]
        lines += self.timing_table(timing_rows) + [""]
        for row in ("1", "2", "3"):
            pw = self.pairwise(row)
            if pw:
                lines += [f"### Row {row}: each contender against each peer (same round)", ""] + pw + [""]
        r4 = self.row4_table()
        if r4:
            lines += [f"## Row 4: SIGKILL at ~50 % of {fmt_bytes(s.big)}, then relaunch", "",
                      "Bytes counted by nginx (`$body_bytes_sent` per request, throttled location); "
                      "\"never reached disk\" = sent on the killed request − partial file size right after the "
                      "kill; \"re-fetched although on disk\" = partial size at kill − the relaunch's Range "
                      "offset. First new byte: the partial file grows past its size at kill (polled every "
                      f"{POLL * 1000:.0f} ms), timed from spawning the relaunched process.", ""] + r4 + [""]
        if self.by("7"):
            rate = getattr(b.args, "split_rate", "3m")
            lines += [f"## Row 7: {fmt_bytes(s.split)} from a server that limits each connection to {rate}/s "
                      "(nginx limit_rate)", "", "\"time ÷ bare\" divides by bgsession on one connection, so "
                      "\"speed vs bare\" is the speed-up over one connection.", ""]
            lines += self.timing_table([("7", f"{fmt_bytes(s.split)} at {rate}/s per connection", s.split)])
            lines += [""] + self.pairwise("7") + [""]
        r5 = self.row5_table()
        if r5:
            lines += [f"## Row 5: {s.queue_n} queued tasks (resumed against a server that accepts and never "
                      "answers)", ""] + r5 + [""]
        r6 = self.row6_table()
        if r6:
            lines += ["## Row 6: peak RSS while downloading (VmHWM of a fresh process; daemon host: app + "
                      "daemon)", ""] + r6 + [""]
        lines += ["## Targets (bench/README.md)", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {mv} | {v} |" for t, mv, v in self.targets()] + [""]
        if b.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in b.notes] + [""]
        return "\n".join(lines)

    def csv_rows(self) -> list[list[Any]]:
        m = self.b.machine
        rows = [["date", "host", "row", "contender", "round", "metric", "value", "unit", "note"]]
        for t in self.trials:
            base = [m["date"], m["host"], t.row, t.contender, t.round]
            rows.append(base + ["primary_s", "" if t.primary is None else f"{t.primary:.6f}", "s", t.note])
            if t.rss_kib:
                rows.append(base + ["peak_rss", t.rss_kib, "KiB", ""])
            for k, v in sorted(t.extra.items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    rows.append(base + [k, v, "s" if isinstance(v, float) else "", ""])
                else:
                    rows.append(base + [k, json.dumps(v), "", ""])
        return rows


def verdict(ok: bool, value: Any, skip: bool = False) -> str:
    if skip:
        return "skipped"
    if value is None:
        return "not measured"
    return "**met**" if ok else "**MISSED**"


def write_results(bench: Bench) -> str:
    report = Report(bench)
    md = report.markdown()
    os.makedirs(RESULTS, exist_ok=True)
    stamp = bench.stamp
    kind = "quick" if bench.args.quick else "full"
    base = os.path.join(RESULTS, f"{stamp}-{kind}")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(md + "\n")
    if not getattr(bench, "rendered", False):
        with open(base + ".json", "w", encoding="utf-8") as f:  # everything needed to render again
            json.dump({"machine": bench.machine, "stamp": bench.stamp, "kill_rate": bench.kill_rate,
                       "args": {"quick": bench.args.quick, "rows": sorted(bench.args.rows),
                                "repeat": bench.args.repeat, "split_rate": bench.args.split_rate},
                       "skipped": bench.skipped, "notes": bench.notes, "daemon_skip": bench.daemon_skip,
                       "trials": [dataclasses.asdict(t) for t in bench.trials]}, f, indent=1)
    with open(base + ".csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        m = bench.machine
        w.writerow([f"# machine: nproc {m['nproc']}; {m['cpu']}; kernel {m['kernel']}; Python {m['python']}; "
                    f"fs {m['fs']}; {m['tools']}; {m['bgsession']}"])
        w.writerows(report.csv_rows())
    log(f"wrote {base}.md, .csv and .json")
    return md


# ============================================================================
# CLI
# ============================================================================


class Rendered:
    """A finished run loaded from its .json, for ``--render`` (report code changed, numbers did not)."""

    rendered = True

    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        self.machine, self.stamp, self.kill_rate = data["machine"], data["stamp"], data["kill_rate"]
        self.args = argparse.Namespace(quick=data["args"]["quick"], rows=set(data["args"]["rows"]),
                                       repeat=data["args"]["repeat"], split_rate=data["args"].get("split_rate", "3m"))
        self.sizes = QUICK if self.args.quick else FULL
        self.skipped, self.notes, self.daemon_skip = data["skipped"], data["notes"], data["daemon_skip"]
        self.trials = [Trial(**t) for t in data["trials"]]


def parse_rows(text: str) -> set:
    rows = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            rows.update(range(int(lo), int(hi) + 1))
        else:
            rows.add(int(part))
    bad = rows - set(range(1, 8))
    if bad:
        raise argparse.ArgumentTypeError(f"rows are 1..7, not {sorted(bad)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke check (64 MiB, 200 files, ...)")
    p.add_argument("--rows", type=parse_rows, default=set(range(1, 8)), help="rows to run, e.g. 1,2,5 or 1-3")
    p.add_argument("--repeat", type=int, default=None, help="rounds per row (default 5; --quick: 2)")
    p.add_argument("--allow-missing", action="store_true", help="skip contenders whose program is missing")
    p.add_argument("--workdir", default=None, help="where the temp dir goes (default: the system temp dir); "
                   "its filesystem is part of the result")
    p.add_argument("--kill-rate", default="128m", help="nginx limit_rate of row 4's location (0: unthrottled)")
    p.add_argument("--split-rate", default="3m", help="nginx limit_rate per connection of row 7's location")
    p.add_argument("--verify", action="store_true", help="SHA-256 every single-file output (slower)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (files, nginx logs)")
    p.add_argument("--fixed-order", action="store_true",
                   help="A B C A B C with the same start every round (default: the start rotates)")
    p.add_argument("--lib", metavar="BGSESSION_PY", default=None,
                   help="measure this bgsession.py instead of the project's (e.g. a pinned version)")
    p.add_argument("--compare-lib", metavar="BGSESSION_PY", default=None,
                   help="also measure this bgsession.py (e.g. a proposed change) as 'bgsession ... [B]' "
                        "in rows 1-3 and 6, alternating with the project's")
    p.add_argument("--profile", action="store_true",
                   help="run bgsession contenders under py-spy (rows 1-3, 6) and cProfile (row 5 open); "
                        "output in bench/results/profiles/ (timings are then not comparable)")
    p.add_argument("--render", metavar="RUN_JSON", default=None,
                   help="only rewrite the .md and .csv of a finished run from its .json (no measuring)")
    args = p.parse_args(argv)
    if args.render:
        print(write_results(Rendered(args.render)))  # type: ignore[arg-type]
        return 0
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    tools = check_tools(args.allow_missing)
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy (pip install py-spy); the bench installs nothing")
    bench = Bench(args, tools)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    finally:
        bench.stop()
    print(write_results(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
