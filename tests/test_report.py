"""The morning after: the read-only ledger, the night's data, the HTML report and its plot.

The read-only ledger is tested against a real coordinator holding its lock (in-process) and
a stopped one; the report against a simulated night (tests/night.py: a real Coordinator, real
ledger and git, fake clock) and against the ledger a real loopback fleet wrote (processes,
keys, the stand-in train.py) while that coordinator is still running, then after it stopped.
test_demo_mlx.py builds the report of a real-MLX night too.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import signal
import sqlite3
import subprocess
import sys

import pytest

from coordinator import history
from coordinator.core import Coordinator
from coordinator.ledger import LedgerError, ReadOnlyLedger, ledger_path
from coordinator.report import write_report
from night import M1, M4, research_repo, simulate
from test_fleet import fleet  # noqa: F401  (the fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, pre: str = "") -> subprocess.CompletedProcess:
    code = f"{pre}\nfrom coordinator.cli import main\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


def _ledger_file(repo):
    return ledger_path(repo / ".autoresearch")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- read-only ledger ------------------------------------------------------------------------

def test_readonly_ledger_beside_a_running_coordinator(fleet_repo, fleet_variant):
    core = Coordinator(fleet_repo)                  # holds coord.lock and writes the ledger
    try:
        ro = ReadOnlyLedger(_ledger_file(fleet_repo))
        assert ro.head()["candidate_id"] == 0
        sub = core.submit(fleet_variant(bpb=1.4), "lower")
        # WAL: the reader sees what the writer committed after the reader opened.
        assert ro.candidate(sub["candidate_id"])["state"] == "queued"
        with pytest.raises(LedgerError, match="read-only"):
            with ro.tx():
                pass
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only"):
            ro.db.execute("UPDATE candidates SET state = 'kept'")
        with ro.reading():                           # one consistent view ...
            before = ro.scalar("SELECT COUNT(*) FROM candidates")
            core.submit(fleet_variant(bpb=1.3), "lower still")
            assert ro.scalar("SELECT COUNT(*) FROM candidates") == before
        assert ro.scalar("SELECT COUNT(*) FROM candidates") == before + 1   # ... then the next
        ro.close()
    finally:
        core.close()


def test_readonly_ledger_takes_no_lock_and_never_writes(fleet_repo):
    path = _ledger_file(fleet_repo)
    ro = ReadOnlyLedger(path)                       # the coordinator is stopped
    try:
        assert ro.get_meta("tag") == "fleet"
        Coordinator(fleet_repo).close()             # a coordinator can start meanwhile
    finally:
        ro.close()
    digest = _sha(path)
    for _ in range(2):
        with history.read_run(fleet_repo) as L:
            history.night(L, fleet_repo)
    assert _sha(path) == digest


def test_readonly_ledger_refuses_clearly(tmp_path, fleet_repo):
    with pytest.raises(FileNotFoundError, match="no ledger"):
        ReadOnlyLedger(tmp_path / "nothing.sqlite3")
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot read the ledger"):
        ReadOnlyLedger(junk)
    for args in (["report", str(tmp_path)], ["status", "--dir", str(tmp_path)],
                 ["log", "--dir", str(tmp_path)], ["export", "-", "--dir", str(tmp_path)]):
        r = _cli(*args)
        assert r.returncode == 1 and "is not a research repo" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


# ---- the night as data -----------------------------------------------------------------------

@pytest.fixture
def rule_repo(tmp_path):
    return research_repo(tmp_path)


@pytest.fixture
def night_repo(rule_repo, fleet_variant):
    n = simulate(rule_repo, fleet_variant)
    n.core.close()
    return rule_repo, n


def test_history_of_a_simulated_night(night_repo):
    repo, n = night_repo
    assert len(n.kept) >= 3 and n.discarded and len(n.failed) == 2
    with history.read_run(repo) as L:
        night = history.night(L, repo)
        head_runs = {hw: [r[0] for r in L.all(
            "SELECT val_bpb FROM attempts WHERE candidate_id = ? AND hw_class = ? AND "
            "state = 'done' AND status = 'ok'", L.head()["candidate_id"], hw)] for hw in (M1, M4)}
        base_m1 = L.scalar("SELECT AVG(val_bpb) FROM attempts WHERE candidate_id = 0 AND "
                           "hw_class = ? AND state = 'done' AND status = 'ok'", M1)
    by_class = {s["hw_class"]: s for s in night["progress"]}
    assert set(by_class) == {M1, M4}
    m1 = by_class[M1]
    assert m1["baseline"] == pytest.approx(base_m1)
    # Every decided (not failed) candidate is a point on the class it was decided on.
    decided = {d["candidate_id"] for d in night["decisions"] if d["verdict"] != "failed"}
    assert {p["candidate_id"] for s in night["progress"] for p in s["points"]} == decided
    # The staircase never goes up at a keep, and ends at the head's number on the class.
    kept_steps = [v for v in m1["staircase"] if v["kind"] == "kept"]
    assert kept_steps and all(v["label"].startswith("#") for v in kept_steps)
    for hw, runs in head_runs.items():
        assert runs and by_class[hw]["staircase"][-1]["val_bpb"] == pytest.approx(
            sum(runs) / len(runs))
    # A keep on the other class moves the head under this one, and says so.
    assert any(v["kind"] == "elsewhere" and M4 in v["label"] for v in m1["staircase"])
    # Kept changes in order, with gain and the train.py diff against the keep's parent.
    assert [k["candidate_id"] for k in night["kept"]] == n.kept
    for k in night["kept"]:
        assert k["gain"] > 0 and k["diff"].startswith("diff --git a/train.py b/train.py")
        assert "+KNOB_" in k["diff"]   # the night's variants each set a knob (tests/night.py)
    assert set(night["failures"]) == {"nan", "crash"}
    assert "loss is nan" in night["failures"]["nan"][0]["reason"]
    act = night["activity"]
    assert {w["name"] for w in act["workers"]} == {"m1-a", "m1-b", "m4-a", "m4-b"}
    assert sum(w["runs"] for w in act["workers"]) == night["attempts"]
    assert all(u is None or 0 <= u <= 1 for u in act["utilisation"])


def test_stats_from_repeats_and_from_the_rule(rule_repo, fleet_variant):
    """Repeats give mean +- sem; statistics the decision rule stores on its row win."""
    n = simulate(rule_repo, fleet_variant)
    core = n.core
    # A rule that records its own numbers (issue 14): n, sigma, confidence columns and its
    # comparison as JSON details on the decision row (added here if this schema lacks them).
    have = {r[1] for r in core.ledger.all("PRAGMA table_info(decisions)")}
    with core.ledger.tx() as db:
        for col, kind in (("n_candidate", "INTEGER"), ("n_head", "INTEGER"), ("sigma", "REAL"),
                          ("confidence", "REAL"), ("details", "TEXT")):
            if col not in have:
                db.execute(f"ALTER TABLE decisions ADD COLUMN {col} {kind}")
        db.execute("UPDATE decisions SET confidence = 0.973, n_candidate = 3, n_head = 4, "
                   "sigma = 0.021, details = ? WHERE candidate_id = ?",
                   (json.dumps({"test": "paired", "candidate_mean": 1.4321,
                                "candidate_sem": 0.0042, "head_sem": 0.0038,
                                "difference": -0.0311, "se": 0.0051, "pairs": 3}),
                    n.kept[0]))
    core.close()
    with history.read_run(rule_repo) as L:
        kept = history.kept(L, rule_repo)
    first = next(k for k in kept if k["candidate_id"] == n.kept[0])
    assert first["confidence"] == pytest.approx(0.973) and first["sem"] == pytest.approx(0.0042)
    assert first["mean"] == pytest.approx(1.4321) and first["gain"] == pytest.approx(0.0311)
    assert first["gain_sem"] == pytest.approx(0.0051) and (first["n"], first["head_n"]) == (3, 4)
    others = [k for k in kept if k["candidate_id"] != n.kept[0]]
    assert all(k["gain"] > 0 for k in others)
    if "confidence" not in have:       # no rule statistics: computed ones, no confidence
        assert all(k["confidence"] is None for k in others)
    text = write_report(rule_repo, rule_repo.parent / "out").html_path.read_text()
    assert "+0.0311 ± 0.0051" in text and "97.3%" in text and "3 vs 4, paired" in text


# ---- the HTML report -------------------------------------------------------------------------

def _embedded_png(text: str) -> bytes:
    m = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert m, "no embedded PNG"
    return base64.b64decode(m.group(1))


def test_report_names_every_kept_candidate_and_embeds_the_plot(night_repo, tmp_path):
    repo, n = night_repo
    made = write_report(repo, tmp_path / "out")
    text = made.html_path.read_text(encoding="utf-8")
    png = _embedded_png(text)
    assert png.startswith(PNG_MAGIC) and made.png_path.read_bytes() == png
    assert "http://" not in text and "https://" not in text and "<script" not in text
    with history.read_run(repo) as L:
        for cid in n.kept:
            desc = L.candidate(cid)["description"]
            assert f"#{cid}" in text and html.escape(desc) in text
        for cid in n.failed:
            assert html.escape(L.candidate(cid)["description"]) in text
    assert "crash" in text and "loss is nan" in text and "train.py diff" in text
    assert M1 in text and M4 in text and "m1-b" in text
    assert made.kept == n.kept and set(made.classes) == {M1, M4}


def test_report_escapes_what_submitters_wrote(fleet_repo, fleet_variant, tmp_path):
    from night import Clock, Night

    clock = Clock()
    n = Night(Coordinator(fleet_repo, clock=clock), clock)
    n.hello("w", M1)
    n.submit(fleet_variant, "<img src=x onerror=alert(1)> & <b>bold</b>", -0.05)
    n.run_until_idle()
    n.core.close()
    text = write_report(fleet_repo, tmp_path).html_path.read_text()
    assert "<img src=x" not in text and "<b>bold</b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text


def test_report_without_matplotlib_still_writes_the_tables(night_repo, tmp_path):
    repo, n = night_repo
    out = tmp_path / "nomatplotlib"
    r = _cli("report", str(repo), "-o", str(out), pre="import sys; sys.modules['matplotlib'] = None")
    assert r.returncode == 0, r.stderr
    assert "pip install 'autoresearch-fleet[report]'" in r.stderr
    text = (out / "report.html").read_text()
    assert "No plot" in text and "autoresearch-fleet[report]" in text
    assert "data:image/png" not in text and not (out / "progress.png").exists()
    assert all(f"#{cid}" in text for cid in n.kept)
    r = _cli("report", str(repo), "-o", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["kept"] == n.kept
    assert (out / "progress.png").read_bytes().startswith(PNG_MAGIC)


def test_report_of_an_empty_run(fleet_repo, tmp_path):
    made = write_report(fleet_repo, tmp_path)
    text = made.html_path.read_text()
    assert "Nothing kept yet" in text and "No failures" in text
    assert _embedded_png(text).startswith(PNG_MAGIC)


# ---- from a real loopback fleet --------------------------------------------------------------

@pytest.mark.slow
def test_report_from_a_real_fleet_running_then_stopped(fleet, fleet_variant, tmp_path):
    from test_fleet import Proc, submit, wait_head_measured

    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    fleet.worker(ep, "w2")
    wait_head_measured(coord)
    better = submit(ep, fleet_variant(bpb=1.40), "lower bpb")
    worse = submit(ep, fleet_variant(bpb=1.60), "higher bpb")
    crash = submit(ep, fleet_variant(crash=True), "crashes")
    coord.wait_for(rf"KEEP #{better['candidate_id']}\b")
    coord.wait_for(rf"DISCARD #{worse['candidate_id']}\b")
    coord.wait_for(rf"FAIL #{crash['candidate_id']}\b")

    # While the coordinator runs (it holds coord.lock and keeps writing): read-only, no lock.
    out = tmp_path / "live"
    r = _cli("report", str(fleet.repo), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "1 kept" in r.stdout
    text = (out / "report.html").read_text()
    assert "lower bpb" in text and f"#{better['candidate_id']}" in text
    assert "stand-in crash" in text                       # the failure's reason, from its log
    assert _embedded_png(text).startswith(PNG_MAGIC)
    assert coord.p.poll() is None                         # undisturbed

    # status --watch: the same view, redrawn; Ctrl-C ends it cleanly.
    watch = Proc([sys.executable, "-m", "coordinator.cli", "status", "--watch", "--every", "0.2",
                  "--connect", ep], "watch")
    try:
        for _ in range(3):                                 # three frames: two complete
            watch.wait_for(r"^---- \d\d:\d\d:\d\d · every 0.2s", since=watch.mark())
        assert watch.count(r"head val_bpb per hardware class") >= 2
        assert watch.count(r"w1") >= 2
        watch.signal(signal.SIGINT)
        assert watch.wait() == 0 and "Traceback" not in watch.text
    finally:
        watch.stop()

    # status / log / export --dir: the ledger read directly, beside the running coordinator ...
    live = json.loads(_cli("status", "--json", "--connect", ep).stdout)
    live_tsv = _cli("export", "-", "--connect", ep).stdout
    side = _cli("status", "--json", "--dir", str(fleet.repo))
    assert side.returncode == 0 and json.loads(side.stdout)["heads"] == live["heads"]

    coord.stop()
    # ... and after it stopped: the same numbers, no server needed.
    off = json.loads(_cli("status", "--json", "--dir", str(fleet.repo)).stdout)
    assert off["offline"] is True and off["heads"] == live["heads"]
    assert off["counts"] == live["counts"] and off["head"] == live["head"]
    assert "server_key" not in off and "trusted" not in off
    text = _cli("status", "--dir", str(fleet.repo)).stdout
    assert "read from the ledger" in text and "head val_bpb per hardware class" in text
    assert _cli("export", "-", "--dir", str(fleet.repo)).stdout == live_tsv
    lg = json.loads(_cli("log", "--json", "-n", "50", "--dir", str(fleet.repo)).stdout)
    assert {d["candidate_id"] for d in lg["decisions"]} >= {
        better["candidate_id"], worse["candidate_id"], crash["candidate_id"]}
    r = _cli("status", "--dir", str(fleet.repo), "--connect", ep)
    assert r.returncode == 2 and "--dir reads the ledger itself" in r.stderr

    out2 = tmp_path / "offline"
    r = _cli("report", str(fleet.repo), "-o", str(out2), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kept"] == [better["candidate_id"]] and info["decided"] == 3
    assert "lower bpb" in (out2 / "report.html").read_text()


def test_report_lists_what_is_still_open(rule_repo, fleet_variant, tmp_path):
    """A report made mid-night: the candidate waiting for its repeats is 'still open', with
    its runs so far; the rule's noise per class is in the noise table."""
    from night import mid_repeat

    n = simulate(rule_repo, fleet_variant)
    promising, queued, _ = mid_repeat(n, fleet_variant)
    n.core.close()
    text = write_report(rule_repo, tmp_path).html_path.read_text()
    assert "Still open (1)" in text and "promising: half the warmup" in text
    with history.read_run(rule_repo) as L:
        noise = {x["hw_class"]: x for x in history.noise(L)}
    assert noise[M1]["dof"] >= 1 and noise[M1]["sigma"] > 0 and noise[M1]["rule_sigma"] > 0
    assert f"{noise[M1]['sigma']:.4f}" in text and "σ the rule uses" in text


def test_readonly_ledger_does_not_upgrade_an_older_schema(fleet_repo):
    """Upgrading is a write: a reader refuses an older ledger and says how to upgrade it."""
    import sqlite3 as sq

    path = _ledger_file(fleet_repo)
    db = sq.connect(path)
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    digest = _sha(path)
    with pytest.raises(LedgerError, match="start the coordinator once with this release"):
        ReadOnlyLedger(path)
    assert _sha(path) == digest
