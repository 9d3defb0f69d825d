"""Dataloader throughput: can packing ever be the bottleneck? (reported, never asserted)

The fastest Mac trains at ~29K tok/s, so the loader needs to be far above that. Measures the
best-fit packer at B=16, T=2048 on synthetic token arrays:

  short: ~40-token documents (web snippets: the worst case, ~50 placements per row)
  long:  1K-5K-token documents (many longer than a row, so cropping dominates)

for numpy-only packing (rows as numpy) and end to end (including the mx.int32 conversion of x
and y), plus a straightforward scan-the-buffer packer for comparison.

    python benchmarks/loader.py [--seconds 3] [--out benchmarks/results/loader.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import sys
import os
# Run as a script, this file's directory comes first on sys.path, where benchmarks/trainer.py
# would shadow the trainer package: put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np

from trainer.dataloader import BestFitPacker, DocChunk, TrainLoader, doc_lengths

BOS = 0
B, T = 16, 2048


def synthetic_tokens(kind: str, total_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "short":
        lengths = np.clip(rng.normal(40, 12, total_tokens // 30).round(), 2, 200).astype(np.int64)
    else:
        lengths = rng.integers(1000, 5001, total_tokens // 2000).astype(np.int64)
    lengths = lengths[np.cumsum(lengths) <= total_tokens]
    starts = np.cumsum(lengths) - lengths
    tokens = rng.integers(1, 8192, int(lengths.sum())).astype(np.uint16)
    tokens[starts] = BOS
    return tokens, starts


def endless_chunks(tokens, starts, seed=0):
    rng = np.random.default_rng(seed)
    lengths = doc_lengths(tokens, starts)
    key = 0
    while True:
        order = rng.permutation(len(starts))
        yield DocChunk(key, tokens, starts[order], lengths[order])
        key += 1


def naive_rows(tokens, starts, rows, row_len, buffer_docs=1000, seed=0):
    """Comparison point: scan the whole buffer in Python for every placement."""
    lengths = doc_lengths(tokens, starts).tolist()
    order = np.random.default_rng(seed).permutation(len(starts)).tolist()
    it = iter(order)
    buf: list = []
    out = np.empty((rows, row_len), dtype=np.int32)
    for r in range(rows):
        while len(buf) < buffer_docs:
            d = next(it)
            buf.append((int(starts[d]), lengths[d]))
        pos = 0
        while pos < row_len:
            space = row_len - pos
            best = -1
            best_len = -1
            for j, (_, n) in enumerate(buf):
                if best_len < n <= space:
                    best, best_len = j, n
            if best < 0:
                best = min(range(len(buf)), key=lambda j: buf[j][1])
            s, n = buf.pop(best)
            take = min(n, space)
            out[r, pos:pos + take] = tokens[s:s + take]
            pos += take
    return out


def measure(fn, seconds: float) -> float:
    """Tokens per second (training tokens: B*T per batch) over at least `seconds`."""
    fn()  # warm-up
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * B * T / (time.perf_counter() - t0)


def run(seconds: float) -> dict:
    results: dict = {"batch_size": B, "seq_len": T, "machine": platform.machine(),
                     "python": platform.python_version(), "cases": {}}
    for kind in ("short", "long"):
        tokens, starts = synthetic_tokens(kind, 20_000_000)
        packer = BestFitPacker(T + 1, endless_chunks(tokens, starts))
        numpy_tps = measure(lambda: packer.next_rows(B), seconds)
        loader = TrainLoader(endless_chunks(tokens, starts), B, T)

        def with_mx():
            import mlx.core as mx
            x, y = next(loader)
            mx.eval(x, y)
        mx_tps = measure(with_mx, seconds)
        naive_tps = measure(lambda: naive_rows(tokens, starts, B, T + 1), seconds)
        mean_len = float(doc_lengths(tokens, starts).mean())
        results["cases"][kind] = {
            "mean_doc_tokens": round(mean_len, 1),
            "numpy_tok_per_sec": round(numpy_tps),
            "with_mx_tok_per_sec": round(mx_tps),
            "naive_scan_tok_per_sec": round(naive_tps),
            "crop_fraction": round(loader.crop_fraction, 4),
        }
        print(f"{kind:5s} docs (mean {mean_len:7.1f} tok): numpy {numpy_tps / 1e6:6.2f}M tok/s | "
              f"with mx {mx_tps / 1e6:6.2f}M tok/s | naive scan {naive_tps / 1e6:6.2f}M tok/s | "
              f"crop {loader.crop_fraction:.2%}")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = ap.parse_args(argv)
    results = run(args.seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
