"""Trainer throughput: the baseline train.py run for real, as subprocesses, on the sample data.

Reported, never asserted. For each case: tokens/s, median step time, startup seconds, eval
seconds, peak memory; written to benchmarks/results/trainer.json and printed as a table.

Cases (Linux CPU backend; on macOS the OpenBLAS cases are skipped, the rest run on Metal):
  tiny           the tiny preset (T=128), OpenBLAS at 1 thread (what a demo worker gets)
  default        DEPTH 4 / d_model 256 at T=256, batch 16x256 with no accumulation, OpenBLAS
  default-1t     the same at OPENBLAS_NUM_THREADS=1
  default-mmap   the same with glibc's default malloc tunables instead of the trainer's
                 (trainer.backend.GLIBC_MALLOC_ENV keeps big blocks on the heap): MLX's CPU
                 allocator hands big buffers back to glibc, which by default returns them to
                 the OS, so every [tokens x vocab] temporary page-faults fresh zeroed pages
  default-noblas the same without OpenBLAS (MLX's bundled reference BLAS; very slow)
  default-mlxhead the same with train.py's LOSS_HEAD = "mlx": the softcapped loss's tanh/exp
                 in MLX's CPU kernels instead of numpy (what the numpy head buys)
  default-muon   the same with OPTIMIZER = "muon" (what Muon's Newton-Schulz steps cost)

Eval tok/s (eval tokens / eval seconds, 32K tokens at T=256) is reported next to training's:
the eval forward should run at >= 2x training's tok/s. --rounds N repeats the chosen cases
interleaved (A, B, A, B), so the machine's load falls on every case alike.

    python benchmarks/trainer.py                  # all cases
    python benchmarks/trainer.py --only tiny default --budget 30
    python benchmarks/trainer.py --only default default-mlxhead --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path, where this very file would
# shadow the trainer package: put the repo root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from trainer import backend, presets  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "trainer.json"
UNTIMED_STEPS = 2  # train.py does not time its first steps (compile); skip them here too

DEFAULT_T256 = {"TOTAL_BATCH_SIZE": 16 * 256, "DEVICE_BATCH_SIZE": 16}
# None = unset: glibc's own (dynamic) defaults, to measure what GLIBC_MALLOC_ENV buys. Setting
# the defaults explicitly would not do: any of these variables turns glibc's adaptation off.
GLIBC_DEFAULT_MALLOC = {var: None for var in backend.GLIBC_MALLOC_ENV}


def cases(budget: int) -> dict:
    tiny = presets.PRESETS["tiny"]
    return {
        "tiny": dict(preset="tiny", overrides={}, seq_len=tiny.seq_len, budget=tiny.time_budget,
                     blas=True, threads=1, env={}),
        "default": dict(preset="seed", overrides=DEFAULT_T256, seq_len=256, budget=budget,
                        blas=True, threads=None, env={}),
        "default-1t": dict(preset="seed", overrides=DEFAULT_T256, seq_len=256, budget=budget,
                           blas=True, threads=1, env={}),
        "default-mmap": dict(preset="seed", overrides=DEFAULT_T256, seq_len=256, budget=budget,
                             blas=True, threads=None, env=GLIBC_DEFAULT_MALLOC),
        "default-mlxhead": dict(preset="seed", overrides={**DEFAULT_T256, "LOSS_HEAD": "mlx"},
                                seq_len=256, budget=budget, blas=True, threads=None, env={}),
        "default-muon": dict(preset="seed", overrides={**DEFAULT_T256, "OPTIMIZER": "muon"},
                             seq_len=256, budget=budget, blas=True, threads=None, env={}),
        # Steps take tens of seconds without OpenBLAS: a short budget still measures 1-2 steps.
        "default-noblas": dict(preset="seed", overrides=DEFAULT_T256, seq_len=256,
                               budget=min(budget, 20), blas=False, threads=None, env={}),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sample_dataset(cache: Path) -> Path:
    from trainer.prepare import prepare_sample
    return Path(prepare_sample(cache, vocab_size=8192))


def run_case(name: str, case: dict, dataset: Path, workdir: Path) -> dict:
    text = presets.apply_overrides(presets.baseline_train_py(case["preset"]), case["overrides"])
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.py").write_text(text)
    result, progress = run_dir / "result.json", run_dir / "progress.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTORESEARCH_") and k != "LD_PRELOAD"}
    env.update(AUTORESEARCH_DATA=str(dataset), AUTORESEARCH_SEQ_LEN=str(case["seq_len"]),
               AUTORESEARCH_EVAL_TOKENS="32768", AUTORESEARCH_RESULT=str(result),
               AUTORESEARCH_PROGRESS=str(progress))
    if case["blas"]:
        env = backend.trainer_env(env, case["threads"])
    elif case["threads"]:
        env["OPENBLAS_NUM_THREADS"] = str(case["threads"])
    for var, value in case["env"].items():
        if value is None:
            env.pop(var, None)
        else:
            env[var] = value
    load_before = load_average()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py", "--time-budget", str(case["budget"])],
                          cwd=run_dir, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    row = {"case": name, "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
           "openblas": bool(case["blas"] and env.get("LD_PRELOAD")),
           "openblas_threads": case["threads"], "seq_len": case["seq_len"],
           "overrides": case["overrides"], "extra_env": case["env"],
           "load_before": load_before, "load_after": load_average()}
    if not result.exists():
        row["error"] = (proc.stdout + proc.stderr)[-2000:]
        return row
    doc = json.loads(result.read_text())
    steps = [json.loads(ln) for ln in progress.read_text().splitlines()] if progress.exists() else []
    timed = [s["dt"] for s in steps[UNTIMED_STEPS:] if "dt" in s]
    step_s = statistics.median(timed) if timed else None
    tokens_per_step = doc.get("tokens_per_step") or (
        doc["total_tokens_M"] * 1e6 / doc["num_steps"] if doc.get("num_steps") else None)
    row.update(status=doc["status"], val_bpb=doc.get("val_bpb"), num_steps=doc.get("num_steps"),
               tok_per_sec=doc.get("tok_per_sec"), step_seconds=step_s,
               median_tok_per_sec=tokens_per_step / step_s if step_s and tokens_per_step else None,
               first_steps_seconds=doc.get("untimed_seconds"),
               startup_seconds=doc.get("startup_seconds"), eval_seconds=doc.get("eval_seconds"),
               eval_tok_per_sec=(doc["eval_tokens"] / doc["eval_seconds"]
                                 if doc.get("eval_seconds") and doc.get("eval_tokens") else None),
               loss_head=doc.get("loss_head"), optimizer=doc.get("optimizer"),
               peak_memory_mb=doc.get("peak_vram_mb"), num_params_M=doc.get("num_params_M"),
               backend=doc.get("backend"))
    return row


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'case':<16}{'status':>7}{'tok/s':>9}{'med tok/s':>10}{'eval tok/s':>11}{'step s':>8}"
            f"{'first2 s':>9}{'startup s':>10}{'eval s':>8}{'peak MB':>9}{'steps':>6}  load before/after")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:<16}{r.get('status', 'error'):>7}{fmt(r.get('tok_per_sec'), ',.0f'):>9}"
              f"{fmt(r.get('median_tok_per_sec'), ',.0f'):>10}"
              f"{fmt(r.get('eval_tok_per_sec'), ',.0f'):>11}{fmt(r.get('step_seconds'), '.3f'):>8}"
              f"{fmt(r.get('first_steps_seconds'), '.1f'):>9}"
              f"{fmt(r.get('startup_seconds'), '.1f'):>10}{fmt(r.get('eval_seconds'), '.1f'):>8}"
              f"{fmt(r.get('peak_memory_mb'), ',.0f'):>9}{fmt(r.get('num_steps'), 'd'):>6}  "
              f"{r.get('load_before')} / {r.get('load_after')}")


def main(argv=None) -> None:
    all_cases = cases(60)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(all_cases), help="cases to run")
    ap.add_argument("--budget", type=int, default=30,
                    help="training seconds for the default-config cases (default 30)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root for the prepared sample (default: a temporary directory)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the cases, interleaved")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    chosen = cases(args.budget)
    names = args.only or list(chosen)
    if not sys.platform.startswith("linux"):
        names = [n for n in names if n not in ("default-noblas", "default-malloc")]
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        dataset = sample_dataset(cache)
        rows = []
        for round_ in range(args.rounds):
            for name in names:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                rows.append(run_case(name, chosen[name], dataset, Path(tmp) / f"runs{round_}"))
    doc = {"benchmark": "trainer", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "python": platform.python_version()},
           "note": "tok/s = tokens of timed steps / training seconds; med tok/s from the median "
                   "step; first2 s = the two untimed first steps (mx.compile tracing + JIT). "
                   "Load averages show how busy the machine was.",
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(rows)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
