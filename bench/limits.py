#!/usr/bin/env python3
"""bgsession's bandwidth limits, measured against their targets: within 5 % of the limit over a 10-second window; no
burst above 2 s worth of bytes after an idle period; a limit changed mid-transfer applies within a second.

    python3 bench/limits.py              # every row, both hosts (about 5 minutes)
    python3 bench/limits.py --quick      # 4-second windows, no 20 MiB/s rows (about 1.5 minutes)
    python3 bench/limits.py --hosts inprocess --rows steady

Each row runs in a fresh interpreter (this file with ``--row SPEC``) against ``fake_server.py`` in a process of its
own, on loopback. What is measured is what bgsession moved: the progress hooks' running totals, timestamped as they
arrive on the delegate thread (a download: bytes read from its socket and written to its file; an upload: bytes
written to its socket). The server's own count of a download's bytes is not the rate on the wire: it includes what
waits in the server's socket send buffer (up to 4 MiB on loopback here), which a real network would hold back in
the same place; the client's receive buffer, where bytes wait between the wire and bgsession, stays at its initial
128 KiB because a limited reader never lets Linux grow it.

Rows:
  steady   one download under its task's limit ("task"), or two under the session's ("session"): the rate over the
           10 s after a 2 s start, the worst 10-second window from the first byte on (the time to the first byte,
           a round trip to the daemon and a new connection, is not the limit's), and the largest burst (the most
           bytes any stretch of time moved beyond the limit, in seconds' worth of the limit).
  upload   one upload under its task's limit, the same measures.
  change   one download whose limit (the task's, or the session's) goes 2 MiB/s -> 256 KiB/s -> 20 MiB/s, 4 s each:
           how long after each change the rate (over the next second) is within 5 % of the new limit.
  idle     the session's 2 MiB/s limit; one download for 4 s, nothing for 3 s, a second download: the largest burst
           of the second (the bucket filled while idle).

The rates over a window interpolate between the progress samples (every 0.1 s); a time next to a pause or a change
of limit uses the last sample before it instead.

Results go to bench/results/limits-<date>.md and .json and the Markdown is printed. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KiB, MiB = 1 << 10, 1 << 20
#: The limits the target names.
RATES = (256 * KiB, 2 * MiB, 20 * MiB)
#: Seconds measured after this start (the first bytes wait for the bucket; TCP finds its pace).
WARM_UP = 2.0
TARGET_ERROR = 0.05
TARGET_BURST = 2.0
TARGET_APPLY = 1.0


# ---------------------------------------------------------------------------
# the worker: one row in a fresh interpreter
# ---------------------------------------------------------------------------


class _Meter:
    """Running totals of the session's tasks, as (monotonic time, bytes of all tasks) samples."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[int, int] = {}
        self.samples: list[tuple[float, int]] = []

    def add(self, task_id: int, total: int) -> None:
        with self.lock:
            self.totals[task_id] = total
            self.samples.append((time.monotonic(), sum(self.totals.values())))


def _delegate(bg: Any, meter: _Meter) -> Any:
    class Delegate(bg.SessionDelegate):
        def download_task_did_write_data(self, session, task, written, total, expected):
            meter.add(task.identifier, total)

        def task_did_send_body_data(self, session, task, sent, total, expected):
            meter.add(task.identifier, total)
    return Delegate()


