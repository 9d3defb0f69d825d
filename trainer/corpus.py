"""Where documents come from: the embedded sample, a local corpus, or parquet shards.

A ``Corpus`` hands out its training and validation documents as batches (lists of str), and
can be iterated several times (tokenizer training, then tokenizing), always in the same order.

Local corpora (``--corpus PATH``, a file or a directory searched recursively, sorted by path):

* ``*.parquet`` — one document per row of the ``text`` column (nulls and blanks skipped);
* ``*.jsonl`` / ``*.jsonl.gz`` — one JSON object per line with a string ``"text"`` field;
* ``*.txt`` — the whole file is one document; a file over 1 MiB (a book, a dump) is cut at
  blank lines into documents of at most ~64 KiB, so that one file does not become one
  giant document. Text that is not valid UTF-8 is decoded with replacement characters.

Train/validation split for the sample and local corpora: a document goes to validation when
the sha256 of its text, read as a fraction in [0, 1), is below ``val_fraction``. It depends only
on the text (not on file order), so identical documents always land on the same side; if no
document qualifies, the one with the smallest hash is used, so validation is never empty.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

BATCH_DOCS = 512
BATCH_CHARS = 8_000_000
TXT_SPLIT_BYTES = 1 << 20
TXT_CHUNK_CHARS = 64 * 1024
CORPUS_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
SAMPLE_RESOURCE = "kjv.jsonl.gz"
DEFAULT_VAL_FRACTION = 0.05

Log = Callable[[str], None]


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (and line) at fault."""


# --------------------------------------------------------------------------- corpus objects

@dataclass
class Corpus:
    """Training and validation documents, re-iterable in a fixed order."""
    source: str                     # human-readable, goes into the manifest
    recipe: dict                    # everything that determines the documents (for no-op checks)
    train_batches: Callable[[], Iterator[list[str]]]
    val_batches: Callable[[], Iterator[list[str]]]
    info: dict = field(default_factory=dict)


