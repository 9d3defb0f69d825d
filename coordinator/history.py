"""The night as data: what the report and the dashboard show, read from the ledger.

Pure reads over a ``Ledger`` (normally a ``ReadOnlyLedger``, so no running coordinator is
needed and none is disturbed); every function returns plain JSON-able values:

    progress(L)        per hardware class: the baseline, every decided candidate's val_bpb
                       (mean +- sem of its runs), the head as a staircase, candidates still
                       being measured -- the data of the progress plot
    kept(L, repo)      the kept changes in order: gain +- sem, confidence, train.py diff
    failures(L)        failed candidates and failed head runs, grouped by kind
    workers_activity(L)  runs per hour per worker, lost leases, fleet utilisation over time
    noise(L)           sigma between reruns per class

Numbers are only ever compared inside one hardware class (DESIGN.md, *Fairness*), so the
progress series and the noise are per class. Where the decision rule stores its own statistics
on a decision row (``n_candidate``, ``n_head``, ``sigma``, ``confidence`` columns and the
comparison in its JSON ``details``: see ``STAT_NAMES``) those are shown; where it does not, the same figures are computed here from the attempts the row names, and a figure that
cannot be computed (one run: no sem) is ``None``, shown as a dash.

Utilisation is an estimate: the ledger records leases, not heartbeats, so a worker counts as
present from its first sighting to its last recorded activity (its last lease, result or
hello; "now" while it holds a lease).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from coordinator import states as st
from coordinator.ledger import ReadOnlyLedger, ledger_path, loads
from coordinator import reports, scheduling
from coordinator.reports import classes
from coordinator.stats import mean_sem

STAT_FIELDS = ("n", "mean", "sem", "head_n", "head_sem", "gain", "gain_sem", "sigma",
               "confidence", "test", "pairs")
MAX_DIFF_CHARS = 60_000      # a kept diff longer than this is cut (a train.py is ~600 lines)
MAX_BUCKETS = 24             # utilisation/throughput columns over the night


def open_run(repo_dir: Path) -> ReadOnlyLedger:
    """The research repo's ledger, read-only (FileNotFoundError / LedgerError if unusable)."""
    from coordinator.repo import state_dir

    return ReadOnlyLedger(ledger_path(state_dir(Path(repo_dir))))


@contextmanager
def read_run(repo_dir: Path) -> Iterator[ReadOnlyLedger]:
    """``with read_run(DIR) as L:`` -- the ledger read-only, every read inside one committed
    state, closed afterwards."""
    L = open_run(repo_dir)
    try:
        with L.reading():
            yield L
    finally:
        L.close()


# ---- small statistics ------------------------------------------------------------------------

# Where the decision rule keeps each figure on a decision row: a column, or a key of its JSON
# ``details`` (the rule's comparison: candidate_mean, candidate_sem, head_sem, se = the sem of
# the difference, test = paired | welch, pairs). First name found wins.
STAT_NAMES = {
    "n": ("n_candidate", "n"), "mean": ("candidate_mean", "mean"),
    "sem": ("candidate_sem", "sem"), "head_n": ("n_head", "head_n"),
    "head_sem": ("head_sem",), "gain": ("gain",), "gain_sem": ("se", "gain_sem"),
    "sigma": ("sigma",), "confidence": ("confidence",), "test": ("test",), "pairs": ("pairs",),
}


def _row_stats(row: Any) -> dict:
    """The decision rule's own statistics on a decision row, whatever of them exist."""
    keys = set(row.keys())
    found: dict[str, Any] = {}
    for blob in ("details", "stats"):
        if blob in keys:
            extra = loads(row[blob], {})
            if isinstance(extra, dict):
                found.update({k: v for k, v in extra.items() if v is not None})
    found.update({k: row[k] for k in keys if row[k] is not None})
    out: dict[str, Any] = {}
    for field, names in STAT_NAMES.items():
        for name in names:
            if found.get(name) is not None:
                out[field] = found[name]
                break
    diff = found.get("difference")     # candidate - head: negative is better
    if "gain" not in out and isinstance(diff, (int, float)):
        out["gain"] = -diff
    return out