def _run_row(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, spec["lib_dir"])
    import bgsession as bg
    directory = tempfile.mkdtemp(prefix="bench-limits-", dir=spec.get("workdir"))
    meter = _Meter()
    rate, kind, row = spec["rate"], spec["kind"], spec["row"]
    session_rate = rate if kind == "session" else None
    config = bg.Configuration.background("bench.limits", directory=os.path.join(directory, "s"), host=spec["host"],
                                         max_bytes_per_second=session_rate, timeout_for_request=600.0,
                                         daemon_idle_timeout=0.5)
    session = bg.Session(config, _delegate(bg, meter))
    out: dict[str, Any] = {"marks": []}
    try:
        def start(n: int, seed: int) -> list[Any]:
            size = _blob_size()
            if row == "upload":
                source = os.path.join(directory, f"up-{seed}.bin")
                with open(source, "wb") as f:
                    f.truncate(size)  # sparse: reading it is free, and the server discards what it receives
                tasks = [session.upload_task(bg.Request(spec["base"] + "/upload", method="PUT"), from_file=source)]
            else:
                url = f"{spec['base']}/blob/{size}?seed={seed}"
                tasks = [session.download_task(url) for _ in range(n)]
            if kind == "task":
                for task in tasks:
                    task.max_bytes_per_second = rate
            out["marks"].append(("start", time.monotonic()))
            session.resume_all(tasks)
            return tasks

        def stop(tasks: list[Any]) -> None:
            for task in tasks:
                task.cancel()

        if row in ("steady", "upload"):
            tasks = start(2 if kind == "session" else 1, 1)
            time.sleep(WARM_UP + spec["seconds"] + 0.3)  # (a benchmark: it measures what happens meanwhile)
            stop(tasks)
        elif row == "change":
            tasks = start(1, 2)
            for new_rate in spec["changes"]:
                time.sleep(spec["step"])
                out["marks"].append(("change", time.monotonic(), new_rate))
                if kind == "task":
                    tasks[0].max_bytes_per_second = new_rate
                else:
                    session.max_bytes_per_second = new_rate
            time.sleep(spec["step"])
            stop(tasks)
        else:  # idle
            first = start(1, 3)
            time.sleep(spec["step"])
            stop(first)
            session.wait(60)
            out["marks"].append(("idle", time.monotonic()))
            time.sleep(spec["idle"])
            second = start(1, 4)
            time.sleep(spec["step"])
            stop(second)
        session.wait(60)
    finally:
        session.close()
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(directory, "s", "daemon.pid"), encoding="ascii") as f:
                os.kill(int(f.read().split()[0]), signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)
    out["samples"] = meter.samples
    return out


# ---------------------------------------------------------------------------
# the measures (pure: samples in, numbers out)
# ---------------------------------------------------------------------------


def bytes_at(samples: list[tuple[float, int]], t: float, step: bool = False) -> float:
    """Bytes moved by time *t*, interpolated between the samples around it (*step*: the last sample's, for a time
    next to a pause or a change of rate, which interpolation would smear)."""
    if step:
        return float(max((b for u, b in samples if u <= t), default=0))
    if not samples or t <= samples[0][0]:
        return 0.0 if not samples or t < samples[0][0] else float(samples[0][1])
    lo, hi = 0, len(samples) - 1
    if t >= samples[hi][0]:
        return float(samples[hi][1])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if samples[mid][0] <= t else (lo, mid)
    (t0, b0), (t1, b1) = samples[lo], samples[hi]
    return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else float(b1)


def rate_between(samples: list[tuple[float, int]], t0: float, t1: float) -> float:
    return (bytes_at(samples, t1) - bytes_at(samples, t0)) / (t1 - t0)


def worst_window(samples: list[tuple[float, int]], start: float, end: float, rate: float,
                 length: float = 10.0) -> float:
    """The largest relative error of any *length*-second window within [start, end] (0.05 s steps)."""
    worst, t = 0.0, start
    while t + length <= end + 1e-9:
        worst = max(worst, abs(rate_between(samples, t, t + length) / rate - 1.0))
        t += 0.05
    return worst


def largest_burst(samples: list[tuple[float, int]], start: float, rate: float) -> float:
    """The most bytes any stretch of time after *start* moved beyond *rate* x its length, in seconds' worth."""
    points = [(t, b) for t, b in samples if t >= start]
    if points:
        points.insert(0, (start, bytes_at(samples, start, step=True)))
    best, low = 0.0, None  # low: the least of (bytes - rate * t) seen so far
    for t, b in points:
        value = b - rate * t
        low = value if low is None else min(low, value)
        best = max(best, value - low)
    return best / rate


