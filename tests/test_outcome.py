"""The outcome contract (shared.outcome) and the trainer boundary (shared.trainer_contract).

Table-driven: every status, how an exit code maps to it, the note a reader sees, the wire round
trip, and maps a hostile peer could send. The end-to-end path (real worker -> ledger -> log) is
tests/test_outcome_e2e.py.
"""
from __future__ import annotations

import json
import math

import msgpack
import pytest

from coordinator import decide
from shared import trainer_contract as tc
from shared.codec import decode, encode
from shared.outcome import FAILURE_STATUSES, STATUSES, Outcome, last_line, plain
from trainer import harness
from trainer.settings import RESEARCH_FIELDS, RunSettings

# ---- the vocabulary, defined once ----------------------------------------------------------


def test_status_vocabulary():
    assert STATUSES == ("ok", "crash", "nan", "oom", "timeout", "cancelled")
    assert set(FAILURE_STATUSES) == set(STATUSES) - {"ok", "cancelled"}
    assert tc.RESULT_STATUSES == tuple(s for s in STATUSES if s not in ("timeout", "cancelled"))


@pytest.mark.parametrize("status", tc.RESULT_STATUSES)
def test_exit_code_of_every_harness_status_is_read_back(status):
    code = tc.EXIT_FOR_STATUS[status]
    assert harness.EXIT_FOR_STATUS[status] == code   # the harness exits with the contract's code
    # Without a result file, only the codes Python itself never uses prove a status.
    assert tc.STATUS_FOR_EXIT.get(code) == (status if status in ("nan", "oom") else None)


def test_run_fields_are_the_settings_fields():
    assert RESEARCH_FIELDS == tc.RUN_FIELDS == tuple(RunSettings().research())
    assert set(RunSettings().to_env()) == set(tc.RESEARCH_ENV)


@pytest.mark.parametrize("text, oom", [
    ("MemoryError", True),
    ("[malloc] Unable to allocate 68719476736 bytes", True),
    ("[metal::malloc] Resource limit (499000) exceeded", True),
    ("std::bad_alloc", True),
    ("OSError: [Errno 12] Cannot allocate memory", True),
    ("CUDA out of memory", True),
    ("step 900 | loss 3.1", False),
    ("harness: malloc tuned", False),
    ("", False),
])
def test_one_oom_word_list_for_harness_and_worker(text, oom):
    assert tc.mentions_oom(text) is oom
    assert harness.is_oom(RuntimeError(text)) is oom   # the harness reads the same list


# ---- from_wire: what a coordinator makes of any map -----------------------------------------

OK_MAP = {"status": "ok", "val_bpb": 1.25, "result": {"status": "ok", "val_bpb": 1.25},
          "log_tail": "done", "exit_code": 0, "wall_seconds": 2.5, "note": ""}

CASES = [
    # (map, status, val_bpb, note contains)
    (OK_MAP, "ok", 1.25, ""),
    ({"status": "ok", "val_bpb": 2}, "ok", 2.0, ""),
    ({"status": "ok"}, "crash", None, "no val_bpb"),
    ({"status": "ok", "val_bpb": None}, "crash", None, "no val_bpb"),
    ({"status": "ok", "val_bpb": "1.5"}, "crash", None, "no val_bpb"),
    ({"status": "ok", "val_bpb": True}, "crash", None, "no val_bpb"),
    ({"status": "ok", "val_bpb": math.nan}, "nan", None, "val_bpb is nan"),
    ({"status": "ok", "val_bpb": math.inf}, "nan", None, "val_bpb is inf"),
    ({"status": "ok", "val_bpb": 0.0}, "crash", None, "val_bpb is 0.0"),
    ({"status": "ok", "val_bpb": -1.5}, "crash", None, "val_bpb is -1.5"),
    ({"status": "ok", "val_bpb": 2**70}, "ok", float(2**70), ""),
    ({"status": "timeout", "val_bpb": 1.2, "exit_code": -15, "note": "no result within 330s"},
     "timeout", None, "no result within 330s"),
    ({"status": "oom", "exit_code": -9,
      "note": "killed by SIGKILL; the log mentions running out of memory"},
     "oom", None, "running out of memory"),
    ({"status": "crash", "note": "log limit exceeded (67108864 bytes)"}, "crash", None,
     "log limit exceeded"),
    ({"status": "nan", "exit_code": 3}, "nan", None, ""),
    ({"status": "cancelled", "note": "cancelled: worker shutting down"}, "cancelled", None,
     "worker shutting down"),
    ({"status": "exploded"}, "crash", None, "unknown outcome status 'exploded'"),
    ({"status": 7}, "crash", None, "unknown outcome status 7"),
    ({"status": b"ok"}, "crash", None, "unknown outcome status 'ok'"),
    ({}, "crash", None, "no status"),
    ({"status": "bogus", "note": "worker says hi"}, "crash", None,
     "unknown outcome status 'bogus'; worker's note: worker says hi"),
]


@pytest.mark.parametrize("wire, status, bpb, note", CASES)
def test_from_wire(wire, status, bpb, note):
    out = Outcome.from_wire(wire)
    assert (out.status, out.val_bpb) == (status, bpb)
    assert note in out.note
    assert (out.val_bpb is not None) == (out.status == "ok")


@pytest.mark.parametrize("wire, status, bpb, note", CASES)
def test_wire_round_trip_through_msgpack_and_json(wire, status, bpb, note):
    first = Outcome.from_wire(wire)
    sent = first.to_wire()
    assert Outcome.from_wire(decode(encode(sent))) == first
    assert Outcome.from_wire(json.loads(json.dumps(sent, allow_nan=False))) == first


