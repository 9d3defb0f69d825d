"""The research repo: init/adopt with real git, fixed run settings, the coordinator lock."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from coordinator import repo as R
from coordinator.core import Coordinator
from coordinator.ledger import Ledger, ledger_path

BASE = "LR = 0.01\nprint('baseline', LR)\n"


def git(d, *args) -> str:
    return subprocess.run(["git", "-C", str(d), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(autouse=True)
def no_git_config(tmp_path, monkeypatch):
    """Run as on a machine with no git identity configured at all."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)


def test_init_fresh_directory(tmp_path):
    d = tmp_path / "run"
    cfg = R.init_repo(d, tag="nov25", preset="tiny", train_py=BASE, time_budget=7, margin=0.01)
    assert cfg.branch == "autoresearch/nov25" and cfg.preset == "tiny"
    assert cfg.settings["time_budget"] == 7 and cfg.settings["margin"] == 0.01
    assert set(cfg.settings) == set(R.SETTING_FIELDS)
    assert cfg.settings["timeout"] > 7
    assert git(d, "symbolic-ref", "HEAD") == "refs/heads/autoresearch/nov25"
    assert git(d, "rev-parse", "autoresearch/nov25") == cfg.baseline_commit
    assert git(d, "rev-parse", "refs/autoresearch/candidates/0") == cfg.baseline_commit
    assert (d / "train.py").read_text() == BASE
    assert set(git(d, "ls-tree", "--name-only", "HEAD").split()) == {
        ".gitignore", "program.md", "train.py"}
    ignore = (d / ".gitignore").read_text().splitlines()
    assert ".autoresearch/" in ignore and "results.tsv" in ignore
    program = (d / "program.md").read_text()
    for needle in ("autoresearch-coord submit", "train.py", "val_bpb", "autoresearch/nov25",
                   "harness", "7 seconds",
                   # the agent contract of `autoresearch-coord agents`: in, out, rules
                   "autoresearch-coord agents", "brief.md", "description.txt",
                   "$AUTORESEARCH_TRAIN_PY", "exit status 0", "do not train, submit or commit"):
        assert needle in program, needle
    assert git(d, "status", "--porcelain") == ""
    assert git(d, "log", "-1", "--format=%an <%ae>") == "autoresearch <autoresearch@localhost>"
    # settings are in run.json and in the ledger
    run = json.loads((d / ".autoresearch" / "run.json").read_text())
    assert run["settings"] == cfg.settings and run["tag"] == "nov25"
    led = Ledger(ledger_path(d / ".autoresearch"))
    try:
        assert led.get_meta("settings") == cfg.settings
        assert led.head()["commit_sha"] == cfg.baseline_commit
        assert led.candidate(0)["state"] == "kept"
    finally:
        led.close()
    assert R.load_run(d).to_dict() == cfg.to_dict()


def test_default_tag_is_a_date():
    tag = R.default_tag(0)
    assert tag[:3] in R._MONTHS and tag[3:].isdigit()


def test_reinit_same_settings_is_a_noop_and_different_is_refused(tmp_path):
    d = tmp_path / "run"
    cfg = R.init_repo(d, tag="t", preset="tiny", train_py=BASE)
    again = R.init_repo(d, preset="tiny", train_py=BASE)
    assert again.baseline_commit == cfg.baseline_commit
    with pytest.raises(R.RunMismatch, match=r"time_budget: 15 -> 99.*fixed"):
        R.init_repo(d, tag="t", preset="tiny", train_py=BASE, time_budget=99)
    with pytest.raises(ValueError, match="preset: 'tiny' -> 'seed'"):
        R.init_repo(d, tag="t", preset="seed", train_py=BASE)
    with pytest.raises(ValueError, match="tag: 't' -> 'other'"):
        R.init_repo(d, tag="other", preset="tiny", train_py=BASE)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown run setting"):
        R.init_repo(tmp_path / "a", tag="t", preset="tiny", train_py=BASE, budget=3)
    with pytest.raises(ValueError, match="seq_len=0"):
        R.init_repo(tmp_path / "b", tag="t", preset="tiny", train_py=BASE, seq_len=0)
    with pytest.raises(ValueError, match="unknown preset"):
        R.init_repo(tmp_path / "c", tag="t", preset="huge", train_py=BASE)
    with pytest.raises(ValueError, match="does not compile"):
        R.init_repo(tmp_path / "d", tag="t", preset="tiny", train_py="def (:\n")
    with pytest.raises(ValueError, match="must exceed the time budget"):
        R.init_repo(tmp_path / "e", tag="t", preset="tiny", train_py=BASE, timeout=5)