def _ok_runs(L: Any, cid: int, hw: str, until: float | None = None,
             ids: list[str] | None = None, purpose: str | None = None) -> list[float]:
    """val_bpb of the runs that count (``scheduling.is_run``: ok, not flagged as slowed)."""
    rows = [r for r in L.all("SELECT * FROM attempts WHERE candidate_id = ? AND hw_class = ? "
                             "AND state = 'done' AND status = 'ok' ORDER BY finished_at",
                             cid, hw) if scheduling.is_run(r)]
    if ids:
        wanted = set(ids)
        rows = [r for r in rows if r["attempt_id"] in wanted]
    if until is not None:
        rows = [r for r in rows if (r["finished_at"] or 0) <= until]
    if purpose is not None:
        rows = [r for r in rows if r["purpose"] == purpose]
    return [r["val_bpb"] for r in rows if r["val_bpb"] is not None]


def _head_candidate_at(L: Any, commit: str | None) -> int | None:
    """Which candidate's train.py a head commit holds (the kept one, or the baseline)."""
    if not commit:
        return None
    row = L.one("SELECT candidate_id FROM decisions WHERE head_after = ? AND verdict = 'kept' "
                "ORDER BY id DESC LIMIT 1", commit)
    return None if row is None else row["candidate_id"]


def decision_stats(L: Any, d: Any) -> dict:
    """n, mean, sem of the candidate's runs behind decision ``d``; the head's n and sem; the
    gain (head - candidate, positive = better) and its sem; sigma; confidence. The rule's own
    numbers win; the rest is computed from the attempts."""
    stats = _row_stats(d)
    hw, cid = d["hw_class"], d["candidate_id"]
    out: dict[str, Any] = {k: None for k in STAT_FIELDS}
    # The rule recorded the comparison itself: nothing to recompute (and no queries, which a
    # dashboard over a long night would otherwise repeat for every decision).
    complete = all(stats.get(k) is not None for k in ("n", "mean", "sem", "head_sem", "gain"))
    if hw and d["verdict"] != st.FAILED and not complete:
        runs = _ok_runs(L, cid, hw, ids=loads(d["attempt_ids"], []) or None)
        if not runs:
            runs = _ok_runs(L, cid, hw, until=d["decided_at"], purpose=st.PURPOSE_CANDIDATE)
        m, s = mean_sem(runs)
        out.update(n=len(runs), mean=m if m is not None else d["val_bpb"], sem=s)
        head_cid = _head_candidate_at(L, d["head_before"])
        if head_cid is not None and head_cid != cid:
            hruns = _ok_runs(L, head_cid, hw, until=d["decided_at"])
            hm, hs = mean_sem(hruns)
            out.update(head_n=len(hruns), head_sem=hs)
        if d["head_bpb"] is not None and out["mean"] is not None:
            out["gain"] = d["head_bpb"] - out["mean"]
            if out["sem"] is not None and out["head_sem"] is not None:
                out["gain_sem"] = math.hypot(out["sem"], out["head_sem"])
    out.update(stats)
    return out


# ---- the progress plot's data ----------------------------------------------------------------

