"""``autoresearch-prepare``: download or read a corpus, train the tokenizer, write a dataset.

Python API (used by tests and the demo):

    prepare_sample(cache_dir, vocab_size=8192) -> Path        # the embedded KJV sample
    prepare_corpus(cache_dir, path, ...) -> PrepareResult      # a local corpus
    prepare_climbmix(cache_dir, num_shards=10, ...) -> PrepareResult

All three end in ``trainer.dataset.prepare_dataset``: an identical dataset already in the cache
is a no-op; otherwise the dataset is built in a temporary directory and renamed into place.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click
import numpy as np

from trainer import corpus as corpus_mod
from trainer import dataset as ds
from trainer import download as dl
from trainer.tokenizer import (DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, SPLIT_PATTERN,
                               bos_id, encode_documents, save_tokenizer, train_tokenizer)

# Tokenizer training reads at most this much text (the start of the training documents), and
# at most DOC_CAP characters of any one document, so a huge corpus trains in minutes, not hours.
DEFAULT_TOKENIZER_CHARS = 1_000_000_000
DOC_CAP = 10_000
# Bump when the bytes a given recipe produces change (tokenizer setup, shard format...):
# existing datasets are then rebuilt instead of being taken as identical.
PREPARE_VERSION = 1

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass


# --------------------------------------------------------------------------- building

def _tokenizer_text(batches: Iterable[list[str]], max_chars: int, doc_cap: int) -> Iterator[list[str]]:
    """The training batches, each document cut to doc_cap chars, until max_chars are used."""
    used = 0
    for batch in batches:
        out = []
        for d in batch:
            d = d[:doc_cap]
            out.append(d)
            used += len(d)
            if used >= max_chars:
                break
        if out:
            yield out
        if used >= max_chars:
            return


class _Ticker:
    """'tokenizing train: N docs, M tokens' on stderr: redrawn on a TTY, every 15 s otherwise."""

    def __init__(self, label: str, log: Log, tty: bool):
        self.label, self.log, self.tty = label, log, tty
        self.docs = self.tokens = 0
        self.t0 = self.last = time.monotonic()

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.tty and now - self.last >= 0.2:
            sys.stderr.write(f"\r{self._text()} ")
            sys.stderr.flush()
            self.last = now
        elif not self.tty and now - self.last >= 15:
            self.log(self._text())
            self.last = now

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r")
        self.log(f"{self._text()} in {time.monotonic() - self.t0:.1f} s")

    def _text(self) -> str:
        return f"tokenized {self.label}: {self.docs:,} documents, {self.tokens:,} tokens"


def _builder(corpus: corpus_mod.Corpus, vocab_size: int, tokenizer_chars: int, shard_tokens: int,
             log: Log, tty: bool) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        log(f"training tokenizer (vocab {vocab_size:,}) on up to {tokenizer_chars / 1e6:,.0f}M "
            f"chars of {corpus.source} ...")
        tok = train_tokenizer(_tokenizer_text(corpus.train_batches(), tokenizer_chars, DOC_CAP),
                              vocab_size, log=log)
        if tok.get_vocab_size() < vocab_size:
            log(f"note: the corpus only supports {tok.get_vocab_size():,} tokens "
                f"(asked for {vocab_size:,})")
        save_tokenizer(tok, out)
        bos = bos_id(tok)
        vocab = tok.get_vocab_size()
        dtype = ds.token_dtype(vocab)

        ticker = _Ticker("val", log, tty)
        val_docs: list[np.ndarray] = []
        for batch in corpus.val_batches():
            arrs = encode_documents(tok, batch, bos=bos)
            val_docs += [a.astype(dtype) for a in arrs]
            ticker.add(len(arrs), sum(map(len, arrs)))
        ticker.done()
        if not val_docs:
            raise corpus_mod.CorpusError(f"{corpus.source}: no validation documents")
        val_tokens, val_starts = ds.concat_documents(val_docs, dtype)
        ds.write_shard(out / ds.VAL_FILE, val_tokens, val_starts)
        del val_docs

        ticker = _Ticker("train", log, tty)
        writer = ds.ShardWriter(out, dtype, max_tokens=shard_tokens)
        for batch in corpus.train_batches():
            arrs = encode_documents(tok, batch, bos=bos)
            writer.add(arrs)
            ticker.add(len(arrs), sum(map(len, arrs)))
        writer.flush()
        ticker.done()
        if not writer.written:
            raise corpus_mod.CorpusError(f"{corpus.source}: no training documents")
        return {"vocab_size": vocab, "bos_id": bos, "token_dtype": dtype.name,
                "special_tokens": SPECIAL_TOKENS,
                "train_tokens": writer.tokens, "train_docs": writer.docs,
                "val_tokens": int(len(val_tokens)), "val_docs": int(len(val_starts))}
    return build


def _recipe(corpus: corpus_mod.Corpus, vocab_size: int, tokenizer_chars: int,
            shard_tokens: int) -> dict:
    return {"prepare_version": PREPARE_VERSION, "format": ds.FORMAT_VERSION,
            "corpus": corpus.recipe,
            "tokenizer": {"vocab_size": vocab_size, "split_pattern": SPLIT_PATTERN,
                          "special_tokens": SPECIAL_TOKENS, "max_chars": tokenizer_chars,
                          "doc_cap": DOC_CAP},
            "shard_tokens": shard_tokens}


def prepare_from_corpus(cache_dir: Path, name: str, corpus: corpus_mod.Corpus, *,
                        vocab_size: int = DEFAULT_VOCAB_SIZE,
                        tokenizer_chars: int = DEFAULT_TOKENIZER_CHARS,
                        shard_tokens: int = ds.DEFAULT_SHARD_TOKENS, force: bool = False,
                        log: Log | None = None, tty: bool = False) -> ds.PrepareResult:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (got {vocab_size})")
    log = log or _quiet
    recipe = _recipe(corpus, vocab_size, tokenizer_chars, shard_tokens)
    build = _builder(corpus, vocab_size, tokenizer_chars, shard_tokens, log, tty)
    return ds.prepare_dataset(Path(cache_dir), name, corpus.source, recipe, build,
                              force=force, log=log)


def prepare_sample(cache_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                   val_fraction: float = corpus_mod.DEFAULT_VAL_FRACTION, name: str = "sample",
                   force: bool = False, log: Log | None = None) -> Path:
    """Prepare the embedded KJV sample into ``cache_dir``; returns the dataset directory.

    A fast no-op (no tokenizer work) when the same sample dataset is already there.
    """
    corpus = corpus_mod.sample_corpus(val_fraction, log)
    return prepare_from_corpus(cache_dir, name, corpus, vocab_size=vocab_size, force=force,
                               log=log).dataset_dir


def prepare_corpus(cache_dir: Path, path: Path, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                   val_fraction: float = corpus_mod.DEFAULT_VAL_FRACTION, name: str | None = None,
                   **kw) -> ds.PrepareResult:
    corpus = corpus_mod.local_corpus(path, val_fraction, kw.get("log"))
    return prepare_from_corpus(cache_dir, name or corpus_mod.corpus_name(path), corpus,
                               vocab_size=vocab_size, **kw)


def prepare_climbmix(cache_dir: Path, num_shards: int = dl.DEFAULT_NUM_SHARDS, *,
                     base_url: str = dl.DEFAULT_BASE_URL, workers: int = dl.DEFAULT_WORKERS,
                     policy: dl.FetchPolicy | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                     name: str = "climbmix", download_only: bool = False,
                     log: Log | None = None, tty: bool = False, **kw) -> ds.PrepareResult | None:
    """Download shards 0..num_shards-1 plus the pinned validation shard, then prepare.

    An identical dataset already prepared is a no-op even if the raw shards were deleted.
    """
    log = log or _quiet
    train_idx, val_idx = dl.climbmix_shards(num_shards)
    raw_dir = Path(cache_dir) / "raw" / "climbmix"
    train_paths = [raw_dir / dl.shard_name(i) for i in train_idx]
    val_path = raw_dir / dl.shard_name(val_idx)
    # The recipe names shards, not their bytes: the upstream files are immutable, so the
    # no-op check needs neither the network nor the raw files.
    recipe = {"kind": "climbmix", "train_shards": [train_idx[0], train_idx[-1]],
              "val_shard": val_idx}
    corpus = corpus_mod.parquet_corpus(f"climbmix:{num_shards} shards + val shard {val_idx}",
                                       recipe, train_paths, [val_path])
    full_recipe = _recipe(corpus, vocab_size, kw.get("tokenizer_chars", DEFAULT_TOKENIZER_CHARS),
                          kw.get("shard_tokens", ds.DEFAULT_SHARD_TOKENS))
    if not download_only and not kw.get("force"):
        if ds.existing_if_identical(Path(cache_dir), name, full_recipe) is not None:
            return prepare_from_corpus(cache_dir, name, corpus, vocab_size=vocab_size,
                                       log=log, tty=tty, **kw)
    log(f"downloading {num_shards} training shard(s) + validation shard from {base_url} "
        f"into {raw_dir}")
    dl.download_climbmix(raw_dir, num_shards, base_url, workers, policy, tty=tty)
    if download_only:
        return None
    return prepare_from_corpus(cache_dir, name, corpus, vocab_size=vocab_size, log=log,
                               tty=tty, **kw)


# --------------------------------------------------------------------------- CLI

HELP = f"""Prepare the training data: get text, train the tokenizer, write a dataset.