def batched(docs: Iterable[str], max_docs: int = BATCH_DOCS,
            max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def val_score(text: str) -> float:
    """Position of ``text`` in [0, 1) from its sha256; below val_fraction means validation."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_corpus(source: str, recipe: dict, docs: Callable[[], Iterable[str]],
                 val_fraction: float, log: Log | None = None) -> Corpus:
    """A Corpus that splits ``docs()`` (re-iterable, fixed order) by content hash.

    The split is computed on first use, so building a Corpus only to read its recipe
    (the "is an identical dataset already there?" check) costs nothing.
    """
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    info: dict = {}
    split: list[bytearray] = []

    def is_val() -> bytearray:
        if split:
            return split[0]
        flags = bytearray()
        best, best_score = -1, 2.0
        for i, d in enumerate(docs()):
            s = val_score(d)
            flags.append(s < val_fraction)
            if s < best_score:
                best, best_score = i, s
        n = len(flags)
        if n < 2:
            raise CorpusError(f"{source}: found {n} document(s); need at least 2 "
                              "(one for training, one for validation)")
        if not any(flags):
            flags[best] = 1
        n_val = sum(flags)
        if n_val == n:
            raise CorpusError(f"{source}: every document fell into validation; "
                              "lower --val-fraction")
        if log:
            log(f"{source}: {n:,} documents -> {n - n_val:,} train, {n_val:,} validation")
        info.update(documents=n, val_documents=n_val)
        split.append(flags)
        return flags

    def pick(want_val: bool) -> Iterator[list[str]]:
        flags = is_val()
        return batched(d for i, d in enumerate(docs()) if bool(flags[i]) == want_val)

    return Corpus(source=source, recipe={**recipe, "val_fraction": val_fraction},
                  train_batches=lambda: pick(False), val_batches=lambda: pick(True), info=info)


# --------------------------------------------------------------------------- the sample

def sample_bytes() -> bytes:
    """The compressed embedded sample (works from an installed wheel, too)."""
    return resources.files("trainer.sample").joinpath(SAMPLE_RESOURCE).read_bytes()


# The sample's documents are passages of consecutive verses up to this many characters (about
# 100 tokens), not whole chapters: chapters run to thousands of tokens, so at the short sequence
# lengths a CPU trains with, best-fit packing would crop away most of every chapter (measured:
# 84% of tokens at T=128). Passages look like the short web documents of real pretraining data.
SAMPLE_PASSAGE_CHARS = 400


def sample_documents(data: bytes | None = None,
                     passage_chars: int = SAMPLE_PASSAGE_CHARS) -> list[str]:
    raw = gzip.decompress(sample_bytes() if data is None else data).decode("utf-8")
    docs: list[str] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        title, _, body = json.loads(line)["text"].partition("\n\n")
        passage = [title]  # the chapter's first passage starts with its title ("Genesis 1")
        size, verses = len(title), 0
        for verse in body.splitlines():
            if verses and size + len(verse) > passage_chars:
                docs.append("\n".join(passage) + "\n")
                passage, size, verses = [], 0, 0
            passage.append(verse)
            size += len(verse) + 1
            verses += 1
        if verses:
            docs.append("\n".join(passage) + "\n")
    return docs


def sample_corpus(val_fraction: float = DEFAULT_VAL_FRACTION, log: Log | None = None) -> Corpus:
    data = sample_bytes()
    recipe = {"kind": "sample", "resource": SAMPLE_RESOURCE,
              "sha256": hashlib.sha256(data).hexdigest(), "passage_chars": SAMPLE_PASSAGE_CHARS}
    cached: list[list[str]] = []  # 4 MB of text: decompress once, keep in memory

    def docs() -> Iterator[str]:
        if not cached:
            cached.append(sample_documents(data))
        return iter(cached[0])

    return split_corpus(f"sample:{SAMPLE_RESOURCE}", recipe, docs, val_fraction, log)


# --------------------------------------------------------------------------- local corpus

def find_corpus_files(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"--corpus {path}: no such file or directory")
    if path.is_file():
        if not _corpus_suffix(path):
            raise CorpusError(f"--corpus {path}: unsupported file type "
                              f"(use {', '.join(CORPUS_SUFFIXES)})")
        return [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and _corpus_suffix(Path(f))]
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CorpusError(f"--corpus {path}: no {', '.join(CORPUS_SUFFIXES)} files in it")
    return files


def _corpus_suffix(p: Path) -> str | None:
    name = p.name.lower()
    return next((s for s in CORPUS_SUFFIXES if name.endswith(s)), None)


def iter_file_documents(path: Path, warn: Log | None = None) -> Iterator[str]:
    kind = _corpus_suffix(path)
    if kind == ".parquet":
        yield from iter_parquet_documents(path)
    elif kind in (".jsonl", ".jsonl.gz"):
        yield from _iter_jsonl(path)
    elif kind == ".txt":
        yield from _iter_txt(path, warn)
    else:
        raise CorpusError(f"{path}: unsupported file type")


def iter_parquet_documents(path: Path, batch_rows: int = 1024) -> Iterator[str]:
    import pyarrow.parquet as pq  # heavy import; only when parquet is used

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: parquet file has no 'text' column "
                          f"(columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _iter_jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as raw:
        for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="strict"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string \"text\" field")
            if text.strip():
                yield text


def _iter_txt(path: Path, warn: Log | None) -> Iterator[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        if warn:
            warn(f"warning: {path} is not valid UTF-8; undecodable bytes replaced")
    if len(data) <= TXT_SPLIT_BYTES:
        if text.strip():
            yield text
        return
    yield from _chunk_paragraphs(text, TXT_CHUNK_CHARS)


def _chunk_paragraphs(text: str, max_chars: int) -> Iterator[str]:
    """Cut at blank lines into pieces of at most ~max_chars (a longer paragraph stays whole)."""
    buf, size = [], 0
    for para in text.split("\n\n"):
        if buf and size + len(para) + 2 > max_chars:
            chunk = "\n\n".join(buf)
            if chunk.strip():
                yield chunk
            buf, size = [], 0
        buf.append(para)
        size += len(para) + 2
    chunk = "\n\n".join(buf)
    if chunk.strip():
        yield chunk


def local_corpus(path: Path, val_fraction: float = DEFAULT_VAL_FRACTION,
                 log: Log | None = None) -> Corpus:
    root = Path(path).expanduser().resolve()
    files = find_corpus_files(root)
    warned: set[str] = set()

    def warn_once(msg: str) -> None:
        if log and msg not in warned:
            warned.add(msg)
            log(msg)

    def docs() -> Iterator[str]:
        for f in files:
            yield from iter_file_documents(f, warn_once)

    # Size + mtime of every file: cheap, and changes whenever the corpus is edited.
    fingerprint = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.relative_to(root).as_posix() if f != root else f.name
        fingerprint.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    recipe = {"kind": "corpus", "path": str(root), "files": len(files),
              "fingerprint": fingerprint.hexdigest()}
    return split_corpus(f"corpus:{root}", recipe, docs, val_fraction, log)


def corpus_name(path: Path) -> str:
    """Default dataset name of a local corpus: corpus-<8 hex of its absolute path's hash>."""
    root = str(Path(path).expanduser().resolve())
    return "corpus-" + hashlib.sha256(root.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- parquet shards

def parquet_corpus(source: str, recipe: dict, train_files: list[Path],
                   val_files: list[Path]) -> Corpus:
    """Documents from already-split parquet files (ClimbMix: shards + the pinned val shard)."""
    def from_files(files: list[Path]) -> Iterator[list[str]]:
        return batched(d for f in files for d in iter_parquet_documents(f))

    return Corpus(source=source, recipe=recipe,
                  train_batches=lambda: from_files(train_files),
                  val_batches=lambda: from_files(val_files),
                  info={"train_files": len(train_files), "val_files": len(val_files)})
