#!/usr/bin/env python3
"""Start-up: what ``import bgsession`` costs beyond the interpreter (bench/README.md, "Start-up").

    python3 bench/startup.py                 # 15 rounds (~15 s)
    python3 bench/startup.py --rounds 31 --lib /path/to/bgsession.py
    python3 bench/startup.py --rounds 21 --compare-lib /path/to/other/bgsession.py   # A/B in the same rounds

The library is frozen first: ``bgsession.py`` is copied to a temp dir and byte-compiled, as an installed module is
(``PYTHONDONTWRITEBYTECODE`` may be set in the environment; without a cached ``.pyc`` every import recompiles the
module, about 40 ms more). Then, alternating within each round, fresh processes run

* ``python3 -c pass`` and ``python3 -c "import bgsession"`` (both with ``PYTHONPATH`` at the copy, and run in its
  directory: ``-c`` puts the current directory first on ``sys.path``), timed from spawn to exit: the difference of
  the medians is the import's cost in wall time;
* the same with ``-S`` (no ``site``): site may import modules bgsession needs (on some machines a ``.pth`` file
  imports ``re``, ``typing``, ``tempfile`` ...), which would hide their cost;
* ``python3 -X importtime -c "import bgsession"``: bgsession's cumulative and own (module body) time, and each
  module that the import brings in, by its cumulative time (medians over the rounds).

Each child's CPU time (user + system, from ``wait4``) is reported too: on a shared machine it is disturbed much
less than wall time by what else runs. With ``--compare-lib``, a second ``bgsession.py`` (frozen the same way, in
a directory of its own) is imported in the same rounds, right after the first: the honest way to compare two
versions on a noisy machine.

Relaunch to first new byte (interpreter start, import, session recovery, first byte of a resumed download) is
bench/run.py's row 4, which needs nginx. Standard library only; prints Markdown.
"""

from __future__ import annotations

import argparse
import os
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

#: The target: import ≤ 25 ms beyond the interpreter (bench/README.md, "Targets").
TARGET_MS = 25.0


#: CPU time (user + system) of each child, by the key its wall time is filed under: less disturbed than wall time
#: by other processes on a shared machine.
CPU: dict[str, list[float]] = {}


def spawn_ms(argv: list[str], env: dict[str, str], key: str = "") -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - t0) * 1000
    proc.returncode = status
    if status != 0:
        raise SystemExit(f"{argv} failed (wait status {status})")
    CPU.setdefault(key, []).append((usage.ru_utime + usage.ru_stime) * 1000)
    return wall


def importtime(env: dict[str, str], flags: list[str]) -> dict[str, tuple[int, int, int]]:
    """``-X importtime`` of ``import bgsession``: module -> (self µs, cumulative µs, depth), for the modules imported
    while bgsession was (those already imported by site do not appear)."""
    proc = subprocess.run([sys.executable, *flags, "-X", "importtime", "-c", "import bgsession"], env=env,
                          cwd=env["PYTHONPATH"], check=True, capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    rows: list[tuple[str, int, int, int]] = []
    for line in lines[1:]:  # the first is the header
        self_us, cum_us, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(self_us), int(cum_us), depth))
    # importtime prints a module after its imports: what bgsession imported is printed before it
    end = max(i for i, r in enumerate(rows) if r[0] == "bgsession" and r[3] == 0)
    start = end
    while start > 0 and rows[start - 1][3] > 0:
        start -= 1
    return {name: (s, c, d) for name, s, c, d in rows[start:end + 1]}


#: Run in a fresh ``python3 -S``: the module's top-level statements (compiled by statement_codes() in this process,
#: so that the child imports nothing the module would not) executed one by one, their time summed by kind.
PARTS = r"""
import marshal, sys, time
pyc, codes = sys.argv[1], sys.argv[2]
with open(pyc, "rb") as f:
    data = f.read()[16:]
t = time.perf_counter(); marshal.loads(data); out = {"loading the cached bytecode (unmarshal)": time.perf_counter() - t}
with open(codes, "rb") as f:
    codes = marshal.load(f)
module = type(sys)("bgsession"); module.__file__ = pyc; sys.modules["bgsession"] = module
for k, code in codes:
    t = time.perf_counter(); exec(code, module.__dict__); out[k] = out.get(k, 0) + time.perf_counter() - t
print(repr(out))
"""


