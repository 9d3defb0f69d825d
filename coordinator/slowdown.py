"""Was this attempt slowed by its machine? A pure rule over one result and its references.

A run trains for a fixed time, so a machine that throttles or swaps trains fewer steps and its
val_bpb measures the machine, not the idea (the seed's own M1 Pro trace fell from 26K to under
2K tok/s for several steps while macOS swapped). Such an attempt is *flagged*: stored with the
reason, left out of every decision (``scheduling.is_run``), and the candidate runs again.

The evidence, both read by the worker at the start and end of the run (``worker.conditions``):

* **slow**: the run's tok/s is more than ``SLOW_FRACTION`` below the median tok/s of the same
  ``train.py`` text's counted runs on the same hardware class. Same text and same class is
  the only fair reference: a candidate that is slower by design is compared with itself.
* **machine**: swap traffic during the run of at least ``SWAP_BYTES`` (swap-ins + swap-outs
  between the two readings), memory pressure ``critical`` at either end, or the thermal state
  ``throttled`` / ``warning`` at either end.

The rule:

1. slow -> flagged (the machine ran this text slower than it does here normally), with any
   machine evidence named in the reason;
2. machine evidence and no reference yet (the text's first counted run on the class) ->
   flagged: nothing says the text itself is slow, and the re-run gives a reference;
3. machine evidence but tok/s within ``SLOW_FRACTION`` of the reference -> counted: the
   condition did not cost speed (a candidate that always swaps is measured as it is);
4. at most ``MAX_FLAGGED`` flagged attempts per text and class: after that the attempt counts
   and the reason says so, so a machine that is always hot cannot starve a candidate forever.

The run's tok/s is its average, ``total_tokens_M * 1e6 / training_seconds`` from the harness's
result, falling back to the last logged ``tok_per_sec``.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

SLOW_FRACTION = 0.25          # tok/s this far below the reference median is slowed
SWAP_BYTES = 64 * 2**20       # swap traffic during a run that counts as swapping
MAX_FLAGGED = 2               # flagged attempts per text and class before one is counted
HOT_THERMAL = ("throttled", "warning")


@dataclass(frozen=True)
class Judgement:
    flagged: bool
    reason: str          # why flagged, or why counted despite evidence ("" when clean)
    tok_per_sec: float | None
    reference_tok_per_sec: float | None


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if x == x and x not in (float("inf"), float("-inf")) else None


def run_tok_per_sec(result: Mapping | None) -> float | None:
    """The run's average training throughput from a harness result map."""
    r = result if isinstance(result, Mapping) else {}
    tokens, seconds = _num(r.get("total_tokens_M")), _num(r.get("training_seconds"))
    if tokens and seconds and tokens > 0 and seconds > 0:
        return tokens * 1e6 / seconds
    last = _num(r.get("tok_per_sec"))
    return last if last and last > 0 else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, Mapping) else None
    return d


def machine_evidence(conditions: Mapping | None) -> list[str]:
    """What the two readings (``{"start": ..., "end": ...}``) say against the machine."""
    c = conditions if isinstance(conditions, Mapping) else {}
    start, end = c.get("start"), c.get("end")
    out = []
    deltas = []
    for key in ("swapins", "swapouts"):
        a, b = _num(_get(start, "memory", key)), _num(_get(end, "memory", key))
        if a is not None and b is not None and b >= a:
            deltas.append(b - a)
    page = _num(_get(end, "memory", "page_size")) or _num(_get(start, "memory", "page_size"))
    if deltas and page:
        swapped = sum(deltas) * page
        if swapped >= SWAP_BYTES:
            out.append(f"swapped {swapped / 2**20:.0f} MiB during the run")
    for when, reading in (("start", start), ("end", end)):
        if _get(reading, "memory", "level") == "critical":
            out.append(f"memory pressure critical at {when}")
        state = _get(reading, "thermal", "state")
        if state in HOT_THERMAL:
            limit = _num(_get(reading, "thermal", "cpu_speed_limit"))
            detail = f" (CPU speed limit {limit:.0f}%)" if limit is not None and limit < 100 \
                else ""
            out.append(f"thermal {state}{detail} at {when}")
    return out


def judge(result: Mapping | None, conditions: Mapping | None,
          reference_tok_per_sec: Iterable[float], flagged_before: int) -> Judgement:
    """Apply the rule (module docstring) to one ok attempt.

    ``reference_tok_per_sec``: run tok/s of the same text's counted runs on the same class
    (this attempt excluded); ``flagged_before``: flagged attempts of that text on that class."""
    tok = run_tok_per_sec(result)
    refs = [float(v) for v in reference_tok_per_sec if _num(v)]
    median = statistics.median(refs) if refs else None
    evidence = machine_evidence(conditions)
    slow = tok is not None and median is not None and tok < (1 - SLOW_FRACTION) * median
    why = None
    if slow:
        why = (f"{tok:,.0f} tok/s is {100 * (1 - tok / median):.0f}% below the median "
               f"{median:,.0f} tok/s of the same train.py on this class")
        if evidence:
            why += "; " + "; ".join(evidence)
    elif evidence and median is None:
        why = "; ".join(evidence) + " (no earlier run of this train.py on this class to compare)"
    if why is None:
        note = ""
        if evidence:
            note = (f"counted despite {'; '.join(evidence)}: {tok:,.0f} tok/s is within "
                    f"{100 * SLOW_FRACTION:.0f}% of the median {median:,.0f}")
        return Judgement(False, note, tok, median)
    if flagged_before >= MAX_FLAGGED:
        return Judgement(False, f"counted although slowed by the machine ({why}): "
                                f"{flagged_before} attempts of it were flagged already",
                         tok, median)
    return Judgement(True, f"slowed by the machine, not counted, re-run: {why}", tok, median)
