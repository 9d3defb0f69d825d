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

The numbers are the coordinator's own (``coordinator.reports``): the head's mean ± sem per
class, each decision's means and runs as it stored them, the class's σ from the noise model
(``coordinator.noise``) -- a candidate awaiting repeats gets the sem σ/√n of its runs so far.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from coordinator import reports
from coordinator import states as st
from coordinator.ledger import Ledger
from coordinator.repo import GitError, read_blob

DEFAULT_DECISIONS = 20
DEFAULT_FAILURES = 5
TAIL_CHARS = 4000          # characters of a failure's log sent to proposers
MAX_WATCH = 500            # candidate ids one snapshot reports on
MAX_DECISIONS = 500        # decisions one snapshot carries at most


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

    heads = {h["hw_class"]: h for h in status["heads"]}
    values = [{"hw_class": hw, "mean": h["val_bpb"], "sem": h.get("sem"), "runs": h["runs"]}
              for hw, h in heads.items() if h["runs"]]
    noise = [{"hw_class": hw, "sigma": h.get("sigma"), "source": h.get("sigma_source"),
              "text": h.get("noise")} for hw, h in heads.items() if h.get("sigma")]
    head_desc = L.scalar("SELECT description FROM candidates WHERE id = ?", head_cid)

    decided = []
    for d in log["decisions"][:decisions]:
        decided.append({
            "candidate_id": d["candidate_id"], "verdict": d["verdict"],
            "description": d["description"], "hw_class": d["hw_class"], "reason": d["reason"],
            "mean": d["val_bpb"], "runs": d.get("n_candidate"), "head_mean": d["head_bpb"],
            "head_runs": d.get("n_head"), "confidence": d.get("confidence"),
            # "mean ± sem (n)" as the decision stored it (coordinator.rule.fmt_runs)
            "value_text": d.get("runs"), "head_text": d.get("head_runs"), "time": d["time"]})

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

    running: dict[int, dict] = {}     # one entry per candidate, however many repeats run
    for r in status["running"]:
        if r["purpose"] != "candidate":
            continue
        e = running.setdefault(r["candidate_id"], {
            "candidate_id": r["candidate_id"], "hw_class": r["hw_class"], "workers": [],
            "description": L.scalar("SELECT description FROM candidates WHERE id = ?",
                                    r["candidate_id"])})
        e["workers"].append(r["worker"] or r["worker_id"])
    for e in running.values():
        e["worker"] = ", ".join(e.pop("workers"))
    awaiting = []
    for r in status.get("in_progress", []):
        if r["state"] == st.RUNNING:
            continue                 # listed under running
        sigma = heads.get(r["hw_class"], {}).get("sigma")
        sem = sigma / math.sqrt(r["runs"]) if sigma and r["runs"] else None
        waiting = next((m["waiting_for"] for m in status["measured"]
                        if m["candidate_id"] == r["candidate_id"]), None)
        if waiting is None and r.get("runs_wanted"):
            waiting = f"repeats: {r['runs']} of {r['runs_wanted']} runs"
        awaiting.append({"candidate_id": r["candidate_id"], "description": r["description"],
                         "hw_class": r["hw_class"], "state": r["state"], "mean": r["val_bpb"],
                         "sem": sem, "runs": r["runs"], "runs_wanted": r.get("runs_wanted"),
                         "waiting_for": waiting})

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
        "decisions": decided, "queued": status["queue"], "running": list(running.values()),
        "awaiting": awaiting, "failures": fails, "noise": noise,
    }


__all__ = ["proposer_snapshot", "head_files"]
