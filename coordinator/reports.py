"""What the ledger says, for people and scripts: status, log, results.tsv, candidate summaries.

Functions over a ``Ledger``, read-only: they never write, never take the coordinator's lock and
never touch git, so they work on a live run (``Coordinator.status()`` etc. call them under its
mutex) and on a stopped one (open the ledger of ``DIR/.autoresearch`` and call them directly).
What only a running coordinator knows is passed in and may be left out: ``seen`` (heartbeats and
progress, kept in memory), ``problems`` (its own warnings) and ``reconciled`` (what its last
start fixed). Every value returned is plain JSON-able data.
"""
from __future__ import annotations

import sqlite3
import time
from typing import Any, Iterable, Mapping

from coordinator import noise, routing, rule, scheduling
from coordinator import states as st
from coordinator.ledger import Ledger, loads
from coordinator.repo import decision_settings
from shared.outcome import OK, last_line

# Upstream's five columns first (tools that read results.tsv by position keep working), then
# how each number was measured: runs behind the mean, its sem, the head's mean and runs it was
# compared with, the confidence of the test, and the hardware class that decided it.
TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description", "runs", "sem",
               "head_bpb", "head_runs", "confidence", "hw_class")
TSV_HEADER = "\t".join(TSV_COLUMNS) + "\n"


