"""evaluate_bpb against a hand computation on a tiny vocabulary."""

import math

import numpy as np
import pytest

from trainer.dataloader import batched, eval_rows
from trainer.evaluate import evaluate_bpb, evaluate_val

V = 6
BOS = 0
SPECIAL = 5                                        # a second special token (0 bytes)
TOKEN_BYTES = np.array([0, 1, 2, 1, 3, 0], dtype=np.int32)


def prob_table(seed=0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.1, 1.0, (V, V))
    return p / p.sum(axis=1, keepdims=True)


def bigram_loss(p):
    import mlx.core as mx
    table = mx.array((-np.log(p)).astype(np.float32).reshape(-1))

    def per_token_loss(x, y):
        return mx.take(table, x * V + y)
    return per_token_loss


def val_docs(n_docs, doc_len, seed=1):
    rng = np.random.default_rng(seed)
    docs = rng.integers(1, V, (n_docs, doc_len))    # includes the special token 5
    docs[:, 0] = BOS
    tokens = docs.reshape(-1).astype(np.uint16)
    starts = np.arange(n_docs, dtype=np.int64) * doc_len
    return tokens, starts, docs


def test_matches_hand_computation_with_specials_excluded():
    T = 12
    p = prob_table()
    tokens, starts, docs = val_docs(n_docs=40, doc_len=T + 1)   # one document = one row
    r = evaluate_val(bigram_loss(p), tokens, starts, TOKEN_BYTES, BOS, seq_len=T,
                     eval_tokens=10**9, eval_batch=16)
    nats = 0.0
    nbytes = 0
    for doc in docs:
        for x, y in zip(doc[:-1], doc[1:]):
            if TOKEN_BYTES[y] > 0:
                nats += -math.log(p[x, y])
                nbytes += int(TOKEN_BYTES[y])
    expected = nats / math.log(2) / nbytes
    assert (docs[:, 1:] == SPECIAL).any()           # the exclusion is really exercised
    assert r.rows == 40 and r.tokens == 40 * T        # capped at what val holds
    assert r.bytes == nbytes
    assert r.val_bpb == pytest.approx(expected, rel=1e-6)


def test_eval_tokens_picks_the_first_rows():
    T = 12
    tokens, starts, _ = val_docs(n_docs=40, doc_len=T + 1)
    r = evaluate_val(bigram_loss(prob_table()), tokens, starts, TOKEN_BYTES, BOS, seq_len=T,
                     eval_tokens=10 * T + 5, eval_batch=3)
    assert r.rows == 10 and r.tokens == 10 * T


def test_deterministic_and_batch_size_invariant():
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 40, 400)
    starts = np.cumsum(lengths) - lengths
    tokens = rng.integers(1, V, int(lengths.sum())).astype(np.uint16)
    tokens[starts] = BOS
    loss = bigram_loss(prob_table(1))
    T = 16

    def run(batch):
        return evaluate_val(loss, tokens, starts, TOKEN_BYTES, BOS, seq_len=T,
                            eval_tokens=200 * T, eval_batch=batch)
    a, b = run(16), run(16)
    assert a.val_bpb == b.val_bpb and a.rows == 200
    for batch in (1, 3, 7, 64):
        assert run(batch).val_bpb == pytest.approx(a.val_bpb, abs=1e-9)


def test_wrong_loss_shape_is_refused():
    import mlx.core as mx
    tokens, starts, _ = val_docs(4, 9)
    rows = batched(eval_rows(tokens, starts, BOS, 8, 4), 2)
    with pytest.raises(ValueError, match="shape"):
        evaluate_bpb(lambda x, y: mx.zeros((x.shape[0],)), rows, TOKEN_BYTES)
