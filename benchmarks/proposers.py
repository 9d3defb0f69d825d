"""What proposers cost the coordinator: one ``query brief`` (and ``query head`` when the head
moved) per runner every ``--poll`` seconds (``SNAPSHOT_SECONDS``). Reported only, never asserted.

For each ledger size N (default 10, 100, 1000 decided candidates): a fresh research repo (real
git, real SQLite, preset tiny, the sequential rule's default settings), one simulated worker
made of the core's own calls (hello, next_assignment, record_result) that measures the head and
runs every candidate the rule asks for, then:

  brief     ``coordinator.snapshot.proposer_snapshot`` on the live ledger (what the server runs
            for ``query brief``), median and max of ``--repeat`` calls, ms;
  head      ``coordinator.snapshot.head_files`` (git cat-file twice), ms;
  render    ``coordinator.brief.render_brief`` of that snapshot, ms, and the brief's size;
  share     brief / SNAPSHOT_SECONDS: the fraction of one coordinator core a single runner's
            polling takes.

    python benchmarks/proposers.py [--sizes 10,100,1000] [--repeat 20]

Print ``cat /proc/loadavg`` next to the figures: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.brief import BriefContext, render_brief  # noqa: E402
from coordinator.core import Coordinator  # noqa: E402
from coordinator.proposers import SNAPSHOT_SECONDS, with_head  # noqa: E402
from coordinator.repo import init_repo  # noqa: E402
from coordinator.snapshot import head_files, proposer_snapshot  # noqa: E402

BASE = "BPB = 1.5\nprint(BPB)\n"
HW = "cpu/bench/1GB"


def fill(core: Coordinator, n: int) -> None:
    """n candidates, each run until the rule decides it (a few are better: keeps)."""
    core.worker_hello("w", "w", {}, HW, None)
    for i in range(n):
        bpb = 1.5 - 0.002 * i - 0.2 if i % 7 == 0 else 1.6 + 0.0001 * i
        core.submit(f"BPB = {bpb!r}\nprint(BPB)\n", f"variant {i}")
    while True:
        a = core.next_assignment("w")
        if a is None:
            break
        value = float(a.train_py.split("\n", 1)[0].split("=")[1])
        core.record_result("w", a.attempt_id, {
            "status": "ok", "val_bpb": value, "result": {"status": "ok", "val_bpb": value},
            "log_tail": "step 1\n" * 50, "exit_code": 0, "wall_seconds": 1.0})


def ms(fn, repeat: int) -> tuple[float, float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), max(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    print(f"loadavg {load_before}")
    rows = []
    print(f"{'decided':>8} {'brief ms (med/max)':>20} {'head ms':>8} {'render ms':>10} "
          f"{'brief KB':>9} {'share of a core':>16}")
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "run"
            init_repo(repo, tag="bench", preset="tiny", train_py=BASE)
            with Coordinator(repo) as core:
                fill(core, n)
                decided = core.status()["counts"]
                b_med, b_max, snap = ms(lambda: proposer_snapshot(core.ledger, core.repo_dir),
                                        args.repeat)
                h_med, _, head = ms(lambda: head_files(core.ledger, core.repo_dir), args.repeat)
                full = with_head({**snap, "workers": 4}, head)
                ctx = BriefContext("p1", 4, "w", "w/train.py", "w/description.txt", 900)
                r_med, _, text = ms(lambda: render_brief(full, ctx), args.repeat)
                done = sum(decided[s] for s in ("kept", "discarded", "failed"))
                share = b_med / 1000 / SNAPSHOT_SECONDS
                print(f"{done:>8} {b_med:>10.1f} / {b_max:<7.1f} {h_med:>8.1f} {r_med:>10.2f} "
                      f"{len(text.encode()) / 1024:>9.1f} {share:>15.1%}")
                rows.append({"decided": done, "brief_ms_median": b_med, "brief_ms_max": b_max,
                             "head_ms_median": h_med, "render_ms_median": r_med,
                             "brief_bytes": len(text.encode()), "core_share": share})
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"loadavg {load_after}")
    out = Path(__file__).with_name("results") / "proposers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"poll_seconds": SNAPSHOT_SECONDS, "loadavg_before": load_before,
                               "loadavg_after": load_after, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
