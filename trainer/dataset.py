"""Prepared datasets on disk: layout, manifest, CURRENT pointer, atomic writing, reading.

Layout (see the team contract)::

    $AUTORESEARCH_CACHE/datasets/<name>/
        tokenizer.json  token_bytes.npy  train_00000.npz ...  val.npz  manifest.json
    $AUTORESEARCH_CACHE/datasets/CURRENT      name of the dataset last prepared

Shards are ``.npz`` files with two arrays: ``tokens`` (uint16, or uint32 for vocabularies over
65536), documents concatenated, each starting with BOS; and ``doc_starts`` (int64), the offset
of each document's BOS. Shard files are written byte-for-byte deterministically (fixed zip
timestamps), so preparing the same input twice, on any machine, gives the same hashes.

This module is imported by the harness, the worker and the coordinator: keep it free of
``tokenizers`` and ``mlx`` imports (numpy and filelock only).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
VAL_FILE = "val.npz"
TRAIN_PATTERN = "train_{:05d}.npz"
# ~50M tokens (100 MB as uint16) per training shard: big enough to keep file counts low,
# small enough that one shard loads comfortably on a 16 GB Mac.
DEFAULT_SHARD_TOKENS = 50_000_000

Log = Callable[[str], None]


class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or inconsistent; the message says what to do."""


# --------------------------------------------------------------------------- locations

def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """AUTORESEARCH_CACHE, else ~/.cache/autoresearch."""
    env = os.environ if environ is None else environ
    value = env.get("AUTORESEARCH_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "autoresearch"


def datasets_root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "datasets"


def read_current(cache_dir: Path) -> str | None:
    """Name in datasets/CURRENT, or None when nothing was prepared in this cache."""
    try:
        name = (datasets_root(cache_dir) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def set_current(cache_dir: Path, name: str) -> None:
    """Point datasets/CURRENT at ``name`` (atomic: readers see the old or the new name)."""
    root = datasets_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    if read_current(cache_dir) == name:
        return
    tmp = root / f".{CURRENT_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / CURRENT_FILE)


def resolve_dataset_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The dataset a training run uses: $AUTORESEARCH_DATA, else CACHE/datasets/CURRENT.

    Raises DatasetError with a one-line hint when nothing usable is there.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("AUTORESEARCH_DATA")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / MANIFEST_FILE).is_file():
            raise DatasetError(f"AUTORESEARCH_DATA={explicit} is not a prepared dataset "
                               f"(no {MANIFEST_FILE}); run `autoresearch-prepare --sample`")
        return path
    cache = cache_root(env)
    name = read_current(cache)
    if name is None:
        raise DatasetError(f"no prepared dataset in {cache}; run `autoresearch-prepare --sample` "
                           "(or `autoresearch-prepare` for ClimbMix), or set AUTORESEARCH_DATA")
    path = datasets_root(cache) / name
    if not (path / MANIFEST_FILE).is_file():
        raise DatasetError(f"{cache}/datasets/CURRENT names '{name}' but {path} is not a prepared "
                           "dataset; run `autoresearch-prepare --sample` again")
    return path


# --------------------------------------------------------------------------- manifest

def read_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{dataset_dir} is not a prepared dataset (no {MANIFEST_FILE})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    for key in ("name", "vocab_size", "bos_id", "token_dtype", "files", "dataset_hash"):
        if key not in manifest:
            raise DatasetError(f"{path} lacks '{key}'")
    return manifest


def dataset_hash(files: Mapping[str, Mapping]) -> str:
    """sha256 over the sorted (file name, file sha256) pairs."""
    h = hashlib.sha256()
    for fname in sorted(files):
        h.update(fname.encode())
        h.update(b"\0")
        h.update(files[fname]["sha256"].encode())
        h.update(b"\n")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_files(manifest: Mapping) -> list[str]:
    """Names of the training shards, in order."""
    return sorted(f for f in manifest["files"] if f.startswith("train_") and f.endswith(".npz"))


def verify_dataset(dataset_dir: Path) -> list[str]:
    """Re-hash every file against the manifest; returns problems (empty list = intact)."""
    dataset_dir = Path(dataset_dir)
    try:
        manifest = read_manifest(dataset_dir)
    except DatasetError as e:
        return [str(e)]
    problems = []
    files = manifest["files"]
    for fname, meta in sorted(files.items()):
        path = dataset_dir / fname
        if not path.is_file():
            problems.append(f"{fname}: missing")
            continue
        size = path.stat().st_size
        if size != meta.get("bytes"):
            problems.append(f"{fname}: {size} bytes, manifest says {meta.get('bytes')}")
            continue
        if file_sha256(path) != meta.get("sha256"):
            problems.append(f"{fname}: sha256 differs from manifest")
    if dataset_hash(files) != manifest["dataset_hash"]:
        problems.append("dataset_hash does not match the file hashes in the manifest")
    for required in ("tokenizer.json", "token_bytes.npy", VAL_FILE):
        if required not in files:
            problems.append(f"{required}: not listed in manifest")
    if not train_files(manifest):
        problems.append("no training shards listed in manifest")
    return problems


# --------------------------------------------------------------------------- shards

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def write_shard(path: Path, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
    """Write a shard .npz deterministically (same arrays -> same bytes)."""
    if doc_starts.ndim != 1 or tokens.ndim != 1:
        raise ValueError("tokens and doc_starts must be 1-D")
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in (("tokens", tokens), ("doc_starts", doc_starts.astype(np.int64))):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_starts) of one shard, fully loaded into memory."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["tokens"], z["doc_starts"]
    except FileNotFoundError:
        raise DatasetError(f"shard {path} is missing") from None
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"shard {path} is unreadable: {e}") from None


