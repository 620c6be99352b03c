"""Seeded random-sequence tests, thousands of cases per run, with nothing beyond pytest:

* the journal reducer: random valid record sequences written as JSON Lines and cut at a random
  byte; recovery must equal replaying exactly the whole lines before the cut, and random invalid
  records must be refused without changing anything;
* the Range/Content-Range policy: random local states against a simulated server (honest, or
  with the fault matrix's misbehaviours); a planned write never leaves a spliced file.
"""

from __future__ import annotations

import copy
import os
import random

import pytest

import bgsession as bg

SEED = int(os.environ.get("BGSESSION_PROPERTY_SEED", "20261126"))
P = bg.Phase


# ---------------------------------------------------------------------------
# the journal reducer
# ---------------------------------------------------------------------------


def _random_records(rng: random.Random, n: int) -> list[dict]:
    """A valid record sequence: tasks created, then random legal events through the table."""
    records: list[dict] = [{"v": 1, "t": "header", "generation": 0}]
    shadow = bg._SessionState()
    next_id = 1
    for _ in range(n):
        live = [t for t in shadow.tasks.values() if t.phase is not P.ACKNOWLEDGED]
        if not live or rng.random() < 0.15:
            rec = {"v": 1, "t": "task", "id": next_id, "kind": "download",
                   "request": {"url": f"http://h/{next_id}", "method": "GET", "headers": [], "sha256": None},
                   "description": rng.choice([None, f"photo:{next_id}", "ünïcode ✓"]), "created": 1.0}
            next_id += 1
        else:
            task = rng.choice(live)
            owed = task.events()
            choices = [e for e in bg._TRANSITIONS[task.phase]]
            choices += ["describe", "progress", "response"] if task.phase is not P.DELIVERING else []
            if owed:
                choices = ["ack"]
            event = rng.choice(choices)
            rec = {"v": 1, "t": event, "id": task.id}
            if event == "ack":
                rec["event"] = owed[0]
            elif event == "describe":
                rec["description"] = f"d{rng.randrange(100)}"
            elif event == "progress":
                rec.update(offset=rng.randrange(1 << 20), boot="b")
            elif event == "response":
                rec.update(response={"url": "http://h/x", "status": 200, "headers": []}, start=0,
                           total=rng.randrange(1 << 20), validator={"etag": '"e"'}, boot="b")
            elif event in ("finish", "fail") or (
                    event == "cancel" and bg._TRANSITIONS[task.phase][event] is P.DELIVERING):
                ok = rng.random() < 0.5 and event == "finish"
                rec.update(file=f"{task.id}.done" if ok else None,
                           error=None if ok else {"code": -999, "message": "x", "url": None, "resume": False})
            elif event == "resume":
                rec["at"] = 5.0
        shadow.apply(rec)  # the generator only makes legal records
        records.append(rec)
    return records


def _fingerprint(state: bg._SessionState) -> dict[int, tuple]:
    return {tid: (t.phase, tuple(t.acked), t.description, t.durable_offset, t.error is None, t.file)
            for tid, t in state.tasks.items()}


@pytest.mark.parametrize("chunk", range(8))
def test_recovery_equals_replay_of_whole_lines_before_any_cut(tmp_path, chunk):
    """Journal cut at a random byte: recovery equals replaying exactly the complete lines before the cut."""
    rng = random.Random(SEED + chunk)
    d = tmp_path / "s"
    d.mkdir()
    for case in range(250):
        records = _random_records(rng, rng.randrange(1, 60))
        data = b"".join(bg._dumps(r) for r in records)
        cut = rng.randrange(0, len(data) + 1)
        (d / "journal.jsonl").write_bytes(data[:cut])
        state, valid, problems = bg._load_state(str(d))
        whole = data[:cut].count(b"\n")
        reference = bg._SessionState()
        reference.replay(records[:whole])
        assert problems == [], (case, problems)
        assert _fingerprint(state) == _fingerprint(reference), case
        assert valid == len(b"".join(bg._dumps(r) for r in records[:whole]))