def progress(L: Any) -> list[dict]:
    """One series per hardware class, the picture upstream's analysis notebook draws:

    ``points``: each decided candidate on the class in decision order (x = 1, 2, ...), with
    verdict, mean, sem, n; ``staircase``: vertices {x, val_bpb, kind, label} of the head as
    the rule saw it, kind one of baseline | start (first measured here after a keep
    elsewhere) | kept | elsewhere (a keep on another class moved the head) | remeasured | end;
    ``baseline``: the baseline's mean there; ``pending``: candidates with runs, undecided."""
    out = []
    decided = L.all("SELECT d.*, c.description FROM decisions d JOIN candidates c ON "
                    "c.id = d.candidate_id WHERE d.candidate_id > 0 ORDER BY d.id")
    for hw in classes(L):
        base_runs = _ok_runs(L, 0, hw)
        base, base_sem = mean_sem(base_runs)
        points, stairs = [], []

        def step(x: float, y: float, kind: str, label: str | None = None) -> None:
            stairs.append({"x": x, "val_bpb": y, "kind": kind, "label": label})

        level = base
        if level is not None:
            step(0, level, "baseline", "baseline")
        elsewhere: list[str] = []   # keeps on other classes since this class's last decision
        for d in decided:
            if d["hw_class"] != hw:
                if d["verdict"] == st.KEPT:
                    elsewhere.append(f"#{d['candidate_id']} kept on {d['hw_class']}")
                continue
            if d["verdict"] == st.FAILED:
                continue
            s = decision_stats(L, d)
            x = len(points) + 1
            points.append({"x": x, "candidate_id": d["candidate_id"],
                           "description": d["description"], "verdict": d["verdict"],
                           "mean": s["mean"], "sem": s["sem"], "n": s["n"],
                           "head_bpb": d["head_bpb"], "confidence": s["confidence"],
                           "decided_at": d["decided_at"]})
            hb = d["head_bpb"]
            if hb is not None and level is None:
                # first measured here after the baseline changed: start at that head
                head_cid = _head_candidate_at(L, d["head_before"])
                step(0, hb, "start", f"start: head #{head_cid}" if head_cid else "start")
                level = hb
            elif hb is not None and abs(hb - level) > 1e-12:
                # the head changed under this class: kept elsewhere, or re-measured
                step(x, hb, "elsewhere" if elsewhere else "remeasured",
                     "; ".join(elsewhere) or None)
                level = hb
            elsewhere = []
            if d["verdict"] == st.KEPT and s["mean"] is not None:
                step(x, s["mean"], "kept", f"#{d['candidate_id']} {d['description']}")
                level = s["mean"]
        # The current head as measured here now (kept elsewhere since, or run again).
        head = L.head()
        now_runs = _ok_runs(L, head["candidate_id"], hw)
        now_mean = mean_sem(now_runs)[0]
        if now_mean is not None and (level is None or abs(now_mean - level) > 1e-12):
            # ends where status puts the head: every run of it here, re-measures included
            step(len(points) + 0.5 if level is not None else 0, now_mean,
                 "elsewhere" if elsewhere else "remeasured", "; ".join(elsewhere) or None)
            level = now_mean
        if level is not None:
            step(len(points) + 1, level, "end")     # carry the last level to the edge
        pending = []
        final = tuple(sorted(st.CANDIDATE_FINAL))
        for r in L.all("SELECT c.id, c.description, c.state FROM candidates c WHERE c.id > 0 "
                       f"AND c.state NOT IN ({', '.join('?' * len(final))}) AND NOT EXISTS "
                       "(SELECT 1 FROM decisions d WHERE d.candidate_id = c.id) ORDER BY c.id",
                       *final):
            runs = _ok_runs(L, r["id"], hw, purpose=st.PURPOSE_CANDIDATE)
            if runs:
                m, s = mean_sem(runs)
                pending.append({"candidate_id": r["id"], "description": r["description"],
                                "state": r["state"], "mean": m, "sem": s, "n": len(runs)})
        if points or pending or base is not None:
            out.append({"hw_class": hw, "baseline": base, "baseline_sem": base_sem,
                        "baseline_n": len(base_runs), "points": points, "staircase": stairs,
                        "pending": pending})
    return out


# ---- kept changes ----------------------------------------------------------------------------

def train_py_diff(repo_dir: Path, commit: str) -> str:
    """``git diff`` of train.py between a kept commit and its parent ('' if git cannot)."""
    from coordinator.repo import GitError, git

    try:
        text = git(Path(repo_dir), "diff", "--no-color", "--no-ext-diff", f"{commit}^", commit,
                   "--", "train.py")
    except GitError:
        return ""
    if len(text) > MAX_DIFF_CHARS:
        text = text[:MAX_DIFF_CHARS] + f"\n... (diff cut at {MAX_DIFF_CHARS} characters)"
    return text


def kept(L: Any, repo_dir: Path | None = None, diffs: dict[str, str] | None = None) -> list[dict]:
    """The kept changes in the order they were kept. ``diffs`` caches commit -> diff text
    (a kept commit never changes, so the dashboard computes each once)."""
    out = []
    for d in L.all("SELECT d.*, c.description, c.commit_sha AS candidate_commit FROM decisions "
                   "d JOIN candidates c ON c.id = d.candidate_id WHERE d.verdict = 'kept' AND "
                   "d.candidate_id > 0 ORDER BY d.id"):
        s = decision_stats(L, d)
        diff = None
        if repo_dir is not None:
            if diffs is not None and d["head_after"] in diffs:
                diff = diffs[d["head_after"]]
            else:
                diff = train_py_diff(repo_dir, d["head_after"])
                if diffs is not None:
                    diffs[d["head_after"]] = diff
        out.append({"candidate_id": d["candidate_id"], "description": d["description"],
                    "hw_class": d["hw_class"], "val_bpb": d["val_bpb"],
                    "head_bpb": d["head_bpb"], "commit": d["head_after"],
                    "parent": d["head_before"], "reason": d["reason"],
                    "decided_at": d["decided_at"], "diff": diff,
                    **{k: s[k] for k in STAT_FIELDS}})
    return out


