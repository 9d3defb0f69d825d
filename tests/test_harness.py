"""The harness end to end: a tiny train.py run as a real subprocess from a fresh directory,
result JSON / progress JSONL / summary block, and the failure statuses and exit codes."""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from trainer import HARNESS_VERSION, harness

V = 16
BOS = 0


def make_dataset(root: Path, n_train_shards=2, seed=0) -> Path:
    """A tiny prepared dataset in the contract's format (npz shards, token_bytes, manifest)."""
    rng = np.random.default_rng(seed)
    d = root / "datasets" / "tiny"
    d.mkdir(parents=True)

    def shard(path, n_docs):
        lengths = rng.integers(2, 30, n_docs)
        starts = (np.cumsum(lengths) - lengths).astype(np.int64)
        # A learnable pattern: each token is usually the previous one + 1.
        tokens = (np.cumsum(rng.integers(0, 2, int(lengths.sum()))) % (V - 1) + 1).astype(np.uint16)
        tokens[starts] = BOS
        np.savez(path, tokens=tokens, doc_starts=starts)

    for i in range(n_train_shards):
        shard(d / f"train_{i:05d}.npz", 300)
    shard(d / "val.npz", 100)
    tb = np.array([0] + [1 + (i % 3) for i in range(1, V)], dtype=np.int32)
    np.save(d / "token_bytes.npy", tb)
    (d / "tokenizer.json").write_text("{}")
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                      "bytes": p.stat().st_size} for p in sorted(d.iterdir())}
    h = hashlib.sha256("".join(f"{k}{v['sha256']}" for k, v in sorted(files.items())).encode())
    (d / "manifest.json").write_text(json.dumps({
        "name": "tiny", "source": "test", "vocab_size": V, "bos_id": BOS,
        "token_dtype": "uint16", "files": files, "dataset_hash": h.hexdigest()}))
    (root / "datasets" / "CURRENT").write_text("tiny\n")
    return d


TRAIN_PY = textwrap.dedent('''
    import time
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from trainer import harness

    MODE = "{mode}"

    def main(argv=None):
        run = harness.start(argv)
        if MODE == "crash":
            raise ValueError("boom in train.py")
        if MODE == "oom":
            raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded.")
        if MODE == "return":
            return
        model = nn.Embedding(run.vocab_size, run.vocab_size)
        opt = optim.SGD(learning_rate=1.0)

        def per_token_loss(x, y):
            return nn.losses.cross_entropy(model(x), y, reduction="none")

        def loss_fn(model, x, y):
            return per_token_loss(x, y).mean()
        step_fn = nn.value_and_grad(model, loss_fn)
        loader = run.train_loader(4)
        t_train, step, B, T = 0.0, 0, 4, run.settings.seq_len
        while t_train < run.settings.time_budget or step < 3:
            t0 = time.time()
            x, y = next(loader)
            loss, grads = step_fn(model, x, y)
            opt.update(model, grads)
            mx.eval(loss, model.parameters())
            dt = time.time() - t0
            t_train += dt
            if MODE == "nan" and step == 2:
                run.fail("nan", f"loss is nan at step {{step}}")
            run.log_step(step=step, loss=loss.item(), progress=min(1.0, t_train / run.settings.time_budget),
                         tok_per_sec=B * T / dt, dt=dt)
            step += 1
        val_bpb = run.evaluate(per_token_loss)
        run.finish(val_bpb=val_bpb, training_seconds=t_train, num_steps=step,
                   num_params_M=run.vocab_size ** 2 / 1e6, depth=1, mfu_percent=0.0,
                   total_tokens_M=step * B * T / 1e6, my_extra="hello")

    if __name__ == "__main__":
        harness.run_main(main)
''')


def run_train(tmp_path, data_root, mode="ok", args=(), extra_env=None):
    rundir = tmp_path / f"run-{mode}"
    rundir.mkdir()
    (rundir / "train.py").write_text(TRAIN_PY.format(mode=mode))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update({"AUTORESEARCH_CACHE": str(data_root), "AUTORESEARCH_SEQ_LEN": "32",
                "AUTORESEARCH_EVAL_TOKENS": str(32 * 20), "AUTORESEARCH_TIME_BUDGET": "1",
                "AUTORESEARCH_EVAL_BATCH": "3", "AUTORESEARCH_SEED": "5",
                "AUTORESEARCH_PROGRESS": str(rundir / "progress.jsonl")})
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=rundir, env=env,
                          capture_output=True, text=True, timeout=120)
    result = rundir / "result.json"      # default: ./result.json in the run directory
    doc = json.loads(result.read_text()) if result.exists() else None
    return proc, doc, rundir


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_dataset(root)
    return root


