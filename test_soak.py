"""The soak: random SIGKILLs of the app and of the daemon over a batch of files with random faults.

One ``FakeServer`` serves a batch of files — mostly 1-64 KiB, some 256 KiB-4 MiB, a few 404s, one
or two behind Basic auth — and every request may draw a fault from its file's list: a cut, a reset,
a short body, 500/503/429 with or without ``Retry-After``, a stall shorter than
``timeout_for_request``, throttling, an ignored ``Range``, an early 206, a wrong total, a chunked
body. The chaos loop also changes entities under running downloads, arms new faults, and takes the
server down for a moment. Meanwhile it SIGKILLs the app and the daemon at random intervals, starts
the app again, or leaves it to the daemon to relaunch it (a "background" stretch). When the time is
up the chaos stops, an app stays attached until ``session.wait()`` returns, and the whole contract
is checked: every file byte-exact (SHA-256 against the entity the server last served for it — a
changed entity must arrive in its new version), the 404s delivered as 404 and never saved, every
finish and complete hook returned and acknowledged exactly once, no task lost or duplicated,
``Journal.check()`` clean, ``tmp/`` empty, the daemon gone after its idle timeout, and in this
process no leaked threads or file descriptors.

The app, the driver and the contract check are soakkit's (shared with test_relaunch.py): the app
(``python soakkit.py app``) uses ``appdelegate.main`` because the daemon relaunches it as a
*background launch*, so the soak also covers the launch rules; its hooks append ``started`` and
``returned`` lines to an fsynced ledger, and ``soakkit.check`` judges the run (the reasoning is in
soakkit's docstring). What is the soak's own here: the batch, the random faults, and ``Chaos``,
which plays the user, the system and a misbehaving server at once.

Runs: ``pytest test_soak.py`` is the 2-minute variant (CI); ``pytest -m soak test_soak.py`` the
30-minute one. ``BGSESSION_SOAK_SECONDS`` and ``BGSESSION_SOAK_SEED`` override the duration and the
seed (printed, so a failure can be replayed). A passing run writes its counts to
``bench/results/soak_30min.json`` (docs/reliability.md quotes it; committed) or ``soak_2min.json`` (git-ignored,
so the everyday test run leaves the tree clean).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import bgsession
import fake_server
import soakkit
from soakkit import EXIT_IN_USE, Driver, File
from testkit import HERE, SHORT, MiB, wait_until

KiB = 1 << 10
IDENTIFIER = "com.example.soak"

#: Duration of the default variant (CI runs it; the whole test stays under 150 s of wall time).
SHORT_SECONDS = 120
#: Duration of the ``soak``-marked variant.
LONG_SECONDS = 1800
SECONDS_ENV = "BGSESSION_SOAK_SECONDS"
SEED_ENV = "BGSESSION_SOAK_SEED"

#: Connections the daemon opens to the one server (bgsession's default).
CONNECTIONS = 6
#: The session's timeout_for_request; every stall and delay fault is well below it.
REQUEST_TIMEOUT = 10.0
#: Longest stall or pre-response delay a fault asks for.
STALL_MAX = 3.0
#: The daemon's idle timeout: it must be gone this long after the last app left with nothing to do.
IDLE_TIMEOUT = 1.0
#: First relaunch backoff of the daemon (doubles per relaunched app that acknowledged nothing).
RELAUNCH_BACKOFF = 0.1
#: Retries: generous (a file can meet several faults in a row), short backoffs.
RETRY = dict(total=25, backoff_factor=0.05, backoff_max=1.0)
#: The workload, if never disturbed, would take this many times the chaos phase: the transfers stay
#: busy until the chaos stops, and the drain finishes the rest at full speed. Each file is paced to
#: about the same transfer time (its share of that), so files complete -- and their events are
#: delivered, with kills landing in hooks -- all through the chaos, not only when the big ones end.
WORKLOAD_STRETCH = 1.15
#: Slowest pacing of a file (bytes/s).
MIN_PACING = 1 * KiB
#: Random pause between two chaos actions (seconds).
TICK = (0.1, 2.0)
#: A foreground stretch (an app we launched is usually attached) lasts this long.
FOREGROUND = (5.0, 20.0)
#: A background stretch (no app but what the daemon relaunches) lasts this long: longer than
#: bgsession.RELAUNCH_BATCH_WINDOW, so the daemon relaunches the app while transfers still run.
BACKGROUND = (bgsession.RELAUNCH_BATCH_WINDOW + 5.0, bgsession.RELAUNCH_BATCH_WINDOW + 20.0)
#: Polling interval of the drain (what it waits for, only files and /proc tell: the daemon's children).
POLL = 0.05
#: Longest time an app's finish/complete hook works (uniform 0..this): wide enough for kills to land inside.
HOOK_DELAY = 0.15
#: Launches in the drain after which a batch that is still not delivered fails.
MAX_DRAIN_LAUNCHES = 8
#: Where a passing run writes its counts ({variant}: 2min or 30min).
RESULTS = os.path.join(HERE, "bench", "results", "soak_{variant}.json")


# ============================================================================
# The batch, the faults, the chaos
# ============================================================================


def _make_batch(rng: random.Random, seconds: float) -> list[File]:
    """A few hundred files (about 150 for two minutes): mostly small, some large, a few 404s, auth."""
    count = min(500, 150 + int(max(0.0, seconds - SHORT_SECONDS) / 7))
    big = max(8, count * 15 // 100)
    missing = max(2, count // 50)
    private = 1 if seconds <= SHORT_SECONDS * 2 else 2
    small = count - big - missing - private
    files = [File("empty.bin", 0, seed=1), File("one.bin", 1, seed=2)]
    files += [File(f"s{i:03d}.bin", rng.randint(1 * KiB, 64 * KiB), seed=100 + i) for i in range(small - 2)]
    files += [File(f"b{i:03d}.bin", rng.randint(256 * KiB, 4 * MiB), seed=1000 + i) for i in range(big)]
    files += [File(f"p{i}.bin", rng.randint(1 * KiB, 1 * MiB), seed=2000 + i, auth=True) for i in range(private)]
    files += [File(f"missing{i}.bin", None) for i in range(missing)]
    rng.shuffle(files)
    return files


def _random_fault(rng: random.Random, size: int, pacing: int | None) -> fake_server.Fault:
    """One misbehaviour for one response (kept at the file's pacing, unless it is a throttle)."""
    span = max(1, size)
    kind = rng.choice(["cut", "cut", "reset", "short", "500", "503", "429", "stall", "throttle", "ignore_range",
                       "early_206", "wrong_total", "chunked", "chunked_cut", "delay", "drop_validators",
                       "malformed_range"])
    if kind == "cut":
        fault = fake_server.Fault(cut_after=rng.randrange(span), reset=rng.random() < 0.3)
    elif kind == "reset":
        fault = fake_server.Fault(reset=True)
    elif kind == "short":
        fault = fake_server.Fault(short_body=rng.randint(1, span))
    elif kind in ("500", "503", "429"):
        retry_after = rng.choice([None, "0", "1", email.utils.formatdate(time.time() + 1, usegmt=True)])
        fault = fake_server.Fault(status=int(kind), retry_after=retry_after)
    elif kind == "stall":
        fault = fake_server.Fault(stall_after=rng.randrange(span), stall_seconds=rng.uniform(0.1, STALL_MAX))
    elif kind == "throttle":
        base = pacing or 64 * KiB
        return fake_server.Fault(throttle=rng.randint(base // 2, base * 4))
    elif kind == "ignore_range":
        fault = fake_server.Fault(ignore_range=True)
    elif kind == "early_206":
        fault = fake_server.Fault(early_206=rng.randint(1, 64 * KiB))
    elif kind == "wrong_total":
        fault = fake_server.Fault(wrong_total=True)
    elif kind == "chunked":
        fault = fake_server.Fault(chunked=True)
    elif kind == "chunked_cut":
        fault = fake_server.Fault(chunked=True, cut_after=rng.randrange(span))
    elif kind == "delay":
        fault = fake_server.Fault(delay=rng.uniform(0.1, STALL_MAX))
    elif kind == "drop_validators":
        fault = fake_server.Fault(drop_validators=True)
    else:
        fault = fake_server.Fault(malformed_range=True)
    return dataclasses.replace(fault, throttle=pacing) if pacing else fault


def _random_faults(rng: random.Random, f: File, most: int = 3) -> list[fake_server.Fault | None]:
    assert f.size is not None
    return [_random_fault(rng, f.size, f.pacing) if rng.random() < 0.85 else None
            for _ in range(rng.randint(0, most))]


class Chaos:
    """Plays the user, the system and a misbehaving server over one driver: kills the app and the
    daemon, starts the app or leaves relaunching it to the daemon, changes entities, arms faults and
    takes the server down for a moment; then drains."""

    def __init__(self, driver: Driver, rng: random.Random) -> None:
        self.driver, self.rng = driver, rng
        self.counts = {"entity_changes": 0, "faults_armed": 0, "outages": 0}

    def _pending_blob(self) -> File | None:
        done = self.driver.delivered()
        pending = [f for f in self.driver.files if f.size is not None and f.desc not in done]
        return self.rng.choice(pending) if pending else None

    def change_entity(self) -> None:
        f = self._pending_blob()
        if f is None:
            return
        assert f.size is not None
        size = self.rng.randint(max(0, f.size // 2), max(1, f.size * 3 // 2))
        self.driver.routes[f.path].update(fake_server.blob_bytes(size, self.rng.randrange(1 << 30)))
        self.counts["entity_changes"] += 1

    def arm_faults(self) -> None:
        f = self._pending_blob()
        if f is None:
            return
        route = self.driver.routes[f.path]
        route.set_faults(_random_faults(self.rng, dataclasses.replace(f, size=len(route.data))),
                         route.default_fault)
        self.counts["faults_armed"] += 1

    def outage(self) -> None:
        """The server goes away for a moment (open connections cut) and comes back on the same port."""
        self.driver.server.stop()
        self.driver.server.start()
        self.counts["outages"] += 1

    def calm(self) -> None:
        """The chaos is over: no more faults or pacing; cut the slow responses still running."""
        for route in self.driver.routes.values():
            route.set_faults([], None)
        self.outage()

    # -- the chaos loop and the drain ------------------------------------------------------------
    def chaos(self, until: float, progress: Any) -> None:
        rng, driver = self.rng, self.driver
        began = time.monotonic()
        mode, mode_until, had_background = "fg", time.monotonic() + rng.uniform(*FOREGROUND), False
        driver.launch()
        next_report = time.monotonic() + 30.0
        while time.monotonic() < until:
            time.sleep(rng.uniform(*TICK))  # the chaos interval: workload, not synchronisation
            now = time.monotonic()
            driver.reap()
            if now >= mode_until:
                if mode == "fg" and until - now > BACKGROUND[0] + 5.0 and driver.daemon() is not None and (
                        not had_background or rng.random() < 0.5):
                    mode, had_background = "bg", True
                    mode_until = now + min(rng.uniform(*BACKGROUND), until - now)
                    driver.kill_apps()  # the user leaves the app; from now on only the daemon launches it
                else:
                    mode, mode_until = "fg", now + rng.uniform(*FOREGROUND)
            roll = rng.random()
            if mode == "fg":
                if roll < 0.30:
                    driver.kill_apps()
                elif roll < 0.50:
                    driver.kill_daemon()
                elif roll < 0.60:
                    driver.kill_daemon()
                    driver.kill_apps()
                elif roll < 0.70:
                    self.change_entity()
                elif roll < 0.85:
                    self.arm_faults()
                elif roll < 0.88:
                    self.outage()
                driver.reap()
                if not driver.running() and rng.random() < 0.7:
                    driver.launch()
            else:
                if roll < 0.35:
                    driver.kill_apps()  # only what the daemon relaunched runs now
                elif roll < 0.50:
                    self.change_entity()
                elif roll < 0.70:
                    self.arm_faults()
                elif roll < 0.73:
                    self.outage()
                elif roll < 0.74 and driver.kill_daemon():  # rare: it ends the stretch (only an app restarts it)
                    driver.kill_apps()
                    mode, mode_until = "fg", now + rng.uniform(*FOREGROUND)  # only an app brings it back
                    driver.launch()
            if now >= next_report:
                next_report = now + 30.0
                progress(f"  {now - began:.0f} s: {len(driver.delivered())}/{len(driver.files)} delivered, "
                         f"{self.counts}, {driver.counts}")

    def drain(self, deadline: float) -> None:
        """Stop the chaos and let everything finish: an app stays attached until session.wait() returns.

        Done when a launch made after the chaos exited normally with every file delivered (a
        "returned" line of a process killed before its ack is not enough: that event comes again),
        and no other launch still runs.
        """
        driver = self.driver
        self.calm()
        everything = {f.desc for f in driver.files}
        launches, final = 0, None
        while True:
            driver.reap()
            running = driver.running()
            if final is not None and final.ended:
                if final.rc == 0 and driver.delivered() >= everything and not running:
                    return
                if final.rc not in (0, EXIT_IN_USE):
                    raise AssertionError(f"an app launched in the drain exited with {final.rc}")
                final = None
            if final is None and not running:
                if launches >= MAX_DRAIN_LAUNCHES:
                    raise AssertionError(f"{launches} launches after the chaos did not finish: {self._pending()}")
                final = driver.launch()
                launches += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"the drain timed out: {self._pending()}")
            time.sleep(POLL)  # polling processes this test may not wait on (the daemon's children)

    def _pending(self) -> str:
        """What keeps the batch from being done (for a failure message)."""
        driver = self.driver
        tasks = bgsession.Journal(driver.session_dir).tasks()
        phases: dict[str, int] = {}
        for t in tasks:
            phases[t["phase"]] = phases.get(t["phase"], 0) + 1
        return (f"complete hook never returned for {sorted({f.desc for f in driver.files} - driver.delivered())[:20]}; "
                f"{len(tasks)} tasks not acknowledged in the journal {phases}, e.g. "
                f"{[(t['description'], t['acked']) for t in tasks[:5]]}; running launches: "
                f"{[x.key for x in driver.running()]}; launches after the chaos: "
                f"{[(x.key, x.rc) for x in driver.launches[-MAX_DRAIN_LAUNCHES:]]}")

    def wait_daemon_gone(self) -> None:
        wait_until(lambda: self.driver.daemon() is None, IDLE_TIMEOUT + SHORT,
                   what=f"the daemon to exit within {IDLE_TIMEOUT + SHORT} s after the last app")


# ============================================================================
# The summary
# ============================================================================


def _summary(chaos: Chaos, seed: int, seconds: float, wall: float) -> dict[str, Any]:
    driver = chaos.driver
    ledger = driver.records
    sizes = [len(e.data) for e in (r.final_entity() for r in driver.routes.values()) if e is not None]
    requests = [rec for route in driver.routes.values() for rec, _ in route.served]
    redelivered = sum(max(0, sum(1 for e in ledger if e["event"] == ev and e.get("desc") == f.desc
                                 and e["phase"] == "started") - 1)
                      for f in driver.files for ev in soakkit.HOOKS)
    injected = sum(r.injected for r in driver.routes.values())
    return {
        "seed": seed, "duration": seconds, "seconds": round(wall, 1),
        "kills_app": driver.counts["app_kills"], "kills_daemon": driver.counts["daemon_kills"],
        "faults_injected": injected + chaos.counts["entity_changes"] + chaos.counts["outages"],
        "faulty_responses": injected, "entity_changes": chaos.counts["entity_changes"],
        "outages": chaos.counts["outages"], "files": len(driver.files),
        "files_404": sum(1 for f in driver.files if f.size is None), "bytes": sum(sizes),
        "bytes_served": sum(driver.server.bytes_served(f.path) for f in driver.files),
        "requests": len(requests), "range_requests": sum(1 for r in requests if r.range_header),
        "launches_by_test": driver.counts["launches_by_test"],
        "launches_by_daemon": sum(1 for x in driver.launches if x.background),
        "in_use_exits": sum(1 for x in driver.launches if x.rc == EXIT_IN_USE),
        "hook_redeliveries": redelivered,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_results(summary: Mapping[str, Any], variant: str) -> None:
    path = RESULTS.format(variant=variant)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ============================================================================
# The test
# ============================================================================


def _duration(default: int) -> int:
    return int(os.environ.get(SECONDS_ENV, default))


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listdir's own descriptor, closed by now
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


@pytest.fixture
def baseline() -> Iterator[tuple[set[threading.Thread], dict[int, str]]]:
    yield set(threading.enumerate()), _fds()


@pytest.mark.parametrize("variant", [
    pytest.param(SHORT_SECONDS, id="2min", marks=pytest.mark.timeout(max(300, _duration(SHORT_SECONDS) * 2))),
    pytest.param(LONG_SECONDS, id="30min",
                 marks=[pytest.mark.soak, pytest.mark.timeout(max(300, _duration(LONG_SECONDS) * 2))]),
])
def test_soak(tmp_path: Any, variant: int, baseline: tuple[set[threading.Thread], dict[int, str]]) -> None:
    """Random SIGKILLs of app and daemon over a faulty batch: every file exact, every hook once, nothing leaked."""
    threads_before, fds_before = baseline
    seconds = _duration(variant)
    seed = int(os.environ.get(SEED_ENV, random.SystemRandom().randrange(1 << 32)))
    rng = random.Random(seed)
    started = time.monotonic()
    print(f"soak: seed {seed} ({SEED_ENV}={seed} {SECONDS_ENV}={seconds} to replay), {seconds} s", flush=True)

    reserve = 10.0 + 0.02 * seconds  # setup, drain and checks
    chaos_seconds = max(10.0, seconds - reserve)
    files = _make_batch(rng, seconds)
    share = CONNECTIONS * chaos_seconds * WORKLOAD_STRETCH / len(files)  # seconds of transfer per file
    for f in files:
        f.pacing = max(MIN_PACING, int(f.size / (share * rng.uniform(0.5, 2.0)))) if f.size else None
    for f in files:
        if f.size is not None:
            f.faults = _random_faults(rng, f)
    driver: Driver | None = None
    summary: dict[str, Any] | None = None
    with fake_server.FakeServer() as server:
        try:
            driver = Driver(str(tmp_path), server, files, host="daemon", identifier=IDENTIFIER, session={
                "timeout_for_request": REQUEST_TIMEOUT, "retry": RETRY, "daemon_idle_timeout": IDLE_TIMEOUT,
                "relaunch_backoff": RELAUNCH_BACKOFF}, hook_delay=HOOK_DELAY)
            chaos = Chaos(driver, rng)
            chaos.chaos(started + chaos_seconds, progress=lambda text: print(text, flush=True))
            chaos.drain(time.monotonic() + 45.0 + 0.05 * seconds)
            chaos.wait_daemon_gone()
            problems = soakkit.check(driver, settled=True)
            summary = _summary(chaos, seed, seconds, time.monotonic() - started)
            assert problems == [], (
                f"soak seed {seed} ({SEED_ENV}={seed} {SECONDS_ENV}={seconds} to replay): {len(problems)} problems:\n"
                + "\n".join(problems[:40]) + f"\n{summary}\n--- app log ---\n{driver.app_log(6000)}"
                + f"\n--- daemon log ---\n{driver.tail(os.path.join(driver.session_dir, 'daemon.log'), 3000)}")
        except AssertionError as err:
            if driver is not None and summary is None:
                raise AssertionError(f"soak seed {seed}: {err}\n{driver.counts}\n--- app log ---\n"
                                     f"{driver.app_log(6000)}\n--- daemon log ---\n"
                                     f"{driver.tail(os.path.join(driver.session_dir, 'daemon.log'), 3000)}") from err
            raise
        finally:
            if driver is not None:
                driver.close()
    assert summary is not None
    summary["seconds"] = round(time.monotonic() - started, 1)

    # nothing leaked in this process: threads (the server's end within SHORT) and descriptors
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(SHORT)
    leaked = [t.name for t in set(threading.enumerate()) - threads_before]
    assert leaked == [], f"threads leaked: {leaked}"
    fds = _fds()
    assert {n: fds[n] for n in set(fds) - set(fds_before)} == {}, "file descriptors leaked"

    _write_results(summary, "30min" if variant == LONG_SECONDS else "2min")
    print("soak: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)

