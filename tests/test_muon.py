"""Muon in the baseline train.py (OPTIMIZER = "muon"): orthogonalisation, the split of the fused
qkv weight, NorMuon, cautious weight decay, the momentum ramp, and a compiled run that trains."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from trainer import train  # noqa: E402


def singular_values(a) -> np.ndarray:
    return np.linalg.svd(np.asarray(a.astype(mx.float32)), compute_uv=False)


def with_spectrum(shape, smallest: float, seed: int = 3) -> mx.array:
    """A random matrix whose singular values spread log-evenly from 1 down to smallest."""
    rng = np.random.default_rng(seed)
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    return mx.array((u * np.logspace(0, np.log10(smallest), k)) @ v.T, dtype=mx.float32)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (256, 1024)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orthogonalize_brings_every_singular_value_near_one(shape, dtype):
    g = 7.0 * with_spectrum(shape, smallest=1e-2)  # condition number 100; scale must not matter
    out = train.orthogonalize(g, train.MUON_NS_STEPS, getattr(mx, dtype))
    assert out.shape == g.shape and out.dtype == mx.float32
    s = singular_values(out)
    assert s.min() > 0.7 and s.max() < 1.2, (s.min(), s.max())


def test_orthogonalize_keeps_the_singular_vectors():
    """U V^T of the input: the polar factor, not just any orthogonal matrix."""
    mx.random.seed(4)
    g = mx.random.normal((40, 24))
    u, _, vt = np.linalg.svd(np.asarray(g), full_matrices=False)
    polar = u @ vt
    out = np.asarray(train.orthogonalize(g))
    cosine = (out * polar).sum() / (np.linalg.norm(out) * np.linalg.norm(polar))
    assert cosine > 0.99


def muon_model(n_layer=2, d=64, heads=2, T=16, vocab=32):
    config = train.GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=heads,
                             n_kv_head=heads, n_embd=d, window_pattern="SL")
    mx.random.seed(0)
    model = train.GPT(config)
    model.init_weights()
    mx.eval(model.parameters())
    return config, model


def muon_groups(model, monkeypatch):
    monkeypatch.setattr(train, "OPTIMIZER", "muon")
    return train.param_groups(model)


def test_fused_qkv_is_three_separate_matrices_for_muon(monkeypatch):
    config, model = muon_model(d=64, heads=2)
    groups = {g.name: g for g in muon_groups(model, monkeypatch)}
    assert groups["matrices"].kind == "muon"
    assert all(g.kind == "adamw" for n, g in groups.items() if n != "matrices")
    name = "blocks.0.attn.c_qkv.weight"
    assert model.blocks[0].attn.c_qkv.weight.shape == (3 * 64, 64)
    assert train.muon_blocks(name, (192, 64), config) == [64, 64, 64]  # q, k, v
    assert train.muon_blocks("blocks.0.mlp.c_fc.weight", (256, 64), config) == [256]
    opt = train.Optimizer(model, list(groups.values()))
    assert [v.shape for v in opt.state["row_v"][name]] == [(64, 1)] * 3
    assert [v.shape for v in opt.state["row_v"]["blocks.0.mlp.c_fc.weight"]] == [(256, 1)]
    assert [v.shape for v in opt.state["row_v"]["blocks.0.mlp.c_proj.weight"]] == [(1, 256)]
    assert "blocks.0.attn.c_qkv.weight" not in opt.state["v"]  # no Adam second moment
    # Each block is normalised on its own: a k gradient 1000x smaller than q's still moves k
    # as much (one orthogonalisation of the fused weight would leave k almost still).
    grads = train.tree_map(mx.zeros_like, model.parameters())
    mx.random.seed(5)
    gq, gk, gv = (mx.random.normal((64, 64)) for _ in range(3))
    grads["blocks"][0]["attn"]["c_qkv"]["weight"] = mx.concatenate([gq, gk * 1e-3, gv], axis=0)
    before = model.blocks[0].attn.c_qkv.weight
    opt.update(model, grads, mx.array(1.0), mx.array(0.0), mx.array(0.9))
    step = np.asarray(model.blocks[0].attn.c_qkv.weight - before)
    norms = [np.linalg.norm(step[i * 64:(i + 1) * 64]) for i in range(3)]
    assert min(norms) / max(norms) > 0.8, norms


def test_muon_step_size_scale_and_cautious_decay(monkeypatch):
    """First step from zero momentum state: update = lr * sqrt(max(1, out/in)) * (a unit-RMS
    orthogonalised matrix); decay only where the update and the weight agree in sign."""
    config, model = muon_model(d=64)
    opt = train.Optimizer(model, muon_groups(model, monkeypatch))
    name = "blocks.0.mlp.c_fc.weight"  # 256 x 64: tall, lr scale sqrt(4) = 2
    w = mx.random.normal((256, 64)) * 0.1
    model.blocks[0].mlp.c_fc.weight = w
    grads = train.tree_map(mx.zeros_like, model.parameters())
    grads["blocks"][0]["mlp"]["c_fc"]["weight"] = mx.random.normal((256, 64))
    opt.update(model, grads, mx.array(1.0), mx.array(0.0), mx.array(0.9))  # no decay
    delta = np.asarray(w - model.blocks[0].mlp.c_fc.weight) / train.MATRIX_LR
    # NorMuon keeps the orthogonalised update's norm: RMS of U V^T (64 unit singular values
    # over 256 x 64 entries) is 1/sqrt(256) ~ 0.0625, times the lr scale 2.
    rms = np.sqrt((delta ** 2).mean())
    assert rms == pytest.approx(2 * math.sqrt(64 / (256 * 64)), rel=0.15)
    # Now with decay: the decay part is wd * p exactly where the update agrees with p.
    _, model = muon_model(d=64)
    opt = train.Optimizer(model, muon_groups(model, monkeypatch))
    model.blocks[0].mlp.c_fc.weight = w
    opt.update(model, grads, mx.array(1.0), mx.array(1.0), mx.array(0.9))
    with_decay = np.asarray(w - model.blocks[0].mlp.c_fc.weight) / train.MATRIX_LR
    decay = with_decay - delta
    agree = (delta * np.asarray(w)) >= 0
    assert np.allclose(decay[agree], train.WEIGHT_DECAY * np.asarray(w)[agree], atol=1e-5)
    assert np.allclose(decay[~agree], 0.0, atol=1e-5)
    assert 0.2 < agree.mean() < 0.8


def test_momentum_ramps_from_085_to_095():
    assert train.muon_momentum(0) == pytest.approx(0.85)
    assert train.muon_momentum(train.MUON_MOMENTUM_STEPS // 2) == pytest.approx(0.90)
    assert train.muon_momentum(train.MUON_MOMENTUM_STEPS) == pytest.approx(0.95)
    assert train.muon_momentum(10 * train.MUON_MOMENTUM_STEPS) == pytest.approx(0.95)


def test_compiled_muon_training_reduces_loss(monkeypatch):
    config, model = muon_model(n_layer=2, d=64, vocab=32)
    masks = train.attention_masks(config, mx.float32)
    opt = train.Optimizer(model, muon_groups(model, monkeypatch))
    loss_and_grad = nn.value_and_grad(
        model, lambda m, x, y: train.softcap_cross_entropy(m(x, masks), y).mean())
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def micro_step(x, y):
        return loss_and_grad(model, x, y)

    @partial(mx.compile, inputs=state, outputs=state)
    def optimizer_step(grads, lr_mult, wd_mult, momentum):
        opt.update(model, grads, lr_mult, wd_mult, momentum)

    rows = mx.tile(mx.random.randint(0, config.vocab_size, (2, config.sequence_len + 1)), (4, 1))
    x, y = rows[:, :-1], rows[:, 1:]
    losses = []
    for step in range(12):
        loss, grads = micro_step(x, y)
        optimizer_step(grads, mx.array(0.5), mx.array(1.0), mx.array(train.muon_momentum(step)))
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses
