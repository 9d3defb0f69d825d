"""The baseline train.py's model and optimizer, imported as a module (tiny configs, real MLX),
and the presets that rewrite its constants."""

from __future__ import annotations

import math
from functools import partial

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from trainer import presets  # noqa: E402
from trainer import train  # noqa: E402  (the __main__ guard keeps this import inert)


def tiny_config(n_layer=4, T=16, vocab=64, d=32, heads=2, pattern="SSSL"):
    return train.GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=heads,
                           n_kv_head=heads, n_embd=d, window_pattern=pattern)


def tiny_model(config):
    mx.random.seed(0)
    model = train.GPT(config)
    model.init_weights()
    mx.eval(model.parameters())
    return model


def test_output_shapes_and_dtype():
    config = tiny_config()
    model = tiny_model(config)
    idx = mx.random.randint(0, config.vocab_size, (3, config.sequence_len))
    logits = model(idx, train.attention_masks(config, mx.float32))
    assert logits.shape == (3, config.sequence_len, config.vocab_size)
    assert logits.dtype == mx.float32
    loss = train.softcap_cross_entropy(logits, idx)
    assert loss.shape == (3, config.sequence_len) and loss.dtype == mx.float32
    # Zero-init output projections and a tiny lm_head: the first loss is ~ln(vocab).
    assert abs(loss.mean().item() - math.log(config.vocab_size)) < 0.1


def test_window_sizes_follow_pattern_and_last_layer_is_long():
    T = 16
    assert train.window_sizes(tiny_config(n_layer=4, T=T)) == [8, 8, 8, 16]
    assert train.window_sizes(tiny_config(n_layer=6, T=T)) == [8, 8, 8, 16, 8, 16]
    # The last layer is long even where the pattern says S.
    assert train.window_sizes(tiny_config(n_layer=3, T=T)) == [8, 8, 16]
    assert train.window_sizes(tiny_config(n_layer=2, T=T, pattern="L")) == [16, 16]
    with pytest.raises(ValueError, match="WINDOW_PATTERN"):
        train.window_sizes(tiny_config(pattern="SXL"))


def test_masks_short_layers_see_last_half_causally():
    config = tiny_config(n_layer=4, T=16)
    masks = train.attention_masks(config, mx.float32)
    T, half = 16, 8
    for layer, mask in enumerate(masks):
        visible = (mask == 0).tolist()
        window = half if layer < 3 else T
        for i in range(T):
            for j in range(T):
                assert visible[i][j] == (j <= i and i - j < window), (layer, i, j)
    assert masks[0] is masks[1]  # layers with the same window share one array


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mask_dtype_matches_activations(dtype):
    # mx.fast.scaled_dot_product_attention rejects a float32 mask with bf16 inputs.
    dt = getattr(mx, dtype)
    config = tiny_config(n_layer=2)
    masks = train.attention_masks(config, dt)
    assert all(m.dtype == dt for m in masks)
    model = tiny_model(config)
    model.set_dtype(dt)
    idx = mx.random.randint(0, config.vocab_size, (2, config.sequence_len))
    mx.eval(model(idx, masks))


def test_value_embedding_layers_alternate_and_include_last():
    for n_layer, expected in [(4, [1, 3]), (5, [0, 2, 4]), (2, [1]), (1, [0])]:
        assert [i for i in range(n_layer) if train.has_value_embed(i, n_layer)] == expected
        model = train.GPT(tiny_config(n_layer=n_layer))
        assert sorted(model.value_embeds) == sorted(f"layer{i}" for i in expected)
        gated = [i for i, b in enumerate(model.blocks) if b.attn.has_ve]
        assert gated == expected


