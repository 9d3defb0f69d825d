"""The research repo: an ordinary git repo a person can clone, driven only through the git CLI.

Layout of ``DIR``:

    train.py        the one file research edits (the head's version, on branch autoresearch/<tag>)
    program.md      instructions for agents
    .gitignore      ignores .autoresearch/ and results.tsv
    results.tsv     exported after every decision (upstream-compatible, not committed)
    .autoresearch/  run.json (the fixed run settings), ledger.sqlite3, coord.lock

Refs:

    refs/heads/autoresearch/<tag>        advances only through keeps
    refs/autoresearch/candidates/<id>    every candidate ever submitted (parent: its base head)
    refs/autoresearch/rebased/<id>/<sha> a candidate's change rebased onto a later head (parent:
                                         that head), one per text it ran
    refs/autoresearch/displaced/<n>      a branch tip that disagreed with the ledger (kept, not lost)

Commits are built with plumbing (hash-object, a private GIT_INDEX_FILE, write-tree, commit-tree,
update-ref with the expected old value), so the working tree is never needed to decide. The
coordinator owns ``DIR``'s working tree: after the branch moves it resets the index and
``train.py`` to the branch (best-effort; failures are reported, never fatal). Edit a clone, not
``DIR``.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from coordinator.identity import program_sha, text_sha
from coordinator.ledger import Ledger, ledger_path
from coordinator.brief import agent_contract_md
from coordinator.noise import DEFAULT_PRIOR_SIGMA
from coordinator.rule import DEFAULTS as RULE_DEFAULTS
from coordinator.rule import check_settings as check_rule_settings
from shared.trainer_contract import RUN_FIELDS
from trainer.presets import baseline_train_py, get_preset

STATE_DIR = ".autoresearch"
RUN_FILE = "run.json"
LOCK_FILE = "coord.lock"
CANDIDATE_REFS = "refs/autoresearch/candidates/"
DISPLACED_REFS = "refs/autoresearch/displaced/"
REBASED_REFS = "refs/autoresearch/rebased/"
ZERO = "0" * 40

# Research-run settings that reach the harness through the environment (the trainer boundary's
# RUN_FIELDS), and the coordinator's own per-run settings. All fixed when the run is initialised.
# How decisions are made (coordinator.rule, coordinator.noise, coordinator.scheduling), with
# their defaults. A run made before these existed reads the defaults but its policy is greedy
# (what it was decided with), see decision_settings().
DECISION_DEFAULTS: dict[str, Any] = {
    "policy": RULE_DEFAULTS["policy"],          # sequential | greedy
    "confidence": RULE_DEFAULTS["confidence"],  # one-sided, needed to keep
    "max_repeats": RULE_DEFAULTS["max_repeats"],  # runs of a candidate per class, at most
    "screen": RULE_DEFAULTS["screen"],          # σ the first run must beat the head by
    "head_runs": 3,                             # head runs on a class before deciding there
    "remeasure_every": 10,                      # decisions on a class between head re-runs (0: no)
    "remeasure_seconds": 3600.0,                # wall-clock seconds between head re-runs (0: no)
    "noise_prior": DEFAULT_PRIOR_SIGMA,         # σ used until a class's pool has enough df
}
SETTING_FIELDS = RUN_FIELDS + ("timeout", "margin") + tuple(DECISION_DEFAULTS)
# The rule before repeats existed: the head measured once per class, never re-measured, a
# candidate kept on one run below it. What a schema-1 run decides with; tests of the ledger's
# mechanics (leases, keeps, crashes) use it so one result is one decision.
SINGLE_RUN: dict[str, Any] = {"policy": "greedy", "head_runs": 1, "remeasure_every": 0,
                              "remeasure_seconds": 0.0}

# An identity that works on machines with no git config at all.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
    "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost",
}
# Per-invocation config that must not come from the user's: no signing prompts, no hooks.
GIT_CONFIG = ["-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null",
              "-c", "init.defaultBranch=main"]

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


class GitError(RuntimeError):
    pass


class CoordinatorBusy(RuntimeError):
    """Another coordinator (or init) holds DIR/.autoresearch/coord.lock."""


class RunMismatch(ValueError):
    """init was asked to change the settings of an existing run."""


# ---- git ---------------------------------------------------------------------------------------

def _git_run(repo: Path, args: tuple[str, ...] | list[str], input: str | None = None,
             env: dict | None = None) -> subprocess.CompletedProcess:
    # Drop git variables inherited from a hook or a parent git: they would redirect us.
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    full_env.update(GIT_IDENTITY)
    full_env.update(env or {})
    # Bytes, not text mode: text mode would translate \r\n in a train.py we read back.
    return subprocess.run(["git", *GIT_CONFIG, "-C", str(repo), *args],
                          input=None if input is None else input.encode("utf-8", "surrogatepass"),
                          capture_output=True, env=full_env)


def git(repo: Path, *args: str, input: str | None = None, env: dict | None = None,
        check: bool = True, raw: bool = False) -> str:
    """Run git in ``repo``; return stdout (without the trailing newline unless ``raw``);
    GitError on failure."""
    proc = _git_run(repo, args, input, env)
    out = proc.stdout.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip() or out.strip()
        raise GitError(f"git {' '.join(args)} failed in {repo}: {err}")
    return out if raw else out.rstrip("\n")


def merge_file(repo: Path, ours: str, base: str, theirs: str,
               labels: tuple[str, str, str] = ("ours", "base", "theirs")) -> tuple[str, int]:
    """``git merge-file``: replay the change base -> theirs onto ours. Returns (the merged
    text, the number of conflicts); conflicting hunks carry git's diff3 markers, labelled
    ``labels``. GitError if git itself fails."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-merge-") as tmp:
        paths = []
        for name, text in zip(("ours", "base", "theirs"), (ours, base, theirs)):
            path = Path(tmp) / name
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
            paths.append(str(path))
        args = ["merge-file", "-p", "--diff3"]
        for label in labels:
            args += ["-L", " ".join(str(label).split())]
        proc = _git_run(repo, args + paths)
    if not 0 <= proc.returncode < 128:   # >= 0: the conflict count (capped at 127)
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise GitError(f"git merge-file failed in {repo} (exit {proc.returncode}): {err}")
    return proc.stdout.decode("utf-8", "surrogatepass"), proc.returncode