@pytest.mark.slow
def test_full_run_from_a_fresh_directory(tmp_path, data_root):
    proc, doc, rundir = run_train(tmp_path, data_root)
    assert proc.returncode == harness.EXIT_OK, proc.stderr
    assert doc["status"] == "ok" and doc["schema"] == 1
    assert doc["harness_version"] == HARNESS_VERSION
    for key in harness.RESULT_FIGURES + ("val_bpb", "error", "settings"):
        assert key in doc
    assert math.isfinite(doc["val_bpb"]) and 0 < doc["val_bpb"] < 10
    assert doc["error"] is None and doc["backend"] in ("cpu", "metal")
    assert doc["eval_tokens"] == 20 * 32
    assert doc["settings"] == {"seq_len": 32, "eval_tokens": 640, "time_budget": 1,
                               "seed": 5, "eval_batch": 3}
    assert doc["num_steps"] >= 3 and doc["depth"] == 1 and doc["my_extra"] == "hello"
    assert doc["peak_vram_mb"] > 0 and doc["peak_memory_source"]
    assert 0 <= doc["crop_fraction"] < 1 and doc["tok_per_sec"] > 0
    assert doc["total_seconds"] >= doc["training_seconds"] > 0
    # Progress stream: one JSON line per step.
    lines = [json.loads(l) for l in (rundir / "progress.jsonl").read_text().splitlines()]
    assert len(lines) == doc["num_steps"]
    assert set(lines[0]) >= {"step", "progress", "loss", "tok_per_sec", "elapsed"}
    # Summary block in upstream format; the printed val_bpb is the file's to 6 decimals.
    out = proc.stdout
    block = out[out.index("\n---\n") + 1:].splitlines()
    assert block[0] == "---"
    assert [l.split(":")[0] for l in block[1:10]] == [
        "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
        "total_tokens_M", "num_steps", "num_params_M", "depth"]
    assert block[1].split()[1] == f"{doc['val_bpb']:.6f}"
    assert "step 00000" in out


@pytest.mark.slow
def test_time_budget_flag_and_failure_statuses(tmp_path, data_root):
    proc, doc, _ = run_train(tmp_path, data_root, mode="nan", args=["--time-budget", "2"])
    assert proc.returncode == harness.EXIT_NAN
    assert doc["status"] == "nan" and doc["val_bpb"] is None
    assert doc["error"] == "loss is nan at step 2" and doc["settings"]["time_budget"] == 2

    proc, doc, _ = run_train(tmp_path, data_root, mode="crash")
    assert proc.returncode == harness.EXIT_CRASH
    assert doc["status"] == "crash" and "boom in train.py" in doc["error"]
    assert "Traceback" in doc["error"] and doc["backend"] in ("cpu", "metal")

    proc, doc, _ = run_train(tmp_path, data_root, mode="oom")
    assert proc.returncode == harness.EXIT_OOM and doc["status"] == "oom"

    proc, doc, _ = run_train(tmp_path, data_root, mode="return")
    assert proc.returncode == harness.EXIT_CRASH and "run.finish" in doc["error"]

    proc, doc, _ = run_train(tmp_path, data_root, mode="ok",
                             extra_env={"AUTORESEARCH_SEQ_LEN": "lots"})
    assert proc.returncode == harness.EXIT_CRASH
    assert "AUTORESEARCH_SEQ_LEN" in doc["error"]