\b
Sources (pick one):
  (default)      download ClimbMix-400B shuffle shards: --num-shards training shards
                 (0..N-1) plus the pinned last shard {dl.VAL_SHARD} as validation, into
                 CACHE/raw/climbmix/ (parallel, retried, resumed from .part files)
  --sample       the small corpus embedded in the package (King James Bible, ~4 MB);
                 works offline; what the demo and the tests use
  --corpus PATH  your own text: a file or a directory searched recursively for
                 *.parquet (a 'text' column), *.jsonl / *.jsonl.gz (a "text" field per
                 line) and *.txt files. A .txt file is ONE document, except that a file
                 over 1 MiB is cut at blank lines into documents of about 64 KiB or less.

\b
Split: ClimbMix uses the validation shard. --sample and --corpus send a document
to validation when the sha256 of its text falls in the first --val-fraction of the
hash range (so duplicates never straddle the split); at least one document always
goes to validation.

\b
Tokenizer: byte-level BPE (no unknown tokens), GPT-4 style pre-split with digits in
groups of 1-2, specials <|reserved_0|>..<|reserved_3|> (ids 0-3), BOS = <|reserved_0|>.
Special-token text inside documents is encoded as plain text. Trained on the training
documents only (first --tokenizer-chars characters, each document capped at {DOC_CAP:,}).

