"""The fixed harness every train.py uses: settings, data, evaluation, result file.

Research edits train.py, never this file. The worker reads only what this module writes: the
result JSON (atomically, at AUTORESEARCH_RESULT) and the progress JSON lines
(AUTORESEARCH_PROGRESS); numbers printed on the console are for people.

This module imports mlx only inside ``start()`` and the methods that need it, so
``write_result`` works in a process that never loads MLX (the fleet tests' stand-in scripts).

Usage (see trainer/train.py):

    run = harness.start()
    loader = run.train_loader(batch_size)
    ... train, calling run.log_step(...) ...
    val_bpb = run.evaluate(per_token_loss)
    run.finish(val_bpb=val_bpb, training_seconds=..., num_steps=..., ...)

    if __name__ == "__main__":
        harness.run_main(main)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

# The boundary's vocabulary (env names, exit codes, result schema and figures, OOM words) is
# shared.trainer_contract's, so the worker reads exactly what this module writes. The exit
# codes are re-exported: a train.py or a test reads them as harness.EXIT_*.
from shared.trainer_contract import (  # noqa: F401 (EXIT_NAN, EXIT_OOM: re-exported)
    ENV_RESULT, EXIT_CRASH, EXIT_FOR_STATUS, EXIT_NAN, EXIT_OK, EXIT_OOM, RESULT_FIGURES,
    RESULT_SCHEMA, mentions_oom,
)
from trainer import HARNESS_VERSION, dataset
from trainer.backend import trainer_env
from trainer.dataloader import train_loader
from trainer.evaluate import evaluate_val
from trainer.settings import RunSettings
ERROR_TAIL_CHARS = 4000

# Set once a result file has been written by this process (run_main must not overwrite it).
_result_written: Path | None = None
_current_run: "Run | None" = None


# -- result file ------------------------------------------------------------------------------

def _jsonable(value):
    """Plain JSON values: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if hasattr(value, "item") and hasattr(value, "shape") and tuple(value.shape) == ():
        value = value.item()  # a scalar mx.array
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def result_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(ENV_RESULT) or "result.json").expanduser()


def write_result(status: str, *, path: str | os.PathLike | None = None, **figures) -> Path:
    """Write the result JSON atomically (temp file in the same directory + os.replace).

    Usable without start(): unknown figures default to null, "settings" defaults to the
    research settings found in the environment. Returns the path written.
    """
    global _result_written
    if status not in EXIT_FOR_STATUS:
        raise ValueError(f"result status must be one of {sorted(EXIT_FOR_STATUS)}, got {status!r}")
    doc: dict = {"schema": RESULT_SCHEMA, "harness_version": HARNESS_VERSION,
                 "status": status, "val_bpb": None, "error": None}
    doc.update({k: None for k in RESULT_FIGURES})
    if "settings" not in figures:
        try:
            doc["settings"] = RunSettings.from_env().research()
        except ValueError:
            doc["settings"] = {}
    doc.update(figures)
    text = json.dumps(_jsonable(doc), indent=1, sort_keys=False) + "\n"
    target = Path(path) if path is not None else result_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".result-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _result_written = target
    return target


# -- dataset access -----------------------------------------------------------------------------

def _train_shards(dataset_dir: Path, manifest: dict) -> list[Path]:
    pat = re.compile(r"^train_\d+\.npz$")
    names = sorted(n for n in manifest.get("files", {}) if pat.match(n))
    if not names:
        names = sorted(p.name for p in dataset_dir.iterdir() if pat.match(p.name))
    if not names:
        raise FileNotFoundError(f"{dataset_dir}: no train_*.npz shards")
    return [dataset_dir / n for n in names]


# -- memory -----------------------------------------------------------------------------------

def peak_memory_mb() -> tuple[float, str]:
    """Peak memory in MB and where the number came from.

    MLX's allocator peak (mx.get_peak_memory; mx.metal.get_peak_memory on older MLX); if that
    reads 0 (nothing allocated through MLX yet), the process's max RSS.
    """
    import mlx.core as mx
    value, source = 0, ""
    if hasattr(mx, "get_peak_memory"):
        value, source = mx.get_peak_memory(), "mx.get_peak_memory"
    elif hasattr(mx, "metal") and hasattr(mx.metal, "get_peak_memory"):
        value, source = mx.metal.get_peak_memory(), "mx.metal.get_peak_memory"
    if value:
        return value / 1024 / 1024, source
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    mb = rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
    return mb, "ru_maxrss"


