"""Best-fit BOS packing: row shape, BOS alignment, no padding, determinism, crop accounting."""


import numpy as np
import pytest

from trainer.dataloader import (BestFitPacker, DocChunk, batched, check_shard, doc_lengths,
                                eval_rows, shuffled_chunks, train_loader)

BOS = 0


def make_docs(lengths, seed=0):
    """Token array where every non-BOS token is its own position (so rows can be decoded)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    tokens = np.arange(int(lengths.sum()), dtype=np.int64).astype(np.uint32)
    tokens[starts] = BOS
    return tokens, starts


def decode_row(row, tokens, starts):
    """Split a row into (doc_start, taken_length) segments, checking each is a doc prefix."""
    assert row[0] == BOS
    cuts = np.flatnonzero(row == BOS).tolist() + [len(row)]
    segs = []
    start_set = set(starts.tolist())
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b - a == 1:
            # A document cropped to its BOS alone (space for one token left): only at the end.
            assert b == len(row)
            segs.append((None, 1))
            continue
        s = int(row[a + 1]) - 1
        assert s in start_set
        assert np.array_equal(row[a:b], tokens[s:s + (b - a)])
        segs.append((s, b - a))
    return segs


def one_chunk(tokens, starts, order=None):
    lengths = doc_lengths(tokens, starts)
    order = np.arange(len(starts)) if order is None else order
    return iter([DocChunk(0, tokens, starts[order], lengths[order])])


def test_best_fit_by_hand():
    # Row of 10: largest fitting first (7), then 3 fills it; next row 6 + 4.
    tokens, starts = make_docs([6, 4, 3, 7])
    packer = BestFitPacker(10, one_chunk(tokens, starts))
    rows = packer.next_rows(5)
    assert rows.shape == (2, 10)
    segs = [[n for _, n in decode_row(r, tokens, starts)] for r in rows]
    assert segs == [[7, 3], [6, 4]]
    assert packer.crop_fraction == 0.0


def test_crops_the_shortest_when_nothing_fits():
    # Row of 10: 8 goes first; 2 left, docs of 5, 11, 12 don't fit -> crop the 5 (3 lost).
    tokens, starts = make_docs([8, 5, 11, 12])
    packer = BestFitPacker(10, one_chunk(tokens, starts))
    row = packer.next_rows(1)[0]
    assert [n for _, n in decode_row(row, tokens, starts)] == [8, 2]
    assert packer.tokens_cropped == 3 and packer.tokens_consumed == 13


def test_rows_are_bos_aligned_full_and_account_for_every_token():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 90, 3000)
    tokens, starts = make_docs(lengths)
    row_len = 65
    packer = BestFitPacker(row_len, one_chunk(tokens, starts, rng.permutation(len(starts))),
                           buffer_docs=50)
    rows = packer.next_rows(10_000)   # finite stream: stops when documents run out
    assert rows.shape[1] == row_len and rows.shape[0] > 100
    used = {}
    for row in rows:
        segs = decode_row(row, tokens, starts)
        assert sum(n for _, n in segs) == row_len             # no padding
        for s, n in segs:
            if s is None:
                continue
            assert s not in used                              # each document at most once
            used[s] = n
    full = dict(zip(starts.tolist(), lengths.tolist()))
    cropped = sum(full[s] - n for s, n in used.items())
    assert packer.tokens_cropped - cropped >= 0               # plus the dropped tail row
    assert packer.tokens_consumed == sum(full.values())       # every document was taken
    # Only a row's last segment may be cropped.
    for row in rows:
        segs = decode_row(row, tokens, starts)
        assert all(s is not None and n == full[s] for s, n in segs[:-1])


def test_documents_longer_than_a_row_are_cropped():
    tokens, starts = make_docs([50, 3, 40])
    packer = BestFitPacker(16, one_chunk(tokens, starts))
    rows = packer.next_rows(10)
    for row in rows:
        decode_row(row, tokens, starts)
    assert packer.crop_fraction > 0.5


def test_training_stream_is_deterministic_and_independent_of_batch_size(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(3):
        tokens, starts = make_docs(rng.integers(2, 40, 200))
        p = tmp_path / f"train_{i:05d}.npz"
        np.savez(p, tokens=tokens.astype(np.uint16), doc_starts=starts)
        paths.append(p)

    def load(p):
        z = np.load(p)
        return z["tokens"], z["doc_starts"]

    def rows(seed, batch, n_batches):
        loader = train_loader(paths, load, BOS, batch, 31, seed)
        return np.concatenate([loader.next_numpy() for _ in range(n_batches)])

    a = rows(7, 4, 30)            # 120 rows: several epochs of ~3 shards
    assert np.array_equal(a, rows(7, 4, 30))
    assert np.array_equal(a, rows(7, 8, 15))
    assert not np.array_equal(a, rows(8, 4, 30))
    assert (a[:, 0] == BOS).all()
    # Handing shards over in slices changes nothing.
    import trainer.dataloader as dl
    monkeypatch.setattr(dl, "CHUNK_DOCS", 37)
    assert np.array_equal(a, rows(7, 4, 30))


def test_train_loader_yields_mx_int32_shifted_pairs(tmp_path):
    import mlx.core as mx
    tokens, starts = make_docs(np.full(100, 9))
    p = tmp_path / "train_00000.npz"
    np.savez(p, tokens=tokens.astype(np.uint16), doc_starts=starts)
    loader = train_loader([p], lambda q: (np.load(q)["tokens"], np.load(q)["doc_starts"]),
                          BOS, batch_size=3, seq_len=17, seed=0)
    for _ in range(50):           # 150 rows from 100 docs: wraps into new epochs
        x, y = next(loader)
    assert x.dtype == mx.int32 and x.shape == (3, 17) and y.shape == (3, 17)
    assert np.array_equal(np.array(x)[:, 1:], np.array(y)[:, :-1])
    assert loader.crop_fraction == 0.0      # 9 + 9 = 18 = T + 1 exactly


def test_many_shards_do_not_stay_in_memory():
    # Long-lived leftovers from old shards get compacted: at most a few sources stay loaded.
    rng = np.random.default_rng(3)

    def chunks():
        key = 0
        while True:
            tokens, starts = make_docs(rng.integers(2, 300, 40))
            yield DocChunk(key, tokens, starts, doc_lengths(tokens, starts))
            key += 1

    packer = BestFitPacker(64, chunks(), buffer_docs=100)
    for _ in range(200):
        rows = packer.next_rows(4)
        assert (rows[:, 0] == BOS).all()
        assert len(packer._sources) <= 3


def test_eval_rows_fixed_and_capped():
    rng = np.random.default_rng(4)
    tokens, starts = make_docs(rng.integers(2, 30, 300))
    all_rows = list(eval_rows(tokens, starts, BOS, 15, max_rows=10**6))
    assert 0 < len(all_rows) < 10**6                     # capped by what val holds
    first = list(eval_rows(tokens, starts, BOS, 15, max_rows=7))
    assert len(first) == 7
    assert all(np.array_equal(a, b) for a, b in zip(first, all_rows))
    groups = list(batched(iter(first), 3))
    assert [len(g) for g in groups] == [3, 3, 1]


def test_bad_shard_is_refused():
    tokens, starts = make_docs([4, 4])
    tokens[4] = 7                          # second document lost its BOS
    with pytest.raises(ValueError, match="BOS"):
        check_shard(tokens, starts, BOS)
    with pytest.raises(ValueError, match="no training shards"):
        next(shuffled_chunks([], None, BOS, 0))
