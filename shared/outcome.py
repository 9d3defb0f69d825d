"""The outcome contract: what one attempt's run came to, as the worker reports it.

One ``Outcome`` type crosses two seams. The worker builds it from the trainer's result file,
exit code and log (``worker.runner``); ``to_wire`` is the ``outcome`` map of a ``result``
message; the coordinator rebuilds it with ``from_wire`` (``coordinator.server`` /
``coordinator.core``), which never trusts the map: a peer can send any msgpack value in any
field. Everything that judges such a map goes through ``from_wire``, and every untrusted
nested value (a result file, a progress line, a profile, a result map) through ``plain``.

Status vocabulary (``STATUSES``):

    ok         the harness wrote a result with a finite, positive val_bpb
    crash      anything else that went wrong in the run (the note says what)
    nan        the loss or val_bpb went non-finite
    oom        out of memory (the harness caught it, or the OS killed the trainer for it)
    timeout    no result within the hard wall-clock limit
    cancelled  the worker stopped the run itself (told to, leaving, low on disk): not the
               candidate's fault, so the coordinator requeues it without a strike

The first four are the harness's own (``shared.trainer_contract.RESULT_STATUSES``, with their
exit codes); timeout and cancelled only the worker can know. ``note`` is one line saying why
this status ("no result within 330s", "log limit exceeded (67108864 bytes)", ...): it is stored
on the attempt and is the first thing a failure's reason says.

``conditions`` is what the worker's machine was doing at the start and end of the run,
``{"start": reading, "end": reading}`` with readings from ``worker.conditions.read_conditions``
(power, thermal state, memory pressure and swap counters). The coordinator stores it on the
attempt and judges from it whether the machine slowed the run (``coordinator.slowdown``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from shared.trainer_contract import RESULT_STATUSES

OK, CRASH, NAN, OOM, TIMEOUT, CANCELLED = "ok", "crash", "nan", "oom", "timeout", "cancelled"
STATUSES: tuple[str, ...] = RESULT_STATUSES + (TIMEOUT, CANCELLED)
# Statuses that fail a candidate; "cancelled" requeues it instead.
FAILURE_STATUSES: tuple[str, ...] = (CRASH, NAN, OOM, TIMEOUT)

MAX_DEPTH = 32            # nesting kept of untrusted maps (the harness writes 2 levels)
MAX_LOG_TAIL = 16_384     # characters of log tail kept from a wire outcome
MAX_NOTE = 500            # characters of a note kept from a wire outcome
LINE_LIMIT = 300          # characters of one summary line (last_line)


def plain(obj: Any, depth: int = 0) -> Any:
    """Untrusted data (msgpack from a peer, JSON a trainer wrote) made safe for both JSON and
    msgpack: str keys; bytes and strings as valid UTF-8 text (lone surrogates become "?");
    non-finite floats, integers beyond 64 bits and anything nested deeper than MAX_DEPTH
    become None; any other type becomes its str()."""
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj if -2**63 <= obj < 2**64 else None
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, (dict, list, tuple)) and depth >= MAX_DEPTH:
        return None
    if isinstance(obj, dict):
        return {_key(k): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    return plain(str(obj))


def _key(k: Any) -> str:
    if isinstance(k, (bytes, bytearray, memoryview)):
        return bytes(k).decode("utf-8", "replace")
    return plain(k if isinstance(k, str) else str(k))


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of JSON-like data, counting no further than limit + 1."""
    if limit < 0 or not isinstance(obj, (dict, list)):
        return 0
    values = obj.values() if isinstance(obj, dict) else obj
    return 1 + max((depth(v, limit - 1) for v in values), default=0)


def last_line(text: Any, limit: int = LINE_LIMIT) -> str:
    """The last non-blank line of ``text``, stripped and capped: the line of a traceback or a
    log that says what finally happened."""
    for line in reversed(str(text or "").strip().splitlines()):
        if line.strip():
            return line.strip()[:limit]
    return ""


def one_line(text: Any, limit: int = MAX_NOTE) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed to one space, capped."""
    return " ".join(str(text or "").split())[:limit]


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _db_int(value: Any) -> int | None:
    """An int SQLite can store (64-bit signed), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
        return value
    return None


READING_KEYS = ("start", "end")
MAX_READING_CHARS = 8192   # one machine reading is ~600 characters of JSON


