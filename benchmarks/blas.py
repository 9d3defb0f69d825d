"""f32 / bf16 matmul GFLOP/s of MLX's CPU backend with and without the system OpenBLAS
preloaded (reported, never asserted).

    python benchmarks/blas.py [--n 1024] [--seconds 2] [--threads N] [--out benchmarks/results/blas.json]

Each case runs in a fresh child process (LD_PRELOAD only applies at process start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, where benchmarks/trainer.py
# would shadow the trainer package: put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from trainer.backend import openblas_path, trainer_env

CHILD = r"""
import json, sys, time
import mlx.core as mx
n, seconds = int(sys.argv[1]), float(sys.argv[2])
out = {}
for name, dt in (("f32", mx.float32), ("bf16", mx.bfloat16)):
    a = mx.random.normal((n, n)).astype(dt); b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a @ b)
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mx.eval(a @ b); k += 1
    out[name] = 2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9
maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
out["openblas_mapped"] = "libopenblas" in maps
print(json.dumps(out))
"""


def measure(env: dict, n: int, seconds: float) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(seconds)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "blas.json"))
    args = ap.parse_args(argv)
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain["AUTORESEARCH_OPENBLAS"] = ""
    cases = {"without_preload": trainer_env(plain, args.threads)}
    lib = openblas_path()
    if lib:
        with_env = dict(os.environ)
        with_env.pop("AUTORESEARCH_OPENBLAS", None)
        cases["with_preload"] = trainer_env(with_env, args.threads)
    results = {"n": args.n, "openblas": lib, "threads": args.threads, "cases": {}}
    for name, env in cases.items():
        r = measure(env, args.n, args.seconds)
        results["cases"][name] = {k: (round(v, 1) if isinstance(v, float) else v)
                                  for k, v in r.items()}
        print(f"{name:16s} f32 {r['f32']:7.1f} GFLOP/s | bf16 {r['bf16']:7.1f} GFLOP/s | "
              f"openblas mapped: {r['openblas_mapped']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
