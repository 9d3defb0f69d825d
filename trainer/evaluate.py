"""The fixed metric: validation bits per byte (val_bpb).

    val_bpb = sum(cross-entropy nats of every target whose token has > 0 bytes)
              / ln 2 / sum(UTF-8 byte length of those targets)

over the first ``eval_tokens // T`` rows of the fixed validation packing (dataloader.eval_rows:
same best-fit packing, seed 0 whatever the run's seed), capped at what val holds. Special tokens
(token_bytes == 0, e.g. BOS) are excluded from both sums, so the number does not depend on how
many documents a row happens to hold.

Memory stays bounded: rows are packed and evaluated ``eval_batch`` at a time, each batch is
forced with mx.eval, and its per-token losses come back to the host as float32 and are summed in
float64 there. The sums therefore do not depend on how rows are grouped into batches (beyond
float64 rounding), and the same weights on the same machine give the same val_bpb.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from trainer.dataloader import batched, eval_rows


@dataclass
class EvalResult:
    val_bpb: float
    rows: int            # rows evaluated
    tokens: int          # target positions evaluated (rows * T): the "eval_tokens" used
    scored_tokens: int   # targets with > 0 bytes (what the metric averages over)
    nats: float
    bytes: int
    seconds: float


def evaluate_bpb(per_token_loss: Callable, batches: Iterable[np.ndarray],
                 token_bytes: np.ndarray) -> EvalResult:
    """val_bpb of `per_token_loss(x, y) -> [B, T] nats` over row batches [B, T+1] (numpy).

    Rows are split into x = row[:, :-1], y = row[:, 1:] as mx.int32.
    """
    import mlx.core as mx

    t0 = time.perf_counter()
    token_bytes = np.asarray(token_bytes, dtype=np.int64)
    nats = 0.0
    nbytes = 0
    rows = tokens = scored = 0
    for batch in batches:
        batch = np.asarray(batch, dtype=np.int32)
        y_np = batch[:, 1:]
        m = mx.array(batch)
        loss = per_token_loss(m[:, :-1], m[:, 1:])
        if tuple(loss.shape) != tuple(y_np.shape):
            raise ValueError(f"per_token_loss returned shape {tuple(loss.shape)}, "
                             f"expected {tuple(y_np.shape)} (one loss per target)")
        loss = loss.astype(mx.float32)
        mx.eval(loss)
        loss_np = np.asarray(loss)
        tb = token_bytes[y_np]
        keep = tb > 0
        nats += float(loss_np[keep].sum(dtype=np.float64))
        nbytes += int(tb.sum())
        rows += batch.shape[0]
        tokens += y_np.size
        scored += int(keep.sum())
    if nbytes == 0:
        raise ValueError("evaluation covered no bytes (empty validation set?)")
    val_bpb = nats / math.log(2) / nbytes
    return EvalResult(val_bpb=val_bpb, rows=rows, tokens=tokens, scored_tokens=scored,
                      nats=nats, bytes=nbytes, seconds=time.perf_counter() - t0)


def eval_row_count(eval_tokens: int, seq_len: int) -> int:
    return max(1, eval_tokens // seq_len)


def evaluate_val(per_token_loss: Callable, val_tokens: np.ndarray, val_doc_starts: np.ndarray,
                 token_bytes: np.ndarray, bos_id: int, seq_len: int, eval_tokens: int,
                 eval_batch: int) -> EvalResult:
    """The harness's evaluation: fixed val rows, batched at eval_batch."""
    rows = eval_rows(val_tokens, val_doc_starts, bos_id, seq_len,
                     eval_row_count(eval_tokens, seq_len))
    return evaluate_bpb(per_token_loss, batched(rows, eval_batch), token_bytes)