def decisions(L: Any, limit: int = 20) -> list[dict]:
    """The most recent decisions (newest first) with their statistics."""
    out = []
    for d in L.all("SELECT d.*, c.description FROM decisions d JOIN candidates c ON "
                   "c.id = d.candidate_id WHERE d.candidate_id > 0 ORDER BY d.id DESC LIMIT ?",
                   limit):
        s = decision_stats(L, d)
        out.append({"candidate_id": d["candidate_id"], "description": d["description"],
                    "verdict": d["verdict"], "hw_class": d["hw_class"],
                    "val_bpb": d["val_bpb"], "head_bpb": d["head_bpb"], "reason": d["reason"],
                    "decided_at": d["decided_at"], **{k: s[k] for k in STAT_FIELDS}})
    return out


# ---- failures --------------------------------------------------------------------------------

def _kind_of(L: Any, d: Any) -> str:
    for aid in loads(d["attempt_ids"], []) or []:
        status = L.scalar("SELECT status FROM attempts WHERE attempt_id = ?", aid)
        if status and status not in ("ok", "cancelled"):
            return status
    reason = str(d["reason"] or "")
    return "lost" if reason.startswith("lost") else (reason.split(" ", 1)[0] or "failed")


def failures(L: Any) -> dict[str, list[dict]]:
    """kind (crash, nan, oom, timeout, lost, ...) -> failed candidates and failed head runs."""
    by_kind: dict[str, list[dict]] = {}
    for d in L.all("SELECT d.*, c.description FROM decisions d JOIN candidates c ON "
                   "c.id = d.candidate_id WHERE d.verdict = 'failed' ORDER BY d.id"):
        by_kind.setdefault(_kind_of(L, d), []).append({
            "candidate_id": d["candidate_id"], "description": d["description"],
            "hw_class": d["hw_class"], "reason": d["reason"], "time": d["decided_at"],
            "what": "candidate"})
    from coordinator.decide import failure_reason

    for a in L.all("SELECT a.*, c.description FROM attempts a JOIN candidates c ON "
                   "c.id = a.candidate_id WHERE a.purpose = 'head' AND a.state = 'done' AND "
                   "a.status != 'ok' ORDER BY a.finished_at"):
        by_kind.setdefault(a["status"], []).append({
            "candidate_id": a["candidate_id"], "description": a["description"],
            "hw_class": a["hw_class"], "what": "head run",
            "reason": failure_reason(a["status"], a["hw_class"], a["log_tail"], None,
                                     a["exit_code"]),
            "time": a["finished_at"]})
    return dict(sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0])))


# ---- workers and utilisation -----------------------------------------------------------------