def rev_parse(repo: Path, ref: str) -> str | None:
    """Full sha of ``ref`` (a commit), or None if it does not exist."""
    out = git(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
    return out or None


def commit_tree_of(repo: Path, commit: str) -> str:
    return git(repo, "rev-parse", f"{commit}^{{tree}}")


def read_blob(repo: Path, commit: str, path: str = "train.py") -> str:
    return git(repo, "cat-file", "blob", f"{commit}:{path}", raw=True)


def make_tree(repo: Path, base_commit: str, files: dict[str, str]) -> str:
    """Tree of ``base_commit`` with ``files`` (path -> text) replaced; no working tree used."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "read-tree", commit_tree_of(repo, base_commit), env=env)
        for path, text in files.items():
            blob = git(repo, "hash-object", "-w", "--stdin", input=text)
            git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        return git(repo, "write-tree", env=env)


def commit_object(repo: Path, tree: str, parents: list[str], message: str) -> str:
    """Write a commit object (unreferenced until a ref points at it: harmless if we die)."""
    args = ["commit-tree", tree]
    for p in parents:
        args += ["-p", p]
    return git(repo, *args, input=message)


def update_ref(repo: Path, ref: str, new: str, old: str | None = None, reason: str = "") -> None:
    """Point ``ref`` at ``new``; with ``old`` (ZERO = must not exist) only if it still is ``old``."""
    args = ["update-ref", "-m", reason or "autoresearch", ref, new]
    if old is not None:
        args.append(old)
    git(repo, *args)


def candidate_ref(cid: int) -> str:
    return f"{CANDIDATE_REFS}{cid}"


def rebased_ref(cid: int, commit: str) -> str:
    """Keeps a rebased text of candidate ``cid`` (a commit on a later head) reachable."""
    return f"{REBASED_REFS}{cid}/{commit}"


def list_refs(repo: Path, prefix: str) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    refs = {}
    for line in out.splitlines():
        name, _, sha = line.partition(" ")
        refs[name] = sha
    return refs


def is_ancestor(repo: Path, a: str, b: str) -> bool:
    proc = subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", a, b],
                          capture_output=True, env={**os.environ, **GIT_IDENTITY})
    return proc.returncode == 0


def clear_stale_ref_locks(repo: Path, branch: str) -> list[str]:
    """Remove lock files a killed git left on the refs only the coordinator writes.

    Called under coord.lock, so no other coordinator can be mid-update on these refs; without
    this a ``kill -9`` during ``update-ref`` would block every later update of that ref.
    """
    gitdir = Path(git(repo, "rev-parse", "--absolute-git-dir"))
    found = [gitdir / "refs" / "heads" / f"{branch}.lock"]
    # update-ref of the checked-out branch also locks HEAD (its reflog), sync_worktree locks the
    # index, and ref deletions lock packed-refs: a kill -9 at those instants leaves these too.
    # DIR belongs to the coordinator (see module docstring), so at start they can only be stale.
    found += [gitdir / "HEAD.lock", gitdir / "index.lock", gitdir / "packed-refs.lock"]
    ours = gitdir / "refs" / "autoresearch"
    if ours.is_dir():
        found += sorted(ours.rglob("*.lock"))
    removed = []
    for path in found:
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(f"removed stale git lock {path.relative_to(gitdir)}")
    return removed


def sync_worktree(repo: Path, branch: str) -> str | None:
    """Make DIR's index and tracked files match the branch if DIR has it checked out.

    Best-effort: returns a one-line problem, or None. The coordinator owns DIR (see module doc),
    so local edits to tracked files there are overwritten.
    """
    try:
        current = git(repo, "symbolic-ref", "-q", "HEAD", check=False)
        if current != f"refs/heads/{branch}":
            return None  # someone checked out something else: leave their tree alone
        git(repo, "read-tree", "--reset", "-u", "HEAD")
        return None
    except (GitError, OSError) as exc:
        return f"could not sync the working tree of {repo} to {branch}: {exc}"


# ---- run settings ------------------------------------------------------------------------------

def default_tag(now: float | None = None) -> str:
    """A date tag like ``nov25`` (locale-independent)."""
    t = time.localtime(now)
    return f"{_MONTHS[t.tm_mon - 1]}{t.tm_mday}"


def preset_settings(preset: str) -> dict[str, Any]:
    """The preset's run settings and hard timeout (trainer.presets), margin 0.0."""
    p = get_preset(preset)  # ValueError naming the presets
    out = p.settings()
    out["timeout"] = float(p.timeout or p.time_budget * 3 + 300)
    out["margin"] = 0.0
    out.update(DECISION_DEFAULTS)
    return out


def decision_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's decision settings, defaults filled in; a run stored before they existed (no
    ``policy`` key) was decided on single runs and stays so (SINGLE_RUN)."""
    out = dict(DECISION_DEFAULTS, margin=settings.get("margin", 0.0))
    if "policy" not in settings:
        out.update(SINGLE_RUN)
    out.update({k: settings[k] for k in DECISION_DEFAULTS if k in settings})
    return out


def resolve_settings(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Preset settings with ``overrides`` applied and checked; ValueError on bad input."""
    base = preset_settings(preset)
    settings = dict(base)
    unknown = sorted(set(overrides) - set(SETTING_FIELDS))
    if unknown:
        raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(SETTING_FIELDS)}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in RUN_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key}={value!r}: expected an integer")
            if value < (0 if key == "seed" else 1):
                raise ValueError(f"{key}={value}: must be {'>= 0' if key == 'seed' else '> 0'}")
        elif key in DECISION_DEFAULTS:
            value = _decision_value(key, value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r}: expected a number")
            value = float(value)
            if key == "timeout" and value <= 0:
                raise ValueError(f"timeout={value}: must be > 0")
            if key == "margin" and value < 0:
                raise ValueError(f"margin={value}: must be >= 0")
        settings[key] = value
    # A longer budget without an explicit timeout keeps the preset's allowance for startup+eval.
    if overrides.get("time_budget") is not None and overrides.get("timeout") is None:
        settings["timeout"] = float(base["timeout"]) + settings["time_budget"] - base["time_budget"]
    settings["timeout"] = float(settings["timeout"])
    problem = check_rule_settings(settings)
    if problem:
        raise ValueError(problem)
    if settings["timeout"] <= settings["time_budget"]:
        raise ValueError(f"timeout={settings['timeout']:g}s must exceed the time budget "
                         f"({settings['time_budget']}s) to leave room for startup and eval")
    return settings