def _readings(cond: Any) -> dict:
    """The ``conditions`` map of an untrusted outcome: only the start / end readings that are
    maps, made plain, each dropped if oversized (they are advisory: never worth a big row)."""
    out = {}
    for key in READING_KEYS:
        value = cond.get(key) if isinstance(cond, dict) else None
        if isinstance(value, dict):
            value = plain(value)
            if depth(value) <= 4 and len(json.dumps(value)) <= MAX_READING_CHARS:
                out[key] = value
    return out


@dataclass
class Outcome:
    status: str                    # one of STATUSES
    val_bpb: float | None          # finite and > 0 iff status == "ok"
    result: dict = field(default_factory=dict)  # the harness's result JSON ({} if none)
    log_tail: str = ""             # last lines of the trainer's combined stdout+stderr
    exit_code: int | None = None   # Popen convention: -N = killed by signal N; None = not started
    wall_seconds: float | None = 0.0   # None: the sender did not say
    note: str = ""                 # one line: why this status (e.g. "log limit exceeded")
    conditions: dict = field(default_factory=dict)  # {"start", "end"} machine readings

    def to_wire(self) -> dict:
        """The ``outcome`` map of a result message (plain data: survives msgpack and JSON)."""
        return {
            "status": self.status,
            "val_bpb": self.val_bpb,
            "result": plain(self.result) if isinstance(self.result, dict) else {},
            "log_tail": self.log_tail,
            "exit_code": self.exit_code,
            "wall_seconds": (None if self.wall_seconds is None
                             else round(float(self.wall_seconds), 3)),
            "note": self.note,
            "conditions": plain(self.conditions) if isinstance(self.conditions, dict) else {},
        }

    @classmethod
    def from_wire(cls, outcome: Any) -> "Outcome":
        """The Outcome an untrusted ``outcome`` map stands for; never raises.

        A map that does not hold up becomes a crash whose note says why (and keeps the
        sender's note after it): an unknown status, ok without a val_bpb or with one <= 0; ok
        with a non-finite val_bpb is nan. Fields of the wrong type are dropped, strings capped.
        """
        m = outcome if isinstance(outcome, dict) else {}
        raw_status = m.get("status")
        bpb = _finite_number(m.get("val_bpb"))
        problem = None
        status = raw_status
        if raw_status is None:
            status, problem = CRASH, "no status in the outcome"
        elif not isinstance(raw_status, str) or raw_status not in STATUSES:
            status, problem = CRASH, f"unknown outcome status {plain(raw_status)!r}"[:LINE_LIMIT]
        elif status == OK:
            raw = m.get("val_bpb")
            if isinstance(raw, float) and not math.isfinite(raw):
                status, problem = NAN, f"status ok but val_bpb is {raw}"
            elif bpb is None:
                status, problem = CRASH, "status ok but no val_bpb in the outcome"
            elif bpb <= 0:  # bits per byte of real text are always > 0
                status, problem = CRASH, f"status ok but val_bpb is {bpb}"
        if status != OK:
            bpb = None
        note = one_line(m.get("note")) if isinstance(m.get("note"), str) else ""
        if problem:
            note = f"{problem}; worker's note: {note}" if note else problem
        result = m.get("result")
        tail = m.get("log_tail")
        wall = _finite_number(m.get("wall_seconds"))
        cond = m.get("conditions")
        return cls(status=status, val_bpb=bpb,
                   result=plain(result) if isinstance(result, dict) else {},
                   log_tail=plain(tail)[-MAX_LOG_TAIL:] if isinstance(tail, str) else "",
                   exit_code=_db_int(m.get("exit_code")),
                   wall_seconds=wall, note=note[:MAX_NOTE],
                   conditions=_readings(cond))

    @classmethod
    def refused(cls, note: str) -> "Outcome":
        """An assignment that could not even start (bad id, bad settings): a crash."""
        return cls(CRASH, None, {}, "", None, 0.0, note)

    @classmethod
    def cancelled(cls, note: str) -> "Outcome":
        """The worker did not (or will not) finish the run: requeued, not held against it."""
        return cls(CANCELLED, None, {}, "", None, 0.0, note)

    @property
    def failed(self) -> bool:
        return self.status in FAILURE_STATUSES

    @property
    def error(self) -> str:
        """The harness's own error text from the result file ("" if none)."""
        err = self.result.get("error") if isinstance(self.result, dict) else None
        return err if isinstance(err, str) else ""


__all__ = ["Outcome", "STATUSES", "FAILURE_STATUSES", "OK", "CRASH", "NAN", "OOM", "TIMEOUT",
           "CANCELLED", "plain", "depth", "last_line", "one_line", "MAX_DEPTH", "MAX_LOG_TAIL"]