def test_param_groups_membership_and_hyperparameters():
    config = tiny_config(n_layer=4, d=32)
    model = train.GPT(config)
    groups = {g.name: g for g in train.param_groups(model)}
    assert list(groups) == ["wte", "value_embeds", "lm_head", "matrices", "resid_lambdas",
                            "x0_lambdas"]
    assert groups["wte"].params == ["wte.weight"]
    assert groups["lm_head"].params == ["lm_head.weight"]
    assert sorted(groups["value_embeds"].params) == ["value_embeds.layer1.weight",
                                                     "value_embeds.layer3.weight"]
    assert groups["resid_lambdas"].params == ["resid_lambdas"]
    assert groups["x0_lambdas"].params == ["x0_lambdas"]
    # Per layer: c_qkv, c_proj, c_fc, mlp c_proj (4), plus a ve_gate on the two VE layers.
    assert len(groups["matrices"].params) == 4 * 4 + 2
    assert all(n.startswith("blocks.") for n in groups["matrices"].params)
    every = [n for g in groups.values() for n in g.params]
    assert len(every) == len(set(every)) == len(train.tree_flatten(model.trainable_parameters()))
    # Only matrices decay; x0_lambdas have their own betas; (un)embeddings scale with width.
    assert [g.name for g in groups.values() if g.weight_decay] == ["matrices"]
    assert groups["matrices"].weight_decay == train.WEIGHT_DECAY
    assert groups["x0_lambdas"].betas == (0.96, 0.95)
    assert all(g.betas == (0.8, 0.95) for n, g in groups.items() if n != "x0_lambdas")
    scale = (32 / 768) ** -0.5
    assert groups["wte"].lr == pytest.approx(0.6 * scale)
    assert groups["value_embeds"].lr == pytest.approx(0.6 * scale)
    assert groups["lm_head"].lr == pytest.approx(0.004 * scale)
    assert groups["matrices"].lr == 0.04
    assert groups["resid_lambdas"].lr == 0.005
    assert groups["x0_lambdas"].lr == 0.5


def test_unknown_parameters_get_a_group_by_rule_or_fail_with_their_name():
    config = tiny_config(n_layer=2, d=32)
    model = train.GPT(config)
    # Rule: a 2-D weight an edit adds inside a block is a matrix (lr, weight decay of matrices).
    model.blocks[0].mlp.c_gate = nn.Linear(32, 32, bias=False)
    groups = {g.name: g for g in train.param_groups(model)}
    assert "blocks.0.mlp.c_gate.weight" in groups["matrices"].params
    # Anything else has no group: a loud error naming the parameter, never a silent guess.
    model.blocks[1].mlp.c_fc = nn.Linear(32, 128, bias=True)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.c_fc\.bias' \(1-D\) has no optimizer"):
        train.param_groups(model)
    model = train.GPT(config)
    model.out_gain = mx.ones((32,))
    with pytest.raises(ValueError, match="'out_gain'"):
        train.param_counts(model)


@pytest.mark.parametrize("depth", [1, 3, 5, 7])
def test_any_depth_rounds_d_model_up_to_whole_heads(monkeypatch, depth):
    monkeypatch.setattr(train, "DEPTH", depth)
    config = train.build_config(vocab_size=64, sequence_len=16)
    assert config.n_embd % train.HEAD_DIM == 0
    assert depth * train.ASPECT_RATIO <= config.n_embd < depth * train.ASPECT_RATIO + train.HEAD_DIM
    assert config.n_head == config.n_embd // train.HEAD_DIM and config.n_layer == depth
    assert train.model_dim(3, 64, 128) == 256 and train.model_dim(4, 64, 128) == 256
    assert train.model_dim(5, 64, 128) == 384 and train.model_dim(2, 64, 64) == 128


