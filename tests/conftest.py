"""Shared pytest fixtures.

prepare_* fixtures and ``prepared_sample`` belong to the data-preparation area
(trainer/prepare.py); other areas may append their own fixtures below.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# CI explores the same examples on every run (a red CI must be reproducible, not a new random
# draw); locally hypothesis keeps exploring and remembers failures in .hypothesis/.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _own_keys(tmp_path, monkeypatch):
    """No test reads or writes the real ~/.config key directory or a pinned server key."""
    monkeypatch.setenv("AUTORESEARCH_KEYS", str(tmp_path / "keys"))
    monkeypatch.delenv("AUTORESEARCH_SERVER_KEY", raising=False)


@pytest.fixture(scope="session")
def prepare_cache_dir(tmp_path_factory) -> Path:
    """A cache root (AUTORESEARCH_CACHE layout) private to this test session."""
    return tmp_path_factory.mktemp("prepare_cache")


@pytest.fixture(scope="session")
def prepared_sample(prepare_cache_dir) -> Path:
    """The embedded sample prepared once per session at vocab 512; returns the dataset dir.

    The directory is <cache>/datasets/sample (so its parent's parent is a usable
    AUTORESEARCH_CACHE, and CURRENT points at it). Treat it as read-only.
    """
    from trainer.prepare import prepare_sample

    return prepare_sample(prepare_cache_dir, vocab_size=512)


# ---- fleet_ fixtures: a research repo whose train.py is a fast stand-in (test_wire, test_fleet)

_FLEET_TRAIN_PY = '''"""Stand-in train.py for the fleet tests: no MLX; "trains" by sleeping, reports BPB."""
import json
import os
import time

BPB = 1.50        # the val_bpb this variant reports
SLEEP = 0.3       # seconds of pretend training
CRASH = False     # raise instead of reporting

# Knobs that change nothing (a variant sets one to be a distinct program): one per line with a
# line between, so variants of different knobs rebase onto each other's keeps cleanly.
KNOB_1 = 0

KNOB_2 = 0

KNOB_3 = 0

KNOB_4 = 0

KNOB_5 = 0

KNOB_6 = 0

KNOB_7 = 0

KNOB_8 = 0

KNOB_9 = 0

KNOB_10 = 0

KNOB_11 = 0

KNOB_12 = 0


def main():
    t0 = time.time()
    progress = os.environ.get("AUTORESEARCH_PROGRESS")
    steps = 5
    for step in range(steps):
        time.sleep(SLEEP / steps)
        if progress:
            with open(progress, "a") as f:
                f.write(json.dumps({"step": step, "progress": (step + 1) / steps, "loss": 3.0,
                                    "tok_per_sec": 1000.0, "elapsed": time.time() - t0}) + "\\n")
    if CRASH:
        raise RuntimeError("stand-in crash")
    try:
        from trainer.harness import write_result
    except ImportError:
        path = os.environ.get("AUTORESEARCH_RESULT", "result.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"schema": 1, "status": "ok", "val_bpb": BPB}, f)
        os.replace(path + ".tmp", path)
    else:
        write_result("ok", val_bpb=BPB, training_seconds=SLEEP, num_steps=steps)


if __name__ == "__main__":
    main()
'''


def _fleet_variant_text(bpb: float = 1.50, sleep: float = 0.3, crash: bool = False,
                        knob: int | None = None) -> str:
    # Only the constants asked for change (a default stays byte-identical), so two variants of
    # different constants touch different lines and rebase onto each other (coordinator.rebase).
    text = _FLEET_TRAIN_PY
    for old, value, default in (("BPB = 1.50", bpb, 1.50), ("SLEEP = 0.3", sleep, 0.3),
                                ("CRASH = False", crash, False)):
        assert text.count(old) == 1
        if value != default:
            text = text.replace(old, f"{old.split(' = ')[0]} = {value!r}")
    if knob is not None:
        assert text.count(f"KNOB_{knob} = 0\n") == 1, f"the stand-in has no KNOB_{knob}"
        text = text.replace(f"KNOB_{knob} = 0\n", f"KNOB_{knob} = 1\n")
    return text


@pytest.fixture
def fleet_train_py() -> str:
    """The stand-in baseline: reports val_bpb 1.50 after 0.3 s."""
    return _FLEET_TRAIN_PY


@pytest.fixture
def fleet_variant():
    """``fleet_variant(bpb=1.4, sleep=2.0, crash=False, knob=3)`` -> a variant of the
    stand-in (``knob``: set KNOB_<n>, a distinct program that changes nothing)."""
    return _fleet_variant_text


@pytest.fixture
def fleet_repo(tmp_path):
    """A research repo (real git, real ledger) whose baseline is the stand-in train.py.

    Decided on single runs (``SINGLE_RUN``: one head run, greedy): these fleets test the
    wire's and the workers' mechanics, where one result must be one decision. The sequential
    rule's fleet is tests/test_decisions_fleet.py."""
    from coordinator.repo import SINGLE_RUN, init_repo

    repo = tmp_path / "research"
    init_repo(repo, tag="fleet", preset="tiny", train_py=_FLEET_TRAIN_PY, **SINGLE_RUN)
    return repo
