"""The one-line reasons the ledger stores for failures and losses, and the head's mean.

Keep/discard is ``coordinator.rule`` (the sequential rule and the greedy one); this module says
why a candidate *failed* (its outcome, or lost leases). Pure functions: no ledger, no git.
"""
from __future__ import annotations

import math

from coordinator.states import DISCARDED, FAILED, KEPT  # noqa: F401 (re-exported)
from shared.outcome import FAILURE_STATUSES, Outcome, last_line

# Lost leases after which a candidate is failed (it may be what takes the machines down).
LOST_LIMIT = 3


def head_value(values: list[float]) -> float | None:
    """The head's val_bpb on a class: mean of its ok measurements (None if it has none)."""
    good = [v for v in values if v is not None and math.isfinite(v)]
    return sum(good) / len(good) if good else None


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


__all__ = ["head_value", "failure_reason", "lost_reason",
           "LOST_LIMIT", "FAILURE_STATUSES",
           "KEPT", "DISCARDED", "FAILED"]
