"""The keep/discard rule, and the one-line reasons the ledger stores for every decision.

Numbers are compared only within one hardware class (see DESIGN.md, *Fairness*). The head's
value on a class is the mean of its ok measurements there; a candidate is kept iff its val_bpb
is below that by more than the run's margin. Pure functions: no ledger, no git.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.states import DISCARDED, FAILED, KEPT
from shared.outcome import FAILURE_STATUSES, Outcome, last_line

# Lost leases after which a candidate is failed (it may be what takes the machines down).
LOST_LIMIT = 3


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


def failure_reason(outcome: Outcome, hw_class: str) -> str:
    """``timeout on <class> (exit -15): no result within 330s; last log line: step 900 ...``.

    The worker's note comes first: it is the classification (why this status). The harness's
    error, or else the log's last line, follows when it adds something (a crash "exit code 1
    without a result file" is explained by the traceback's last line)."""
    code = f" (exit {outcome.exit_code})" if outcome.exit_code is not None else ""
    note = outcome.note
    detail = last_line(outcome.error) or last_line(outcome.log_tail)
    if detail and detail in note:
        detail = ""
    if note and detail:
        text = f"{note}; {'error' if outcome.error else 'last log line'}: {detail}"
    else:
        text = note or detail
    return f"{outcome.status} on {hw_class}{code}" + (f": {text}" if text else "")


def lost_reason(times: int) -> str:
    return f"lost {times} times: may crash the machine"


__all__ = ["Verdict", "head_value", "judge", "failure_reason", "lost_reason",
           "LOST_LIMIT", "FAILURE_STATUSES",
           "KEPT", "DISCARDED", "FAILED"]
