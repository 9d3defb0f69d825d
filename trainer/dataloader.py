"""BOS-aligned best-fit packing of documents into rows of T+1 tokens.

Every row starts with a document's BOS and is filled to exactly T+1 tokens with no padding:
documents are taken from a buffer of ``buffer_docs`` candidates, always the largest one that
still fits the space left in the row. When none fits, the *shortest* buffered document is
cropped to fill the row exactly and its tail is dropped. Why the shortest: every buffered
document is longer than the space left at that point, so the shortest one throws away the
fewest tokens; and the tail cannot be kept for a later row because it would start mid-document
without a BOS. The tokens thrown away are counted (``crop_fraction``).

Speed: the reference implementation scans its whole buffer in Python for every placement. Here
documents sit in per-length buckets (lengths > T+1 share one "oversize" bucket), and a sorted
list of the lengths that have a non-empty bucket answers "largest length <= space left" with
one bisect, so a placement costs O(log T) whatever the buffer size. Rows are described as
(source, start, length) pieces; the tokens themselves are copied once per batch with one
vectorised numpy gather, and the mlx conversion happens once per batch.

The row stream depends only on the documents and the seed, never on the batch size, so eval
results do not depend on eval_batch and a training run's data order does not depend on B.
Only the ``TrainLoader``/``eval batches`` wrappers import mlx (lazily).
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

DEFAULT_BUFFER_DOCS = 1000
CHUNK_DOCS = 1 << 16


@dataclass
class DocChunk:
    """A run of documents from one token array, in the order they should enter the buffer."""
    key: int                 # identifies `tokens` while its documents are in flight
    tokens: np.ndarray       # 1-D token array (uint16/uint32/int)
    starts: np.ndarray       # int64 start offset (the BOS) of each document, in feed order
    lengths: np.ndarray      # int64 length of each document


def doc_lengths(tokens: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """Length of each document: the gap to the next BOS (or to the end of the array)."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    if len(starts):
        ends[-1] = len(tokens)
    return ends - starts


def check_shard(tokens: np.ndarray, doc_starts: np.ndarray, bos_id: int, name: str = "shard"):
    """Fail loudly on data that would silently break BOS alignment."""
    if tokens.ndim != 1 or doc_starts.ndim != 1:
        raise ValueError(f"{name}: tokens and doc_starts must be 1-D")
    if len(doc_starts) == 0:
        return
    if doc_starts[0] < 0 or doc_starts[-1] >= len(tokens) or np.any(np.diff(doc_starts) <= 0):
        raise ValueError(f"{name}: doc_starts must be strictly increasing offsets inside tokens")
    if not np.all(tokens[doc_starts] == bos_id):
        raise ValueError(f"{name}: a document does not start with BOS id {bos_id}")


