"""AdamW against Muon (train.py's OPTIMIZER) on the sample data: val_bpb mean +- sd over seeds.

Reported, never asserted. Runs are interleaved (seed 1: adamw, muon; seed 2: adamw, muon; ...)
so the machine's load falls on both alike; each row keeps its load averages.

Configs:
  tiny      the tiny preset as the demo runs it (T=128, 15 s budget, 16K eval tokens)
  default   DEPTH 4 / d_model 256 at T=256, batch 16x256, --budget seconds, 64K eval tokens

    python benchmarks/optimizers.py --config tiny --seeds 1 2 3 4
    python benchmarks/optimizers.py --config default --budget 60 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _load_trainer_benchmark():
    """benchmarks/trainer.py (run_case, sample_dataset) under another name: as `trainer` it
    would shadow the trainer package."""
    import importlib.util
    path = Path(__file__).resolve().with_name("trainer.py")
    spec = importlib.util.spec_from_file_location("bench_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_trainer_benchmark()

RESULTS = bench.ROOT / "benchmarks" / "results" / "optimizers.json"


def config(name: str, budget: int, threads: int) -> dict:
    from trainer import presets
    if name == "tiny":
        tiny = presets.PRESETS["tiny"]
        return dict(preset="tiny", overrides={}, seq_len=tiny.seq_len, budget=tiny.time_budget,
                    blas=True, threads=threads,
                    env={"AUTORESEARCH_EVAL_TOKENS": str(tiny.eval_tokens)})
    return dict(preset="seed", overrides=dict(bench.DEFAULT_T256), seq_len=256, budget=budget,
                blas=True, threads=threads, env={"AUTORESEARCH_EVAL_TOKENS": str(65536)})


def summarise(rows: list[dict], key: str) -> dict:
    out = {}
    for opt in ("adamw", "muon"):
        vals = [r[key] for r in rows if r.get("optimizer") == opt and r.get(key) is not None]
        if vals:
            out[opt] = {"n": len(vals), "mean": statistics.fmean(vals),
                        "sd": statistics.stdev(vals) if len(vals) > 1 else None}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--budget", type=int, default=60, help="training seconds (default config)")
    ap.add_argument("--threads", type=int, default=1, help="OpenBLAS threads per run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = config(args.config, args.budget, args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-optimizers-") as tmp:
        dataset = bench.sample_dataset(Path(tmp) / "cache")
        for seed in args.seeds:
            for opt in ("adamw", "muon"):
                case = {**base, "overrides": {**base["overrides"], "OPTIMIZER": opt},
                        "env": {**base["env"], "AUTORESEARCH_SEED": str(seed)}}
                name = f"{args.config}-{opt}-s{seed}"
                print(f"running {name} ...", file=sys.stderr, flush=True)
                row = bench.run_case(name, case, dataset, Path(tmp) / "runs")
                row.update(optimizer=opt, seed=seed)
                rows.append(row)
                print(f"  val_bpb {row.get('val_bpb')} steps {row.get('num_steps')} "
                      f"tok/s {row.get('tok_per_sec')} load {row['load_before']}",
                      file=sys.stderr, flush=True)
    doc = {"benchmark": "optimizers", "config": args.config, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "val_bpb": summarise(rows, "val_bpb"), "num_steps": summarise(rows, "num_steps"),
           "tok_per_sec": summarise(rows, "tok_per_sec"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out if args.out != RESULTS else RESULTS.with_name(f"optimizers-{args.config}.json")
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for key in ("val_bpb", "num_steps", "tok_per_sec"):
        for opt, s in doc[key].items():
            sd = f"{s['sd']:.4f}" if s["sd"] is not None else "-"
            print(f"{args.config:<8}{key:<12}{opt:<7} {s['mean']:.4f} +- {sd} (n={s['n']})")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
