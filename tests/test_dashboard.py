"""The live dashboard: addresses, the snapshot holder, what it refuses to show, and the page
itself in a real headless Chromium (Debian's ``chromium``; CI installs it).

The page's data comes from a real Coordinator (real ledger and git) driven in-process through a
simulated night (tests/night.py) with one worker mid-run; the HTTP side is the real server on a
loopback port. The screenshot lands in benchmarks/results/dashboard.png.
"""
from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from coordinator.dashboard import (Dashboard, DashboardError, SnapshotHolder, parse_address,
                                   public_status)
from night import M1, mid_repeat, research_repo, simulate
from test_fleet import fleet  # noqa: F401  (the fixture)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECRET_BITS = ("server_key", "trusted", "fingerprint", "inv-", "secret")


def _get(dash: Dashboard, path: str, host: str | None = None,
         method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(dash.host, dash.port, timeout=10)
    try:
        headers = {"Host": host} if host else {}
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_addresses():
    assert parse_address("8080") == ("127.0.0.1", 8080, False)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080, True)
    assert parse_address("[::1]:9000") == ("::1", 9000, True)
    assert parse_address("localhost:0") == ("localhost", 0, True)
    for bad in ("", "host", "host:", ":80", "80000", "1.2.3.4:99999", "a:b:c"):
        with pytest.raises(DashboardError):
            parse_address(bad)


def test_non_loopback_refused_unless_explicit(fleet_repo):
    holder = SnapshotHolder()
    with pytest.raises(DashboardError, match="explicitly"):
        Dashboard(holder, fleet_repo, "0.0.0.0", 0)
    with pytest.raises(DashboardError, match="explicitly"):
        Dashboard(holder, fleet_repo, "example.org", 0)
    dash = Dashboard(holder, fleet_repo, "0.0.0.0", 0, public=True).start()
    try:
        assert dash.port > 0
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
        conn.request("GET", "/", headers={"Host": "lab-mac.local:8080"})
        assert conn.getresponse().status == 200      # public on purpose: any Host is fine
        conn.close()
    finally:
        dash.stop()


def test_snapshot_holder_publishes_at_most_every_interval():
    t = [100.0]
    holder = SnapshotHolder(interval=1.0, clock=lambda: t[0])
    calls = []

    def status():
        calls.append(t[0])
        return {"n": len(calls)}

    assert holder.offer(status) and holder.get()[:2] == (1, {"n": 1})
    for dt in (0.1, 0.5, 0.99):
        t[0] = 100.0 + dt
        assert not holder.offer(status)
    t[0] = 101.0
    assert holder.offer(status)
    assert calls == [100.0, 101.0] and holder.get()[0] == 2


def test_never_shows_keys_or_secrets(fleet_repo):
    status = {
        "branch": "autoresearch/x", "head": "a" * 40, "head_candidate": 0,
        "server_key": "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
        "trusted": [{"name": "alice", "role": "admin", "fingerprint": "SHA256:deadbeef"}],
        "workers": [{"name": "m1", "hw_class": M1, "state": "idle", "worker_id": "w-123",
                     "key": "secret-key-text", "profile": {"serial": "C02XYZ"}}],
        "heads": [{"hw_class": M1, "val_bpb": 1.5, "commit": "a" * 40}],
        "invite": "inv-0123456789", "counts": {"kept": 1}, "settings": {"time_budget": 300},
    }
    shown = json.dumps(public_status(status))
    for bit in SECRET_BITS + ("w-123", "C02XYZ", "rq:rM"):
        assert bit not in shown, bit
    assert "m1" in shown and "1.5" in shown
    holder = SnapshotHolder()
    holder.publish(status)
    dash = Dashboard(holder, fleet_repo).start()
    try:
        code, body = _get(dash, "/api/snapshot")
        assert code == 200
        for bit in SECRET_BITS + ("rq:rM",):
            assert bit.encode() not in body, bit
        assert json.loads(body)["status"]["workers"][0]["name"] == "m1"
    finally:
        dash.stop()