class BestFitPacker:
    """Turns a stream of DocChunks into packed rows; see the module docstring for the policy.

    ``next_batch_pieces(n)`` returns the (key, start, length) pieces of up to n rows; the
    caller gathers tokens with ``gather``. Counters: ``tokens_consumed`` (full lengths of the
    documents taken out of the buffer) and ``tokens_cropped`` (the part of them dropped).
    """

    def __init__(self, row_len: int, chunks: Iterator[DocChunk],
                 buffer_docs: int = DEFAULT_BUFFER_DOCS):
        if row_len < 2:
            raise ValueError(f"row length must be >= 2, got {row_len}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        self.row_len = row_len
        self.buffer_docs = buffer_docs
        self._chunks = chunks
        self._oversize = row_len + 1                  # bucket for every doc longer than a row
        # FIFO buckets, so a document of a rarely fitting length does not wait forever.
        self._buckets: list[deque] = [deque() for _ in range(row_len + 2)]
        self._present: list[int] = []                 # sorted lengths with a non-empty bucket
        self._count = 0                               # documents in the buffer
        self._sources: dict[int, np.ndarray] = {}     # key -> tokens, while referenced
        self._inbuf: dict[int, int] = {}              # key -> documents of it in the buffer
        self._cur_key: int | None = None
        self._compact_key = -1                        # keys < 0: compacted leftovers
        self._cur_starts: list[int] = []
        self._cur_lengths: list[int] = []
        self._cur_pos = 0
        self.exhausted = False                        # no more chunks to read
        self.tokens_consumed = 0
        self.tokens_cropped = 0
        self.rows_packed = 0

    @property
    def crop_fraction(self) -> float:
        return self.tokens_cropped / self.tokens_consumed if self.tokens_consumed else 0.0

    # -- buffer ---------------------------------------------------------------------------
    def _next_chunk(self) -> bool:
        for chunk in self._chunks:
            if len(chunk.starts) == 0:
                continue
            self._release_current()
            self._sources[chunk.key] = chunk.tokens
            self._inbuf.setdefault(chunk.key, 0)
            self._cur_key = chunk.key
            self._cur_starts = np.asarray(chunk.starts, dtype=np.int64).tolist()
            self._cur_lengths = np.asarray(chunk.lengths, dtype=np.int64).tolist()
            self._cur_pos = 0
            return True
        self._release_current()
        self.exhausted = True
        return False

    def _release_current(self):
        # The source itself is dropped after the next gather (pieces may still point into it).
        self._cur_key = None

    def _refill(self):
        buckets, present, oversize = self._buckets, self._present, self._oversize
        inbuf = self._inbuf
        while self._count < self.buffer_docs:
            if self._cur_pos >= len(self._cur_starts):
                if self.exhausted or not self._next_chunk():
                    return
                continue
            # Take as many documents from the current chunk as the buffer has room for.
            key = self._cur_key
            pos = self._cur_pos
            end = min(len(self._cur_starts), pos + self.buffer_docs - self._count)
            starts, lengths = self._cur_starts, self._cur_lengths
            for i in range(pos, end):
                n = lengths[i]
                b = n if n < oversize else oversize
                bucket = buckets[b]
                if not bucket:
                    insort(present, b)
                bucket.append((key, starts[i], n))
            inbuf[key] += end - pos
            self._count += end - pos
            self._cur_pos = end

    # -- packing --------------------------------------------------------------------------
    def _pack_row(self, out: list) -> bool:
        """Append one full row's pieces to `out`; False (and nothing appended) if the
        documents ran out before the row could be filled."""
        buckets, present, inbuf = self._buckets, self._present, self._inbuf
        space = self.row_len
        mark = len(out)
        consumed = cropped = 0
        # Top the buffer up once per row (not per document: cheaper, same determinism).
        self._refill()
        while space > 0:
            if not present:
                self._refill()
                if not present:
                    # Out of documents: drop the partial row (never pad). Its documents are gone.
                    del out[mark:]
                    self.tokens_consumed += consumed
                    self.tokens_cropped += consumed
                    return False
            i = bisect_right(present, space) - 1
            if i < 0:
                i = 0                           # nothing fits: crop the shortest (see docstring)
            length = present[i]
            bucket = buckets[length]
            key, start, n = bucket.popleft()
            if not bucket:
                del present[i]
            self._count -= 1
            inbuf[key] -= 1
            take = n if n <= space else space
            out.append((key, start, take))
            consumed += n
            cropped += n - take
            space -= take
        self.tokens_consumed += consumed
        self.tokens_cropped += cropped
        self.rows_packed += 1
        return True

    def next_pieces(self, rows: int) -> tuple[list, int]:
        """Pieces of up to `rows` full rows, and how many rows they make (< rows only at the end
        of a finite stream)."""
        out: list = []
        made = 0
        while made < rows and self._pack_row(out):
            made += 1
        return out, made

    def gather(self, pieces: list, rows: int, dtype=np.int32) -> np.ndarray:
        """Copy the pieces' tokens into a [rows, row_len] array with one gather per source."""
        total = rows * self.row_len
        out = np.empty(total, dtype=dtype)
        if not pieces:
            return out.reshape(rows, self.row_len)
        arr = np.array(pieces, dtype=np.int64)        # columns: key, start, length
        keys, starts, lens = arr[:, 0], arr[:, 1], arr[:, 2]
        dst = np.cumsum(lens) - lens
        # Position p of piece j reads tokens[starts[j] + (p - dst[j])].
        idx = np.repeat(starts - dst, lens) + np.arange(total, dtype=np.int64)
        if (keys == keys[0]).all():
            out[:] = self._sources[int(keys[0])][idx]
        else:
            piece_of = np.repeat(np.arange(len(lens)), lens)
            for key in np.unique(keys):
                sel = keys[piece_of] == key
                out[sel] = self._sources[int(key)][idx[sel]]
        self._drop_unreferenced()
        return out.reshape(rows, self.row_len)

    def _drop_unreferenced(self):
        for key in [k for k, c in self._inbuf.items() if c == 0 and k != self._cur_key]:
            del self._inbuf[key]
            self._sources.pop(key, None)
        if len(self._sources) > 2:
            self._compact()

    def _compact(self):
        """Copy the buffered documents of finished sources into one small array, so a few
        lingering documents never keep whole old shards in memory."""
        old = {k for k in self._sources if k != self._cur_key}
        parts, offset = [], 0
        new_key = self._compact_key
        self._compact_key -= 1
        for bucket in self._buckets:
            if not bucket:
                continue
            entries = list(bucket)
            for j, (key, start, n) in enumerate(entries):
                if key in old:
                    parts.append(self._sources[key][start:start + n])
                    entries[j] = (new_key, offset, n)
                    offset += n
            bucket.clear()
            bucket.extend(entries)
        moved = sum(self._inbuf.pop(k) for k in old)
        for k in old:
            del self._sources[k]
        if parts:
            self._sources[new_key] = np.concatenate(parts)
            self._inbuf[new_key] = moved

    def next_rows(self, rows: int, dtype=np.int32) -> np.ndarray:
        """Up to `rows` packed rows as a numpy array [n, row_len] (n < rows only at the end)."""
        pieces, made = self.next_pieces(rows)
        return self.gather(pieces, made, dtype)


# -- document streams ---------------------------------------------------------------------

ShardLoader = Callable[[Path], tuple]  # path -> (tokens, doc_starts)


def shuffled_chunks(shard_paths: Sequence[Path], load_shard: ShardLoader, bos_id: int,
                    seed: int, epochs: int | None = None) -> Iterator[DocChunk]:
    """Documents of all shards, epoch after epoch (forever if epochs is None).

    Each epoch visits the shards in a seeded random order and each shard's documents in a
    seeded random order. Shuffling is within a shard (one shard in memory at a time, plus
    whatever of the previous one still sits in the packing buffer).
    """
    if not shard_paths:
        raise ValueError("no training shards")
    rng = np.random.default_rng(seed)
    key = 0
    epoch = 0
    while epochs is None or epoch < epochs:
        any_docs = False
        for si in rng.permutation(len(shard_paths)):
            path = Path(shard_paths[int(si)])
            tokens, starts = load_shard(path)
            starts = np.asarray(starts, dtype=np.int64)
            check_shard(tokens, starts, bos_id, path.name)
            lengths = doc_lengths(tokens, starts)
            order = rng.permutation(len(starts))
            any_docs = any_docs or len(starts) > 0
            # Hand the shard over in slices (same key) so the packer never holds a whole
            # shard's document list as Python ints.
            for i in range(0, len(order), CHUNK_DOCS):
                part = order[i:i + CHUNK_DOCS]
                yield DocChunk(key, tokens, starts[part], lengths[part])
            key += 1
        if not any_docs:
            raise ValueError("training shards hold no documents")
        epoch += 1


class TrainLoader:
    """Infinite iterator of (x, y) mx.int32 [B, T] batches from the training shards."""

    def __init__(self, chunks: Iterator[DocChunk], batch_size: int, seq_len: int,
                 buffer_docs: int = DEFAULT_BUFFER_DOCS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.packer = BestFitPacker(seq_len + 1, chunks, buffer_docs)
        self.batches = 0

    @property
    def crop_fraction(self) -> float:
        return self.packer.crop_fraction

    @property
    def tokens_yielded(self) -> int:
        return self.batches * self.batch_size * self.seq_len

    def __iter__(self):
        return self

    def next_numpy(self) -> np.ndarray:
        rows = self.packer.next_rows(self.batch_size)
        if len(rows) < self.batch_size:
            raise StopIteration
        return rows

    def __next__(self):
        import mlx.core as mx
        rows = mx.array(self.next_numpy())
        self.batches += 1
        return rows[:, :-1], rows[:, 1:]


def train_loader(shard_paths: Sequence[Path], load_shard: ShardLoader, bos_id: int,
                 batch_size: int, seq_len: int, seed: int,
                 buffer_docs: int = DEFAULT_BUFFER_DOCS) -> TrainLoader:
    return TrainLoader(shuffled_chunks(shard_paths, load_shard, bos_id, seed),
                       batch_size, seq_len, buffer_docs)


EVAL_SEED = 0  # the eval rows are the same for every run, whatever the run's seed


def eval_rows(tokens: np.ndarray, doc_starts: np.ndarray, bos_id: int, seq_len: int,
              max_rows: int, buffer_docs: int = DEFAULT_BUFFER_DOCS) -> Iterator[np.ndarray]:
    """The fixed validation rows, one numpy [T+1] row at a time, at most max_rows, fewer if
    val runs out. Same packing, fixed seed, one pass."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    check_shard(tokens, starts, bos_id, "val")
    lengths = doc_lengths(tokens, starts)
    order = np.random.default_rng(EVAL_SEED).permutation(len(starts))
    packer = BestFitPacker(seq_len + 1, iter([DocChunk(0, tokens, starts[order], lengths[order])]),
                           buffer_docs)
    # Pack in groups for the vectorised gather; the rows do not depend on the group size.
    group = 64
    made_total = 0
    while made_total < max_rows:
        rows = packer.next_rows(min(group, max_rows - made_total))
        yield from rows
        made_total += len(rows)
        if len(rows) == 0:
            return


def batched(rows: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Group rows into [<=batch_size, T+1] arrays (the last one may be short)."""
    buf: list = []
    for row in rows:
        buf.append(row)
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)
