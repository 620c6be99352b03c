"""Child-process contenders for bench/run.py (one fresh interpreter per measurement).

Usage (by run.py only): ``python bench/worker.py '<json spec>'``. The spec's
``mode`` picks the contender; the last line on stdout is a JSON object with the
measurements (seconds from ``time.perf_counter``, ``rss_kib`` = this process's
peak RSS, VmHWM). Exit status 3 with ``{"skip": reason}`` means "this contender
cannot run here" (for example the daemon host before it exists).

Timed intervals (the README explains why):
  bare-single   first request sent -> file closed
  bare-pool     first request sent -> every file closed
  bg-single     first ``resume()`` -> ``session.wait()`` returned (file moved by the finish hook)
  bg-many       first ``resume()`` -> ``session.wait()`` returned (every file moved)
  bg-queue-open ``Session(...)`` constructed + ``get_tasks()`` returned

Standard library only; imports bgsession from the project root. Each contender imports what it uses itself (the
bare loops urllib.request, the pool concurrent.futures, a profiled open cProfile): a relaunch (row 4) is timed from
spawn, and an app's relaunch does not import them.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Exit status meaning "skipped, see the reason".
EXIT_SKIP = 3
#: Read buffer of the bare loop (the same size bgsession reads into).
BUFFER_SIZE = 1 << 20
#: timeout_for_request used by the bench sessions (no retry may hide inside a measurement).
REQUEST_TIMEOUT = 600.0
#: Identifier of every bench session (each lives in its own directory).
IDENTIFIER = "bench.bgsession"


def _status_kib(pid: str, field: str) -> int:
    """A ``/proc/<pid>/status`` size field in KiB, 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rss_kib() -> int:
    """This process's peak RSS: VmHWM (per address space, so not inflated by the spawner).

    ``ru_maxrss`` of a process started by fork+exec also counts the *parent's*
    RSS at exec time on Linux (the kernel folds the old mm's high-water mark in),
    so it is only used where /proc is missing.
    """
    return _status_kib("self", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _emit(result: dict, code: int = 0) -> None:
    result.setdefault("rss_kib", _rss_kib())
    result["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.exit(code)


# ----------------------------------------------------------------------------
# bare urllib contenders
# ----------------------------------------------------------------------------

def bare_single(spec: dict) -> dict:
    """One file: urlopen, readinto a reused 1 MiB buffer, write (optionally fsync at the end)."""
    import urllib.request
    buf = bytearray(spec.get("buffer", BUFFER_SIZE))
    view = memoryview(buf)
    t0 = time.perf_counter()
    with urllib.request.urlopen(spec["url"]) as resp, open(spec["dest"], "wb", buffering=0) as f:
        while True:
            n = resp.readinto(buf)
            if not n:
                break
            f.write(view[:n])
        if spec.get("fsync"):
            os.fsync(f.fileno())
    return {"t": time.perf_counter() - t0}


def _fetch_naive(url: str, dest: str) -> int:
    import urllib.request
    with urllib.request.urlopen(url) as resp:
        data = resp.read()
    with open(dest, "wb") as f:
        f.write(data)
    return len(data)


def bare_pool(spec: dict) -> dict:
    """Many files: a naive 16-thread pool, one urlopen (one connection) per file."""
    import concurrent.futures
    with open(spec["list"], encoding="utf-8") as f:
        urls = [line.strip() for line in f if line.strip()]
    out = spec["outdir"]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(spec.get("threads", 16)) as pool:
        sizes = list(pool.map(lambda u: _fetch_naive(u, os.path.join(out, u.rsplit("/", 1)[-1])), urls))
    return {"t": time.perf_counter() - t0, "files": len(sizes), "bytes": sum(sizes)}


# ----------------------------------------------------------------------------
# bgsession contenders
# ----------------------------------------------------------------------------

def _import_bgsession(spec: dict):
    """bgsession from the spec's ``lib`` dir (run.py --compare-lib), else BENCH_LIB (run.py's frozen
    copy, so one run measures one version), else the project root."""
    sys.path.insert(0, spec.get("lib") or os.environ.get("BENCH_LIB") or ROOT)
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(relativeCreated)8.0f ms %(threadName)s %(levelname)s %(message)s")
    import bgsession
    return bgsession


def _configuration(bgsession, spec: dict):
    """A background configuration for the spec's host; raises _Skip when that host does not exist."""
    kwargs = dict(directory=spec["session"], host=spec.get("host", "inprocess"),
                  max_connections_per_host=spec.get("conns", 6), timeout_for_request=REQUEST_TIMEOUT)
    if kwargs["host"] == "daemon":
        kwargs["daemon_idle_timeout"] = 1.0  # the bench cleans up after itself
    if spec.get("split"):  # row 7: connections per download
        kwargs["max_connections_per_task"] = spec["split"]
    try:
        return bgsession.Configuration.background(IDENTIFIER, **kwargs)
    except NotImplementedError as err:
        raise _Skip(f"host={kwargs['host']!r}: {err}") from None
    except TypeError:  # an older/newer signature without daemon_idle_timeout (or max_connections_per_task)
        if "max_connections_per_task" in kwargs:
            raise _Skip("this bgsession.py has no max_connections_per_task") from None
        kwargs.pop("daemon_idle_timeout", None)
        return bgsession.Configuration.background(IDENTIFIER, **kwargs)


class _Skip(Exception):
    pass


def _open_session(bgsession, config, delegate):
    try:
        return bgsession.Session(config, delegate=delegate)
    except NotImplementedError as err:
        raise _Skip(f"host={config.host!r}: {err}") from None


def _delegate_class(bgsession):
    class MovingDelegate(bgsession.SessionDelegate):
        """The minimal app: the finish hook moves the file to outdir/<description>."""

        def __init__(self, outdir: str) -> None:
            self.outdir = outdir
            self.moved = 0
            self.errors: list = []

        def download_task_did_finish_downloading(self, session, task, location):
            resp = task.response
            if resp is None or resp.status != 200:
                self.errors.append(f"task {task.identifier}: HTTP {resp.status if resp else None}")
                return
            os.replace(location, os.path.join(self.outdir, task.description))
            self.moved += 1

        def task_did_complete(self, session, task, error):
            if error is not None:
                self.errors.append(f"task {task.identifier}: {error}")

    return MovingDelegate


def _daemon_rss_kib(session_dir: str) -> int:
    """Peak RSS (VmHWM) of the session's daemon, if the daemon host runs one; 0 otherwise."""
    try:
        with open(os.path.join(session_dir, "daemon.pid"), encoding="ascii") as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return _status_kib(str(pid), "VmHWM")


def _resume_all(session, tasks) -> str:
    """Resume every task the way an app starting many would: one ``Session.resume_all(tasks)``
    call where the library has it (one journal fsync), else ``task.resume()`` in a loop."""
    bulk = getattr(session, "resume_all", None)
    if bulk is not None and len(tasks) > 1:
        bulk(tasks)
        return "Session.resume_all"
    for task in tasks:
        task.resume()
    return "task.resume() loop"


def bg_transfer(spec: dict) -> dict:
    """One or many downloads in one background session; timed from the first resume to wait()."""
    bgsession = _import_bgsession(spec)
    if "list" in spec:
        with open(spec["list"], encoding="utf-8") as f:
            urls = [line.strip() for line in f if line.strip()]
    else:
        urls = [spec["url"]]
    names = spec.get("names") or [u.rsplit("/", 1)[-1].split("?")[0] for u in urls]
    t_setup = time.perf_counter()
    config = _configuration(bgsession, spec)
    delegate = _delegate_class(bgsession)(spec["outdir"])
    session = _open_session(bgsession, config, delegate)
    tasks = [session.download_task(u, description=n) for u, n in zip(urls, names)]
    t0 = time.perf_counter()
    resume_api = _resume_all(session, tasks)
    t_resumed = time.perf_counter()
    ok = session.wait(timeout=spec.get("timeout", 3600))
    t1 = time.perf_counter()
    daemon_rss = _daemon_rss_kib(spec["session"])
    session.close()
    return {"t": t1 - t0, "setup": t0 - t_setup, "resume_loop": t_resumed - t0, "close": time.perf_counter() - t1,
            "files": delegate.moved, "errors": delegate.errors[:5], "n_errors": len(delegate.errors),
            "waited": ok, "daemon_rss_kib": daemon_rss, "resume_api": resume_api}


def bg_recover(spec: dict) -> dict:
    """A relaunch: re-create the session (same identifier and directory) and wait for what it recovers."""
    bgsession = _import_bgsession(spec)
    t_start = time.perf_counter()
    config = _configuration(bgsession, spec)
    delegate = _delegate_class(bgsession)(spec["outdir"])
    session = _open_session(bgsession, config, delegate)
    recovered = len(session.get_tasks())
    t_open = time.perf_counter()
    ok = session.wait(timeout=spec.get("timeout", 3600))
    t1 = time.perf_counter()
    session.close()
    return {"open": t_open - t_start, "t": t1 - t_start, "recovered": recovered, "files": delegate.moved,
            "errors": delegate.errors[:5], "n_errors": len(delegate.errors), "waited": ok}


def bg_queue_create(spec: dict) -> dict:
    """Create and resume N downloads against a server that accepts and never answers, then close."""
    bgsession = _import_bgsession(spec)
    config = _configuration(bgsession, spec)
    session = _open_session(bgsession, config, bgsession.SessionDelegate())
    n, prefix = spec["n"], spec["prefix"]
    t0 = time.perf_counter()
    tasks = [session.download_task(f"{prefix}{i}", description=f"q{i}") for i in range(n)]
    t1 = time.perf_counter()
    resume_api = _resume_all(session, tasks)
    t2 = time.perf_counter()
    session.close()
    t3 = time.perf_counter()
    return {"create": t1 - t0, "resume_loop": t2 - t1, "close": t3 - t2, "t": t3 - t0, "resume_api": resume_api}


def bg_queue_open(spec: dict) -> dict:
    """Open + recover: ``Session(...)`` construction and ``get_tasks()``; peak RSS of this process."""
    import cProfile
    bgsession = _import_bgsession(spec)
    config = _configuration(bgsession, spec)
    delegate = bgsession.SessionDelegate()
    prof = cProfile.Profile() if spec.get("cprofile") else None
    if prof is not None:
        prof.enable()
    t0 = time.perf_counter()
    session = _open_session(bgsession, config, delegate)
    t1 = time.perf_counter()
    tasks = session.get_tasks()
    t2 = time.perf_counter()
    if prof is not None:
        prof.disable()
        prof.dump_stats(spec["cprofile"])
    rss = _rss_kib()
    states = {}
    for task in tasks:
        states[task.state.name] = states.get(task.state.name, 0) + 1
    session.close()
    return {"t": t2 - t0, "construct": t1 - t0, "get_tasks": t2 - t1, "tasks": len(tasks), "states": states,
            "rss_kib": rss}


def probe(spec: dict) -> dict:
    """Does this host exist? Open and close a session of it."""
    bgsession = _import_bgsession(spec)
    config = _configuration(bgsession, spec)
    session = _open_session(bgsession, config, bgsession.SessionDelegate())
    session.close()
    return {"t": 0.0}


MODES = {
    "bare-single": bare_single,
    "bare-pool": bare_pool,
    "bg-transfer": bg_transfer,
    "bg-recover": bg_recover,
    "bg-queue-create": bg_queue_create,
    "bg-queue-open": bg_queue_open,
    "probe": probe,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = MODES[spec["mode"]](spec)
    except _Skip as skip:
        _emit({"skip": str(skip)}, EXIT_SKIP)
    _emit(result)


if __name__ == "__main__":
    main()
