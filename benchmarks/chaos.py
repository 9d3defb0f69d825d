"""Chaos sessions on a real fleet, with figures (reported only, never asserted on time).

Each seed is one session of tests/chaos_fleet.py, longer than the suite's: one coordinator and
two keyed workers through the real CLIs on loopback, random ``kill -9`` of all three during a
stream of short legitimate runs (the fast stand-in train.py), then the invariants checked from
the ledger and git. Per seed it reports kills (coordinator / worker), candidates (submitted,
kept, discarded, failed), attempts by state, violations of the invariants, and spurious strikes
(lost leases held against a worker process that was alive: never killed, or not yet), with the
load average.

    python benchmarks/chaos.py                         # seeds 1..3, 90 s of kills each
    python benchmarks/chaos.py --seed 7 --duration 120
    python benchmarks/chaos.py --seeds 1 2 3 4 5 --duration 60 --out /tmp/chaos.json

Writes benchmarks/results/chaos.json (git-ignored) unless --out says otherwise. Exit status 1
if any session broke an invariant (spurious strikes are reported, not counted as violations).

Measured on the 2-core Linux box (2026-12-01, shared with other work, load average 2-5),
``--seeds 1 2 3 4 5 --duration 60``: 106 kills (37 coordinator, 69 worker), 171 candidates
(9 kept, 160 discarded, 2 failed: each lost three times, every loss on a worker process killed
while it held the candidate), 0 violations, 0 spurious strikes, 0 runs wasted. Before issue 9's
hello/assign fix (seeds 1-3, load 9-10): 63 kills, 102 candidates, 0 violations, 11 spurious
strikes ("worker restarted without it" on live workers) and 5 runs wasted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # chaos_fleet and the stand-in live in tests/


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, action="append", dest="seeds", default=None,
                    help="seed of one session (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", dest="seed_list", default=None,
                    help="several seeds at once")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of kills per session")
    ap.add_argument("--settle", type=float, default=120.0,
                    help="at most this long for the queue to drain after the last kill")
    ap.add_argument("--coordinator-weight", type=float, default=1.0,
                    help="odds of the coordinator being the one killed (each worker: 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chaos.json")
    args = ap.parse_args(argv)
    seeds = (args.seeds or []) + (args.seed_list or []) or [1, 2, 3]

    from chaos_fleet import ChaosConfig, Lab, Session
    from trainer.prepare import prepare_sample

    sessions = []
    with tempfile.TemporaryDirectory(prefix="autoresearch-chaos-") as tmp:
        tmp = Path(tmp)
        print(f"preparing the sample dataset in {tmp} ...", file=sys.stderr, flush=True)
        data = prepare_sample(tmp / "data", vocab_size=512)
        os.environ["AUTORESEARCH_DATA"] = str(data)
        os.environ.pop("AUTORESEARCH_SERVER_KEY", None)
        for seed in seeds:
            root = tmp / f"seed{seed}"
            root.mkdir()
            os.environ["AUTORESEARCH_KEYS"] = str(root / "keys")   # this user's keys, per session
            cfg = ChaosConfig(seed=seed, duration=args.duration, settle=args.settle,
                              coordinator_weight=args.coordinator_weight)
            t0 = time.monotonic()
            print(f"seed {seed}: {args.duration:g}s of kills ...", file=sys.stderr, flush=True)
            report = Session(Lab.make(root), cfg,
                             say=lambda s: print(f"  {s}", file=sys.stderr, flush=True)).run()
            r = report.to_dict()
            sessions.append(r)
            print(f"seed {seed}: {r['kills']['total']} kills ({r['kills']['coordinator']} "
                  f"coordinator, {r['kills']['worker']} worker), "
                  f"{r['candidates']['submitted']} candidates "
                  f"({r['candidates']['kept']} kept, {r['candidates']['discarded']} discarded, "
                  f"{r['candidates']['failed']} failed), {len(r['violations'])} violations, "
                  f"{len(r['spurious_strikes'])} spurious strikes, "
                  f"{len(r['wasted_runs'])} runs wasted on unkilled workers, "
                  f"{time.monotonic() - t0:.0f}s, load {r['loadavg']}", flush=True)
            for v in r["violations"]:
                print(f"  VIOLATION {v}", flush=True)
            for f in r["failures"]:
                print(f"  failed #{f['candidate_id']}: {f['reason']} (lost on "
                      f"{', '.join(f['lost_on']) or '-'})", flush=True)
            for s in r["spurious_strikes"]:
                print(f"  spurious strike: #{s['candidate_id']} on {s['worker']}: {s['note']}",
                      flush=True)
    total = {k: sum(len(s[k]) if isinstance(s[k], list) else 0 for s in sessions)
             for k in ("violations", "spurious_strikes", "wasted_runs")}
    summary = {
        "seeds": seeds, "duration": args.duration, "coordinator_weight": args.coordinator_weight,
        "kills": sum(s["kills"]["total"] for s in sessions),
        "candidates": sum(s["candidates"]["submitted"] for s in sessions),
        **total, "sessions": sessions,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"total over {len(seeds)} seeds: {summary['kills']} kills, {summary['candidates']} "
          f"candidates, {summary['violations']} violations, {summary['spurious_strikes']} "
          f"spurious strikes -> {args.out}")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
