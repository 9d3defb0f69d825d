"""The byte-level BPE tokenizer every prepared dataset carries (HF ``tokenizers``).

Choices, and why:

* Byte-level: every string maps to tokens (no unknown token), and decoding the ids of a
  whole document gives back exactly the original text.
* Pre-split with the GPT-4 style regex, except that digits are grouped by at most two
  (``\\p{N}{1,2}``), which spends fewer of a small vocabulary's slots on numbers.
* Four reserved special tokens get ids 0..3; ``<|reserved_0|>`` is BOS. A document that happens
  to contain the text ``<|reserved_0|>`` is encoded as ordinary bytes (``encode_special_tokens``),
  so data can never forge a document boundary.
* ``token_bytes.npy`` stores each token's UTF-8 byte length (0 for specials): evaluation divides
  by it to turn nats per token into bits per byte.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
DEFAULT_VOCAB_SIZE = 8192
# The smallest vocabulary that still holds the 256 bytes plus the specials and a few merges.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1

# GPT-4 style split: contractions, letter runs with one optional leading non-letter,
# 1-2 digit groups, punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


def _byte_level_alphabet() -> dict[str, int]:
    """Map each character of the byte-level alphabet back to the byte it stands for.

    Byte-level BPE writes byte b as a printable character: printable Latin-1 bytes stand for
    themselves, the other bytes (controls, space, soft hyphen...) are moved to U+0100 onwards,
    in byte order. We need the inverse to measure each token's length in bytes.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in char_to_byte.values():
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


_CHAR_TO_BYTE = _byte_level_alphabet()


def new_tokenizer() -> Tokenizer:
    """An untrained tokenizer with this project's model, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())  # byte-level alphabet: no unk token needed
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    batches: Iterable[list[str]],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    log: Callable[[str], None] | None = None,
) -> Tokenizer:
    """Train byte-level BPE on ``batches`` (an iterable of lists of documents).

    Feeding lists rather than single strings lets ``tokenizers`` pre-tokenize in parallel,
    which is what keeps training on a few MB in the seconds range.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab size {vocab_size} is too small (minimum {MIN_VOCAB_SIZE})")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,  # its bars go to a TTY regardless of our --json/quiet handling
        special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    counted = _Counting(batches)
    t0 = time.monotonic()
    tok.train_from_iterator(counted, trainer=trainer)
    if log:
        log(f"trained tokenizer: vocab {tok.get_vocab_size()} on {counted.docs:,} documents "
            f"({counted.chars / 1e6:.1f}M chars) in {time.monotonic() - t0:.1f} s")
    tok.encode_special_tokens = True
    return tok


class _Counting:
    """Iterator wrapper that counts documents and characters passing through."""

    def __init__(self, batches: Iterable[list[str]]):
        self._it = iter(batches)
        self.docs = 0
        self.chars = 0

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        batch = next(self._it)
        self.docs += len(batch)
        self.chars += sum(map(len, batch))
        return batch


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """int32 [vocab]: UTF-8 byte length of each token's text; 0 for special tokens."""
    vocab_size = tok.get_vocab_size()
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(vocab_size, dtype=np.int32)
    for i in range(vocab_size):
        token = tok.id_to_token(i)
        if token is None or token in specials:
            continue
        out[i] = len(token)  # each alphabet character stands for exactly one byte
        if any(c not in _CHAR_TO_BYTE for c in token):
            raise ValueError(f"token {i} ({token!r}) is not byte-level")
    return out


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json and token_bytes.npy into ``out_dir``."""
    out_dir = Path(out_dir)
    tok.save(str(out_dir / TOKENIZER_FILE))
    with open(out_dir / TOKEN_BYTES_FILE, "wb") as fh:
        np.save(fh, token_byte_lengths(tok), allow_pickle=False)


def load_tokenizer(dataset_dir: Path) -> Tokenizer:
    """Load a prepared dataset's tokenizer, with special-token text encoded as plain text."""
    path = Path(dataset_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {dataset_dir}")
    tok = Tokenizer.from_file(str(path))
    # Not reliably carried by tokenizer.json, so set it on every load.
    tok.encode_special_tokens = True
    return tok


def bos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(BOS_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {BOS_TOKEN} token")
    return i


def encode_documents(tok: Tokenizer, texts: list[str], bos: int | None = None) -> list[np.ndarray]:
    """Token ids (int32) of each text; with ``bos`` given, each array starts with it.

    Uses the batch encoder (parallel in Rust); ``encode_batch_fast`` skips offset tracking,
    which we never use.
    """
    if not texts:
        return []
    tok.encode_special_tokens = True  # a caller may have built ``tok`` without load_tokenizer
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode(list(texts), add_special_tokens=False)
    out = []
    for enc in encodings:
        ids = enc.ids
        if bos is not None:
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[0] = bos
            arr[1:] = ids
        else:
            arr = np.asarray(ids, dtype=np.int32)
        out.append(arr)
    return out


def decode(tok: Tokenizer, ids) -> str:
    """Text of ``ids`` (special tokens included verbatim)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