# -- the run ----------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def summary_block(figures: Mapping) -> str:
    """The summary block in upstream autoresearch's format (people and old scripts grep it)."""
    rows = [("val_bpb", "val_bpb", ".6f"), ("training_seconds", "training_seconds", ".1f"),
            ("total_seconds", "total_seconds", ".1f"), ("peak_vram_mb", "peak_vram_mb", ".1f"),
            ("mfu_percent", "mfu_percent", ".2f"), ("total_tokens_M", "total_tokens_M", ".1f"),
            ("num_steps", "num_steps", "d"), ("num_params_M", "num_params_M", ".1f"),
            ("depth", "depth", "d")]
    lines = ["---"]
    for label, key, spec in rows:
        lines.append(f"{label + ':':<18}{_fmt(figures.get(key), spec)}")
    return "\n".join(lines)


class Run:
    """One training run's view of the harness (made by start())."""

    def __init__(self, settings: RunSettings, dataset_dir: Path, manifest: dict,
                 token_bytes: np.ndarray, load_shard: Callable, backend: str, dtype, t_start: float):
        self.settings = settings
        self.dataset_dir = dataset_dir
        self.manifest = manifest
        self.vocab_size = int(manifest["vocab_size"])
        self.bos_id = int(manifest["bos_id"])
        self.token_bytes = token_bytes
        self.backend = backend
        self.dtype = dtype
        self.t_start = t_start
        self._load_shard = load_shard
        self._loader = None
        self._progress_file = None
        self.num_steps: int | None = None
        self.last_tok_per_sec: float | None = None
        self.eval_result = None

    # data
    def train_loader(self, batch_size: int):
        """Infinite iterator of (x, y) mx.int32 [batch_size, T] training batches."""
        self._loader = train_loader(_train_shards(self.dataset_dir, self.manifest),
                                    self._load_shard, self.bos_id, batch_size,
                                    self.settings.seq_len, self.settings.seed)
        return self._loader

    @property
    def crop_fraction(self) -> float | None:
        return self._loader.crop_fraction if self._loader is not None else None

    def elapsed(self) -> float:
        return time.time() - self.t_start

    # progress
    def log_step(self, *, step: int, loss, progress: float, tok_per_sec: float,
                 dt: float | None = None, **extra) -> None:
        """One console line and one progress JSON line. dt is the step's seconds."""
        loss = float(loss)
        elapsed = self.elapsed()
        self.num_steps = int(step)
        self.last_tok_per_sec = float(tok_per_sec)
        dt_txt = f" | dt: {dt * 1000:.0f}ms" if dt is not None else ""
        print(f"step {int(step):05d} ({100 * progress:.1f}%) | loss: {loss:.6f}{dt_txt} | "
              f"tok/sec: {tok_per_sec:,.0f} | elapsed: {elapsed:.0f}s", flush=True)
        path = self.settings.progress_path
        if path is None:
            return
        if self._progress_file is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._progress_file = open(path, "a", encoding="utf-8")
        line = {"step": int(step), "progress": float(progress), "loss": loss,
                "tok_per_sec": float(tok_per_sec), "elapsed": round(elapsed, 3)}
        if dt is not None:
            line["dt"] = float(dt)
        line.update(extra)
        self._progress_file.write(json.dumps(_jsonable(line)) + "\n")
        self._progress_file.flush()

    # figures common to every result of this run
    def _figures(self) -> dict:
        total = self.elapsed()
        figs = {"total_seconds": total, "backend": self.backend,
                "settings": self.settings.research(), "num_steps": self.num_steps,
                "crop_fraction": self.crop_fraction, "tok_per_sec": self.last_tok_per_sec,
                "dataset": self.manifest.get("name"),
                "dataset_hash": self.manifest.get("dataset_hash")}
        if self.eval_result is not None:
            figs["eval_seconds"] = self.eval_result.seconds
            figs["eval_tokens"] = self.eval_result.tokens
        try:
            figs["peak_vram_mb"], figs["peak_memory_source"] = peak_memory_mb()
        except Exception:  # never let a memory probe hide the real outcome
            pass
        return figs

    def fail(self, status: str, message: str, **figures):
        """Write a failed result (nan, oom or crash) and exit with its code."""
        if status == "ok":
            raise ValueError("fail() needs a failure status: nan, oom or crash")
        print(f"FAIL ({status}): {message}", file=sys.stderr, flush=True)
        write_result(status, path=self.settings.result_path,
                     **{**self._figures(), "error": message, **figures})
        self._close()
        raise SystemExit(EXIT_FOR_STATUS[status])

    # evaluation
    def evaluate(self, per_token_loss: Callable) -> float:
        """val_bpb of per_token_loss(x, y) -> mx.array [B, T] nats over the fixed val rows."""
        val_tokens, val_starts = self._load_shard(self.dataset_dir / "val.npz")
        s = self.settings
        self.eval_result = evaluate_val(per_token_loss, val_tokens, val_starts, self.token_bytes,
                                        self.bos_id, s.seq_len, s.eval_tokens, s.eval_batch)
        r = self.eval_result
        print(f"eval: {r.rows} rows, {r.tokens:,} tokens, {r.seconds:.1f}s, "
              f"val_bpb {r.val_bpb:.6f}", flush=True)
        return r.val_bpb

    def finish(self, *, val_bpb: float | None = None, training_seconds: float | None = None,
               num_steps: int | None = None, num_params_M: float | None = None,
               depth: int | None = None, mfu_percent: float | None = None,
               total_tokens_M: float | None = None, peak_memory_mb: float | None = None,
               **extra) -> dict:
        """Write the ok result and print the summary block. val_bpb always comes from this
        run's own evaluate() (a differing value passed in is ignored with a warning); a
        non-finite val_bpb becomes a nan result (exit EXIT_NAN)."""
        if self.eval_result is None:
            raise RuntimeError("run.finish() called before run.evaluate()")
        own = self.eval_result.val_bpb
        if val_bpb is not None and not (float(val_bpb) == own or
                                        (math.isnan(float(val_bpb)) and math.isnan(own))):
            print(f"warning: finish(val_bpb={val_bpb}) differs from the harness's "
                  f"evaluation {own}; recording the harness's", file=sys.stderr, flush=True)
        figs = self._figures()
        if num_steps is None:
            num_steps = self.num_steps
        figs.update(training_seconds=training_seconds, num_steps=num_steps,
                    num_params_M=num_params_M, depth=depth, mfu_percent=mfu_percent,
                    total_tokens_M=total_tokens_M)
        if peak_memory_mb is not None:
            figs["peak_vram_mb"], figs["peak_memory_source"] = peak_memory_mb, "train.py"
        if total_tokens_M is not None and training_seconds:
            figs["tok_per_sec"] = total_tokens_M * 1e6 / training_seconds
        used = (training_seconds or 0.0) + (figs.get("eval_seconds") or 0.0)
        figs["startup_seconds"] = max(0.0, figs["total_seconds"] - used)
        figs["val_bpb"] = own
        figs.update(extra)
        if not math.isfinite(own):
            self.fail("nan", f"val_bpb is {own}", **{k: v for k, v in figs.items()
                                                     if k != "val_bpb"})
        write_result("ok", path=self.settings.result_path, **figs)
        print(summary_block(figs), flush=True)
        self._close()
        return figs

    def _close(self):
        if self._progress_file is not None:
            self._progress_file.close()
            self._progress_file = None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "train.py"
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Train for a fixed time budget and report val_bpb. Run settings come from "
                    "AUTORESEARCH_* environment variables (see trainer/settings.py).")
    ap.add_argument("--time-budget", type=_positive_int, metavar="SECONDS",
                    help="training seconds (overrides AUTORESEARCH_TIME_BUDGET; manual runs)")
    return ap.parse_args(argv)