def test_presets_give_their_baseline(tmp_path):
    presets = pytest.importorskip("trainer.presets")
    for name in ("seed", "tiny"):
        cfg = R.init_repo(tmp_path / name, tag="p", preset=name)
        assert (tmp_path / name / "train.py").read_text() == presets.baseline_train_py(name)
        p = presets.PRESETS[name]
        assert cfg.settings["seq_len"] == p.seq_len and cfg.settings["seed"] == p.seed


def test_adopt_existing_repo(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    subprocess.run(["git", "init", "-q", str(d)], check=True)
    (d / "README.md").write_text("my notes\n")
    (d / ".gitignore").write_text("*.pyc\n")
    env = {**os.environ, **R.GIT_IDENTITY}
    subprocess.run(["git", "-C", str(d), "add", "README.md", ".gitignore"], check=True)
    subprocess.run(["git", "-C", str(d), "commit", "-qm", "mine"], check=True, env=env)
    before = git(d, "rev-parse", "HEAD")
    cfg = R.init_repo(d, tag="adopt", preset="tiny", train_py=BASE)
    assert git(d, "rev-parse", f"{cfg.baseline_commit}^") == before
    assert (d / "README.md").exists() and (d / "train.py").read_text() == BASE
    assert (d / ".gitignore").read_text().splitlines() == ["*.pyc", ".autoresearch/",
                                                            "results.tsv"]
    # The same tag again on a repo without run.json: the branch is taken.
    e = tmp_path / "dirty"
    e.mkdir()
    subprocess.run(["git", "init", "-q", str(e)], check=True)
    (e / "a.txt").write_text("1\n")
    subprocess.run(["git", "-C", str(e), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(e), "commit", "-qm", "a"], check=True, env=env)
    (e / "a.txt").write_text("2\n")
    with pytest.raises(ValueError, match="uncommitted changes"):
        R.init_repo(e, tag="x", preset="tiny", train_py=BASE)


def test_plumbing_commits_leave_the_worktree_alone(tmp_path):
    d = tmp_path / "run"
    cfg = R.init_repo(d, tag="t", preset="tiny", train_py=BASE)
    (d / "scratch.txt").write_text("untracked\n")
    tree = R.make_tree(d, cfg.baseline_commit, {"train.py": "LR = 0.02\n"})
    commit = R.commit_object(d, tree, [cfg.baseline_commit], "variant\n")
    assert R.read_blob(d, commit) == "LR = 0.02\n"
    assert R.read_blob(d, commit, "program.md") == (d / "program.md").read_text()
    assert (d / "train.py").read_text() == BASE
    assert git(d, "status", "--porcelain") == "?? scratch.txt"
    # update_ref with an expected old value refuses to clobber.
    R.update_ref(d, "refs/autoresearch/test", commit, R.ZERO)
    with pytest.raises(R.GitError):
        R.update_ref(d, "refs/autoresearch/test", cfg.baseline_commit, R.ZERO)


def test_second_coordinator_and_init_are_refused_while_one_runs(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE)
    first = Coordinator(d)
    try:
        with pytest.raises(R.CoordinatorBusy, match=r"another coordinator is running on .*"
                                                    r"lock \.autoresearch/coord\.lock held"):
            Coordinator(d)
    finally:
        first.close()
    Coordinator(d).close()  # released on close


def test_coordinator_on_a_plain_directory_says_init(tmp_path):
    with pytest.raises(FileNotFoundError, match="autoresearch-coord init"):
        Coordinator(tmp_path)
