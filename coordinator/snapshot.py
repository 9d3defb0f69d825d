"""What proposers need to know about the run, as plain maps (coordinator side, no wire).

Two read-only functions over the ledger, like ``coordinator.reports`` (the server answers
``query head`` and ``query brief`` with them):

  * ``head_files``: the head's commit and candidate id, its train.py and program.md -- what a
    proposer edits and reads, fetched only when the head moves;
  * ``proposer_snapshot``: what ``coordinator.brief`` renders and ``coordinator.pacing``
    counts: the head's val_bpb per hardware class (mean +- sem over its runs), the last K
    decisions (with the candidate's mean +- sem where it has runs), what is queued / running /
    measured and waiting, the last failures with their log tails, the noise per class, the run
    settings and the candidate counts, and the ``watched`` candidates' summaries. The server
    adds ``workers`` (connected workers that can take work): only it knows who is connected.

Noise per class is ``coordinator.noise.pooled`` over the repeated ok runs of each candidate on
that class (head re-measurements and candidate repeats alike); a class without repeats is left
out and the brief says so.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping

from coordinator import reports
from coordinator.ledger import Ledger
from coordinator.noise import pooled
from coordinator.repo import GitError, read_blob
from coordinator.stats import mean, sum_sq_dev

DEFAULT_DECISIONS = 20
DEFAULT_FAILURES = 5
TAIL_CHARS = 4000          # characters of a failure's log sent to proposers
MAX_WATCH = 500            # candidate ids one snapshot reports on
MAX_DECISIONS = 500        # decisions one snapshot carries at most


def mean_sem(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sem None with fewer than 2 values)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    if len(vals) < 2:
        return mean(vals), None
    return mean(vals), math.sqrt(sum_sq_dev(vals) / (len(vals) - 1) / len(vals))


def head_files(ledger: Ledger, repo_dir: Any) -> dict:
    """The head's commit, candidate id, train.py and program.md (what ``query head`` sends)."""
    head = ledger.head()
    commit, cid = head["commit_sha"], head["candidate_id"]
    try:
        train_py = read_blob(repo_dir, commit, "train.py")
    except GitError:   # only if someone damaged the repo: the ledger holds the text too
        train_py = ledger.candidate(cid)["train_py"]
    try:
        program = read_blob(repo_dir, commit, "program.md")
    except GitError:
        program = ""
    return {"commit": commit, "candidate_id": cid, "train_py": train_py, "program_md": program}


def proposer_snapshot(ledger: Ledger, repo_dir: Any, decisions: int = DEFAULT_DECISIONS,
                      failures: int = DEFAULT_FAILURES, watch: Iterable[int] = (),
                      seen: Mapping[str, dict] | None = None) -> dict:
    """See the module docstring. Read-only over the ledger (like ``coordinator.reports``);
    ``watch``: candidate ids whose summaries (state, verdict, reason) the caller follows,
    returned as ``watched`` however old their decision; ``seen``: the server's heartbeats,
    for the progress of running attempts."""
    L = ledger
    status = reports.status(L, repo_dir, seen=seen)
    log = reports.log(L, limit=max(1, decisions))
    head_commit = status["head"]
    head_cid = status["head_candidate"]

    ok = L.all("SELECT candidate_id, hw_class, val_bpb FROM attempts WHERE state = 'done' "
               "AND status = 'ok' AND val_bpb IS NOT NULL")
    by_cand_class: dict[tuple, list[float]] = defaultdict(list)
    for r in ok:
        by_cand_class[(r["candidate_id"], r["hw_class"])].append(r["val_bpb"])

    values = []
    for hw in sorted({k[1] for k in by_cand_class if k[0] == head_cid}):
        vals = by_cand_class[(head_cid, hw)]
        m, sem = mean_sem(vals)
        values.append({"hw_class": hw, "mean": m, "sem": sem, "runs": len(vals)})
    head_desc = L.scalar("SELECT description FROM candidates WHERE id = ?", head_cid)

    noise = []
    for hw in sorted({k[1] for k in by_cand_class}):
        groups = [v for k, v in by_cand_class.items() if k[1] == hw]
        sigma, df, _used = pooled(groups)
        if sigma is not None:
            runs = sum(len(v) for v in groups if len(v) >= 2)
            noise.append({"hw_class": hw, "sigma": sigma, "runs": runs, "df": df})

    decided = []
    for d in log["decisions"][:decisions]:
        row = dict(d)
        vals = by_cand_class.get((d["candidate_id"], d["hw_class"]), [])
        if vals and d["verdict"] != "failed":
            row["mean"], row["sem"] = mean_sem(vals)
            row["runs"] = len(vals)
        row.setdefault("head_mean", d.get("head_bpb"))
        decided.append(row)

    fails = []
    for r in L.all("SELECT d.candidate_id, d.hw_class, d.reason, c.description FROM decisions d "
                   "JOIN candidates c ON c.id = d.candidate_id WHERE d.verdict = 'failed' "
                   "ORDER BY d.id DESC LIMIT ?", max(0, failures)):
        a = L.one("SELECT status, log_tail FROM attempts WHERE candidate_id = ? AND state = "
                  "'done' AND status != 'ok' ORDER BY finished_at DESC LIMIT 1",
                  r["candidate_id"])
        tail = (a["log_tail"] or "") if a is not None else ""
        fails.append({"candidate_id": r["candidate_id"], "description": r["description"],
                      "hw_class": r["hw_class"], "reason": r["reason"],
                      "status": a["status"] if a is not None else "failed",
                      "log_tail": tail[-TAIL_CHARS:]})

    running = [{"candidate_id": r["candidate_id"], "worker": r["worker"],
                "hw_class": r["hw_class"], "progress": r.get("progress"),
                "description": L.scalar("SELECT description FROM candidates WHERE id = ?",
                                        r["candidate_id"])}
               for r in status["running"] if r["purpose"] == "candidate"]
    awaiting = []
    for r in status["measured"]:
        vals = by_cand_class.get((r["candidate_id"], r["hw_class"]), [])
        m, sem = mean_sem(vals)
        awaiting.append({**r, "mean": m, "sem": sem, "runs": len(vals)})

    watched = []
    for i in list(watch)[:MAX_WATCH]:
        row = L.candidate(i) if isinstance(i, int) and not isinstance(i, bool) else None
        if row is not None:
            watched.append(reports.candidate_summary(L, row))
    return {
        "watched": watched,
        "tag": status["tag"], "branch": status["branch"],
        "head": {"commit": head_commit, "candidate_id": head_cid, "description": head_desc,
                 "values": values},
        "settings": status["settings"], "counts": status["counts"],
        "decisions": decided, "queued": status["queue"], "running": running,
        "awaiting": awaiting, "failures": fails, "noise": noise,
    }


__all__ = ["proposer_snapshot", "head_files", "mean_sem"]