\b
Output: CACHE/datasets/NAME/ with tokenizer.json, token_bytes.npy, train_NNNNN.npz
(about --shard-tokens tokens each), val.npz and manifest.json (sha256 of every file and
a dataset hash); CACHE/datasets/CURRENT names the dataset training runs use. NAME is
'sample', 'climbmix' or 'corpus-<hash of the path>' unless --name is given. The dataset
is written to a temporary directory and renamed into place under a lock; preparing an
identical dataset again does nothing (and says so). A different recipe under the same
name replaces the old dataset.

\b
CACHE is --cache-dir, else $AUTORESEARCH_CACHE, else ~/.cache/autoresearch.
Progress goes to stderr; the summary (or --json) to stdout. Exit status is non-zero on
any failure, with a one-line reason.
"""


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                            "max_content_width": 100})
@click.option("--sample", is_flag=True, help="Use the embedded sample corpus (offline).")
@click.option("--corpus", "corpus_path", type=click.Path(path_type=Path), metavar="PATH",
              help="Use a local corpus (file or directory; see above).")
@click.option("--num-shards", type=click.IntRange(1, dl.MAX_SHARD), default=dl.DEFAULT_NUM_SHARDS,
              show_default=True, help="ClimbMix training shards to download.")
@click.option("--base-url", default=dl.DEFAULT_BASE_URL, show_default=True,
              help="Where the shard_NNNNN.parquet files are served.")
@click.option("--download-workers", type=click.IntRange(1, 64), default=dl.DEFAULT_WORKERS,
              show_default=True, help="Parallel downloads.")
@click.option("--retries", type=click.IntRange(0, 20), default=dl.DEFAULT_RETRIES,
              show_default=True, help="Retries per file (exponential backoff from 1 s).")
@click.option("--download-only", is_flag=True, help="ClimbMix: download the shards and stop.")
@click.option("--vocab-size", type=click.IntRange(MIN_VOCAB_SIZE, 1 << 24),
              default=DEFAULT_VOCAB_SIZE, show_default=True,
              help="Tokenizer vocabulary, including the 4 special tokens.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=corpus_mod.DEFAULT_VAL_FRACTION, show_default=True,
              help="--sample/--corpus: share of documents used for validation.")
@click.option("--tokenizer-chars", type=click.IntRange(1), default=DEFAULT_TOKENIZER_CHARS,
              show_default=True, help="Most characters of training text the tokenizer sees.")
@click.option("--shard-tokens", type=click.IntRange(1), default=ds.DEFAULT_SHARD_TOKENS,
              show_default=True, help="Tokens per training shard file (documents never split).")
@click.option("--name", help="Dataset name (default: sample / climbmix / corpus-<hash>).")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="AUTORESEARCH_CACHE",
              show_envvar=True, help="Cache root [default: ~/.cache/autoresearch].")
@click.option("--force", is_flag=True, help="Rebuild even if an identical dataset exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def cli(ctx: click.Context, sample: bool, corpus_path: Path | None, num_shards: int, base_url: str,
        download_workers: int, retries: int, download_only: bool, vocab_size: int,
        val_fraction: float, tokenizer_chars: int, shard_tokens: int, name: str | None,
        cache_dir: Path | None, force: bool, as_json: bool) -> None:
    if sample and corpus_path is not None:
        raise click.UsageError("use either --sample or --corpus PATH, not both")
    if sample or corpus_path is not None:
        for opt in ("num_shards", "base_url", "download_workers", "retries", "download_only"):
            if _explicit(ctx, opt):
                raise click.UsageError(f"--{opt.replace('_', '-')} applies only to the ClimbMix "
                                       "download (no --sample / --corpus)")
    elif _explicit(ctx, "val_fraction"):
        raise click.UsageError("--val-fraction applies only to --sample / --corpus "
                               "(ClimbMix validates on its pinned shard)")
    cache = (cache_dir or ds.cache_root({})).expanduser()
    tty = sys.stderr.isatty()
    t0 = time.monotonic()
    common = dict(vocab_size=vocab_size, tokenizer_chars=tokenizer_chars,
                  shard_tokens=shard_tokens, force=force, log=stderr_log, tty=tty)
    try:
        if sample:
            corpus = corpus_mod.sample_corpus(val_fraction, stderr_log)
            result = prepare_from_corpus(cache, name or "sample", corpus, **common)
        elif corpus_path is not None:
            result = prepare_corpus(cache, corpus_path, val_fraction=val_fraction, name=name,
                                    **common)
        else:
            policy = dl.FetchPolicy(retries=retries)
            result = prepare_climbmix(cache, num_shards, base_url=base_url,
                                      workers=download_workers, policy=policy,
                                      name=name or "climbmix", download_only=download_only,
                                      **common)
            if result is None:
                stderr_log(f"downloaded into {cache / 'raw' / 'climbmix'}")
                return
    except (dl.DownloadError, corpus_mod.CorpusError, ds.DatasetError, ValueError, OSError) as e:
        click.echo(f"autoresearch-prepare: error: {e}", err=True)
        ctx.exit(1)
    except KeyboardInterrupt:
        click.echo("autoresearch-prepare: interrupted (partial downloads are kept and resume)",
                   err=True)
        ctx.exit(130)
    _report(result, time.monotonic() - t0, as_json)


def _report(result: ds.PrepareResult, seconds: float, as_json: bool) -> None:
    s = result.summary()
    s["seconds"] = round(seconds, 2)
    if s["status"] == "unchanged":
        stderr_log(f"dataset '{s['name']}' is already prepared with the same recipe; nothing to do")
    if as_json:
        click.echo(json.dumps(s))
        return
    click.echo(f"dataset:      {s['dataset_dir']}  ({s['status']}, now CURRENT)")
    click.echo(f"source:       {s['source']}")
    click.echo(f"vocab:        {s['vocab_size']:,} (BOS id {s['bos_id']})")
    click.echo(f"train tokens: {s['train_tokens']:,} in {s['train_shards']} shard(s), "
               f"{s['train_docs']:,} documents")
    click.echo(f"val tokens:   {s['val_tokens']:,} in {s['val_docs']:,} documents")
    click.echo(f"dataset hash: {s['dataset_hash']}")


def main(argv: list[str] | None = None) -> None:
    # tokenizers parallelises with threads; silence its warning if a caller forks later.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    cli.main(args=argv, prog_name="autoresearch-prepare")


if __name__ == "__main__":
    main()
