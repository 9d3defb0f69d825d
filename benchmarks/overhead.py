"""Where an experiment's wall clock goes: a real worker runs the same assignment several times.

Reported, never asserted. This script plays the coordinator's side of the wire (a ZeroMQ
ROUTER speaking shared.protocol with shared.codec, no keys) and starts one real worker process
(`python -m worker.cli join --insecure`), so everything a worker does per run is real: the
assign message, preflight, the runner (run dir, kernel cache seed/harvest, bootstrap, limits),
the trainer, the result message. The worker's cache holds the prepared sample (vocab 8192).
It gets the same assignment (the preset's baseline train.py, the preset's settings) --runs
times; the first run starts with the worker's MLX kernel cache empty.

Per run, on this machine's one clock:

  dispatch        assign sent -> the trainer's interpreter runs train.py's first line (the
                  benchmark prepends one line that prints time.time())
  start_to_step   -> the first training step begins (imports, data, model, mx.compile setup)
  untimed_steps   the first UNTIMED_STEPS steps (tracing, JIT compile, first allocations)
  training        the timed budget (training_seconds)
  eval            the harness's evaluation (eval_seconds)
  finish          eval end -> result.json written (summary, result file)
  reporting       result.json written -> the result message arrives here (interpreter exit, the
                  worker noticing it, kernel harvest, the message)
  wall            assign sent -> result received; overhead = 1 - training / wall

--preset seed also prints a projection for a Mac: each component scaled from this CPU to the
seed's M1 Pro (26K tok/s training), the fixed ones (dispatch, reporting, imports) unscaled.

    python benchmarks/overhead.py                       # tiny preset, 4 runs
    python benchmarks/overhead.py --runs 3 --threads 2
    python benchmarks/overhead.py --preset seed --runs 2 --budget 60   # seed shape, shorter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from shared import codec, protocol  # noqa: E402
from trainer import presets  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STAMP = "overhead-bench process-start"
PREAMBLE = f'import time as _t; print("{STAMP}", repr(_t.time()), flush=True)\n'
SEED_MAC_TOK_PER_SEC = 26_000  # the seed article's M1 Pro training throughput (DEPTH 4, T 2048)
HANG = 3600.0


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class StandInCoordinator:
    """The coordinator's half of the conversation for one worker: welcome, assign on ready
    (while runs remain), heartbeats back, ack every result."""

    def __init__(self):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def send(self, ident: bytes, type_: str, **fields) -> None:
        self.sock.send_multipart([ident, codec.encode(protocol.make(type_, **fields))])

    def serve(self, train_py: str, settings: dict, timeout: float, runs: int,
              on_result, worker: subprocess.Popen) -> None:
        sent: dict[str, float] = {}
        assigned = done = 0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        deadline = time.time() + HANG
        last_beat = 0.0
        peer = None
        while done < runs and time.time() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode})")
            if peer is not None and time.time() - last_beat > 1.0:
                self.send(peer, "heartbeat")
                last_beat = time.time()
            if not poller.poll(100):
                continue
            ident, data = self.sock.recv_multipart()
            msg = codec.decode(data)
            t = msg.get("type")
            now = time.time()
            if os.environ.get("OVERHEAD_DEBUG"):
                print(f"{now:.3f} <- {t}", file=sys.stderr, flush=True)
            if t == "hello":
                peer = ident
                self.send(ident, "welcome", heartbeat_interval=protocol.HEARTBEAT_INTERVAL,
                          liveness=protocol.HEARTBEAT_LIVENESS)
            elif t == "ready" and assigned < runs and assigned == done:
                attempt_id = str(uuid.uuid4())
                sent[attempt_id] = time.time()
                assigned += 1
                self.send(ident, "assign", attempt_id=attempt_id, candidate_id=1,
                          commit="0" * 40, train_py=train_py, settings=settings,
                          timeout=float(timeout), purpose="candidate")
            elif t == "result":
                attempt_id = msg["attempt_id"]
                self.send(ident, "ack", attempt_id=attempt_id, accepted=True, note="")
                if attempt_id in sent:
                    done += 1
                    on_result(attempt_id, sent.pop(attempt_id), now, msg["outcome"])

    def close(self):
        self.sock.close(0)


def components(assigned: float, received: float, outcome: dict, run_dir: Path) -> dict:
    """The per-run split (see the module docstring) from the run dir the worker kept."""
    result = json.loads((run_dir / "result.json").read_text())
    log = (run_dir / "train.log").read_text(errors="replace")
    m = re.search(re.escape(STAMP) + r" ([0-9.]+)", log)
    process_start = float(m.group(1)) if m else None
    written = (run_dir / "result.json").stat().st_mtime
    harness_start = written - result["total_seconds"]
    steps = [json.loads(ln) for ln in (run_dir / "progress.jsonl").read_text().splitlines()]
    first_step_start = harness_start + steps[0]["elapsed"] - steps[0]["dt"]
    training, untimed = result["training_seconds"], result.get("untimed_seconds") or 0.0
    evaluation = result.get("eval_seconds") or 0.0
    loop_end = first_step_start + untimed + training  # timed steps run back to back
    wall = received - assigned
    row = {
        "status": outcome.get("status"), "val_bpb": result.get("val_bpb"),
        "num_steps": result.get("num_steps"), "tok_per_sec": result.get("tok_per_sec"),
        "eval_tokens": result.get("eval_tokens"),
        "eval_tok_per_sec": result["eval_tokens"] / evaluation if evaluation else None,
        "dispatch": process_start - assigned if process_start else None,
        "start_to_step": first_step_start - process_start if process_start else None,
        "untimed_steps": untimed, "training": training, "eval": evaluation,
        "finish": max(0.0, written - loop_end - evaluation),
        "reporting": received - written, "wall": wall,
        "overhead_fraction": 1 - training / wall if wall > 0 else None,
        "trainer_wall": outcome.get("wall_seconds"),
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}


def mac_projection(rows: list[dict], budget: float, eval_tokens: int) -> dict:
    """The seed preset on the seed's M1 Pro, from this CPU's measured split: work that scales
    with the model (steps, eval) is divided by the throughput ratio; process start, dispatch
    and reporting are kept as measured here (they are not model work)."""
    later = rows[1:] or rows
    mean = lambda k: statistics.fmean(r[k] for r in later if r.get(k) is not None)
    ratio = SEED_MAC_TOK_PER_SEC / mean("tok_per_sec")
    # Eval on the Mac: its tokens at this CPU's eval/train speed ratio times the Mac's speed.
    eval_ratio = mean("eval_tok_per_sec") / mean("tok_per_sec")
    eval_mac = eval_tokens / (SEED_MAC_TOK_PER_SEC * eval_ratio)  # the preset's eval, not the sample's
    fixed = mean("dispatch") + mean("reporting") + mean("finish")
    startup = mean("start_to_step")  # imports + data + model: measured here, an upper bound
    untimed = mean("untimed_steps") / ratio
    wall = fixed + startup + untimed + budget + eval_mac
    return {"mac_tok_per_sec": SEED_MAC_TOK_PER_SEC, "this_cpu_tok_per_sec": round(mean("tok_per_sec")),
            "throughput_ratio": round(ratio, 1), "budget": budget, "eval_tokens": eval_tokens,
            "eval_over_train_tok_per_sec": round(eval_ratio, 2),
            "eval_seconds": round(eval_mac, 1), "untimed_steps_seconds": round(untimed, 2),
            "startup_seconds_upper_bound": round(startup, 1), "fixed_seconds": round(fixed, 2),
            "wall_seconds": round(wall, 1), "overhead_fraction": round(1 - budget / wall, 3),
            "note": "eval: the preset's eval tokens at this CPU's eval/train tok/s ratio times "
                    "the Mac's 26K tok/s; untimed steps scaled by the throughput ratio (Metal's "
                    "JIT differs); startup as measured on this CPU (an upper bound)"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(presets.PRESETS), default="tiny")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--budget", type=int, default=None, help="training seconds (default: preset)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="default: the preset's")
    ap.add_argument("--threads", type=int, default=1, help="the worker's --threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    preset = presets.get_preset(args.preset)
    settings = preset.settings()
    if args.budget:
        settings["time_budget"] = args.budget
    if args.eval_tokens:
        settings["eval_tokens"] = args.eval_tokens
    train_py = PREAMBLE + presets.baseline_train_py(args.preset)
    timeout = preset.timeout + max(0, settings["time_budget"] - preset.time_budget)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        cache = Path(tmp) / "cache"
        from trainer.prepare import prepare_sample
        prepare_sample(cache, vocab_size=8192)
        coord = StandInCoordinator()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "join", coord.endpoint, "--insecure",
             "--name", "overhead-bench", "--cache-dir", str(cache), "--threads", str(args.threads)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_root = cache / "runs" / f"overhead-bench-{worker.pid}"

        def on_result(attempt_id, assigned, received, outcome):
            row = components(assigned, received, outcome, run_root / attempt_id)
            row.update(run=len(rows) + 1, load=load_average())
            rows.append(row)
            print(f"run {row['run']}: wall {row['wall']:.1f}s (budget {settings['time_budget']}s) "
                  f"dispatch {row['dispatch']}s start->step {row['start_to_step']}s untimed "
                  f"{row['untimed_steps']}s train {row['training']}s eval {row['eval']}s "
                  f"report {row['reporting']}s overhead {row['overhead_fraction']:.0%} "
                  f"| load {row['load']}", file=sys.stderr, flush=True)

        try:
            coord.serve(train_py, settings, timeout, args.runs, on_result, worker)
        finally:
            worker.send_signal(signal.SIGINT)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            coord.close()

    budget = settings["time_budget"]
    doc = {"benchmark": "overhead", "preset": args.preset, "settings": settings,
           "threads": args.threads, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "rows": rows,
           "wall_over_budget": [round(r["wall"] / budget, 2) for r in rows]}
    if args.preset != "tiny" and rows:
        doc["mac_projection"] = mac_projection(rows, preset.time_budget, preset.eval_tokens)
    out = args.out or RESULTS / f"overhead-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wall / budget per run: {doc['wall_over_budget']}")
    if "mac_projection" in doc:
        print("M1 Pro projection:", json.dumps(doc["mac_projection"]))
    print(f"written {out}")


if __name__ == "__main__":
    main()