def test_read_only_and_loopback_host_only(fleet_repo):
    dash = Dashboard(SnapshotHolder(), fleet_repo).start()
    try:
        assert _get(dash, "/")[0] == 200
        assert _get(dash, "/", host=f"localhost:{dash.port}")[0] == 200
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not read it.
        assert _get(dash, "/api/snapshot", host="evil.example:80")[0] == 421
        assert _get(dash, "/api/snapshot", method="POST")[0] == 405
        assert _get(dash, "/api/snapshot", method="DELETE")[0] == 405
        assert _get(dash, "/etc/passwd")[0] == 404
        assert _get(dash, "/../../coordinator/cli.py")[0] == 404
        assert _get(dash, "/api/diff/1")[0] == 404           # nothing kept yet
        body = json.loads(_get(dash, "/api/snapshot")[1])
        assert body["status"] is None and body["seq"] == 0   # nothing published yet
    finally:
        dash.stop()


@pytest.fixture
def rule_repo(tmp_path):
    return research_repo(tmp_path)


@pytest.fixture
def live_night(rule_repo, fleet_variant):
    """A simulated night, then: a promising candidate screened, its repeat running on m1-b
    mid-way, one more candidate queued; the dashboard serving it."""
    n = simulate(rule_repo, fleet_variant)
    promising, queued, _ = mid_repeat(n, fleet_variant)
    holder = SnapshotHolder()
    holder.publish(n.core.status())
    dash = Dashboard(holder, rule_repo).start()
    yield n, dash, holder, promising
    dash.stop()
    n.core.close()


def test_snapshot_and_diffs(live_night):
    n, dash, _, promising = live_night
    snap = json.loads(_get(dash, "/api/snapshot")[1])
    w = next(w for w in snap["status"]["workers"] if w["name"] == "m1-b")
    assert w["state"] == "running" and w["progress"]["step"] == 123
    assert w["candidate_id"] == promising
    waiting = {c["candidate_id"]: c for c in snap["status"]["in_progress"]}
    assert waiting[promising]["runs"] == 1 and waiting[promising]["runs_wanted"] >= 2
    hist = snap["history"]
    pending = [p for s in hist["progress"] for p in s["pending"]]
    assert [p["candidate_id"] for p in pending] == [promising]
    assert [k["candidate_id"] for k in hist["kept"]] == n.kept
    assert all("diff" not in k for k in hist["kept"])       # diffs come one by one
    code, diff = _get(dash, f"/api/diff/{n.kept[0]}")
    assert code == 200 and diff.startswith(b"diff --git a/train.py b/train.py")
    assert _get(dash, f"/api/diff/{n.discarded[0]}")[0] == 404
    heads = snap["status"]["heads"]
    assert all(h["sigma"] > 0 and h["sem"] > 0 for h in heads)   # the rule's noise, shown


def _chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--virtual-time-budget=5000", *args, url],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                                              "chromium; CI installs it)")
def test_page_in_headless_chromium_shows_live_progress_and_the_head(live_night):
    n, dash, holder, promising = live_night
    r = _chromium(dash.url, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert 'data-seq="1"' in dom                             # the script ran and rendered
    assert "m1-b" in dom and f"candidate #{promising}" in dom
    assert "step 123" in dom and "42%" in dom and "12,345 tok/s" in dom and "left" in dom
    head_m1 = next(h for h in holder.get()[1]["heads"] if h["hw_class"] == M1)
    assert f"{head_m1['val_bpb']:.4f}" in dom and f"± {head_m1['sem']:.4f}" in dom
    assert "promising: half the warmup" in dom and "1 of " in dom   # awaiting its repeats
    assert "smaller batch, more steps" in dom                # the queue
    assert "GQA with 2 kv heads" in dom                      # a kept change
    assert dom.count("<svg") == 2                            # one plot per class
    RESULTS.mkdir(parents=True, exist_ok=True)
    shot = RESULTS / "dashboard.png"
    r = _chromium(dash.url, f"--screenshot={shot}", "--window-size=1280,2000")
    assert r.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG")


# ---- start --dashboard: the page of a real loopback fleet ------------------------------------

def _wait_snapshot(url: str, ok, what: str) -> dict:
    import time
    import urllib.request

    end = time.monotonic() + 60
    snap: dict = {}
    while time.monotonic() < end:
        with urllib.request.urlopen(url + "api/snapshot", timeout=10) as r:
            snap = json.loads(r.read())
        if ok(snap):
            return snap
        time.sleep(0.2)
    raise AssertionError(f"dashboard never showed {what}: {snap}")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                                              "chromium; CI installs it)")
