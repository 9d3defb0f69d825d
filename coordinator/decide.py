"""The keep/discard rule, and the one-line reasons the ledger stores for every decision.

Numbers are compared only within one hardware class (see DESIGN.md, *Fairness*). The head's
value on a class is the mean of its ok measurements there; a candidate is kept iff its val_bpb
is below that by more than the run's margin. Pure functions: no ledger, no git.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.states import DISCARDED, FAILED, KEPT

# Failed head measurements on one class after which we stop re-measuring the head there.
HEAD_FAILURES_LIMIT = 2
# Lost leases after which a candidate is failed (it may be what takes the machines down).
LOST_LIMIT = 3
# Outcome statuses that fail a candidate (the worker's "cancelled" requeues instead).
FAILURE_STATUSES = ("crash", "nan", "oom", "timeout")


@dataclass(frozen=True)
class Verdict:
    verdict: str        # kept | discarded
    reason: str


def head_value(values: list[float]) -> float | None:
    """The head's val_bpb on a class: mean of its ok measurements (None if it has none)."""
    good = [v for v in values if v is not None and math.isfinite(v)]
    return sum(good) / len(good) if good else None


def judge(candidate_bpb: float, head_bpb: float, margin: float, hw_class: str,
          head_runs: int = 1) -> Verdict:
    """Keep iff candidate < head - margin (strictly)."""
    runs = f", mean of {head_runs} runs" if head_runs > 1 else ""
    if candidate_bpb < head_bpb - margin:
        return Verdict(KEPT, f"{candidate_bpb:.4f} < head {head_bpb:.4f} on {hw_class} "
                             f"(margin {margin:g}{runs})")
    return Verdict(DISCARDED, f"{candidate_bpb:.4f} >= head {head_bpb:.4f} - margin on {hw_class} "
                              f"(margin {margin:g}{runs})")


def last_line(text: str | None) -> str:
    for line in reversed((text or "").strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def failure_reason(status: str, hw_class: str, log_tail: str | None = None,
                   error: str | None = None, exit_code: int | None = None) -> str:
    """``crash on <class> (exit 1): <last log line>``."""
    code = f" (exit {exit_code})" if exit_code is not None else ""
    detail = last_line(error) or last_line(log_tail)
    return f"{status} on {hw_class}{code}" + (f": {detail}" if detail else "")


def lost_reason(times: int) -> str:
    return f"lost {times} times: may crash the machine"


def normalise_outcome(outcome: dict) -> tuple[str, float | None, str | None]:
    """(status, val_bpb, problem) from a wire outcome map; ok without a finite val_bpb -> nan."""
    status = str(outcome.get("status") or "crash")
    bpb = outcome.get("val_bpb")
    if isinstance(bpb, bool) or not isinstance(bpb, (int, float)):
        bpb = None
    if status == "ok":
        if bpb is None:
            return "crash", None, "status ok but no val_bpb in the outcome"
        if not math.isfinite(bpb):
            return "nan", None, f"status ok but val_bpb is {bpb}"
        return "ok", float(bpb), None
    if status not in FAILURE_STATUSES and status != "cancelled":
        return "crash", None, f"unknown outcome status {status!r}"
    return status, None, None


__all__ = ["Verdict", "head_value", "judge", "failure_reason", "lost_reason",
           "normalise_outcome", "HEAD_FAILURES_LIMIT", "LOST_LIMIT", "FAILURE_STATUSES",
           "KEPT", "DISCARDED", "FAILED"]