def test_invalid_records_are_refused_without_change():
    """Random illegal records (unknown task, wrong phase, bad ack) raise and leave the state as it was."""
    rng = random.Random(SEED)
    refused = 0
    for case in range(3000):
        state = bg._SessionState()
        state.replay(_random_records(rng, rng.randrange(1, 30)))
        before = copy.deepcopy(_fingerprint(state))
        tid = rng.choice(list(state.tasks) + [999])
        event = rng.choice(sorted(bg._PHASE_RECORDS) + ["ack", "nonsense"])
        rec = {"v": 1, "t": event, "id": tid, "event": rng.choice(["finish", "complete"])}
        try:
            state.apply(rec)
        except (bg.IllegalTransition, bg.JournalError):
            refused += 1
            assert _fingerprint(state) == before, case
    assert refused > 1000  # most random records are illegal: the test exercised refusals


# ---------------------------------------------------------------------------
# the Range / Content-Range policy against a simulated server
# ---------------------------------------------------------------------------


def _entity(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


def _server(rng: random.Random, entity: bytes, offset: int, asked: bool, behaviour: str
            ) -> tuple[int, bg.Headers, bytes]:
    """A response to ``Range: bytes=offset-`` (+If-Range) the way a (mis)behaving server would send it."""
    size = len(entity)
    if not asked or behaviour == "ignore_range" or behaviour == "changed":
        return 200, bg.Headers([("Content-Length", str(size))]), entity
    if offset >= size:
        return 416, bg.Headers([("Content-Range", f"bytes */{size}")]), b""
    start = offset
    if behaviour == "early":
        start = rng.randrange(0, offset + 1)
    elif behaviour == "late":
        start = min(size - 1, offset + rng.randrange(1, 5))
    total = str(size + 7) if behaviour == "wrong_total" else str(size)
    cr = f"bytes {start}-{size - 1}/{total}"
    if behaviour == "malformed":
        cr = rng.choice(["bytes", f"bytes {start}-/{size}", f"bites {start}-{size - 1}/{size}",
                         f"bytes {size}-{start}/{size}", "garbage"])
    return 206, bg.Headers([("Content-Range", cr)]), entity[start:]


@pytest.mark.parametrize("chunk", range(4))
def test_range_policy_never_splices(chunk):
    """For random local states and server behaviours, the file the policy builds is one entity, whole."""
    rng = random.Random(SEED * 7 + chunk)
    outcomes: dict[str, int] = {}
    for case in range(2500):
        old = _entity(rng)
        behaviour = rng.choice(["honest", "honest", "ignore_range", "changed", "early", "late",
                                "wrong_total", "malformed"])
        current = _entity(rng) if behaviour == "changed" else old
        offset = rng.randrange(0, len(old) + 1)
        local = old[:offset]
        known: int | None = len(old) if rng.random() < 0.8 else None
        asked = offset > 0
        for _ in range(4):  # a re-request goes out without Range
            status, headers, body = _server(rng, current, offset, asked, behaviour)
            plan = bg.plan_response(len(local), asked, status, headers, known)
            outcomes[plan.action] = outcomes.get(plan.action, 0) + 1
            if plan.action == "rerequest":
                assert asked, (case, behaviour)  # only a ranged answer can be refused
                asked, local, offset = False, b"", 0
                continue
            if plan.action == "complete":
                assert status == 416 and len(local) == len(current)
                final = local
            else:
                assert 0 <= plan.start <= len(local), (case, behaviour, plan)  # never a gap
                final = local[:plan.start] + body
            assert final == current, (case, behaviour, offset, status, headers, plan)
            break
        else:
            pytest.fail(f"case {case}: no usable answer after re-requests ({behaviour})")
    assert set(outcomes) == {"write", "complete", "rerequest"}  # every branch was taken


def test_content_range_parser_on_random_strings():
    """parse_content_range accepts exactly well-formed ranges and never raises."""
    rng = random.Random(SEED)
    alphabet = "bytes 0123456789-/*, "
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        parsed = bg.parse_content_range(text)
        if parsed is not None:
            first, last, total = parsed
            if first is not None:
                assert last is not None and first <= last
                assert total is None or last < total
            else:
                assert total is not None