def _bucket_seconds(span: float) -> float:
    for b in (60, 300, 600, 900, 1800, 3600, 7200, 10800):
        if span / b <= MAX_BUCKETS:
            return float(b)
    return float(math.ceil(span / MAX_BUCKETS / 3600) * 3600)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def workers_activity(L: Any, now: float | None = None) -> dict:
    """Per worker: runs (ok / failed / lost), hours present, runs per hour, busy share; per
    time bucket: runs finished per worker and the fleet's utilisation (busy / present)."""
    attempts = L.all("SELECT worker_id, leased_at, finished_at, state, status FROM attempts "
                     "ORDER BY leased_at")
    workers = {w["worker_id"]: w for w in L.all("SELECT * FROM workers")}
    if not attempts:
        return {"bucket_seconds": None, "start": None, "buckets": [], "workers": [],
                "utilisation": []}
    last_event = max([a["finished_at"] or a["leased_at"] for a in attempts]
                     + [w["last_seen"] for w in workers.values()])
    now = float(now) if now is not None else last_event
    t0 = min([a["leased_at"] for a in attempts] + [w["first_seen"] for w in workers.values()])
    span = max(now - t0, 1.0)
    width = _bucket_seconds(span)
    n = max(1, math.ceil(span / width))
    starts = [t0 + i * width for i in range(n)]
    per: dict[str, dict] = {}
    for a in attempts:
        p = per.setdefault(a["worker_id"], {"runs": 0, "ok": 0, "failed": 0, "lost": 0,
                                            "busy": 0.0, "first": a["leased_at"],
                                            "last": a["leased_at"], "per_bucket": [0] * n,
                                            "busy_bucket": [0.0] * n})
        end = a["finished_at"] if a["finished_at"] is not None else now
        p["last"] = max(p["last"], end)
        p["busy"] += max(0.0, end - a["leased_at"])
        for i, b0 in enumerate(starts):
            p["busy_bucket"][i] += _overlap(a["leased_at"], end, b0, b0 + width)
        if a["state"] == st.DONE:
            p["runs"] += 1
            p["ok" if a["status"] == "ok" else "failed"] += 1
            i = min(n - 1, int(((a["finished_at"] or a["leased_at"]) - t0) // width))
            p["per_bucket"][i] += 1
        elif a["state"] in (st.LOST, st.STALE):
            p["lost"] += 1
    rows, present_bucket = [], [0.0] * n
    for wid, p in per.items():
        w = workers.get(wid)
        first = min(p["first"], w["first_seen"]) if w is not None else p["first"]
        last = max(p["last"], w["last_seen"]) if w is not None else p["last"]
        present = max(last - first, 1e-9)
        for i, b0 in enumerate(starts):
            present_bucket[i] += _overlap(first, last, b0, b0 + width)
        rows.append({"worker_id": wid, "name": w["name"] if w is not None else wid,
                     "hw_class": w["hw_class"] if w is not None else None,
                     "runs": p["runs"], "ok": p["ok"], "failed": p["failed"],
                     "lost": p["lost"], "hours": present / 3600,
                     "runs_per_hour": p["runs"] / (present / 3600) if present > 60 else None,
                     "busy": min(1.0, p["busy"] / present) if present > 1 else None,
                     "per_bucket": p["per_bucket"]})
    rows.sort(key=lambda r: (r["name"], r["worker_id"]))
    busy_bucket = [sum(p["busy_bucket"][i] for p in per.values()) for i in range(n)]
    util = [min(1.0, b / a) if a > 0 else None for b, a in zip(busy_bucket, present_bucket)]
    return {"bucket_seconds": width, "start": t0, "buckets": starts, "workers": rows,
            "utilisation": util,
            "workers_present": [a / width for a in present_bucket]}


# ---- noise -----------------------------------------------------------------------------------

def noise(L: Any) -> list[dict]:
    """Per class, the decision rule's noise model (``reports.class_noise``): σ between reruns
    of one train.py pooled over every text run more than once there (with its degrees of
    freedom and groups), σ of one paired difference, and the σ the rule uses (the pool's once
    it has enough degrees of freedom, else the run's prior)."""
    prior = reports.prior_sigma(L)
    out = []
    for hw in classes(L):
        nz = reports.class_noise(L, hw, prior)
        runs = L.scalar("SELECT COUNT(*) FROM attempts WHERE hw_class = ? AND state = 'done' "
                        "AND status = 'ok'", hw)
        out.append({"hw_class": hw, "sigma": nz.pooled_sigma, "dof": nz.pooled_df,
                    "repeated": nz.groups, "runs": runs, "paired_sigma": nz.paired_sigma,
                    "paired_dof": nz.paired_df, "rule_sigma": nz.sigma,
                    "rule_source": nz.source, "min_dof": nz.min_df})
    return out


# ---- everything ------------------------------------------------------------------------------

def night(L: Any, repo_dir: Path | None = None, now: float | None = None) -> dict:
    """All of the above in one consistent read (the report's input)."""
    head = L.head()
    return {
        "tag": L.get_meta("tag"), "branch": L.get_meta("branch"),
        "settings": L.get_meta("settings") or {},
        "head": head["commit_sha"], "head_candidate": head["candidate_id"],
        "counts": {r[0]: r[1] for r in L.all(
            "SELECT state, COUNT(*) FROM candidates WHERE id > 0 GROUP BY state")},
        "attempts": L.scalar("SELECT COUNT(*) FROM attempts"),
        "first_time": L.scalar("SELECT MIN(leased_at) FROM attempts"),
        "last_time": L.scalar("SELECT MAX(COALESCE(finished_at, leased_at)) FROM attempts"),
        "made_at": time.time(),
        "progress": progress(L), "kept": kept(L, repo_dir), "failures": failures(L),
        "activity": workers_activity(L, now), "noise": noise(L),
        "decisions": decisions(L, limit=1_000_000),
    }