def applied_after(samples: list[tuple[float, int]], at: float, rate: float, until: float) -> float | None:
    """Seconds after *at* until the rate over the next second is within TARGET_ERROR of *rate* (None: never)."""
    d = 0.0
    while at + d + 1.0 <= until:
        if abs(rate_between(samples, at + d, at + d + 1.0) / rate - 1.0) <= TARGET_ERROR:
            return d
        d += 0.05
    return None


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------


def _human(rate: float) -> str:
    return f"{rate / MiB:g} MiB/s" if rate >= MiB else f"{rate / KiB:g} KiB/s"


def _machine(lib: str) -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open(lib, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), load average {load} at the end, Linux {platform.release()}, "
            f"Python {platform.python_version()}, bgsession.py sha256 {digest}")


def _server(workdir: str | None) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "fake_server.py"), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, text=True, cwd=workdir or None)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("serving on "):
        proc.kill()
        raise SystemExit(f"fake_server.py did not start: {line!r}")
    return proc, line.split()[-1]


def _blob_size() -> int:
    """One size for every row's downloads: never runs out within a row (the server keeps it cached, per seed)."""
    return int(max(RATES) * 1.2 * (10.0 + WARM_UP + 4))


def _warm(base: str) -> None:
    """Have the server generate the blobs before anything is measured (about a second each)."""
    for seed in range(1, 5):
        request = urllib.request.Request(f"{base}/blob/{_blob_size()}?seed={seed}", headers={"Range": "bytes=0-0"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            resp.read()


def _specs(args: argparse.Namespace, base: str) -> list[dict[str, Any]]:
    seconds = 4.0 if args.quick else 10.0
    rates = RATES[:2] if args.quick else RATES
    common = {"base": base, "lib_dir": os.path.dirname(os.path.abspath(args.lib)), "seconds": seconds,
              "workdir": args.workdir}
    rows = set(args.rows.split(","))
    specs = []
    for host in args.hosts.split(","):
        if "steady" in rows:
            specs += [{**common, "row": "steady", "host": host, "kind": kind, "rate": rate}
                      for kind in ("session", "task") for rate in rates]
        if "upload" in rows:
            specs.append({**common, "row": "upload", "host": host, "kind": "task", "rate": 2 * MiB})
        if "change" in rows:
            specs += [{**common, "row": "change", "host": host, "kind": kind, "rate": 2 * MiB, "step": 4.0,
                       "changes": [256 * KiB, 20 * MiB]} for kind in ("task", "session")]
        if "idle" in rows:
            specs.append({**common, "row": "idle", "host": host, "kind": "session", "rate": 2 * MiB, "step": 4.0,
                          "idle": 3.0})
    return specs


def _measure(spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    samples = [tuple(s) for s in result["samples"]]
    marks = result["marks"]
    rate = spec["rate"]
    if spec["row"] in ("steady", "upload"):
        start = marks[0][1]
        first, end = (samples[0][0], samples[-1][0]) if samples else (start, start)
        measured = rate_between(samples, start + WARM_UP, start + WARM_UP + spec["seconds"])
        return {"measured": measured, "error": measured / rate - 1.0, "first_byte": first - start,
                "worst_window": worst_window(samples, first, end, rate, min(10.0, spec["seconds"])),
                "burst": largest_burst(samples, start, rate)}
    if spec["row"] == "change":
        changes = [m for m in marks if m[0] == "change"]
        ends = [m[1] for m in changes[1:]] + [samples[-1][0] if samples else changes[-1][1]]
        out: dict[str, Any] = {"changes": []}
        for (_, at, new_rate), until in zip(changes, ends):
            out["changes"].append({"to": new_rate, "applied_after": applied_after(samples, at, new_rate, until - 0.25),
                                   "then": rate_between(samples, at + 1.0, until - 0.25) / new_rate - 1.0})
        return out
    idle, second = marks[1][1], marks[-1][1]
    moved = bytes_at(samples, second, step=True) - bytes_at(samples, idle, step=True)
    return {"burst_after_idle": largest_burst(samples, second, rate), "idle_rate": moved / (second - idle)}


def _markdown(runs: list[tuple[dict[str, Any], dict[str, Any]]], header: str, seconds: float) -> str:
    lines = [f"Bandwidth limits, measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {header}.", ""]
    steady = [(s, m) for s, m in runs if s["row"] in ("steady", "upload")]
    if steady:
        lines += [f"| host | limit of | transfer | limit | measured ({seconds:g} s after a {WARM_UP:g} s start) | error "
                  f"| worst {min(10.0, seconds):g} s window | largest burst | first byte |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s, m in steady:
            what = "1 upload" if s["row"] == "upload" else ("2 downloads" if s["kind"] == "session" else "1 download")
            lines.append(f"| {s['host']} | {s['kind']} | {what} | {_human(s['rate'])} | {_human(m['measured'])} | "
                         f"{m['error'] * 100:+.2f} % | {m['worst_window'] * 100:.2f} % | {m['burst']:.2f} s | "
                         f"{m['first_byte']:.2f} s |")
        lines.append("")
    changes = [(s, m) for s, m in runs if s["row"] == "change"]
    if changes:
        lines += ["| host | limit of | change | applied after | error after the first second |", "|---|---|---|---|---|"]
        for s, m in changes:
            before = s["rate"]
            for c in m["changes"]:
                after = "never" if c["applied_after"] is None else f"{c['applied_after']:.2f} s"
                lines.append(f"| {s['host']} | {s['kind']} | {_human(before)} → {_human(c['to'])} | {after} | "
                             f"{c['then'] * 100:+.2f} % |")
                before = c["to"]
        lines.append("")
    idle = [(s, m) for s, m in runs if s["row"] == "idle"]
    if idle:
        lines += ["| host | limit | idle | largest burst of the next download |", "|---|---|---|---|"]
        for s, m in idle:
            lines.append(f"| {s['host']} | session {_human(s['rate'])} | {s['idle']:g} s (rate meanwhile "
                         f"{_human(m['idle_rate'])}) | {m['burst_after_idle']:.2f} s |")
        lines.append("")
    lines.append(f"Targets: error and worst window within {TARGET_ERROR * 100:g} %, burst below {TARGET_BURST:g} s, "
                 f"a change applied within {TARGET_APPLY:g} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4-second windows, no 20 MiB/s rows")
    parser.add_argument("--hosts", default="inprocess,daemon", help="inprocess,daemon (default both)")
    parser.add_argument("--rows", default="steady,upload,change,idle", help="which rows (default all)")
    parser.add_argument("--lib", default=os.path.join(ROOT, "bgsession.py"), help="the bgsession.py to measure")
    parser.add_argument("--workdir", help="where the sessions' temp dirs go (default: the system temp dir)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(_run_row(json.loads(args.row))))
        return 0
    server, base = _server(args.workdir)
    runs, raws = [], []
    try:
        _warm(base)
        for spec in _specs(args, base):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--row", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            raw = json.loads(proc.stdout.strip().splitlines()[-1])
            measured = _measure(spec, raw)
            runs.append((spec, measured))
            raws.append(raw)
            print(spec["row"], spec["host"], spec["kind"], _human(spec["rate"]),
                  {k: v for k, v in measured.items() if k != "changes"} or measured, file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()
    report = _markdown(runs, _machine(args.lib), 4.0 if args.quick else 10.0)
    stamp = f"limits-{datetime.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", stamp + ".md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(HERE, "results", stamp + ".json"), "w", encoding="utf-8") as f:
        json.dump([{"spec": s, "measured": m, "samples": r["samples"], "marks": r["marks"]} for (s, m), r in
                   zip(runs, raws)], f)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