def test_write_result_without_start_or_mlx(tmp_path):
    script = textwrap.dedent('''
        import sys
        from trainer import harness
        harness.write_result("ok", val_bpb=1.25, num_steps=3, training_seconds=0.1, extra=[1, 2])
        assert "mlx" not in sys.modules
    ''')
    out = tmp_path / "sub" / "r.json"
    env = dict(os.environ, AUTORESEARCH_RESULT=str(out), AUTORESEARCH_SEED="9")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=tmp_path)
    doc = json.loads(out.read_text())
    assert doc["status"] == "ok" and doc["val_bpb"] == 1.25 and doc["extra"] == [1, 2]
    assert doc["settings"]["seed"] == 9 and doc["training_seconds"] == 0.1
    assert doc["peak_vram_mb"] is None                      # unknown figures are null
    assert not list(out.parent.glob(".result-*"))          # no temp file left behind


def test_write_result_refuses_unknown_status_and_nan_becomes_null(tmp_path):
    with pytest.raises(ValueError, match="status"):
        harness.write_result("great", path=tmp_path / "r.json")
    harness.write_result("nan", path=tmp_path / "r.json", val_bpb=float("nan"))
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text)["val_bpb"] is None and "NaN" not in text


def test_oom_classification():
    assert harness.is_oom(MemoryError())
    assert harness.is_oom(RuntimeError("[malloc] Unable to allocate 1234 bytes"))
    assert harness.is_oom(RuntimeError("Resource limit (499000) exceeded"))
    assert harness.is_oom(RuntimeError("CUDA out of memory"))
    assert not harness.is_oom(RuntimeError("shape mismatch"))
    assert not harness.is_oom(ValueError("out of memory"))


def test_start_in_process_with_flag_override(tmp_path, data_root, monkeypatch, capsys):
    import mlx.core as mx
    env = {"AUTORESEARCH_CACHE": str(data_root), "AUTORESEARCH_SEQ_LEN": "32",
           "AUTORESEARCH_TIME_BUDGET": "300", "AUTORESEARCH_RESULT": str(tmp_path / "r.json")}
    monkeypatch.setattr(harness, "_result_written", None)
    monkeypatch.setattr(harness, "_current_run", None)
    run = harness.start(["--time-budget", "7"], environ=env)
    assert run.settings.time_budget == 7 and run.settings.seq_len == 32
    assert run.vocab_size == V and run.bos_id == BOS
    assert run.backend == ("metal" if mx.metal.is_available() else "cpu")
    assert run.dtype == (mx.bfloat16 if run.backend == "metal" else mx.float32)
    x, y = next(run.train_loader(2))
    assert x.shape == (2, 32) and x.dtype == mx.int32
    assert "time_budget 7s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run.fail("nan", "loss exploded")
    assert e.value.code == harness.EXIT_NAN
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "nan" and doc["error"] == "loss exploded"
    with pytest.raises(RuntimeError, match="before run.evaluate"):
        run.finish(training_seconds=1.0)


def test_help_flag_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        harness.parse_args(["--help"])
    assert e.value.code == 0 and "--time-budget" in capsys.readouterr().out


def test_summary_block_format():
    text = harness.summary_block({"val_bpb": 1.2345678, "training_seconds": 300.04,
                                  "total_seconds": 325.9, "peak_vram_mb": 45060.2,
                                  "mfu_percent": 39.8, "total_tokens_M": 499.6, "num_steps": 953,
                                  "num_params_M": 50.3, "depth": 8})
    assert text.splitlines() == [
        "---", "val_bpb:          1.234568", "training_seconds: 300.0",
        "total_seconds:    325.9", "peak_vram_mb:     45060.2", "mfu_percent:      39.80",
        "total_tokens_M:   499.6", "num_steps:        953", "num_params_M:     50.3",
        "depth:            8"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD restart is Linux-only")
def test_manual_run_restarts_once_with_openblas_preloaded(tmp_path, prepared_sample):
    from trainer.backend import openblas_path
    if not openblas_path():
        pytest.skip("no system OpenBLAS installed")
    script = tmp_path / "train.py"
    script.write_text(
        "import os\n"
        "from trainer import harness\n"
        "harness.start()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('BLAS', 'openblas' in maps, os.environ.get('AUTORESEARCH_TRAINER_ENV'),"
        " os.environ.get('MALLOC_MMAP_MAX_'))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "AUTORESEARCH_TRAINER_ENV") and not k.startswith("MALLOC_")}
    env.update(AUTORESEARCH_DATA=str(prepared_sample), AUTORESEARCH_RESULT=str(tmp_path / "r.json"))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("harness: restarting") == 1
    assert "BLAS True 1 0" in out.stdout