@dataclass
class ShardWriter:
    """Accumulates BOS-prefixed documents and writes train_NNNNN.npz shards of ~max_tokens.

    Documents are never split across shards, so every shard is self-contained.
    """
    out_dir: Path
    dtype: np.dtype
    max_tokens: int = DEFAULT_SHARD_TOKENS
    pattern: str = TRAIN_PATTERN
    written: list[str] = field(default_factory=list)
    tokens: int = 0
    docs: int = 0
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_tokens: int = 0

    def add(self, docs: Iterable[np.ndarray]) -> None:
        for d in docs:
            if self._pending and self._pending_tokens + len(d) > self.max_tokens:
                self.flush()
            self._pending.append(d.astype(self.dtype, copy=False))  # uint16: half of int32
            self._pending_tokens += len(d)

    def flush(self) -> None:
        if not self._pending:
            return
        tokens, starts = concat_documents(self._pending, self.dtype)
        name = self.pattern.format(len(self.written))
        write_shard(Path(self.out_dir) / name, tokens, starts)
        self.written.append(name)
        self.tokens += len(tokens)
        self.docs += len(starts)
        self._pending, self._pending_tokens = [], 0


def concat_documents(docs: list[np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
    return tokens, starts


# --------------------------------------------------------------------------- writing a dataset

@dataclass
class PrepareResult:
    dataset_dir: Path
    manifest: dict
    status: str  # "prepared" | "unchanged" | "replaced"

    def summary(self) -> dict:
        m = self.manifest
        return {
            "status": self.status,
            "name": m["name"],
            "dataset_dir": str(self.dataset_dir),
            "source": m.get("source"),
            "vocab_size": m["vocab_size"],
            "bos_id": m["bos_id"],
            "train_tokens": m.get("train_tokens"),
            "train_docs": m.get("train_docs"),
            "train_shards": len(train_files(m)),
            "val_tokens": m.get("val_tokens"),
            "val_docs": m.get("val_docs"),
            "dataset_hash": m["dataset_hash"],
        }


def existing_if_identical(cache_dir: Path, name: str, recipe: Mapping) -> dict | None:
    """The manifest of datasets/<name> if it was prepared from the same recipe and its files
    are all present with the recorded sizes (a cheap check; verify_dataset re-hashes)."""
    ddir = datasets_root(cache_dir) / name
    try:
        manifest = read_manifest(ddir)
    except DatasetError:
        return None
    if manifest.get("recipe") != json.loads(json.dumps(recipe)):
        return None
    for fname, meta in manifest["files"].items():
        p = ddir / fname
        if not p.is_file() or p.stat().st_size != meta.get("bytes"):
            return None
    return manifest


def prepare_dataset(
    cache_dir: Path,
    name: str,
    source: str,
    recipe: Mapping,
    build: Callable[[Path], Mapping],
    *,
    force: bool = False,
    log: Log | None = None,
) -> PrepareResult:
    """Build datasets/<name> atomically, or do nothing if an identical one exists.

    ``recipe`` describes everything that determines the content (source and its fingerprint,
    vocab size, split, format version); an existing dataset with the same recipe is kept.
    ``build(tmp_dir)`` writes tokenizer.json, token_bytes.npy, val.npz and train_*.npz into
    ``tmp_dir`` and returns the manifest fields it knows (vocab_size, bos_id, token counts...).
    The directory is then hashed, a manifest written, and renamed into place under
    datasets/.lock, so concurrent preparers and readers never see half a dataset.
    CURRENT is pointed at ``name`` in every case.
    """
    log = log or (lambda msg: None)
    _check_name(name)
    root = datasets_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name

    if not force:
        manifest = existing_if_identical(cache_dir, name, recipe)
        if manifest is not None:
            set_current(cache_dir, name)
            return PrepareResult(final, manifest, "unchanged")

    with _dataset_lock(root, log):
        # Another preparer may have finished the same dataset while we waited.
        manifest = None if force else existing_if_identical(cache_dir, name, recipe)
        if manifest is not None:
            set_current(cache_dir, name)
            return PrepareResult(final, manifest, "unchanged")
        _remove_leftovers(root)  # only a crashed preparer leaves these; we hold the lock
        tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            fields = dict(build(tmp))
            manifest = _finish_manifest(tmp, name, source, recipe, fields)
            status = "replaced" if final.exists() else "prepared"
            install_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        set_current(cache_dir, name)
    return PrepareResult(final, manifest, status)


def _finish_manifest(tmp: Path, name: str, source: str, recipe: Mapping, fields: dict) -> dict:
    files = {}
    for p in sorted(tmp.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    for required in ("tokenizer.json", "token_bytes.npy", VAL_FILE):
        if required not in files:
            raise DatasetError(f"internal error: build wrote no {required}")
    manifest = {
        "format": FORMAT_VERSION,
        "name": name,
        "source": source,
        "vocab_size": fields.pop("vocab_size"),
        "bos_id": fields.pop("bos_id"),
        "token_dtype": fields.pop("token_dtype"),
        **fields,
        "recipe": json.loads(json.dumps(recipe)),
        "files": files,
        "dataset_hash": dataset_hash(files),
    }
    tmp_manifest = tmp / (MANIFEST_FILE + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp_manifest, tmp / MANIFEST_FILE)
    return manifest


def install_dir(src: Path, final: Path) -> None:
    """Rename a fully written directory into place; an existing one is swapped out, never
    leaving a moment without a complete dataset at ``final``. Call under the datasets lock."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, final)


def _check_name(name: str) -> None:
    ok = name and name not in (".", "..") and not name.startswith(".")
    ok = ok and all(c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise ValueError(f"bad dataset name {name!r}: use letters, digits, '-', '_', '.'")


def _remove_leftovers(root: Path) -> None:
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
            shutil.rmtree(p, ignore_errors=True)


class _dataset_lock:
    """datasets/.lock; says so on stderr when it has to wait for another preparer."""

    def __init__(self, root: Path, log: Log):
        self.lock = FileLock(str(root / LOCK_FILE))
        self.log = log

    def __enter__(self):
        try:
            self.lock.acquire(timeout=0.5)
        except Timeout:
            self.log(f"waiting for another autoresearch-prepare (lock {self.lock.lock_file}) ...")
            t0 = time.monotonic()
            self.lock.acquire()
            self.log(f"lock acquired after {time.monotonic() - t0:.0f} s")
        return self

    def __exit__(self, *exc):
        self.lock.release()