def test_start_dashboard_shows_a_real_fleet_in_chromium(fleet, fleet_variant):
    from test_fleet import submit, wait_head_measured

    coord = fleet.coord("tcp://127.0.0.1:0", "--dashboard", "0")
    ep = coord.wait_for(r"listening on (tcp://\S+)").group(1)
    url = coord.wait_for(r"dashboard (http://127\.0\.0\.1:\d+/) \(read-only").group(1)
    coord.wait_for(r"watch with:")
    fleet.worker(ep, "w1")
    wait_head_measured(coord)
    # A slow variant: its progress lines arrive every 6 s for 30 s, so the page sees it live.
    slow = submit(ep, fleet_variant(bpb=1.45, sleep=30.0), "a slow but steady change")

    def running(snap):
        st = snap.get("status") or {}
        return any(w.get("candidate_id") == slow["candidate_id"] and
                   (w.get("progress") or {}).get("step") is not None
                   for w in st.get("workers", []))

    snap = _wait_snapshot(url, running, "w1 running with progress")
    head = next(h for h in snap["status"]["heads"] if h["val_bpb"] is not None)
    assert head["val_bpb"] == pytest.approx(1.5)
    assert b"server_key" not in json.dumps(snap).encode() and "trusted" not in snap["status"]

    r = _chromium(url, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert "w1" in dom and f"candidate #{slow['candidate_id']}" in dom
    assert "step " in dom and "tok/s" in dom and "left" in dom     # the live progress bar
    assert "1.5000" in dom                                           # the head's val_bpb
    RESULTS.mkdir(parents=True, exist_ok=True)
    shot = RESULTS / "dashboard_fleet.png"
    r = _chromium(url, f"--screenshot={shot}", "--window-size=1280,1100")
    assert r.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG")
    assert coord.p.poll() is None


def test_start_refuses_a_bad_or_taken_dashboard_address(fleet_repo, prepared_sample, monkeypatch):
    import socket
    import sys

    monkeypatch.setenv("AUTORESEARCH_DATA", str(prepared_sample))

    def start(*args):
        return subprocess.run([sys.executable, "-m", "coordinator.cli", "start", str(fleet_repo),
                               "--bind", "tcp://127.0.0.1:0", *args], capture_output=True,
                              text=True, timeout=60)

    r = start("--dashboard", "everywhere")
    assert r.returncode == 2 and "expected PORT or HOST:PORT" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = start("--dashboard", str(taken.getsockname()[1]))
    assert r.returncode == 1 and "cannot serve the dashboard on 127.0.0.1" in r.stderr
    assert "listening on" not in r.stdout
    # the coordinator's lock was released: a later start is not refused as busy
    from coordinator.core import Coordinator
    Coordinator(fleet_repo).close()


def test_the_poll_loop_publishes_the_status_into_the_holder(fleet_repo):
    """Server(snapshot=holder): each loop turn offers the holder the status (whatever status
    answers, secrets included -- the page filters); nothing else touches the holder."""
    import time

    from serving import served

    holder = SnapshotHolder(interval=0.05)
    with served(fleet_repo, snapshot=holder) as (core, server):
        end = time.monotonic() + 30
        while holder.get()[0] < 3 and time.monotonic() < end:
            time.sleep(0.02)
        seq, data, _ = holder.get()
        assert seq >= 3, "the loop did not keep publishing"
        assert data["branch"] == core.branch and data["security"] == "insecure"
        assert public_status(data)["branch"] == core.branch