def _decision_value(key: str, value: Any) -> Any:
    """One decision setting, type-checked (ranges of the rule's own are checked by it)."""
    default = DECISION_DEFAULTS[key]
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r}: expected a word")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r}: expected a number")
    if isinstance(default, int):
        if value != int(value):
            raise ValueError(f"{key}={value!r}: expected an integer")
        value = int(value)
        if key == "head_runs" and value < 1:
            raise ValueError(f"head_runs={value}: must be >= 1")
        if key == "remeasure_every" and value < 0:
            raise ValueError(f"remeasure_every={value}: must be >= 0 (0: never)")
        return value
    value = float(value)
    if key == "noise_prior" and not value > 0:
        raise ValueError(f"noise_prior={value}: must be > 0")
    if key == "remeasure_seconds" and value < 0:
        raise ValueError(f"remeasure_seconds={value}: must be >= 0 (0: never)")
    return value


@dataclass
class RunConfig:
    """What ``init_repo`` made (or found): fixed for the life of the run."""
    repo_dir: Path
    tag: str
    branch: str
    preset: str
    settings: dict[str, Any]
    baseline_commit: str
    created_at: float
    schema: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_settings(self) -> dict[str, Any]:
        """Only what the harness reads from the environment (AUTORESEARCH_*)."""
        return {k: self.settings[k] for k in RUN_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["repo_dir"] = str(self.repo_dir)
        return d

    @classmethod
    def from_dict(cls, d: dict, repo_dir: Path) -> "RunConfig":
        return cls(repo_dir=Path(repo_dir), tag=d["tag"], branch=d["branch"], preset=d["preset"],
                   settings=dict(d["settings"]), baseline_commit=d["baseline_commit"],
                   created_at=float(d["created_at"]), schema=int(d.get("schema", 1)),
                   extra=dict(d.get("extra", {})))


def state_dir(repo_dir: Path) -> Path:
    return Path(repo_dir) / STATE_DIR


def load_run(repo_dir: Path) -> RunConfig:
    path = state_dir(repo_dir) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{repo_dir} is not a research repo (no {STATE_DIR}/{RUN_FILE}): "
                                f"run `autoresearch-coord init {repo_dir}` first")
    return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), Path(repo_dir))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_results_tsv(repo_dir: Path, text: str) -> None:
    _write_atomic(Path(repo_dir) / "results.tsv", text)