def fmt_time(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def classes(ledger: Ledger) -> list[str]:
    """Every hardware class a worker or an attempt has had, sorted."""
    return sorted({r[0] for r in ledger.all(
        "SELECT hw_class FROM workers UNION SELECT hw_class FROM attempts")})


def head_on_class(ledger: Ledger, hw_class: str) -> scheduling.HeadOnClass:
    """Where the current head stands on one class (its runs, live and failed measurements)."""
    head = ledger.head()
    return scheduling.head_on_class(ledger.class_attempts(head["candidate_id"], hw_class),
                                    scheduling.field_of(head, "text_sha"))


def class_noise(ledger: Ledger, hw_class: str, prior_sigma: float) -> noise.Noise:
    """σ of one class (coordinator.noise) from every text's repeated runs there, and from the
    paired differences its decisions recorded."""
    groups: dict[tuple, list[float]] = {}
    for r in ledger.all("SELECT * FROM attempts WHERE hw_class = ? AND state = 'done' AND "
                        "status = 'ok'", hw_class):
        if scheduling.is_run(r):
            key = (r["candidate_id"], scheduling.field_of(r, "text_sha"))
            groups.setdefault(key, []).append(float(r["val_bpb"]))
    paired = []
    for d in ledger.all("SELECT details FROM decisions WHERE hw_class = ? AND details IS NOT "
                        "NULL", hw_class):
        diffs = (loads(d["details"], {}) or {}).get("paired_differences") or []
        if len(diffs) >= 2:
            paired.append([float(x) for x in diffs])
    return noise.estimate(groups.values(), prior_sigma=prior_sigma, paired_groups=paired)


def prior_sigma(ledger: Ledger) -> float:
    return float(decision_settings(ledger.get_meta("settings") or {})["noise_prior"])


def text_provenance(row: Mapping) -> dict:
    """What a candidate row says about where its text sits: ``based_on`` (the head it was
    written against), ``rebased_onto`` (the later head its change was replayed onto, None if it
    runs as submitted) and ``text_commit`` (the commit of the text it runs)."""
    base = row["base_commit"]
    onto = scheduling.field_of(row, "text_onto")
    return {"based_on": base, "rebased_onto": onto if onto and onto != base else None,
            "text_commit": scheduling.field_of(row, "text_commit") or row["commit_sha"]}


def origin_of(ledger: Ledger, cid: int) -> dict | None:
    """Where candidate ``cid`` came from (tool, proposer, host, transcript), if its client
    said; None for a hand submission, or a ledger read-only from before the origins table."""
    try:
        r = ledger.one("SELECT tool, proposer, host, transcript FROM origins "
                       "WHERE candidate_id = ?", cid)
    except sqlite3.OperationalError:
        return None
    return None if r is None else {k: r[k] for k in r.keys() if r[k] is not None}


def candidate_summary(ledger: Ledger, row: Mapping, duplicate: bool = False) -> dict:
    """One candidate row as a submitter sees it: state, commit, val_bpb (the mean of its runs
    on its class: the decision's once decided), how many runs, verdict."""
    out = {"candidate_id": row["id"], "state": row["state"], "commit": row["commit_sha"],
           "base": row["base_commit"], "description": row["description"],
           "duplicate": duplicate, "val_bpb": None, "hw_class": None, "runs": 0,
           **text_provenance(row)}
    hw = scheduling.field_of(row, "hw_class")
    if hw is None:
        first = ledger.one("SELECT hw_class FROM attempts WHERE candidate_id = ? AND "
                           "state = 'done' AND status = 'ok' ORDER BY finished_at LIMIT 1",
                           row["id"])
        hw = first["hw_class"] if first is not None else None
    if hw is not None:
        # Only runs of the text it runs now (on the current head) are its number.
        runs = scheduling.runs_of(ledger.class_attempts(row["id"], hw),
                                  scheduling.field_of(row, "text_sha"))
        if runs:
            out["val_bpb"] = sum(r.value for r in runs) / len(runs)
            out["hw_class"], out["runs"] = hw, len(runs)
    d = ledger.decision(row["id"])
    if d is not None:
        out["verdict"], out["reason"] = d["verdict"], d["reason"]
        if d["val_bpb"] is not None and d["candidate_id"] != 0:
            out["val_bpb"], out["runs"] = d["val_bpb"], d["n_candidate"] or out["runs"]
    out["origin"] = origin_of(ledger, row["id"])
    return out


def status(ledger: Ledger, repo_dir: Any, *, seen: Mapping[str, dict] | None = None,
           problems: Iterable[str] = (), reconciled: Iterable[str] = ()) -> dict:
    """Everything a person wants at a glance: heads per class, workers, queue, running and
    waiting candidates, counts, problems."""
    L = ledger
    seen = seen or {}
    head = L.head()
    heads, problems = [], list(problems)
    prior = prior_sigma(L)
    for hw in classes(L):
        m = head_on_class(L, hw)
        if m.state == scheduling.BLOCKED:
            problems.append(
                f"head #{head['candidate_id']} failed {m.failed} measurements on {hw}:"
                f" not measuring it there again, so candidates on {hw} cannot be decided"
                f" (its workers get no work) until the head changes")
        nz = class_noise(L, hw, prior)
        mean = sum(m.values) / len(m.values) if m.values else None
        sem = nz.sigma / len(m.values) ** 0.5 if m.values else None
        drift = noise.drift(list(m.values), nz.sigma)
        if drift is not None:
            problems.append(f"head #{head['candidate_id']} drifted on {hw}: {drift.describe()}")
        heads.append({"hw_class": hw, "val_bpb": mean, "sem": sem, "runs": len(m.values),
                      "failed_runs": m.failed, "state": m.state, "commit": head["commit_sha"],
                      "text": rule.fmt_runs(mean, sem, len(m.values)) if m.values else None,
                      "seeds": [r.seed_index for r in m.runs],
                      "sigma": nz.sigma, "sigma_source": nz.source,
                      "pooled_sigma": nz.pooled_sigma, "pooled_df": nz.pooled_df,
                      "noise": nz.describe(),
                      "drift": drift.describe() if drift is not None else None})
    blocked = {h["hw_class"] for h in heads if h["state"] == scheduling.BLOCKED}
    running = []
    for r in L.all("SELECT a.*, w.name AS worker_name FROM attempts a LEFT JOIN workers w "
                   "ON w.worker_id = a.worker_id WHERE a.state = 'leased' ORDER BY a.leased_at"):
        prog = seen.get(r["worker_id"], {}).get("progress")
        prog = prog if prog and prog.get("attempt_id") == r["attempt_id"] else None
        running.append({"attempt_id": r["attempt_id"], "candidate_id": r["candidate_id"],
                        "purpose": r["purpose"], "worker_id": r["worker_id"],
                        "worker": r["worker_name"], "hw_class": r["hw_class"],
                        "leased_at": fmt_time(r["leased_at"]), "progress": prog,
                        "commit": r["commit_sha"], "onto": scheduling.field_of(r, "onto")})
    by_worker = {r["worker_id"]: r for r in running}
    workers = []
    for w in L.all("SELECT * FROM workers ORDER BY name, worker_id"):
        r = by_worker.get(w["worker_id"])
        last = seen.get(w["worker_id"], {}).get("last_seen") or w["last_seen"]
        paused = seen.get(w["worker_id"], {}).get("paused") if w["state"] != "gone" else None
        workers.append({
            "worker_id": w["worker_id"], "name": w["name"], "hw_class": w["hw_class"],
            "state": "gone" if w["state"] == "gone" else
                     ("running" if r else "paused" if paused else "idle"),
            "paused": paused,
            "attempt_id": r["attempt_id"] if r else None,
            "candidate_id": r["candidate_id"] if r else None,
            "purpose": r["purpose"] if r else None,
            "progress": r["progress"] if r else None,
            "last_seen": fmt_time(last), "gone_reason": w["gone_reason"],
            # what memory-aware routing compares (coordinator.routing)
            "usable_memory": routing.worker_memory(loads(w["profile"], {}))})
    queue = [{"candidate_id": r["id"], "description": r["description"],
              "submitted": fmt_time(r["created_at"]), **text_provenance(r),
              "behind_head": r["base_commit"] != head["commit_sha"],
              "origin": origin_of(L, r["id"])}
             for r in L.all("SELECT * FROM candidates WHERE state = 'queued' ORDER BY id")]
    measured, in_progress = [], []
    connected = {w["hw_class"] for w in L.all("SELECT hw_class FROM workers WHERE "
                                              "state != 'gone'")}
    for r in L.all("SELECT * FROM candidates WHERE state IN ('running', 'measured', "
                   "'repeating') AND id > 0 ORDER BY id"):
        summary = candidate_summary(L, r)
        hw = summary["hw_class"] or scheduling.field_of(r, "hw_class")
        entry = {"candidate_id": r["id"], "description": r["description"], "state": r["state"],
                 "hw_class": hw, "val_bpb": summary["val_bpb"], "runs": summary["runs"],
                 "runs_wanted": scheduling.field_of(r, "runs_wanted"), **text_provenance(r)}
        if summary["runs"]:
            in_progress.append(entry)
        if r["state"] == st.REPEATING and hw not in connected:
            # its repeats run only on its own class: say so rather than let it wait unseen
            problems.append(f"candidate #{r['id']} waits for repeats on {hw}, where no worker "
                            f"is connected")
        if r["state"] != st.MEASURED:
            continue
        why = (f"cannot be decided: the head cannot be measured on {hw}" if hw in blocked else
               f"waiting for the head's runs on {hw}")
        measured.append(dict(entry, waiting_for=why))
        if hw in blocked:
            problems.append(f"candidate #{r['id']} {why}")
    candidates = [{"id": r["id"], "candidate_id": r["id"], "state": r["state"],
                   "description": r["description"], "val_bpb": r["val_bpb"]}
                  for r in L.all("SELECT c.id, c.state, c.description, d.val_bpb, d.verdict "
                                 "FROM candidates c LEFT JOIN decisions d "
                                 "ON d.candidate_id = c.id ORDER BY c.id")]
    counts = {s: 0 for s in st.CANDIDATE_STATES}
    for r in L.all("SELECT state, COUNT(*) FROM candidates WHERE id > 0 GROUP BY state"):
        counts[r[0]] = r[1]
    counts["attempts"] = L.scalar("SELECT COUNT(*) FROM attempts")
    routed = []
    try:   # a ledger read offline may predate schema 3 (no flags, no routes)
        counts["flagged"] = L.scalar("SELECT COUNT(*) FROM attempts WHERE flagged IS NOT NULL")
        routed = [{"candidate_id": r["candidate_id"], "from_class": r["from_class"],
                   "memory": r["memory"], "reason": r["reason"], "state": r["state"],
                   "routed_at": fmt_time(r["routed_at"])}
                  for r in L.all("SELECT r.*, c.state FROM routes r JOIN candidates c "
                                 "ON c.id = r.candidate_id ORDER BY r.id")]
    except sqlite3.OperationalError:
        pass
    return {
        "repo": str(repo_dir), "tag": L.get_meta("tag"), "branch": L.get_meta("branch"),
        "head": head["commit_sha"], "head_commit": head["commit_sha"],
        "head_candidate": head["candidate_id"], "heads": heads, "workers": workers,
        "queue": queue, "running": running, "measured": measured, "in_progress": in_progress,
        "candidates": candidates, "counts": counts, "settings": dict(L.get_meta("settings")),
        "routed": routed,
        "problems": problems, "reconciled": list(reconciled),
    }


def log(ledger: Ledger, limit: int = 50) -> dict:
    """Recent attempts, decisions and retries, newest first (and merged, as ``entries``). An
    attempt carries the worker's note (why its status) and, when it failed, its log's last
    line; a retry its reason and the decision it superseded."""
    L = ledger
    attempts = []
    for r in L.all("SELECT a.*, w.name AS worker_name, c.description, c.base_commit "
                   "FROM attempts a "
                   "LEFT JOIN workers w ON w.worker_id = a.worker_id JOIN candidates c "
                   "ON c.id = a.candidate_id ORDER BY COALESCE(a.finished_at, a.leased_at)"
                   " DESC, a.rowid DESC LIMIT ?", limit):
        summary = loads(r["summary"], {}) or {}
        onto = scheduling.field_of(r, "onto")
        rebased = bool(onto) and onto != r["base_commit"]
        attempts.append({
            "attempt_id": r["attempt_id"], "candidate_id": r["candidate_id"],
            "purpose": r["purpose"], "worker_id": r["worker_id"],
            "worker": r["worker_name"], "hw_class": r["hw_class"],
            "state": r["state"], "status": r["status"], "val_bpb": r["val_bpb"],
            "leased_at": fmt_time(r["leased_at"]),
            "finished_at": fmt_time(r["finished_at"]),
            "time": fmt_time(r["finished_at"] or r["leased_at"]),
            "_t": r["finished_at"] or r["leased_at"],
            "exit_code": r["exit_code"], "wall_seconds": r["wall_seconds"],
            "peak_vram_mb": summary.get("peak_vram_mb"),
            "num_steps": summary.get("num_steps"), "note": r["note"],
            "flagged": scheduling.field_of(r, "flagged"),
            "tok_per_sec": scheduling.field_of(r, "tok_per_sec"),
            "conditions": loads(scheduling.field_of(r, "conditions"), None),
            "log_tail": last_line(r["log_tail"]) if r["status"] != OK else None,
            "description": f"{r['purpose']} run of #{r['candidate_id']} "
                           f"({r['description']}) on {r['worker_name'] or r['worker_id']}"
                           + (f", rebased onto {onto[:10]}" if rebased else ""),
            "commit": r["commit_sha"], "based_on": r["base_commit"],
            "rebased_onto": onto if rebased else None,
        })
    decisions = []
    for r in L.all("SELECT d.*, c.description, c.commit_sha, c.base_commit, c.text_onto, "
                   "c.text_commit FROM decisions d JOIN candidates c ON c.id = d.candidate_id "
                   "ORDER BY d.id DESC LIMIT ?", limit):
        details = loads(scheduling.field_of(r, "details"), {}) or {}
        decisions.append({
            "candidate_id": r["candidate_id"], "verdict": r["verdict"],
            "hw_class": r["hw_class"], "val_bpb": r["val_bpb"],
            "head_bpb": r["head_bpb"], "head_before": r["head_before"],
            "head_after": r["head_after"], "commit": r["commit_sha"],
            "reason": r["reason"], "description": r["description"],
            "attempt_ids": loads(r["attempt_ids"], []),
            "n_candidate": scheduling.field_of(r, "n_candidate"),
            "n_head": scheduling.field_of(r, "n_head"),
            "sigma": scheduling.field_of(r, "sigma"),
            "confidence": scheduling.field_of(r, "confidence"),
            "rule": scheduling.field_of(r, "rule"),
            "runs": runs_text(details, "candidate"), "head_runs": runs_text(details, "head"),
            **text_provenance(r),
            # stale: what it conflicts with and where to resubmit (coordinator.rebase)
            "conflicts": details.get("conflicts"), "conflicts_with": details.get("conflicts_with"),
            "resubmit_on": details.get("resubmit_on"),
            "origin": origin_of(L, r["candidate_id"]),
            "time": fmt_time(r["decided_at"]), "_t": r["decided_at"]})
    retries = []
    # An older ledger opened read-only may lack the table (the coordinator adds it on open).
    has_retries = L.scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                           "name = 'retries'")
    for r in L.all("SELECT r.*, c.description FROM retries r JOIN candidates c ON "
                   "c.id = r.candidate_id ORDER BY r.id DESC LIMIT ?", limit) \
            if has_retries else []:
        before = loads(r["decision"], {}) or {}
        retries.append({
            "candidate_id": r["candidate_id"], "state": "retried",
            "from_state": r["from_state"], "reason": r["reason"],
            "requested_by": r["requested_by"], "previous_reason": before.get("reason"),
            "description": f"retried ({r['from_state']}: {before.get('reason', '-')}): "
                           f"{r['reason']}",
            "time": fmt_time(r["retried_at"]), "_t": r["retried_at"]})
    kinds = (("attempt", attempts), ("decision", decisions), ("retry", retries))
    entries = sorted((dict(e, kind=kind) for kind, rows in kinds for e in rows),
                     key=lambda e: e["_t"], reverse=True)[:limit]
    for e in attempts + decisions + retries + entries:
        e.pop("_t", None)
    return {"attempts": attempts, "decisions": decisions, "retries": retries,
            "entries": entries}