def test_lr_and_weight_decay_schedules():
    # No warmup; flat for the first half; linear warmdown to FINAL_LR_FRAC (0) at the end.
    lr = [train.lr_multiplier(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert lr == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    wd = [train.WEIGHT_DECAY * train.weight_decay_multiplier(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert wd == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0])


def test_default_config_has_about_11_5M_parameters():
    config = train.build_config(vocab_size=8192, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head) == (4, 256, 2)
    counts = train.param_counts(train.GPT(config))
    assert counts["total"] == pytest.approx(11.5e6, rel=0.03)
    assert counts["wte"] == counts["lm_head"] == 8192 * 256
    assert counts["value_embeds"] == 2 * 8192 * 256
    assert counts["scalars"] == 8
    # FLOPs use each layer's window: three S layers at T/2 and one L layer at T.
    flops = train.estimate_flops(config, counts)
    attn = 12 * 2 * 128 * (3 * 1024 + 2048)
    assert flops == 6 * (counts["matrices"] + counts["lm_head"]) + attn


def test_softcap_cross_entropy_matches_autodiff_reference():
    mx.random.seed(1)
    logits = 20 * mx.random.normal((4, 5, 11))
    targets = mx.random.randint(0, 11, (4, 5))
    weights = mx.random.uniform(shape=(4, 5))

    def ours(z):
        return (train.softcap_cross_entropy(z, targets) * weights).sum()

    def reference(z):
        capped = train.SOFTCAP * mx.tanh(z / train.SOFTCAP)
        return (nn.losses.cross_entropy(capped, targets, reduction="none") * weights).sum()

    assert ours(logits).item() == pytest.approx(reference(logits).item(), rel=1e-5)
    g1, g2 = mx.grad(ours)(logits), mx.grad(reference)(logits)
    assert mx.allclose(g1, g2, atol=1e-5).item()


def test_forward_only_eval_loss_matches_the_training_loss():
    logits = 40.0 * mx.random.normal((3, 5, 50))
    targets = mx.random.randint(0, 50, (3, 5))
    assert mx.allclose(train.softcap_nll(logits, targets),
                       train.softcap_cross_entropy(logits, targets), atol=1e-4).item()


def test_numpy_head_matches_the_mlx_head_in_loss_and_gradients(monkeypatch):
    """The CPU backend's loss head (numpy tanh/exp, gradient fed into MLX's backward) trains
    the same model: same per-token loss, same gradient for every parameter, chunked or not."""
    np = pytest.importorskip("numpy")
    config = tiny_config(n_layer=2, T=16, vocab=64, d=32)
    model = tiny_model(config)
    model.lm_head.weight = 0.5 * mx.random.normal(model.lm_head.weight.shape)  # sizeable logits
    masks = train.attention_masks(config, mx.float32)
    x = mx.random.randint(0, config.vocab_size, (3, config.sequence_len))
    y = mx.random.randint(0, config.vocab_size, (3, config.sequence_len))
    reference = nn.value_and_grad(
        model, lambda m, x, y: train.softcap_cross_entropy(m(x, masks), y).mean())
    ref_loss, ref_grads = reference(model, x, y)
    for chunk in (1024, 5):  # 5 rows: chunks that do not divide the 48 rows
        monkeypatch.setattr(train, "HEAD_CHUNK_ROWS", chunk)
        (_, loss), grads = nn.value_and_grad(
            model, lambda m, x, y: train.numpy_head_loss(m, x, y, masks))(model, x, y)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        ref, ours = dict(train.tree_flatten(ref_grads)), dict(train.tree_flatten(grads))
        assert set(ref) == set(ours)
        largest = max(mx.abs(g).max().item() for g in ref.values())
        for name in ref:  # float32 rounding differs; near-cancelling sums (resid_lambdas) too
            err = mx.abs(ref[name] - ours[name]).max().item()
            assert err <= 1e-4 * mx.abs(ref[name]).max().item() + 1e-6 * largest, name
        per_token, none = train.softcap_ce_numpy(np.asarray(model(x, masks)), np.asarray(y),
                                                 with_grad=False)
        assert none is None
        assert np.allclose(per_token.reshape(y.shape),
                           np.asarray(train.softcap_nll(model(x, masks), y)), atol=1e-5)


def test_adamw_step_matches_formula():
    config = tiny_config(n_layer=2)
    model = tiny_model(config)
    groups = train.param_groups(model)
    opt = train.Optimizer(model, groups)
    before = dict(train.tree_flatten(model.parameters()))
    grads = train.tree_map(lambda p: mx.full(p.shape, 0.5), model.parameters())
    opt.update(model, grads, mx.array(0.5), mx.array(0.5))
    after = dict(train.tree_flatten(model.parameters()))
    # Step 1 with bias correction: Adam's step is exactly lr * sign(g) (eps aside).
    for g in groups:
        lr = g.lr * 0.5
        for n in g.params:
            expected = before[n] * (1 - lr * g.weight_decay * 0.5) - lr
            assert mx.allclose(after[n], expected, atol=1e-6).item(), n


def test_bf16_weights_keep_float32_masters_so_small_steps_accumulate():
    """On Metal weights are bf16: steps below bf16's spacing (0.004 near 1.0) must not be lost."""
    config = tiny_config(n_layer=2)
    model = tiny_model(config)
    model.set_dtype(mx.bfloat16)
    opt = train.Optimizer(model, train.param_groups(model))
    assert set(opt.state["master"]) == {n for n, _ in train.tree_flatten(model.trainable_parameters())}

    @partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])
    def step(grads, lr_mult):
        opt.update(model, grads, lr_mult, mx.array(0.0))

    grads = train.tree_map(lambda p: mx.full(p.shape, 0.5, dtype=p.dtype), model.parameters())
    lr_mult = 0.1  # each Adam step moves resid_lambdas by RESID_LR * 0.1 = 0.0005
    for _ in range(20):
        step(grads, mx.array(lr_mult))
    master = opt.state["master"]["resid_lambdas"]
    assert mx.allclose(master, mx.full(master.shape, 1.0 - 20 * train.RESID_LR * lr_mult),
                       atol=1e-5).item()
    weight = model.resid_lambdas
    assert weight.dtype == mx.bfloat16
    assert mx.array_equal(weight, master.astype(mx.bfloat16)).item()
    assert (weight < 1.0).all().item()  # without masters each 0.0005 step rounds back to 1.0