@pytest.mark.parametrize("status", STATUSES)
def test_worker_outcome_of_every_status_survives_the_wire(status):
    bpb = 1.1 if status == "ok" else None
    sent = Outcome(status, bpb, {"status": "crash", "error": "Boom\nValueError: x"},
                   "tail\nlast", -9 if status == "oom" else 1, 3.25, f"why {status}")
    back = Outcome.from_wire(decode(encode(sent.to_wire())))
    assert back == sent and back.error.endswith("ValueError: x")


def _deep(n):
    d: dict = {}
    for _ in range(n):
        d = {"d": d}
    return d


HOSTILE = [
    None, [], "ok", 1.5, b"\x00",
    {"status": "ok", "val_bpb": 1.4, "result": "not a map"},
    {"status": "ok", "val_bpb": 1.4, "result": {b"bytes": b"\xff\xfe", 1: [math.nan, 2**80]}},
    {"status": "ok", "val_bpb": 1.4, "result": _deep(200)},
    {"status": "crash", "log_tail": "\ud800 lone surrogate" + "x" * 100_000},
    {"status": "crash", "log_tail": ["not", "text"], "exit_code": 2**70, "wall_seconds": "fast"},
    {"status": "crash", "exit_code": True, "wall_seconds": math.inf},
    {"status": "crash", "note": "line one\nline two\r\n" + "n" * 10_000},
    {"status": "crash", "note": {"nested": "map"}},
    {b"status": b"ok", b"val_bpb": 1.4},
]


@pytest.mark.parametrize("wire", HOSTILE)
def test_hostile_maps_become_plain_safe_outcomes(wire):
    out = Outcome.from_wire(wire)
    assert out.status in STATUSES and isinstance(out.note, str) and "\n" not in out.note
    assert len(out.note) <= 500 and len(out.log_tail) <= 16_384
    assert out.exit_code is None or -2**63 <= out.exit_code < 2**63
    assert out.wall_seconds is None or math.isfinite(out.wall_seconds)
    assert isinstance(out.result, dict)
    # What the ledger stores must survive strict JSON, and the wire must carry it back.
    text = json.dumps(out.to_wire(), allow_nan=False)
    assert Outcome.from_wire(json.loads(text)) == out
    assert isinstance(msgpack.packb(out.to_wire()), bytes)


def test_plain_is_the_one_sanitiser():
    raw = {b"k": b"v\xff", "f": [math.nan, -math.inf, 1.5], "i": [2**64, -2**63, 2**64 - 1],
           "s": "\udfff", 3: object.__name__, "d": _deep(40)}
    out = plain(raw)
    assert out["k"] == "v\ufffd" and out["f"] == [None, None, 1.5]
    assert out["i"] == [None, -2**63, 2**64 - 1] and out["s"] == "?" and out["3"] == "object"
    json.dumps(out, allow_nan=False)
    depth, node = 0, out["d"]
    while isinstance(node, dict):
        node, depth = node.get("d"), depth + 1
    assert depth < 40   # capped, not recursed without end


# ---- what a reader sees ---------------------------------------------------------------------

REASONS = [
    # (outcome, reason)
    (Outcome("timeout", None, {}, "step 900 loss 3.1", -15, 330.0, "no result within 330s"),
     "timeout on C (exit -15): no result within 330s; last log line: step 900 loss 3.1"),
    (Outcome("crash", None, {"error": "Traceback\nRuntimeError: boom"}, "...", 1, 1.0,
             "RuntimeError: boom"),
     "crash on C (exit 1): RuntimeError: boom"),
    (Outcome("crash", None, {}, "Traceback\nNameError: name 'nn_Linear' is not defined", 1,
             1.0, "exit code 1 without a result file"),
     "crash on C (exit 1): exit code 1 without a result file; last log line: NameError: name "
     "'nn_Linear' is not defined"),
    (Outcome("crash", None, {}, "", None, 0.0, "worker could not start the trainer: OSError"),
     "crash on C: worker could not start the trainer: OSError"),
    (Outcome("nan", None, {}, "loss nan", 3, 1.0, ""), "nan on C (exit 3): loss nan"),
    (Outcome("crash", None, {}, "", 1, 1.0, ""), "crash on C (exit 1)"),
]


@pytest.mark.parametrize("outcome, reason", REASONS)
def test_failure_reason_leads_with_the_note(outcome, reason):
    assert decide.failure_reason(outcome, "C") == reason


def test_last_line():
    assert last_line("a\nb\n\n  c  \n\n") == "c"
    assert last_line(None) == "" and last_line("   ") == ""
    assert last_line("x" * 1000) == "x" * 300


def test_conditions_travel_with_the_outcome_and_hostile_ones_are_dropped():
    from shared.outcome import MAX_READING_CHARS, Outcome

    reading = {"power": {"source": "ac"}, "memory": {"level": "warn", "swapouts": 12},
               "thermal": {"state": "throttled", "unknown_lines": ["x"]}}
    o = Outcome("ok", 1.5, conditions={"start": reading, "end": reading})
    back = Outcome.from_wire(o.to_wire())
    assert back.conditions == {"start": reading, "end": reading}
    assert Outcome.from_wire({"status": "ok", "val_bpb": 1.0}).conditions == {}
    hostile = {"start": "nope", "end": {"a": "x" * (MAX_READING_CHARS + 1)}, "extra": {}}
    assert Outcome.from_wire({"status": "ok", "val_bpb": 1.0,
                              "conditions": hostile}).conditions == {}
    deep = {"end": {"a": {"b": {"c": {"d": {"e": 1}}}}}}
    assert Outcome.from_wire({"status": "ok", "val_bpb": 1.0, "conditions": deep}).conditions \
        == {}
    assert Outcome.from_wire({"status": "ok", "val_bpb": 1.0, "conditions": [1]}).conditions == {}