def acquire_lock(repo_dir: Path, what: str = "another coordinator") -> FileLock:
    """Take DIR/.autoresearch/coord.lock without waiting; CoordinatorBusy if someone has it."""
    sd = state_dir(repo_dir)
    sd.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(sd / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CoordinatorBusy(f"another coordinator is running on {repo_dir} "
                              f"(lock {STATE_DIR}/{LOCK_FILE} held); stop it first") from None
    return lock


# ---- init --------------------------------------------------------------------------------------

GITIGNORE_LINES = (f"{STATE_DIR}/", "results.tsv")


def program_md(tag: str, branch: str, settings: dict[str, Any]) -> str:
    return f"""# autoresearch run `{tag}`

You are one of several researchers (agents or people) improving a small language model's
training script. A fleet of machines trains every variant you submit for a fixed time budget
and keeps it only if it beats the current best. This file tells you how to take part.

## The loop

1. Get the current best: `git fetch` and read `train.py` on branch `{branch}` (the branch only
   ever moves forward through kept variants; each commit message says by how much and where).
2. Change `train.py` with one idea: architecture, optimiser, learning rates, schedule,
   batch size, initialisation, anything inside that file.
3. Submit it: `autoresearch-coord submit train.py -m "what you changed, in one line"`.
4. Watch: `autoresearch-coord status`, `autoresearch-coord log`. A worker trains the variant for
   exactly {settings['time_budget']} seconds of training (startup and compilation excluded),
   then evaluates it.
5. Kept: the branch advances to your file; build on it. Discarded or failed: read the reason
   and the log tail (`autoresearch-coord log`), learn from it, try the next idea.

## The one file you edit

Only `train.py`. It imports the fixed harness (`trainer.harness`: data loading, the time budget,
evaluation, result reporting) and MLX. Do not edit, monkeypatch or work around the harness, the
evaluation, the data, the tokenizer or the time budget, and do not read the validation data in
training: such a result measures the change to the rules, not the idea, and is worthless.
No new dependencies; no network; no files outside the run directory.

## The metric

`val_bpb`: bits per byte on the fixed validation set, lower is better. It is independent of the
tokenizer's vocabulary size, so changing model width or depth is a fair comparison. Numbers
are only compared within one hardware class (the same kind of machine): an M1's and an M4's are
never mixed. One run is noisy (a few hundredths between re-runs), so prefer ideas with clear
effects over tuning the last digit.

{decision_rule_md(settings)}

Fixed for this run: sequence length {settings['seq_len']}, {settings['eval_tokens']} validation
tokens, seed {settings['seed']}, time budget {settings['time_budget']} s, hard timeout
{settings['timeout']:g} s per run (then it counts as failed).

## Rules

- Submit whole `train.py` files that compile; the same program (comments and formatting do not
  count) is answered with its earlier result instead of being trained again.
- Your change is what counts, not your copy of the file: a variant written against an older
  best is rebased onto the current best (git's three-way merge of your edit) before it runs,
  and a keep is always measured on top of the best it lands on. If your edit touches the same
  lines as a variant kept meanwhile it ends `stale`, with the lines that conflict: resubmit it on
  top of the current best. If the best already holds your idea it ends `stale` as already there.
- Variants that crash, produce nan, run out of memory or time out are recorded as failed with
  their log tail. Keep memory use sensible: the machines are laptops and desktops.
- Simpler is better: a tiny gain that adds a lot of complexity is not worth keeping; a change
  that deletes code and holds the number is a win.
- Do not commit to `{branch}` yourself: only the coordinator moves it.

{agent_contract_md()}
"""


def decision_rule_md(settings: dict[str, Any]) -> str:
    """How this run decides, in a few lines for program.md (the numbers are the run's)."""
    d = decision_settings(settings)
    if d["policy"] == "greedy":
        return (f"How a variant is decided (policy greedy): its first run on a class is compared "
                f"with the mean of the best's runs there; it is kept when lower by more than "
                f"{d['margin']:g}.")
    clock = (f" and every {d['remeasure_seconds']:g} s" if d["remeasure_seconds"] else "")
    every = (f"every {d['remeasure_every']} decisions{clock}" if d["remeasure_every"] else
             (f"every {d['remeasure_seconds']:g} s" if clock else "never"))
    return f"""How a variant is decided (policy sequential, per hardware class):
- The best is run {d['head_runs']} times on a class (seeds {settings.get('seed', 42)}, \
{settings.get('seed', 42) + 1}, ...) before anything is decided
  there, and re-run {every}.
- Your variant's first run is a screen: unless it beats the best's mean by
  {d['screen']:g} σ (σ: the class's run-to-run noise, measured from repeats), it is discarded.
- Otherwise it is repeated (same seeds as the best's runs, in parallel where machines are
  free, at most {d['max_repeats']} runs) and kept only when a one-sided test gives
  {100 * d['confidence']:g}% confidence that it is better than the best by more than \
{d['margin']:g}.
  It is discarded at {d['max_repeats']} runs, or as soon as that confidence is out of reach.
- The best's number is the mean of its runs, shown as mean ± sem (n)."""


def init_repo(dir: Path, tag: str | None = None, preset: str = "seed",
              train_py: str | None = None, **overrides: Any) -> RunConfig:
    """Create (or adopt) the research repo in ``dir``; return the run's RunConfig.

    Idempotent for the same settings; refuses (RunMismatch, a ValueError) to change the settings
    of an existing run. ``train_py`` overrides the preset's baseline text (tests, custom runs).
    """
    repo = Path(dir).expanduser().resolve()
    settings = resolve_settings(preset, overrides)
    if tag is not None:
        tag = tag.strip()
        if not tag or git(Path.cwd(), "check-ref-format", "--branch", f"autoresearch/{tag}",
                          check=False) == "":
            raise ValueError(f"tag {tag!r} does not make a valid branch name autoresearch/<tag>")

    run_file = state_dir(repo) / RUN_FILE
    if run_file.exists():
        existing = load_run(repo)
        have = {**existing.settings, **decision_settings(existing.settings)}
        diffs = [f"{k}: {have.get(k)!r} -> {settings[k]!r}"
                 for k in SETTING_FIELDS if have.get(k) != settings[k]]
        if tag is not None and tag != existing.tag:
            diffs.insert(0, f"tag: {existing.tag!r} -> {tag!r}")
        if preset != existing.preset:
            diffs.insert(0, f"preset: {existing.preset!r} -> {preset!r}")
        if diffs:
            raise RunMismatch(
                f"{repo} already holds run {existing.tag!r} with different settings "
                f"({'; '.join(diffs)}); a run's settings are fixed: init a new directory instead")
        return existing

    if train_py is None:
        train_py = baseline_train_py(preset)
    try:
        compile(train_py, "train.py", "exec")
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"baseline train.py does not compile: {exc}") from None

    tag = tag or default_tag()
    branch = f"autoresearch/{tag}"
    repo.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(repo)
    try:
        return _init_locked(repo, tag, branch, preset, settings, train_py, Ledger, ledger_path)
    finally:
        lock.release()