# Set in the environment of a trainer that restarted itself under trainer_env (never twice).
REEXEC_MARK = "AUTORESEARCH_TRAINER_ENV"


def _restart_under_trainer_env() -> None:
    """A manual `python train.py` on Linux: restart once with the trainer environment.

    LD_PRELOAD only works from process start, and without the system OpenBLAS MLX's CPU backend
    is ~20x slower (115 vs 2,129 tok/s for the default model at T=256, benchmarks/trainer.py).
    The worker and `python -m trainer.launch` already start trainers this way, so for them the
    environment is complete and nothing happens; the same pid goes on (exec, not a child).
    """
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_MARK):
        return
    if not sys.argv or not os.path.isfile(sys.argv[0]):
        return  # python -c / interactive: no script to restart
    env = trainer_env(os.environ)
    if env == dict(os.environ):
        return
    env[REEXEC_MARK] = "1"
    print("harness: restarting under the trainer environment (system OpenBLAS preloaded, "
          "malloc tuned); AUTORESEARCH_OPENBLAS= disables the preload", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def start(argv=None, environ: Mapping[str, str] | None = None) -> Run:
    """Parse the command line, read settings, locate the dataset, seed, print the settings."""
    global _current_run
    t_start = time.time()
    args = parse_args(argv)
    if argv is None and environ is None:
        _restart_under_trainer_env()
    env = os.environ if environ is None else environ
    settings = RunSettings.from_env(env)
    if args.time_budget is not None:
        settings = settings.replace(time_budget=args.time_budget)
    # Absolute now, so a train.py that changes directory still writes where the worker looks.
    settings = settings.replace(
        result_path=settings.result_path.absolute(),
        progress_path=settings.progress_path.absolute() if settings.progress_path else None)

    # AUTORESEARCH_DATA, else CACHE/datasets/CURRENT
    dataset_dir = Path(dataset.resolve_dataset_dir(env))
    manifest = dataset.read_manifest(dataset_dir)
    for key in ("vocab_size", "bos_id"):
        if key not in manifest:
            raise ValueError(f"{dataset_dir}/manifest.json has no {key!r}")
    token_bytes = np.load(dataset_dir / "token_bytes.npy")
    if token_bytes.shape != (int(manifest["vocab_size"]),):
        raise ValueError(f"{dataset_dir}/token_bytes.npy has shape {token_bytes.shape}, "
                         f"expected ({manifest['vocab_size']},)")

    import mlx.core as mx
    backend = "metal" if mx.metal.is_available() else "cpu"
    # bf16 matmuls are slow on the CPU backend (no fast BLAS path), so f32 there.
    dtype = mx.bfloat16 if backend == "metal" else mx.float32
    np.random.seed(settings.seed)
    mx.random.seed(settings.seed)
    import random
    random.seed(settings.seed)

    run = Run(settings, dataset_dir, manifest, token_bytes, dataset.load_shard, backend, dtype,
              t_start)
    _current_run = run
    s = settings
    print(f"harness {HARNESS_VERSION} | backend {backend} ({'bfloat16' if backend == 'metal' else 'float32'}) "
          f"| mlx {getattr(mx, '__version__', '?')}", flush=True)
    print(f"dataset {manifest.get('name', dataset_dir.name)} ({dataset_dir}) | vocab {run.vocab_size} "
          f"| bos {run.bos_id} | hash {str(manifest.get('dataset_hash', '?'))[:12]}", flush=True)
    print(f"settings: seq_len {s.seq_len} | eval_tokens {s.eval_tokens:,} | time_budget "
          f"{s.time_budget}s | seed {s.seed} | eval_batch {s.eval_batch} | result {s.result_path}",
          flush=True)
    return run


# -- process wrapper --------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    """A MemoryError, or a RuntimeError (how MLX reports allocation failures) whose text has
    one of the boundary's OOM_MARKERS."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and mentions_oom(str(exc))


def run_main(main: Callable[[], object]) -> None:
    """Run main(); classify an uncaught exception into a crash/oom result; exit with its code.

    A SystemExit (run.fail, --help, sys.exit in train.py) passes through unchanged. If main
    returns without any result having been written, that is a crash too: the worker must
    never be left without a result from a run that exited 0.
    """
    try:
        main()
    except SystemExit:
        raise
    except BaseException as exc:  # KeyboardInterrupt included: the run did not finish
        status = "oom" if is_oom(exc) else "crash"
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        sys.stderr.flush()
        _write_failure(status, tb[-ERROR_TAIL_CHARS:])
        sys.exit(EXIT_FOR_STATUS[status])
    if _result_written is None:
        msg = "train.py returned without writing a result (missing run.finish()?)"
        print(msg, file=sys.stderr, flush=True)
        _write_failure("crash", msg)
        sys.exit(EXIT_CRASH)
    sys.exit(EXIT_OK)


def _write_failure(status: str, error: str) -> None:
    run = _current_run
    try:
        if run is not None:
            figs = {}
            try:
                figs = run._figures()
            except Exception:
                pass
            write_result(status, path=run.settings.result_path, **{**figs, "error": error})
            run._close()
        else:
            write_result(status, error=error)
    except Exception as werr:  # the exit code still tells the worker what happened
        print(f"could not write the result file: {werr}", file=sys.stderr, flush=True)
