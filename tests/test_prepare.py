"""Preparing datasets: layout and manifest, no-op re-prepare, locking, corpora, CLI."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from trainer.corpus import SAMPLE_PASSAGE_CHARS, sample_documents
import pyarrow.parquet as pq
import pytest

from trainer import corpus as corpus_mod
from trainer import dataset as ds
from trainer.prepare import prepare_corpus, prepare_from_corpus, prepare_sample
from trainer.tokenizer import decode, load_tokenizer

PREPARE = [sys.executable, "-m", "trainer.prepare"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PREPARE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------- the sample

def test_prepared_sample_layout(prepared_sample: Path):
    d = prepared_sample
    cache = d.parent.parent
    assert d.name == "sample" and d.parent.name == "datasets"
    assert (cache / "datasets" / "CURRENT").read_text().strip() == "sample"
    names = sorted(p.name for p in d.iterdir())
    assert names == ["manifest.json", "token_bytes.npy", "tokenizer.json", "train_00000.npz",
                     "val.npz"]
    m = ds.read_manifest(d)
    assert m["name"] == "sample" and m["source"].startswith("sample:")
    assert m["vocab_size"] == 512 and m["bos_id"] == 0 and m["token_dtype"] == "uint16"
    assert set(m["files"]) == {"tokenizer.json", "token_bytes.npy", "train_00000.npz", "val.npz"}
    assert m["dataset_hash"] == ds.dataset_hash(m["files"])
    assert ds.verify_dataset(d) == []
    tb = np.load(d / "token_bytes.npy")
    assert tb.dtype == np.int32 and tb.shape == (512,) and tb[:4].tolist() == [0, 0, 0, 0]


def test_shards_hold_bos_prefixed_documents(prepared_sample: Path):
    m = ds.read_manifest(prepared_sample)
    total = 0
    for fname in ["val.npz", *ds.train_files(m)]:
        tokens, starts = ds.load_shard(prepared_sample / fname)
        assert tokens.dtype == np.uint16 and starts.dtype == np.int64
        assert starts[0] == 0 and np.all(np.diff(starts) > 1)
        assert np.all(tokens[starts] == m["bos_id"])
        assert int((tokens == m["bos_id"]).sum()) == len(starts)  # BOS only at boundaries
        assert tokens.max() < m["vocab_size"]
        total += len(starts)
    assert m["val_docs"] >= 1 and m["val_docs"] + m["train_docs"] == total == len(sample_documents())


def test_val_documents_decode_to_the_split_text(prepared_sample: Path):
    tok = load_tokenizer(prepared_sample)
    tokens, starts = ds.load_shard(prepared_sample / "val.npz")
    bounds = [*starts.tolist(), len(tokens)]
    decoded = [decode(tok, tokens[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
    expected = [d for batch in corpus_mod.sample_corpus().val_batches() for d in batch]
    assert decoded == expected
    # the split is by content hash
    assert all(corpus_mod.val_score(t) < 0.05 for t in expected)


def test_identical_prepare_is_a_noop(prepared_sample: Path):
    cache = prepared_sample.parent.parent
    before = {p.name: p.stat().st_mtime_ns for p in prepared_sample.iterdir()}
    assert prepare_sample(cache, vocab_size=512) == prepared_sample
    result = prepare_from_corpus(cache, "sample", corpus_mod.sample_corpus(), vocab_size=512)
    assert result.status == "unchanged"
    assert {p.name: p.stat().st_mtime_ns for p in prepared_sample.iterdir()} == before


@pytest.mark.slow
def test_rebuild_is_byte_identical_and_other_vocab_replaces(tmp_path):
    first = prepare_from_corpus(tmp_path, "sample", corpus_mod.sample_corpus(), vocab_size=300)
    again = prepare_from_corpus(tmp_path, "sample", corpus_mod.sample_corpus(), vocab_size=300,
                                force=True)
    assert first.status == "prepared" and again.status == "replaced"
    assert again.manifest["dataset_hash"] == first.manifest["dataset_hash"]
    other = prepare_from_corpus(tmp_path, "sample", corpus_mod.sample_corpus(), vocab_size=320)
    assert other.status == "replaced" and other.manifest["vocab_size"] == 320
    assert other.manifest["dataset_hash"] != first.manifest["dataset_hash"]
    # no temporary or old directories are left behind
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [".lock", "CURRENT",
                                                                         "sample"]


def test_verify_dataset_detects_damage(prepared_sample: Path, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(prepared_sample, d)
    assert ds.verify_dataset(d) == []
    data = bytearray((d / "val.npz").read_bytes())
    data[-1] ^= 0xFF
    (d / "val.npz").write_bytes(bytes(data))
    (d / "token_bytes.npy").unlink()
    problems = ds.verify_dataset(d)
    assert "val.npz: sha256 differs from manifest" in problems
    assert "token_bytes.npy: missing" in problems
    (d / "manifest.json").unlink()
    assert "no manifest.json" in ds.verify_dataset(d)[0]


def test_failed_build_leaves_nothing(tmp_path):
    def build(out: Path):
        (out / "tokenizer.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ds.prepare_dataset(tmp_path, "broken", "test", {"x": 1}, build)
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [".lock"]


# --------------------------------------------------------------------------- resolving

def test_resolve_dataset_dir(prepared_sample: Path, tmp_path):
    cache = prepared_sample.parent.parent
    assert ds.resolve_dataset_dir({"AUTORESEARCH_CACHE": str(cache)}) == prepared_sample
    assert ds.resolve_dataset_dir({"AUTORESEARCH_DATA": str(prepared_sample),
                                   "AUTORESEARCH_CACHE": str(tmp_path)}) == prepared_sample
    with pytest.raises(ds.DatasetError, match="autoresearch-prepare --sample"):
        ds.resolve_dataset_dir({"AUTORESEARCH_CACHE": str(tmp_path / "empty")})
    with pytest.raises(ds.DatasetError, match="AUTORESEARCH_DATA"):
        ds.resolve_dataset_dir({"AUTORESEARCH_DATA": str(tmp_path)})
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "CURRENT").write_text("gone\n")
    with pytest.raises(ds.DatasetError, match="names 'gone'"):
        ds.resolve_dataset_dir({"AUTORESEARCH_CACHE": str(tmp_path)})


def test_cache_root_default_and_env(tmp_path):
    assert ds.cache_root({}) == Path.home() / ".cache" / "autoresearch"
    assert ds.cache_root({"AUTORESEARCH_CACHE": str(tmp_path)}) == tmp_path


def test_load_shard_errors(tmp_path):
    with pytest.raises(ds.DatasetError, match="missing"):
        ds.load_shard(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ds.DatasetError, match="unreadable"):
        ds.load_shard(tmp_path / "bad.npz")


def test_shard_writer_splits_between_documents(tmp_path):
    docs = [np.arange(n, dtype=np.int32) for n in (5, 7, 3, 9, 2, 20)]
    w = ds.ShardWriter(tmp_path, np.dtype(np.uint16), max_tokens=12)
    w.add(docs)
    w.flush()
    # 5+7 and 3+9 fill 12 exactly; 2 alone; a document longer than a shard gets its own
    assert w.written == [f"train_{i:05d}.npz" for i in range(4)]
    starts = [ds.load_shard(tmp_path / f)[1].tolist() for f in w.written]
    assert starts == [[0, 5], [0, 3], [0], [0]]
    assert w.tokens == 46 and w.docs == 6
    assert ds.token_dtype(65536) == np.uint16 and ds.token_dtype(65537) == np.uint32
    # deterministic bytes
    tokens, starts = ds.load_shard(tmp_path / "train_00000.npz")
    ds.write_shard(tmp_path / "again.npz", tokens, starts)
    assert (tmp_path / "again.npz").read_bytes() == (tmp_path / "train_00000.npz").read_bytes()


# --------------------------------------------------------------------------- local corpora

def make_corpus(root: Path) -> list[str]:
    """A mixed corpus; returns its documents in the order prepare reads them."""
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("A whole text file is one document.\n\nEven with paragraphs.")
    with open(root / "b.jsonl", "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"text": f"jsonl document number {i} says hello", "n": i}) + "\n")
        fh.write("\n")
    with gzip.open(root / "sub" / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "gzipped jsonl document 😀"}) + "\n")
    pq.write_table(pa.table({"text": [f"parquet row {i} 中文" for i in range(20)] + [None, " "]}),
                   root / "sub" / "d.parquet")
    (root / ".hidden" / "e.txt").write_text("ignored")
    (root / "notes.md").write_text("ignored: not a corpus suffix")
    return (["A whole text file is one document.\n\nEven with paragraphs."]
            + [f"jsonl document number {i} says hello" for i in range(30)]
            + ["gzipped jsonl document 😀"] + [f"parquet row {i} 中文" for i in range(20)])


def test_local_corpus_reads_every_kind(tmp_path):
    expected = make_corpus(tmp_path / "c")
    docs = [d for f in corpus_mod.find_corpus_files(tmp_path / "c")
            for d in corpus_mod.iter_file_documents(f)]
    assert docs == expected


def test_prepare_local_corpus(tmp_path):
    expected = make_corpus(tmp_path / "c")
    cache = tmp_path / "cache"
    result = prepare_corpus(cache, tmp_path / "c", vocab_size=300, val_fraction=0.2)
    m = result.manifest
    assert result.dataset_dir.name == corpus_mod.corpus_name(tmp_path / "c")
    assert result.dataset_dir.name.startswith("corpus-") and len(result.dataset_dir.name) == 15
    assert m["train_docs"] + m["val_docs"] == len(expected) and m["val_docs"] >= 1
    assert ds.verify_dataset(result.dataset_dir) == []
    tok = load_tokenizer(result.dataset_dir)
    tokens, starts = ds.load_shard(result.dataset_dir / "val.npz")
    bounds = [*starts.tolist(), len(tokens)]
    val = [decode(tok, tokens[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
    want = [d for d in expected if corpus_mod.val_score(d) < 0.2] or [
        min(expected, key=corpus_mod.val_score)]
    assert val == want
    assert m["val_docs"] == len(want)
    # unchanged corpus: no-op; touched corpus: rebuilt
    assert prepare_corpus(cache, tmp_path / "c", vocab_size=300, val_fraction=0.2).status == "unchanged"
    (tmp_path / "c" / "a.txt").write_text("changed text\n")
    assert prepare_corpus(cache, tmp_path / "c", vocab_size=300, val_fraction=0.2).status == "replaced"


def test_split_keeps_at_least_one_val_document(tmp_path):
    docs = ["one document", "another document"]
    c = corpus_mod.split_corpus("t", {}, lambda: iter(docs), val_fraction=1e-9)
    val = [d for b in c.val_batches() for d in b]
    train = [d for b in c.train_batches() for d in b]
    assert len(val) == 1 and len(train) == 1 and sorted(val + train) == sorted(docs)
    with pytest.raises(corpus_mod.CorpusError, match="at least 2"):
        list(corpus_mod.split_corpus("t", {}, lambda: iter(["solo"]), 0.05).val_batches())


def test_large_txt_is_cut_at_blank_lines(tmp_path):
    para = ("word " * 200).strip()
    text = "\n\n".join(f"{i} {para}" for i in range(1500))  # ~1.5 MB
    (tmp_path / "big.txt").write_text(text)
    docs = list(corpus_mod.iter_file_documents(tmp_path / "big.txt"))
    assert len(docs) > 10
    assert all(len(d) <= corpus_mod.TXT_CHUNK_CHARS for d in docs)
    assert "\n\n".join(docs) == text


def test_corpus_errors_are_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    proc = run_cli("--corpus", str(tmp_path / "bad"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "x.jsonl:2: expected an object with a string \"text\" field")
    proc = run_cli("--corpus", str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 1 and "no such file or directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("--corpus", str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 1 and "no .parquet, .jsonl, .jsonl.gz, .txt files" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- CLI

def test_cli_help_explains_everything():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ("--sample", "--corpus", "--num-shards", "--base-url", "--download-workers",
                 "--vocab-size", "--val-fraction", "--cache-dir", "AUTORESEARCH_CACHE", "--json",
                 "ONE document", "CURRENT", "manifest.json", "<|reserved_0|>", "6542"):
        assert word in proc.stdout, word


def test_cli_rejects_conflicting_sources(tmp_path):
    proc = run_cli("--sample", "--corpus", str(tmp_path))
    assert proc.returncode == 2 and "either --sample or --corpus" in proc.stderr
    proc = run_cli("--sample", "--num-shards", "3")
    assert proc.returncode == 2 and "only to the ClimbMix" in proc.stderr


@pytest.mark.slow
def test_cli_sample_json_then_noop(tmp_path):
    env = {"AUTORESEARCH_CACHE": str(tmp_path)}  # the env var picks the cache
    proc = run_cli("--sample", "--vocab-size", "300", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["status"] == "prepared" and s["vocab_size"] == 300 and s["train_shards"] == 1
    assert s["dataset_dir"] == str(tmp_path / "datasets" / "sample")
    assert s["train_tokens"] > 0 and s["val_tokens"] > 0 and len(s["dataset_hash"]) == 64
    assert "trained tokenizer" in proc.stderr  # progress goes to stderr
    proc = run_cli("--sample", "--vocab-size", "300", env=env)
    assert proc.returncode == 0
    assert "nothing to do" in proc.stderr
    assert f"dataset hash: {s['dataset_hash']}" in proc.stdout
    assert "val tokens:" in proc.stdout and "vocab:        300" in proc.stdout


@pytest.mark.slow
def test_concurrent_preparers_share_one_build(tmp_path):
    """Two processes preparing the same sample into one cache: one builds, one waits and reuses."""
    args = [*PREPARE, "--sample", "--vocab-size", "300", "--json", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o) for o, _ in outs]
    assert sorted(r["status"] for r in results) == ["prepared", "unchanged"]
    assert results[0]["dataset_hash"] == results[1]["dataset_hash"]
    assert ds.verify_dataset(tmp_path / "datasets" / "sample") == []


@pytest.mark.slow
def test_full_sample_at_default_vocab(tmp_path):
    """The demo's dataset: the whole sample at vocab 8192 (takes a couple of seconds)."""
    d = prepare_sample(tmp_path)
    m = ds.read_manifest(d)
    assert m["vocab_size"] == 8192 and m["token_dtype"] == "uint16"
    assert len(ds.train_files(m)) == 1
    assert m["train_tokens"] > 500_000 and m["val_tokens"] > 10_000
    assert ds.verify_dataset(d) == []


def test_sample_documents_are_short_passages_that_keep_every_verse():
    """Chapters are cut into verse passages (short documents pack well at small T); no text is lost."""
    import gzip as _gzip
    from importlib import resources
    docs = sample_documents()
    chapters = [json.loads(l)["text"] for l in _gzip.decompress(
        resources.files("trainer.sample").joinpath("kjv.jsonl.gz").read_bytes()).decode().splitlines()]
    assert len(docs) > 5 * len(chapters)
    # A passage only exceeds the cap when a single verse does (plus the chapter title).
    longest_verse = max(len(v) for c in chapters for v in c.split("\n"))
    assert max(len(d) for d in docs) <= max(SAMPLE_PASSAGE_CHARS, longest_verse) + 40
    joined = "".join(docs).replace("\n", "")
    assert joined == "".join(c.replace("\n", "") for c in chapters)