def statement_codes(path: str) -> list[tuple[str, Any]]:
    """The module's top-level statements, each compiled on its own, with its kind (PARTS)."""
    import __future__

    import ast

    def kind(node: ast.stmt) -> str:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return "imports of the standard library"
        if isinstance(node, (ast.If, ast.Try)):
            return "if/try blocks (platform detection, TYPE_CHECKING, the lazy helpers)"
        if isinstance(node, ast.ClassDef):
            if any(ast.unparse(b).startswith("enum.") for b in node.bases):
                return "enum classes"
            if any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                return "dataclass classes"
            return "other classes"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return "functions"
        text = ast.unparse(node)
        return "regular expressions" if "re.compile(" in text or "_regex(" in text else "other module-level values"

    with open(path, encoding="utf-8") as f:
        body = ast.parse(f.read()).body
    flags = __future__.annotations.compiler_flag
    return [(kind(n), compile(ast.Module([n], []), path, "exec", flags=flags, dont_inherit=True)) for n in body]


def parts(envs: list[dict[str, str]], rounds: int, labels: list[str]) -> list[str]:
    """Where the import's time goes, by kind of top-level statement (PARTS), medians, libraries alternating."""
    import ast
    import importlib.util
    import marshal
    runs: list[list[dict[str, float]]] = [[] for _ in envs]
    for env in envs:
        with open(os.path.join(env["PYTHONPATH"], "statements.marshal"), "wb") as f:
            marshal.dump(statement_codes(os.path.join(env["PYTHONPATH"], "bgsession.py")), f)
    for _ in range(rounds):
        for env, got in zip(envs, runs):
            work = env["PYTHONPATH"]
            pyc = importlib.util.cache_from_source(os.path.join(work, "bgsession.py"))
            proc = subprocess.run([sys.executable, "-S", "-c", PARTS, pyc, os.path.join(work, "statements.marshal")],
                                  env=env, cwd=work, check=True, capture_output=True, text=True)
            got.append(ast.literal_eval(proc.stdout))
    keys = sorted({k for got in runs for r in got for k in r},
                  key=lambda k: -statistics.median(r.get(k, 0.0) for r in runs[0]))
    lines = ["", "The import by kind of top-level statement (`python3 -S`, each statement timed as it runs; the "
             f"imports' time is that of the modules they bring in; medians of {rounds}):", "",
             "| part | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{statistics.median(r.get(k, 0.0) for r in got) * 1000:.1f} ms"
                                             for got in runs) + " |")
    lines.append("| total | " + " | ".join(f"{statistics.median(sum(r.values()) for r in got) * 1000:.1f} ms"
                                          for got in runs) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="fresh processes per variant (medians reported)")
    ap.add_argument("--lib", default=os.path.join(ROOT, "bgsession.py"), help="the bgsession.py to measure")
    ap.add_argument("--top", type=int, default=15, help="modules listed by cumulative import time")
    ap.add_argument("--compare-lib", help="also measure this bgsession.py (B), alternating with --lib in each round")
    ap.add_argument("--parts", action="store_true", help="also time the import by kind of top-level statement")
    args = ap.parse_args()
    works = [tempfile.mkdtemp(prefix="bgstartup-") for _ in range(2 if args.compare_lib else 1)]
    try:
        envs = []
        for work, lib in zip(works, (args.lib, args.compare_lib)):
            shutil.copy2(lib, os.path.join(work, "bgsession.py"))
            py_compile.compile(os.path.join(work, "bgsession.py"), doraise=True)
            envs.append(dict(os.environ, PYTHONPATH=work))
            envs[-1].pop("PYTHONDONTWRITEBYTECODE", None)
        env = envs[0]
        walls: dict[str, list[float]] = {k: [] for k in ("pass", "import", "pass -S", "import -S", "B", "B -S")}
        samples: list[dict[str, tuple[int, int, int]]] = []
        samples_s: list[dict[str, tuple[int, int, int]]] = []
        samples_b: list[dict[str, tuple[int, int, int]]] = []
        for _ in range(args.rounds):
            walls["pass"].append(spawn_ms([sys.executable, "-c", "pass"], env, "pass"))
            walls["import"].append(spawn_ms([sys.executable, "-c", "import bgsession"], env, "import"))
            walls["pass -S"].append(spawn_ms([sys.executable, "-S", "-c", "pass"], env, "pass -S"))
            walls["import -S"].append(spawn_ms([sys.executable, "-S", "-c", "import bgsession"], env, "import -S"))
            samples.append(importtime(env, []))
            samples_s.append(importtime(env, ["-S"]))
            if len(envs) > 1:
                walls["B"].append(spawn_ms([sys.executable, "-c", "import bgsession"], envs[1], "B"))
                walls["B -S"].append(spawn_ms([sys.executable, "-S", "-c", "import bgsession"], envs[1], "B -S"))
                samples_b.append(importtime(envs[1], ["-S"]))
        by_part = parts(envs, args.rounds, ["A (--lib)", "B (--compare-lib)"][:len(envs)]) if args.parts else []
    finally:
        for work in works:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items() if v}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}, medians of {args.rounds} fresh processes each, bytecode cached, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| measure | `python3` | `python3 -S` |")
    print("|---|---|---|")
    print(f"| `-c pass`, spawn to exit | {med['pass']:.1f} ms | {med['pass -S']:.1f} ms |")
    print(f"| `-c \"import bgsession\"`, spawn to exit | {med['import']:.1f} ms | {med['import -S']:.1f} ms |")
    d, d_s = med["import"] - med["pass"], med["import -S"] - med["pass -S"]
    print(f"| **import beyond the interpreter** (difference of the medians) | **{d:.1f} ms** | **{d_s:.1f} ms** |")
    cpu = {k: statistics.median(v) for k, v in CPU.items()}
    print(f"| import beyond the interpreter in CPU time (user + system) | {cpu['import'] - cpu['pass']:.1f} ms | "
          f"{cpu['import -S'] - cpu['pass -S']:.1f} ms |")
    for label, key in (("`-X importtime`: bgsession cumulative", 1), ("`-X importtime`: bgsession's own body", 0)):
        a = statistics.median(s["bgsession"][key] for s in samples) / 1000
        b = statistics.median(s["bgsession"][key] for s in samples_s) / 1000
        print(f"| {label} | {a:.1f} ms | {b:.1f} ms |")
    if samples_b:
        b_body = statistics.median(s["bgsession"][0] for s in samples_b) / 1000
        print(f"| B ({args.compare_lib}): import beyond the interpreter | {med['B'] - med['pass']:.1f} ms | "
              f"{med['B -S'] - med['pass -S']:.1f} ms |")
        print(f"| B: in CPU time | {cpu['B'] - cpu['pass']:.1f} ms | {cpu['B -S'] - cpu['pass -S']:.1f} ms |")
        print(f"| B: `-X importtime` own body | | {b_body:.1f} ms |")
    print(f"\nTarget ≤ {TARGET_MS:.0f} ms beyond the interpreter: {'met' if max(d, d_s) <= TARGET_MS else 'MISSED'} "
          f"({d:.1f} ms; {d_s:.1f} ms without site).\n")
    print(f"Modules that `import bgsession` brings in (`python3 -S -X importtime`; the {args.top} largest cumulative "
          f"times; a module's time includes what it imports itself; medians):\n")
    names = set.intersection(*(set(s) for s in samples_s)) - {"bgsession"}
    cum = {n: statistics.median(s[n][1] for s in samples_s) / 1000 for n in names}
    depth = {n: samples_s[0][n][2] for n in names}
    print("| module | depth | cumulative ms |")
    print("|---|---|---|")
    for name in sorted(cum, key=cum.get, reverse=True)[:args.top]:  # type: ignore[arg-type]
        print(f"| {name} | {depth[name]} | {cum[name]:.1f} |")
    print("\n".join(by_part))


if __name__ == "__main__":
    main()
