#!/usr/bin/env python3
"""Compaction in a running session: how long the engine's lock is held, and how long an app call waits meanwhile
(bench/README.md, "Compaction").

    python3 bench/compaction.py                                    # 10,000 and 100,000 tasks, 3 rounds
    python3 bench/compaction.py --counts 10000 --compare-lib /tmp/old/bgsession.py

For each count and round, in a fresh process and session directory: ``download_task()`` N times (the tasks stay
suspended, so N tasks are in the state), then the journal is declared due for compaction and the session's
compaction is started the way a running session starts it (``_Compaction.when_due``, or ``_Store.maybe_compact`` in a
library from before background compaction). Meanwhile a probe thread changes a task's description in a loop -- an
app call that takes the engine's lock and journals a record -- and times every call. Reported (medians of the
rounds): the time the compaction call held the caller (the lock), the time until the compaction was complete (the
snapshot written), the probe's median call before the compaction, and its longest call while the compaction ran.

Each library is frozen first (copied to a temp dir and byte-compiled); with ``--compare-lib`` both libraries run
alternately, round by round, so they see the same machine. Standard library only. Prints a Markdown table;
``--json FILE`` also writes every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

sys.path.insert(0, HERE)
from scale import freeze  # noqa: E402 - the bench's own: a library copied and byte-compiled

#: The child: runs one measurement with the bgsession found first on sys.path, prints one JSON line.
CHILD = r"""
import json, os, sys, threading, time
import bgsession as bg
assert os.path.dirname(bg.__file__) == os.environ["PYTHONPATH"], bg.__file__  # the frozen copy, not another
n, directory = int(sys.argv[1]), sys.argv[2]
session = bg.Session(bg.Configuration.background("bench.compaction", directory=directory, host="inprocess"))
tasks = [session.download_task(f"http://127.0.0.1:9/{i}") for i in range(n)]
store = session._backend.store
store.writer.flush()
compaction = getattr(store, "compaction", None)
start = compaction.when_due if compaction is not None else store.maybe_compact
join = compaction.join if compaction is not None else (lambda: None)
calls, stop, began = [], threading.Event(), threading.Event()

def probe():
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        tasks[i % len(tasks)].description = f"probe {i}"
        calls.append((t0, time.perf_counter() - t0))
        i += 1
        if i == 200:
            began.set()

thread = threading.Thread(target=probe)
thread.start()
began.wait(60)
store.writer.records_written = bg.DEFAULT_COMPACT_RECORDS + 1  # due now
t0 = time.perf_counter()
start()
held = time.perf_counter() - t0
join()
done = time.perf_counter() - t0
stop.set()
thread.join()
before = [d for t, d in calls if t < t0]
during = [d for t, d in calls if t0 <= t < t0 + done] or [0.0]
# a call that began before the compaction and ended after it started waited for it too
during += [d for t, d in calls if t < t0 < t + d]
session.close()
print(json.dumps({"n": n, "held_ms": held * 1e3, "done_ms": done * 1e3,
                  "probe_before_ms": sorted(before)[len(before) // 2] * 1e3, "probe_max_ms": max(during) * 1e3,
                  "probes_during": len(during)}))
"""


def measure(lib: str, n: int, workdir: str) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="session-", dir=workdir)
    try:
        env = dict(os.environ, PYTHONPATH=lib)
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), os.path.join(directory, "s")], env=env,
                             cwd=directory, capture_output=True, text=True, check=True, timeout=900)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(results: dict[str, dict[int, list[dict[str, Any]]]]) -> str:
    lines = ["| library | tasks | lock held by the compaction | compaction complete | probe call before (median) "
             "| longest probe call during |", "|---|---|---|---|---|---|"]
    for name, by_n in results.items():
        for n, rows in by_n.items():
            lines.append(f"| {name} | {n:,} | {med(rows, 'held_ms'):.1f} ms | {med(rows, 'done_ms'):.0f} ms "
                         f"| {med(rows, 'probe_before_ms'):.2f} ms | {med(rows, 'probe_max_ms'):.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10000,100000", help="task counts, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per count (median reported)")
    ap.add_argument("--lib", default=os.path.join(ROOT, "bgsession.py"), help="the bgsession.py to measure")
    ap.add_argument("--compare-lib", default=None, help="another bgsession.py, measured alternately")
    ap.add_argument("--workdir", default=None, help="where the temp dir goes (its filesystem matters)")
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench-compaction-", dir=args.workdir)
    try:
        libs = {"this": freeze(args.lib, workdir, "this")}
        if args.compare_lib:
            libs["compared"] = freeze(args.compare_lib, workdir, "compared")
        results: dict[str, dict[int, list[dict[str, Any]]]] = {name: {n: [] for n in counts} for name in libs}
        for n in counts:
            for _ in range(args.repeat):
                for name, lib in libs.items():
                    results[name][n].append(measure(lib, n, workdir))
        print(table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
