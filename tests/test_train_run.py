"""The baseline train.py run for real as a subprocess on the prepared sample (tiny preset)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

from trainer import harness, presets  # noqa: E402

pytestmark = pytest.mark.slow


def run_train(train_py: str, workdir: Path, dataset: Path, budget: int = 3,
              timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    """Write train_py into workdir/run/ and run it from workdir/elsewhere (a different cwd)."""
    run_dir = workdir / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "train.py").write_text(train_py)
    cwd = workdir / "elsewhere"
    cwd.mkdir()
    result, progress = workdir / "out" / "result.json", workdir / "out" / "progress.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_DATA=str(dataset), AUTORESEARCH_SEQ_LEN="64",
               AUTORESEARCH_EVAL_TOKENS="2048", AUTORESEARCH_EVAL_BATCH="8",
               AUTORESEARCH_RESULT=str(result), AUTORESEARCH_PROGRESS=str(progress),
               OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(run_dir / "train.py"), "--time-budget", str(budget)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    doc = json.loads(result.read_text()) if result.exists() else {}
    lines = [json.loads(ln) for ln in progress.read_text().splitlines()] if progress.exists() else []
    return proc, doc, lines


def test_whole_run_prints_summary_and_writes_result(tmp_path, prepared_sample):
    proc, doc, progress = run_train(presets.baseline_train_py("tiny"), tmp_path, prepared_sample)
    assert proc.returncode == harness.EXIT_OK, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\n---\nval_bpb:" in proc.stdout
    for key in ("training_seconds:", "num_steps:", "num_params_M:", "depth:"):
        assert key in proc.stdout
    assert doc["status"] == "ok"
    assert math.isfinite(doc["val_bpb"]) and doc["val_bpb"] > 0
    assert doc["depth"] == 2 and doc["num_steps"] >= 3
    assert doc["params"]["total"] == pytest.approx(doc["num_params_M"] * 1e6)
    assert doc["settings"]["seq_len"] == 64
    # The loss falls on real text over the run (progress lines carry the smoothed loss).
    assert len(progress) == doc["num_steps"]
    assert progress[-1]["loss"] < progress[0]["loss"] - 0.3, [p["loss"] for p in progress]


def test_nan_fails_fast_with_exit_code_3(tmp_path, prepared_sample):
    text = presets.baseline_train_py("tiny")
    assert text.count("\nMATRIX_LR = 0.04 ") == 1
    text = text.replace("\nMATRIX_LR = 0.04 ", '\nMATRIX_LR = float("nan") ')
    proc, doc, _ = run_train(text, tmp_path, prepared_sample, budget=60)
    assert proc.returncode == harness.EXIT_NAN, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc["status"] == "nan"
    assert "loss is nan" in doc["error"]
    assert doc["num_steps"] is None or doc["num_steps"] <= 3  # failed at once, not after 60 s


def test_depth_edit_that_is_not_whole_heads_trains(tmp_path, prepared_sample):
    """DEPTH 3 x ASPECT_RATIO 40 = 120 channels: rounded up to 128 (two 64-channel heads)."""
    text = presets.apply_overrides(presets.baseline_train_py("tiny"),
                                   {"DEPTH": 3, "ASPECT_RATIO": 40})
    proc, doc, progress = run_train(text, tmp_path, prepared_sample)
    assert proc.returncode == harness.EXIT_OK, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc["depth"] == 3 and doc["config"]["n_embd"] == 128 and doc["config"]["n_head"] == 2
    assert math.isfinite(doc["val_bpb"])
    assert progress[-1]["loss"] < progress[0]["loss"], [p["loss"] for p in progress]


def test_muon_run_trains_and_says_so(tmp_path, prepared_sample):
    text = presets.apply_overrides(presets.baseline_train_py("tiny"), {"OPTIMIZER": "muon"})
    proc, doc, progress = run_train(text, tmp_path, prepared_sample)
    assert proc.returncode == harness.EXIT_OK, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc["optimizer"] == "muon" and "group matrices" in proc.stdout
    assert "muon momentum 0.85->0.95" in proc.stdout
    assert math.isfinite(doc["val_bpb"])
    assert progress[-1]["loss"] < progress[0]["loss"] - 0.3, [p["loss"] for p in progress]
