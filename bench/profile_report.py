#!/usr/bin/env python3
"""Summarise py-spy "raw" (collapsed-stack) profiles written by ``run.py --profile``.

    python bench/profile_report.py bench/results/profiles/row2-bgsession-inprocess-r1.txt [--top 15]

py-spy ran with ``--idle --threads``: every sample of every thread counts, so
the numbers are wall-clock shares per thread, not CPU. For each thread group
(workers, delegate, journal, main, ...) it prints where that group's time went:
the leaf frame ("self") and the bgsession functions on the stack ("inclusive").
A cProfile file (``*.cprofile``, row 5) is printed with pstats instead.

Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import re
import sys

_FRAME_RE = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _group(thread_frame: str) -> str:
    """'thread (0x7f..): bgsession-worker-127.0.0.1' -> 'bgsession-worker'; process frames pass through."""
    name = thread_frame.split(":", 1)[1].strip() if ":" in thread_frame else thread_frame
    name = re.sub(r"-127\.0\.0\.1$|-\d+$|\s*\(\d+\)$", "", name)
    return name or thread_frame


def _short(frame: str) -> str:
    m = _FRAME_RE.match(frame)
    if not m:
        return frame
    file = m.group("file").rsplit("/", 1)[-1]
    return f"{m.group('func')} ({file}:{m.group('line')})" if m.group("line") else f"{m.group('func')} ({file})"


def _func(frame: str) -> str:
    """A frame without its line number: inclusive time is per function."""
    m = _FRAME_RE.match(frame)
    if not m:
        return frame
    return f"{m.group('func')} ({m.group('file').rsplit('/', 1)[-1]})"


def load(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append((stack.split(";"), n))
    return stacks


def report(path: str, top: int) -> str:
    stacks = load(path)
    groups: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for frames, n in stacks:
        # py-spy --threads puts "thread (tid): name" (or "thread (tid)") first; --subprocesses adds "process ..."
        head = [f for f in frames if f.startswith(("process ", "thread "))]
        body = [f for f in frames if not f.startswith(("process ", "thread "))]
        proc = next((f for f in head if f.startswith("process ")), "")
        thread = next((f for f in head if f.startswith("thread ")), "thread ?")
        # the thread name is the first Python frame's thread when py-spy could not name it
        key = _group(thread)
        if proc:
            m = re.search(r'"([^"]*)"', proc)
            key = f"{'daemon' if m and ' daemon' in m.group(1) else 'app'} / {key}"
        groups[key].append((body, n))
    total = sum(n for _, n in stacks)
    out = [f"{path}: {total} samples (all threads, idle included)"]
    for key, items in sorted(groups.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        g_total = sum(n for _, n in items)
        leaf: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        for body, n in items:
            if body:
                leaf[_short(body[-1])] += n
            for fn in {_func(f) for f in body if "bgsession" in f}:
                incl[fn] += n
        out.append(f"\n== {key}: {g_total} samples ({100 * g_total / max(total, 1):.0f}% of all)")
        out.append("   self (leaf frame):")
        for frame, n in leaf.most_common(top):
            out.append(f"     {100 * n / g_total:5.1f}%  {frame}")
        out.append("   inclusive (bgsession functions on the stack):")
        for fn, n in incl.most_common(top):
            out.append(f"     {100 * n / g_total:5.1f}%  {fn}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    for path in args.paths:
        if path.endswith(".cprofile"):
            stats = pstats.Stats(path, stream=sys.stdout)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top)
        else:
            print(report(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
