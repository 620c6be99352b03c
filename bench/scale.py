#!/usr/bin/env python3
"""Scale: 1,000 / 10,000 / 100,000 queued tasks in one session (bench/README.md, "Scale").

    python3 bench/scale.py                      # 1,000, 10,000 and 100,000 tasks, 3 rounds each (~3 min)
    python3 bench/scale.py --counts 1000,10000 --repeat 5

For each count and round, in a fresh session directory and each step in a fresh process:

1. *enqueue*: ``download_task()`` N times, then one ``Session.resume_all(tasks)``, then ``close()``
   (bench/worker.py ``bg-queue-create``). The tasks point at a black hole, a local server that accepts connections
   and never answers, so they stay queued: 6 wait for a response, the rest for a connection slot.
2. *open #1*: ``Session(...)`` + ``get_tasks()`` (worker.py ``bg-queue-open``), the first open after enqueueing; and
   *open #2*, the next one. Peak RSS is the worker's own ``VmHWM``.
3. *status*: ``python3 bgsession.py status --session ID --state-dir DIR`` (no daemon serves the session, so the CLI
   reads the journal as it is), timed from spawn to exit (interpreter start-up and import included); its peak RSS
   is ``ru_maxrss`` from ``os.wait4`` (this parent is small, so the fork+exec floor bench/README.md describes is a
   few MiB at most).

The journal and snapshot sizes are taken after each step. Every number in the table is the median of the rounds
(the machine may be shared: compare rows of one run only). The library is frozen first: ``bgsession.py`` is copied
to a temp dir and byte-compiled, and every child imports that copy (``PYTHONDONTWRITEBYTECODE`` may be set here).

Standard library only. Prints a Markdown table; ``--json FILE`` also writes every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "worker.py")
IDENTIFIER = "bench.bgsession"  # worker.py's
MiB = 1 << 20

sys.path.insert(0, HERE)
from run import BlackHole, session_file_sizes  # noqa: E402 - the benchmark's own "queued" server, its sizes

#: The targets of 100,000 queued tasks (bench/README.md, "Targets").
TARGET_OPEN_S = 1.5
TARGET_RSS_MIB = 250


def freeze(lib_src: str, workdir: str, name: str = "lib") -> str:
    """Copy a bgsession.py into workdir/name and byte-compile it; return the directory."""
    lib = os.path.join(workdir, name)
    os.makedirs(lib)
    shutil.copy2(lib_src, os.path.join(lib, "bgsession.py"))
    py_compile.compile(os.path.join(lib, "bgsession.py"), doraise=True)
    return lib


def run_worker(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, WORKER, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {spec['mode']} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def run_status(lib: str, session: str, env: dict[str, str]) -> dict[str, Any]:
    """The CLI's status, spawn to exit; peak RSS from wait4 (ru_maxrss, KiB on Linux)."""
    argv = [sys.executable, os.path.join(lib, "bgsession.py"), "status", "--session", IDENTIFIER,
            "--state-dir", session]
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out_f, stderr=err_f)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, not by Popen, to get this child's own rusage
        t = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if code != 0:
        raise SystemExit(f"status failed ({code}): {err.decode(errors='replace')[-2000:]}")
    lines = out.decode(errors="replace").splitlines()
    return {"t": t, "rss_kib": usage.ru_maxrss, "lines": len(lines)}


def measure(n: int, rounds: int, lib: str, workdir: str, hole: BlackHole, env: dict[str, str]) -> list[dict]:
    results = []
    for rnd in range(1, rounds + 1):
        session = os.path.join(workdir, f"s{n}-{rnd}")
        hole.reset()
        spec = {"session": session, "host": "inprocess", "n": n, "prefix": f"http://127.0.0.1:{hole.port}/q/"}
        row: dict[str, Any] = {"n": n, "round": rnd}
        row["create"] = run_worker(dict(spec, mode="bg-queue-create"), env)
        row["after_create"] = session_file_sizes(session)
        for step in ("open1", "open2"):
            hole.reset()
            r = run_worker(dict(spec, mode="bg-queue-open"), env)
            if r.get("tasks") != n:
                raise SystemExit(f"{step}: {r.get('tasks')} tasks, expected {n}")
            row[step] = r
            row[f"after_{step}"] = session_file_sizes(session)
        hole.reset()
        row["status"] = run_status(lib, session, env)
        if row["status"]["lines"] != n + 1:
            raise SystemExit(f"status printed {row['status']['lines']} lines, expected {n + 1}")
        results.append(row)
        print(f"# {n} round {rnd}: enqueue {row['create']['create']:.3f}+{row['create']['resume_loop']:.3f} s, "
              f"open #1 {row['open1']['t']:.3f} s {row['open1']['rss_kib'] / 1024:.0f} MiB, "
              f"open #2 {row['open2']['t']:.3f} s {row['open2']['rss_kib'] / 1024:.0f} MiB, "
              f"status {row['status']['t']:.3f} s", file=sys.stderr, flush=True)
        shutil.rmtree(session, ignore_errors=True)
    return results