def _init_locked(repo: Path, tag: str, branch: str, preset: str, settings: dict,
                 train_py: str, Ledger, ledger_path) -> RunConfig:
    inside = git(repo, "rev-parse", "--show-toplevel", check=False)
    if inside and Path(inside).resolve() != repo:
        raise ValueError(f"{repo} is inside the git repo {inside}: use its top level or a new "
                         "directory")
    if not inside:
        git(repo, "init", "-q")
    parent = rev_parse(repo, "HEAD")
    if rev_parse(repo, f"refs/heads/{branch}"):
        raise ValueError(f"branch {branch} already exists in {repo}: pick another --tag")
    if parent:
        dirty = git(repo, "status", "--porcelain", "--untracked-files=no")
        if dirty:
            raise ValueError(f"{repo} has uncommitted changes to tracked files; commit or "
                             "stash them before adopting it as a research repo")
    gitignore = repo / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    lines += [ln for ln in GITIGNORE_LINES if ln not in lines]
    files = {"train.py": train_py, "program.md": program_md(tag, branch, settings),
             ".gitignore": "\n".join(lines) + "\n"}
    message = (f"baseline for autoresearch run {tag} (preset {preset})\n\n"
               + "".join(f"{k}: {settings[k]}\n" for k in SETTING_FIELDS))
    if parent:
        tree = make_tree(repo, parent, files)
        commit = commit_object(repo, tree, [parent], message)
    else:
        with tempfile.TemporaryDirectory(prefix="autoresearch-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            for path, text in files.items():
                blob = git(repo, "hash-object", "-w", "--stdin", input=text)
                git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}",
                    env=env)
            tree = git(repo, "write-tree", env=env)
        commit = commit_object(repo, tree, [], message)
    update_ref(repo, f"refs/heads/{branch}", commit, ZERO, reason="autoresearch init")
    update_ref(repo, candidate_ref(0), commit, reason="autoresearch baseline")
    git(repo, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    git(repo, "read-tree", "--reset", "-u", "HEAD")

    now = time.time()
    config = RunConfig(repo_dir=repo, tag=tag, branch=branch, preset=preset, settings=settings,
                       baseline_commit=commit, created_at=now)
    sd = state_dir(repo)
    lp = ledger_path(sd)
    if lp.exists():  # left by an init that died before writing run.json: start it afresh
        for suffix in ("", "-wal", "-shm"):
            Path(str(lp) + suffix).unlink(missing_ok=True)
    ledger = Ledger(lp, create=True)
    try:
        with ledger.tx() as db:
            for key, value in (("settings", settings), ("tag", tag), ("branch", branch),
                               ("preset", preset), ("baseline_commit", commit),
                               ("created_at", now)):
                ledger.set_meta(key, value)
            db.execute("INSERT INTO candidates(id, description, sha256, train_py, base_commit, "
                       "commit_sha, state, created_at, updated_at, program_sha, text_commit, "
                       "text_sha) VALUES (0, ?, ?, ?, NULL, ?, 'kept', ?, ?, ?, ?, ?)",
                       ("baseline", text_sha(train_py), train_py, commit, now, now,
                        program_sha(train_py), commit, text_sha(train_py)))
            db.execute("INSERT INTO decisions(candidate_id, hw_class, verdict, head_before, "
                       "head_after, val_bpb, head_bpb, reason, attempt_ids, decided_at) "
                       "VALUES (0, NULL, 'kept', NULL, ?, NULL, NULL, ?, '[]', ?)",
                       (commit, f"baseline of run {tag} (preset {preset})", now))
            db.execute("INSERT INTO head(id, commit_sha, candidate_id, updated_at) "
                       "VALUES (1, ?, 0, ?)", (commit, now))
    finally:
        ledger.close()
    # run.json last: its presence means the run is complete.
    _write_atomic(sd / RUN_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return config