def test_float32_model_has_no_master_copies():
    model = tiny_model(tiny_config(n_layer=2))
    assert train.Optimizer(model, train.param_groups(model)).state["master"] == {}


def test_compiled_training_reduces_loss_on_repeated_sequences():
    config = tiny_config(n_layer=2, T=16, vocab=32, d=32)
    model = tiny_model(config)
    masks = train.attention_masks(config, mx.float32)
    opt = train.Optimizer(model, train.param_groups(model))
    loss_and_grad = nn.value_and_grad(
        model, lambda m, x, y: train.softcap_cross_entropy(m(x, masks), y).mean())
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def micro_step(x, y):
        return loss_and_grad(model, x, y)

    @partial(mx.compile, inputs=state, outputs=state)
    def optimizer_step(grads, lr_mult, wd_mult):
        opt.update(model, grads, lr_mult, wd_mult)

    rows = mx.tile(mx.random.randint(0, config.vocab_size, (2, config.sequence_len + 1)), (4, 1))
    x, y = rows[:, :-1], rows[:, 1:]
    losses = []
    for _ in range(12):
        loss, grads = micro_step(x, y)
        optimizer_step(grads, mx.array(0.3), mx.array(1.0))
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


# -- presets ---------------------------------------------------------------------------------

def test_seed_preset_is_the_seed_articles_setup():
    text = presets.TRAIN_PY.read_text()
    assert presets.baseline_train_py("seed") == text
    # The seed's MLX port evaluates 3 * 524288 tokens ("reduced for Apple Silicon").
    assert presets.PRESETS["seed"].settings() == {"seq_len": 2048, "eval_tokens": 3 * 524288,
                                                   "time_budget": 300, "seed": 42,
                                                   "eval_batch": 16}
    assert presets.PRESETS["seed"].timeout > 300
    # Upstream's H100 eval stays available under its own name, otherwise the same run.
    h100 = presets.PRESETS["upstream-h100"]
    assert h100.settings() == {**presets.PRESETS["seed"].settings(), "eval_tokens": 40 * 524288}
    assert presets.baseline_train_py("upstream-h100") == text


def test_tiny_preset_rewrites_constants_and_keeps_comments():
    tiny = presets.PRESETS["tiny"]
    text = presets.baseline_train_py("tiny")
    for name, value in tiny.overrides.items():
        lines = [ln for ln in text.splitlines() if ln.startswith(f"{name} = ")]
        assert len(lines) == 1 and lines[0].startswith(f"{name} = {value!r}"), lines
        assert "#" in lines[0]
    assert tiny.overrides["TOTAL_BATCH_SIZE"] == tiny.overrides["DEVICE_BATCH_SIZE"] * tiny.seq_len
    compile(text, "train.py", "exec")


def test_override_must_hit_exactly_once():
    text = 'A = 1  # one\nB = "x"\nB = "y"\n'
    assert presets.apply_overrides(text, {"A": 2}) == 'A = 2  # one\nB = "x"\nB = "y"\n'
    with pytest.raises(RuntimeError, match="exactly one"):
        presets.apply_overrides(text, {"B": "z"})
    with pytest.raises(RuntimeError, match="exactly one"):
        presets.apply_overrides(text, {"MISSING": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        presets.baseline_train_py("huge")


def test_presets_module_stays_mlx_free():
    import subprocess
    import sys
    code = "import sys, trainer.presets; assert 'mlx' not in sys.modules, 'mlx imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