def med(rows: list[dict], *path: str) -> float:
    values = []
    for row in rows:
        v: Any = row
        for key in path:
            v = v[key]
        values.append(v)
    return statistics.median(values)


def fmt_size(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def table(all_rows: dict[int, list[dict]]) -> str:
    lines = ["| tasks | enqueue: create / `resume_all` / close (s) | open + recover + `get_tasks()` #1 / #2 (s) "
             "| µs a task (open #2) | peak RSS open #1 / #2 (MiB) | journal + snapshot after open #2 "
             "| `status` CLI (s) | `status` peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, rows in sorted(all_rows.items()):
        journal, snap = med(rows, "after_open2", "journal.jsonl"), med(rows, "after_open2", "snapshot.json")
        lines.append(
            f"| {n:,} | {med(rows, 'create', 'create'):.3f} / {med(rows, 'create', 'resume_loop'):.3f} / "
            f"{med(rows, 'create', 'close'):.3f} "
            f"| {med(rows, 'open1', 't'):.3f} / {med(rows, 'open2', 't'):.3f} "
            f"| {med(rows, 'open2', 't') / n * 1e6:.1f} "
            f"| {med(rows, 'open1', 'rss_kib') / 1024:.1f} / {med(rows, 'open2', 'rss_kib') / 1024:.1f} "
            f"| {fmt_size(journal)} + {fmt_size(snap)} ({snap / n:.0f} B a task) "
            f"| {med(rows, 'status', 't'):.3f} | {med(rows, 'status', 'rss_kib') / 1024:.1f} |")
    return "\n".join(lines)


def verdict(all_rows: dict[int, list[dict]]) -> str:
    out = []
    if 100_000 in all_rows:
        rows = all_rows[100_000]
        t = max(med(rows, "open1", "t"), med(rows, "open2", "t"))
        rss = max(med(rows, "open1", "rss_kib"), med(rows, "open2", "rss_kib")) / 1024
        out.append(f"100,000 tasks open + recover + get_tasks ≤ {TARGET_OPEN_S} s: {t:.3f} s (the slower open's "
                   f"median) — {'met' if t <= TARGET_OPEN_S else 'MISSED'}")
        out.append(f"100,000 tasks peak RSS ≤ {TARGET_RSS_MIB} MiB: {rss:.1f} MiB — "
                   f"{'met' if rss <= TARGET_RSS_MIB else 'MISSED'}")
    counts = sorted(all_rows)
    if len(counts) >= 2:
        lo, hi = counts[0], counts[-1]
        per_lo = med(all_rows[lo], "open2", "t") / lo
        per_hi = med(all_rows[hi], "open2", "t") / hi
        out.append(f"growth of open #2 from {lo:,} to {hi:,}: {per_hi / per_lo:.2f}x the time a task "
                   f"({'linear or better' if per_hi / per_lo <= 1.2 else 'worse than linear'}; ≤ 1.2x counted as "
                   f"linear)")
    return "\n".join(f"* {line}" for line in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,10000,100000", help="task counts, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per count (median reported)")
    ap.add_argument("--lib", default=os.path.join(ROOT, "bgsession.py"), help="the bgsession.py to measure")
    ap.add_argument("--workdir", default=None, help="where the temp dir goes (its filesystem matters)")
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    workdir = tempfile.mkdtemp(prefix="bgscale-", dir=args.workdir)
    hole = BlackHole()
    try:
        lib = freeze(args.lib, workdir)
        env = dict(os.environ, BENCH_LIB=lib)
        all_rows = {n: measure(n, args.repeat, lib, workdir, hole, env) for n in counts}
    finally:
        hole.close()
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {platform.system()} {platform.release()}, medians of {args.repeat} rounds, "
          f"load average {load:.1f} at the end\n")
    print(table(all_rows))
    print()
    print(verdict(all_rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
