"""What looking costs: status, the dashboard's snapshot and history, the report (reported only).

For each night size (candidates C, default 50, 300), a research repo is made (real git, real
SQLite) and a simulated night is played on the real Coordinator with three workers on two
classes (tests/night.py: every candidate screened, repeated, decided as the coordinator's rule
says; fake clock). Then, timed with the machine as it is (the load average is recorded):

  status_ms          Coordinator.status(): what the poll loop pays per dashboard snapshot
                     (at most once a second, only with --dashboard)
  offer_us           SnapshotHolder.offer() between snapshots: what the loop pays every turn
  history_ms         the dashboard thread's recomputation (progress series, kept, decisions,
                     noise) from its own read-only ledger -- only when the ledger changed
  snapshot_http_ms   GET /api/snapshot from the running dashboard (history cached)
  report_s           autoresearch-coord report: read, plot (matplotlib), HTML; and its size
  loop_rtt_ms        a client's query round trip through the real Server's poll loop (p50, p95,
                     p99, max over 4 s of back-to-back queries), with no dashboard, and with
                     the dashboard on (snapshots each second) while a thread fetches
                     /api/snapshot 4 times a second (six open pages: one refreshes every
                     1.5 s), and as fast as it can (a worst case)

    python benchmarks/report.py                 # C = 50, 300
    python benchmarks/report.py --sizes 20      # quick

Writes benchmarks/results/report.json.

Measured on the shared 2-core Linux box (2026-12-01, load average 8-10 from other work):

    C=50  (90 runs):  status 0.8 ms, offer 0.16 us, history 7.6 ms, /api/snapshot 0.8 ms
                      (29 KB), report 0.7 s; loop round trip p50/p95 0.18/2.4 ms without the
                      dashboard, 0.26/5.1 ms with 4 fetches/s, 0.29/1.9 ms hammered
    C=300 (558 runs): status 11 ms, history 9.1 ms, /api/snapshot 3.3 ms (123 KB), report
                      1.4 s; loop p50/p95 0.37/2.7 ms without, 0.35/2.3 ms with 4 fetches/s,
                      0.43/5.3 ms hammered (210 fetches/s)
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Not this directory (its trainer.py would shadow the trainer package); the tests' simulator.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import _FLEET_TRAIN_PY, _fleet_variant_text  # noqa: E402
from night import M1, M4, Clock, Night  # noqa: E402

from coordinator import history  # noqa: E402
from coordinator.core import Coordinator  # noqa: E402
from coordinator.dashboard import Dashboard, HistoryCache, SnapshotHolder  # noqa: E402
from coordinator.repo import init_repo  # noqa: E402
from coordinator.report import write_report  # noqa: E402
from coordinator.server import Server  # noqa: E402
from shared.client import Client  # noqa: E402


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def night_of(size: int, root: Path) -> tuple[Night, Path]:
    repo = root / f"night{size}"
    init_repo(repo, tag=f"bench{size}", preset="tiny", train_py=_FLEET_TRAIN_PY)
    clock = Clock()
    n = Night(Coordinator(repo, clock=clock), clock)
    for wid, hw in (("m1-a", M1), ("m1-b", M1), ("m4", M4)):
        n.hello(wid, hw)
    for i in range(size):
        # one in six fails, one in five is a real improvement, the rest are noise around 0
        effect = None if i % 6 == 5 else (-0.004 * (i + 1) if i % 5 == 0 else 0.01 * (i % 3))
        n.submit(_fleet_variant_text, f"variant {i}: change number {i}", effect)
    n.run_until_idle(limit=100 * size)
    return n, repo


def measure(size: int, root: Path) -> dict:
    t0 = time.perf_counter()
    n, repo = night_of(size, root)
    built = time.perf_counter() - t0
    core = n.core
    runs = core.ledger.scalar("SELECT COUNT(*) FROM attempts")
    status = timed(core.status, 20)
    holder = SnapshotHolder(interval=3600)
    holder.offer(core.status)
    offer = timed(lambda: holder.offer(core.status), 2000)
    cache = HistoryCache(repo, every=0)
    hist = timed(lambda: (setattr(cache, "_version", None), cache.get()), 5)
    dash = Dashboard(holder, repo).start()
    conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=30)

    def get():
        conn.request("GET", "/api/snapshot")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200
        return body

    size_snapshot = len(get())
    http_ms = timed(get, 20)
    conn.close()
    dash.stop()
    core.close()
    rep = timed(lambda: write_report(repo, root / f"report{size}"), 2)
    html = (root / f"report{size}" / "report.html").stat().st_size
    med = statistics.median
    return {"candidates": size, "runs": runs, "kept": len(n.kept), "failed": len(n.failed),
            "build_s": round(built, 1),
            "status_ms": round(1000 * med(status), 2),
            "offer_us": round(1e6 * med(offer), 3),
            "history_ms": round(1000 * med(hist), 1),
            "snapshot_http_ms": round(1000 * med(http_ms), 2),
            "snapshot_bytes": size_snapshot,
            "report_s": round(med(rep), 2), "report_bytes": html,
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def loop_rtt(repo: Path, dashboard: bool, seconds: float = 4.0,
             fetch_every: float = 0.0) -> dict:
    """Round trips of ``query log`` through the poll loop; optionally the dashboard on, its
    page fetched every ``fetch_every`` seconds (0: back to back)."""
    import threading

    core = Coordinator(repo)
    holder = SnapshotHolder() if dashboard else None
    server = Server(core, bind="tcp://127.0.0.1:*", snapshot=holder)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    dash = Dashboard(holder, repo).start() if dashboard else None
    stop, fetched = threading.Event(), [0]

    def hammer():
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=30)
        while not stop.is_set():
            conn.request("GET", "/api/snapshot")
            conn.getresponse().read()
            fetched[0] += 1
            if fetch_every:
                stop.wait(fetch_every)
        conn.close()

    h = threading.Thread(target=hammer, daemon=True) if dashboard else None
    if h:
        h.start()
    rtt = []
    t_start = time.perf_counter()
    with Client(server.endpoint, timeout=30, insecure=True) as c:
        while time.perf_counter() - t_start < seconds:   # long enough for several snapshots
            t0 = time.perf_counter()
            c.query("log", limit=1)
            rtt.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    stop.set()
    if h:
        h.join(10)
    if dash:
        dash.stop()
    server.stop()
    loop.join(10)
    server.close()
    core.close()
    rtt.sort()
    return {"dashboard": dashboard, "fetch_every_s": fetch_every if dashboard else None,
            "queries": len(rtt),
            "p50_ms": round(1000 * rtt[len(rtt) // 2], 2),
            "p95_ms": round(1000 * rtt[int(len(rtt) * 0.95)], 2),
            "p99_ms": round(1000 * rtt[int(len(rtt) * 0.99)], 2),
            "max_ms": round(1000 * rtt[-1], 2),
            "snapshots_published": holder.get()[0] if holder else 0,
            "page_fetches_per_s": round(fetched[0] / wall, 1) if dashboard else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 300])
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        for size in args.sizes:
            r = measure(size, Path(tmp))
            repo = Path(tmp) / f"night{size}"
            r["loop_rtt_ms"] = [loop_rtt(repo, False), loop_rtt(repo, True, fetch_every=0.25),
                                loop_rtt(repo, True)]
            print(json.dumps(r), flush=True)
            results.append(r)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"results": results, "cpus": os.cpu_count()},
                                                indent=2))


if __name__ == "__main__":
    main()