def runs_text(details: dict, side: str) -> str | None:
    """``2.2480 ± 0.0100 (3)`` for one side of a decision, from its stored comparison."""
    try:
        return rule.fmt_runs(details[f"{side}_mean"], details[f"{side}_sem"],
                             details[f"n_{side}"])
    except (KeyError, TypeError, ValueError):
        return None


def provenance(base: str | None, onto: str | None) -> str:
    """`` [based on abc1234, rebased onto def5678]`` for a text rebased onto a later head."""
    if not base or not onto or onto == base:
        return ""
    return f" [based on {base[:7]}, rebased onto {onto[:7]}]"


def export_tsv(ledger: Ledger, cache: dict[int, str] | None = None) -> str:
    """results.tsv in upstream's format: one row per decided candidate, oldest first. A
    candidate that ran rebased says so at the end of its description ("[based on X, rebased
    onto Y]"); a stale one never ran and has no row (the log has its decision).

    ``cache`` (decision id -> rendered line) is kept by the caller across calls: a decision row
    never changes once written, and this file is rewritten after every decision, so re-parsing
    every attempt's summary each time would make a long run quadratic (benchmarks/scheduler.py).
    """
    cache = {} if cache is None else cache
    lines = [TSV_HEADER]
    for d in ledger.all("SELECT d.*, c.commit_sha, c.description, c.base_commit, c.text_onto "
                        "FROM decisions d JOIN candidates c ON c.id = d.candidate_id "
                        "WHERE d.verdict != 'stale' ORDER BY d.id"):
        cached = cache.get(d["id"])
        if cached is not None:
            lines.append(cached)
            continue
        ids = loads(d["attempt_ids"], []) or []
        bpb, aid = d["val_bpb"], ids[0] if ids else None
        if d["candidate_id"] == 0:  # the baseline: its first ok measurement, if any
            first = ledger.one(
                "SELECT attempt_id, val_bpb FROM attempts WHERE candidate_id = 0 AND "
                "state = 'done' AND status = 'ok' ORDER BY finished_at LIMIT 1")
            bpb, aid = (first["val_bpb"], first["attempt_id"]) if first else (None, None)
        mem = 0.0
        if d["verdict"] != st.FAILED and aid:
            summary = loads(ledger.scalar(
                "SELECT summary FROM attempts WHERE attempt_id = ?", aid), {}) or {}
            peak = summary.get("peak_vram_mb")
            if isinstance(peak, (int, float)) and not isinstance(peak, bool):
                mem = peak / 1024
        if d["verdict"] == st.FAILED or bpb is None:
            bpb = 0.0
        desc = " ".join(f"{d['description']}{provenance(d['base_commit'], d['text_onto'])}"
                        .replace("\t", " ").split())
        details = loads(scheduling.field_of(d, "details"), {}) or {}
        conf = scheduling.field_of(d, "confidence")
        extra = [scheduling.field_of(d, "n_candidate"), details.get("candidate_sem"),
                 d["head_bpb"], scheduling.field_of(d, "n_head"), conf, d["hw_class"]]
        if d["candidate_id"] == 0:
            extra = [None] * len(extra)
        cells = ["" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))
                 for v in extra]
        line = (f"{d['commit_sha'][:7]}\t{bpb:.6f}\t{mem:.1f}\t"
                f"{st.TSV_STATUS[d['verdict']]}\t{desc}\t" + "\t".join(cells) + "\n")
        if d["candidate_id"] != 0:  # the baseline's row fills in when it is measured
            cache[d["id"]] = line
        lines.append(line)
    return "".join(lines)


__all__ = ["status", "log", "export_tsv", "candidate_summary", "classes", "head_on_class",
           "class_noise", "prior_sigma", "runs_text", "fmt_time", "TSV_HEADER", "TSV_COLUMNS"]
