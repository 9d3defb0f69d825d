"""
Baseline pretraining script for autoresearch fleet: a small GPT trained for a fixed time
budget with MLX, scored by val_bpb (bits per byte on held-out text; lower is better).

This is the ONE file research edits. Everything else (data loading, evaluation, the time budget,
the result file) lives in the fixed harness, trainer/harness.py. Run it directly:

    python train.py                      # settings from AUTORESEARCH_* env (seed: T=2048, 300 s)
    python train.py --time-budget 60     # shorter run
    python -m trainer.launch train.py    # Linux: same, with a fast system OpenBLAS preloaded

The model and optimizer follow upstream autoresearch (nanochat's GPT) as ported to MLX:
token + value embeddings, RoPE + QK-norm, sliding-window attention, relu^2 MLP, per-layer
residual scalars, logit softcap, and AdamW with six parameter groups (OPTIMIZER = "muon" trains
the matrices with upstream's Muon instead).
"""

import dataclasses
import itertools
import math
import os
import time
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from trainer import harness

# ---------------------------------------------------------------------------------------------
# Hyperparameters. Edit freely. (trainer/presets.py rewrites some of these lines by name.)

# Model shape
DEPTH = 4                  # number of transformer blocks
ASPECT_RATIO = 64          # d_model = DEPTH * ASPECT_RATIO rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128             # channels per attention head; n_head = d_model // HEAD_DIM
WINDOW_PATTERN = "SSSL"    # per-layer attention window, tiled over depth: S = T/2, L = T (last layer always L)

# Batch: tokens per optimizer step = DEVICE_BATCH_SIZE * T * grad_accum_steps
TOTAL_BATCH_SIZE = 2**16   # tokens per optimizer step
DEVICE_BATCH_SIZE = 16     # rows per forward/backward pass (lower it if memory is short)

# Optimizer: "adamw" (the seed's: AdamW for all six groups) or "muon" (upstream's: the matrices
# group trains with Muon, see class Optimizer; the other five groups keep AdamW).
OPTIMIZER = "adamw"

# AdamW, six parameter groups (the seed's table). Embedding and unembedding LRs are scaled by
# 1/sqrt(d_model/768) at build time, so they stay right when the width changes.
EMBEDDING_LR = 0.6         # wte
VALUE_EMBED_LR = 0.6       # value embedding tables
UNEMBEDDING_LR = 0.004     # lm_head
MATRIX_LR = 0.04           # every weight matrix inside the blocks (AdamW or Muon)
RESID_LR = 0.005           # resid_lambdas
X0_LR = 0.5                # x0_lambdas
WEIGHT_DECAY = 0.2         # decoupled weight decay, matrices only; scheduled WD * (1 - progress)
ADAM_BETAS = (0.8, 0.95)   # every group except x0_lambdas
X0_BETAS = (0.96, 0.95)    # x0_lambdas: more momentum, so they move slowly and smoothly
ADAM_EPS = 1e-10

# Muon (OPTIMIZER = "muon"): lr MATRIX_LR * sqrt(max(1, out/in)), weight decay WEIGHT_DECAY
# scheduled as for AdamW but cautious (only where update and weight agree in sign).
MUON_MOMENTUM = (0.85, 0.95)  # Nesterov momentum, ramped linearly from the first to the second ...
MUON_MOMENTUM_STEPS = 300     # ... over this many optimizer steps
MUON_NS_STEPS = 5             # polar-express Newton-Schulz iterations (one coefficient row each)
MUON_BETA2 = 0.95             # NorMuon: EMA of the per-row (or per-column) mean square update

# LR schedule over progress = training_seconds / time_budget (time-based, like upstream)
WARMUP_RATIO = 0.0         # no warmup: a short budget cannot afford it
WARMDOWN_RATIO = 0.5       # linear decay over the last half of the budget ...
FINAL_LR_FRAC = 0.0        # ... down to this fraction of each group's LR

# Small constants of the architecture
SOFTCAP = 15.0             # logits = SOFTCAP * tanh(logits / SOFTCAP)
ROPE_BASE = 10000.0
VE_GATE_CHANNELS = 32      # the value-embedding gate reads this many channels of x
UNTIMED_STEPS = 2          # steps 0 and 1 (mx.compile tracing, first allocations) are not timed
# Where the softcapped loss's [tokens x vocab] tanh/exp run: "numpy" (vectorised on the host, ~20x
# faster than MLX's CPU kernels; the gradient enters MLX's backward), "mlx" (in the graph: best on
# Metal), "auto" = numpy on the CPU backend, mlx on Metal.
LOSS_HEAD = "auto"
HEAD_CHUNK_ROWS = 1024     # numpy head: rows per chunk (bounds its temporaries to ~3 x 32 MB)

# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str


def model_dim(depth: int, aspect_ratio: int, head_dim: int) -> int:
    """depth * aspect_ratio rounded up to whole heads (DEPTH 3 -> 192 -> 256 at HEAD_DIM 128)."""
    return -(-depth * aspect_ratio // head_dim) * head_dim


def build_config(vocab_size: int, sequence_len: int) -> GPTConfig:
    d_model = model_dim(DEPTH, ASPECT_RATIO, HEAD_DIM)
    n_head = d_model // HEAD_DIM
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=DEPTH,
                     n_head=n_head, n_kv_head=n_head, n_embd=d_model,
                     window_pattern=WINDOW_PATTERN)


def window_sizes(config: GPTConfig) -> list[int]:
    """Attention window per layer: the pattern tiled over depth, S = T/2, L = T, last layer L."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"WINDOW_PATTERN must use only 'S' and 'L', got {config.window_pattern!r}")
    T = config.sequence_len
    sizes = [T if pattern[i % len(pattern)] == "L" else T // 2 for i in range(config.n_layer)]
    sizes[-1] = T  # the last layer always sees the whole context
    return sizes


def attention_mask(T: int, window: int, dtype) -> mx.array:
    """Additive [T, T] mask: query i sees keys j with i - window < j <= i (0), else -inf.
    Same dtype as q/k/v: mx.fast.scaled_dot_product_attention rejects a mismatched mask."""
    i = mx.arange(T)[:, None]
    j = mx.arange(T)[None, :]
    visible = (j <= i) & (i - j < window)
    return mx.where(visible, 0.0, -math.inf).astype(dtype)


def attention_masks(config: GPTConfig, dtype) -> list[mx.array]:
    """One mask per layer (layers with the same window share one array)."""
    cache = {}
    for w in window_sizes(config):
        if w not in cache:
            cache[w] = attention_mask(config.sequence_len, w, dtype)
    return [cache[w] for w in window_sizes(config)]


def has_value_embed(layer_idx: int, n_layer: int) -> bool:
    """ResFormer value embeddings on alternating layers, counted back from the last (included)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def norm(x: mx.array) -> mx.array:
    """RMSNorm without learnable weight (nanochat uses no gain anywhere)."""
    return mx.fast.rms_norm(x, None, 1e-6)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        d, hd = config.n_embd, self.head_dim
        # q, k and v in one matmul (one bigger GEMM is faster than three small ones on CPU).
        self.c_qkv = nn.Linear(d, (self.n_head + 2 * self.n_kv_head) * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.has_ve = has_value_embed(layer_idx, config.n_layer)
        if self.has_ve:
            # Value-embedding gate: per head, 2*sigmoid(W x[:32]) in (0, 2); zero init -> 1.
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def __call__(self, x, ve, mask):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = mx.split(self.c_qkv(x), [H * D, (H + Hkv) * D], axis=-1)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
        if ve is not None:
            # ResFormer: mix a direct token lookup into the values, gated by the input.
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # [B, T, Hkv]
            v = v + gate[..., None] * ve.reshape(B, T, Hkv, D)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, heads, T, D]
        # RoPE (rotate-halves form) then QK-norm: bounded attention logits, no position table.
        q = norm(mx.fast.rope(q, D, traditional=False, base=ROPE_BASE, scale=1.0, offset=0))
        k = norm(mx.fast.rope(k, D, traditional=False, base=ROPE_BASE, scale=1.0, offset=0))
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def __call__(self, x):
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))  # relu^2: cheap, sparse


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, ve, mask):
        x = x + self.attn(norm(x), ve, mask)  # pre-norm residual blocks
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # Keyed "layer<i>" (not "<i>": numeric keys would turn into list indices in mlx.utils trees).
        self.value_embeds = {f"layer{i}": nn.Embedding(config.vocab_size, kv_dim)
                             for i in range(config.n_layer) if has_value_embed(i, config.n_layer)}
        self.blocks = [Block(config, i) for i in range(config.n_layer)]
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        # Per-layer residual scalars: x = resid_lambdas[i] * x + x0_lambdas[i] * x0.
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.full((config.n_layer,), 0.1)

    def init_weights(self):
        d = self.config.n_embd
        bound = 3 ** 0.5 * d ** -0.5  # uniform(-b, b) has std 1/sqrt(d)
        uniform = lambda a: mx.random.uniform(-bound, bound, a.shape)
        self.wte.weight = mx.random.normal(self.wte.weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight)
        for block in self.blocks:
            block.attn.c_qkv.weight = uniform(block.attn.c_qkv.weight)
            block.mlp.c_fc.weight = uniform(block.mlp.c_fc.weight)
            # Output projections start at zero: every block begins as the identity.
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if block.attn.has_ve:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)

    def __call__(self, idx, masks):
        x = norm(self.wte(idx))
        x0 = x  # the embedding, re-injected into every layer through x0_lambdas
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = f"layer{i}"
            ve = self.value_embeds[key](idx) if key in self.value_embeds else None
            x = block(x, ve, masks[i])
        # Raw logits in float32; the softcap SOFTCAP * tanh(logits / SOFTCAP) is applied inside
        # softcap_cross_entropy below (apply it yourself if you sample from the model).
        return self.lm_head(norm(x)).astype(mx.float32)


@mx.custom_function
def _softcap_ce(logits, targets):
    # Softcap (Gemma 2): logits bounded to (-SOFTCAP, SOFTCAP), no token gets overconfident.
    t = mx.tanh(logits / SOFTCAP)
    e = mx.exp(SOFTCAP * t)  # |SOFTCAP * t| <= 15, so no max-subtraction is needed
    total = e.sum(axis=-1, keepdims=True)
    target_logit = SOFTCAP * mx.take_along_axis(t, targets[..., None], axis=-1)[..., 0]
    return mx.log(total[..., 0]) - target_logit, t, e / total


@_softcap_ce.vjp
def _softcap_ce_vjp(primals, cotangents, outputs):
    logits, targets = primals
    _, t, probs = outputs  # reuse the forward's tanh and softmax: no third pass of exp
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    dlogits = (probs - onehot) * (1 - mx.square(t)) * cotangents[0][..., None]
    return dlogits, mx.zeros_like(targets)


def softcap_cross_entropy(logits, targets):
    """Per-token loss in nats (float32) of the softcapped logits. Same math as
    cross_entropy(SOFTCAP * tanh(logits / SOFTCAP)), with a hand-written gradient: the
    [tokens x vocab] elementwise work dominates a CPU step and autodiff would redo the exp."""
    return _softcap_ce(logits, targets)[0]


def softcap_nll(logits, targets):
    """The same per-token loss, forward only, for evaluation: it keeps no [tokens x vocab] side
    outputs for a backward pass (at eval batch 16 x 2048 x 8192 each is 1 GB on a Mac)."""
    capped = SOFTCAP * mx.tanh(logits / SOFTCAP)
    target = mx.take_along_axis(capped, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(capped, axis=-1) - target


def softcap_ce_numpy(logits: np.ndarray, targets: np.ndarray, with_grad: bool = True):
    """The softcapped loss on the host: (per-token nats, d(mean loss)/d(logits) or None).

    Why: on MLX's CPU backend tanh and exp run element by element (~13 ns each here), numpy's
    are vectorised (~0.6 ns): over 4096 x 8192 logits that is ~1 s of a ~3 s step. Rows go in
    chunks of HEAD_CHUNK_ROWS so the temporaries stay small whatever the batch."""
    V = logits.shape[-1]
    z, y = logits.reshape(-1, V), targets.reshape(-1)
    n = len(y)
    loss = np.empty(n, dtype=np.float32)
    grad = np.empty(z.shape, dtype=np.float32) if with_grad else None
    for i in range(0, n, HEAD_CHUNK_ROWS):
        rows, yy = np.arange(min(HEAD_CHUNK_ROWS, n - i)), y[i:i + HEAD_CHUNK_ROWS]
        t = np.tanh(z[i:i + HEAD_CHUNK_ROWS] * np.float32(1 / SOFTCAP))
        e = np.exp(t * np.float32(SOFTCAP))  # |SOFTCAP * t| <= 15: no max-subtraction needed
        total = e.sum(axis=-1, keepdims=True)
        loss[i:i + len(rows)] = np.log(total[:, 0]) - SOFTCAP * t[rows, yy]
        if with_grad:  # (softmax - onehot) * d(capped)/d(logits) / n
            g = grad[i:i + len(rows)]
            np.divide(e, total, out=g)
            g[rows, yy] -= 1
            np.multiply(t, t, out=t)
            np.subtract(np.float32(1), t, out=t)
            g *= t
            g *= np.float32(1 / n)
    return loss, grad


def numpy_head_loss(model, x, y, masks):
    """The mean softcapped loss with its [tokens x vocab] elementwise work done by numpy, for
    nn.value_and_grad on the CPU backend. np.asarray evaluates the forward once, mid-trace; MLX
    keeps those activations for the backward, which starts from numpy's d(loss)/d(logits)
    through the surrogate sum(logits * that gradient). Returns (surrogate, mean loss)."""
    logits = model(x, masks)
    loss, dlogits = softcap_ce_numpy(np.asarray(logits), np.asarray(y))
    surrogate = (logits * mx.stop_gradient(mx.array(dlogits).reshape(logits.shape))).sum()
    return surrogate, mx.array(float(loss.mean(dtype=np.float64)))


def param_category(name: str, ndim: int) -> str:
    """The optimizer group of a parameter: the five named tensors by name; every 2-D weight
    inside the blocks is a "matrices" weight. Anything else (a bias, a gain, a new top-level
    tensor) has no group until you give it one here: a ValueError names it, so a parameter an
    edit adds is never trained with hyperparameters nobody chose."""
    for prefix in ("wte", "value_embeds", "lm_head", "resid_lambdas", "x0_lambdas"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    if name.startswith("blocks.") and ndim == 2:
        return "matrices"
    raise ValueError(f"parameter {name!r} ({ndim}-D) has no optimizer group: only 2-D weights "
                     f"inside blocks are matrices; add a rule for it in param_category()")


def param_counts(model: GPT) -> dict:
    counts = {"wte": 0, "value_embeds": 0, "lm_head": 0, "matrices": 0, "scalars": 0}
    for name, p in tree_flatten(model.parameters()):
        cat = param_category(name, p.ndim)
        counts["scalars" if cat.endswith("_lambdas") else cat] += p.size
    counts["total"] = sum(counts.values())
    return counts


def estimate_flops(config: GPTConfig, counts: dict) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (forward + backward; embedding
    lookups and scalars are not matmuls), plus attention: 12 * n_head * head_dim * window per
    layer (QK^T and AV, forward + backward), using each layer's window, not T."""
    head_dim = config.n_embd // config.n_head
    attn = sum(12 * config.n_head * head_dim * w for w in window_sizes(config))
    return 6 * (counts["matrices"] + counts["lm_head"]) + attn


# ---------------------------------------------------------------------------------------------
# Optimizer: AdamW (and Muon, OPTIMIZER = "muon") by hand, so each group's hyperparameters are
# in plain sight.


@dataclass
class ParamGroup:
    name: str
    lr: float
    betas: tuple
    weight_decay: float
    params: list  # parameter names (dotted paths from tree_flatten)
    kind: str = "adamw"  # "adamw" | "muon"


def param_groups(model: GPT) -> list[ParamGroup]:
    scale = (model.config.n_embd / 768) ** -0.5  # 1/sqrt(d_model/768) for (un)embeddings
    groups = [ParamGroup("wte", EMBEDDING_LR * scale, ADAM_BETAS, 0.0, []),
              ParamGroup("value_embeds", VALUE_EMBED_LR * scale, ADAM_BETAS, 0.0, []),
              ParamGroup("lm_head", UNEMBEDDING_LR * scale, ADAM_BETAS, 0.0, []),
              ParamGroup("matrices", MATRIX_LR, ADAM_BETAS, WEIGHT_DECAY, [],
                         kind="muon" if OPTIMIZER == "muon" else "adamw"),
              ParamGroup("resid_lambdas", RESID_LR, ADAM_BETAS, 0.0, []),
              ParamGroup("x0_lambdas", X0_LR, X0_BETAS, 0.0, [])]
    if OPTIMIZER not in ("adamw", "muon"):
        raise ValueError(f"OPTIMIZER must be 'adamw' or 'muon', got {OPTIMIZER!r}")
    by_name = {g.name: g for g in groups}
    for name, p in tree_flatten(model.trainable_parameters()):
        by_name[param_category(name, p.ndim)].params.append(name)
    return groups


# Polar-express coefficients (a, b, c) per Newton-Schulz step, X <- a X + (b A + c A^2) X with
# A = X X^T: tuned so five steps push every singular value of a normalised matrix close to 1.
POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def orthogonalize(g: mx.array, steps: int = MUON_NS_STEPS, dtype=mx.float32) -> mx.array:
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD), approximately, by matmuls
    only: normalise, then polar-express Newton-Schulz steps on the wide orientation (the Gram
    matrix A is the small side squared). dtype: bf16 on Metal, float32 on the CPU backend."""
    x = g.astype(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)))).astype(dtype) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return (x.T if tall else x).astype(mx.float32)


def muon_blocks(name: str, shape: tuple, config: GPTConfig) -> list[int]:
    """Row counts of the separate matrices inside one weight: the fused c_qkv weight is q, k and
    v stacked (each orthogonalised on its own, as three nn.Linear would be); others are whole."""
    if name.endswith("attn.c_qkv.weight"):
        hd = config.n_embd // config.n_head
        blocks = [config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd]
        assert sum(blocks) == shape[0], (name, shape, blocks)
        return blocks
    return [shape[0]]


def muon_momentum(step: int) -> float:
    """Muon's momentum: MUON_MOMENTUM[0] -> [1] linearly over MUON_MOMENTUM_STEPS steps."""
    frac = min(step / MUON_MOMENTUM_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM[0] + frac * MUON_MOMENTUM[1]


class Optimizer:
    """AdamW for "adamw" groups, Muon for "muon" groups; state in float32 whatever the weights'
    dtype. LR, WD and momentum arrive as mx.arrays so a compiled update never retraces when the
    schedule moves.

    AdamW: decoupled weight decay p <- p * (1 - lr * wd); bias-corrected moments.
    Muon, per matrix block (muon_blocks): Nesterov momentum on the gradient; orthogonalize();
    NorMuon: divide each row (column, if wider than tall) by the root of an EMA of its mean
    square, then rescale to the orthogonalised update's norm; lr * sqrt(max(1, out/in));
    cautious weight decay: p <- p - lr * (u + wd * p * [u * p >= 0]).

    Master weights: when the model runs in bf16 (Metal), the optimizer keeps a float32 copy of
    every weight and writes bf16 copies into the model. Updating bf16 weights in place would lose
    every step smaller than bf16's spacing (0.004 near 1.0): the residual scalars would stall and
    the late, small weight-decay steps of WD * (1 - progress) would vanish."""

    def __init__(self, model: GPT, groups: list[ParamGroup]):
        self.groups = groups
        self.config = model.config
        params = dict(tree_flatten(model.trainable_parameters()))
        self.ns_dtype = params["lm_head.weight"].dtype  # bf16 Newton-Schulz on Metal, else f32
        zeros = lambda shape: mx.zeros(shape, dtype=mx.float32)
        adam = [n for g in groups if g.kind == "adamw" for n in g.params]
        muon = [n for g in groups if g.kind == "muon" for n in g.params]
        self.state = {"step": mx.array(0.0),
                      "m": {n: zeros(params[n].shape) for n in adam + muon},
                      "v": {n: zeros(params[n].shape) for n in adam},
                      "row_v": {n: [zeros(self._row_v_shape(rows, params[n].shape[1]))
                                    for rows in muon_blocks(n, params[n].shape, self.config)]
                                for n in muon},
                      "master": {n: params[n].astype(mx.float32) for n in adam + muon
                                 if params[n].dtype != mx.float32}}

    @staticmethod
    def _row_v_shape(rows: int, cols: int) -> tuple:
        return (rows, 1) if rows >= cols else (1, cols)

    def update(self, model: GPT, grads, lr_mult: mx.array, wd_mult: mx.array,
               momentum: mx.array | None = None):
        params = dict(tree_flatten(model.trainable_parameters()))
        grads = dict(tree_flatten(grads))
        master = self.state["master"]
        step = self.state["step"] + 1
        if momentum is None:
            momentum = mx.array(MUON_MOMENTUM[1])
        new = []
        for g in self.groups:
            lr = g.lr * lr_mult
            wd = g.weight_decay * wd_mult if g.weight_decay else None
            for n in g.params:
                grad = grads[n].astype(mx.float32)
                p = master[n] if n in master else params[n]
                if g.kind == "muon":
                    p = self._muon(n, p, grad, lr, wd, momentum)
                else:
                    p = self._adamw(n, p, grad, lr, wd, g.betas, step)
                if n in master:
                    master[n] = p
                new.append((n, p.astype(params[n].dtype)))
        self.state["step"] = step
        model.update(tree_unflatten(new))

    def _adamw(self, n, p, grad, lr, wd, betas, step):
        m, v = self.state["m"], self.state["v"]
        b1, b2 = betas
        m[n] = b1 * m[n] + (1 - b1) * grad
        v[n] = b2 * v[n] + (1 - b2) * mx.square(grad)
        if wd is not None:
            p = p * (1 - lr * wd)
        return p - lr * (m[n] / (1 - b1 ** step)) / (mx.sqrt(v[n] / (1 - b2 ** step)) + ADAM_EPS)

    def _muon(self, n, p, grad, lr, wd, momentum):
        m = self.state["m"]
        m[n] = momentum * m[n] + (1 - momentum) * grad
        nesterov = (1 - momentum) * grad + momentum * m[n]
        blocks = muon_blocks(n, p.shape, self.config)
        parts = mx.split(nesterov, list(itertools.accumulate(blocks))[:-1], axis=0)
        updates = []
        for i, part in enumerate(parts):
            u = orthogonalize(part, MUON_NS_STEPS, self.ns_dtype)
            rows, cols = u.shape
            axis = 1 if rows >= cols else 0  # NorMuon statistics per row of a tall matrix
            mean_sq = mx.mean(mx.square(u), axis=axis, keepdims=True)
            row_v = self.state["row_v"][n]
            row_v[i] = MUON_BETA2 * row_v[i] + (1 - MUON_BETA2) * mean_sq
            scaled = u * mx.rsqrt(mx.maximum(row_v[i], 1e-10))
            norm_ratio = mx.sqrt(mx.sum(mx.square(u))) / mx.maximum(
                mx.sqrt(mx.sum(mx.square(scaled))), 1e-10)
            updates.append(scaled * norm_ratio * math.sqrt(max(1.0, rows / cols)))
        u = mx.concatenate(updates, axis=0) if len(updates) > 1 else updates[0]
        if wd is None:
            return p - lr * u
        cautious = (u * p >= 0).astype(mx.float32)  # decay only where it agrees with the update
        return p - lr * (u + wd * p * cautious)


def lr_multiplier(progress: float) -> float:
    """Linear warmup over WARMUP_RATIO, flat, then linear warmdown to FINAL_LR_FRAC."""
    if WARMUP_RATIO > 0 and progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    frac = max(0.0, (1.0 - progress) / WARMDOWN_RATIO)  # 1 -> 0 over the warmdown
    return frac + (1.0 - frac) * FINAL_LR_FRAC


def weight_decay_multiplier(progress: float) -> float:
    """WD * (1 - progress): late in the run decay would only pull weights toward zero."""
    return max(0.0, 1.0 - progress)


# ---------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    run = harness.start(argv)
    t_start = time.time()
    T = run.settings.seq_len
    budget = run.settings.time_budget

    config = build_config(run.vocab_size, T)
    print(f"config: {dataclasses.asdict(config)}", flush=True)
    model = GPT(config)
    model.init_weights()
    model.set_dtype(run.dtype)  # bf16 on Metal, float32 on CPU (no fast bf16 BLAS there)
    masks = attention_masks(config, run.dtype)
    mx.eval(model.parameters(), masks)

    counts = param_counts(model)
    flops_per_token = estimate_flops(config, counts)
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
    print(f"windows: {window_sizes(config)} | flops/token: {flops_per_token:.3e}", flush=True)

    tokens_per_micro = DEVICE_BATCH_SIZE * T
    if TOTAL_BATCH_SIZE % tokens_per_micro:
        raise ValueError(f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of "
                         f"DEVICE_BATCH_SIZE*T = {tokens_per_micro}")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step = {DEVICE_BATCH_SIZE} rows x {T} x "
          f"{grad_accum_steps} accumulation steps", flush=True)

    groups = param_groups(model)
    for g in groups:
        how = (f"muon momentum {MUON_MOMENTUM[0]}->{MUON_MOMENTUM[1]} over {MUON_MOMENTUM_STEPS} "
               f"steps, {MUON_NS_STEPS} NS steps, beta2 {MUON_BETA2}, cautious"
               if g.kind == "muon" else f"adamw betas {g.betas}")
        print(f"  group {g.name:<13} lr {g.lr:.5f} wd {g.weight_decay} {how} "
              f"({len(g.params)} tensors)", flush=True)
    optimizer = Optimizer(model, groups)

    head = LOSS_HEAD if LOSS_HEAD != "auto" else ("numpy" if run.backend == "cpu" else "mlx")
    if head not in ("numpy", "mlx"):
        raise ValueError(f"LOSS_HEAD must be 'auto', 'numpy' or 'mlx', got {LOSS_HEAD!r}")
    print(f"loss head: {head} (softcapped tanh/exp over tokens x vocab)", flush=True)

    def loss_fn(model, x, y):
        return softcap_cross_entropy(model(x, masks), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    # mx.compile with the model/optimizer state as captured inputs/outputs (mlx-examples idiom).
    # Measured (2-core x86 CPU shared with other jobs, float32, OpenBLAS at 1 thread, median
    # step): DEPTH 4/T 256/B 16 compiled 2.95 s vs eager 3.07 s (1,389 vs 1,333 tok/s);
    # tiny preset 0.39-0.41 s vs 0.45-0.47 s. At 2 BLAS threads the machine's load swamped the
    # difference (1,222-1,755 vs 1,397-1,639 tok/s). Compiled it is; the first call traces and
    # JIT-compiles (a few seconds), which is why the first UNTIMED_STEPS are not timed.
    state = [model.state, optimizer.state]

    # outputs=model.state too: value_and_grad swaps traced arrays into the model while tracing.
    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def micro_step(x, y):
        return loss_and_grad(model, x, y)

    # Not compiled: the forward is evaluated mid-trace to hand it to numpy. Measured in-process
    # (DEPTH 4/T 256/B 16, 1 BLAS thread, interleaved, load ~3.5): median micro-step 1.74 s
    # against 2.31 s for the compiled MLX head; compiling the forward under it gained nothing.
    if head == "numpy":
        numpy_loss_and_grad = nn.value_and_grad(model, partial(numpy_head_loss, masks=masks))

        def micro_step(x, y):
            (_, loss), grads = numpy_loss_and_grad(model, x, y)
            return loss, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def optimizer_step(grads, lr_mult, wd_mult, momentum):
        optimizer.update(model, grads, lr_mult, wd_mult, momentum)

    loader = run.train_loader(DEVICE_BATCH_SIZE)
    startup_seconds = time.time() - t_start
    print(f"startup: {startup_seconds:.1f}s; training for {budget}s", flush=True)

    step, training_seconds, untimed_seconds, smooth_loss = 0, 0.0, 0.0, 0.0
    while True:
        t0 = time.time()
        progress = min(training_seconds / budget, 1.0)
        lr_mult = mx.array(lr_multiplier(progress))
        wd_mult = mx.array(weight_decay_multiplier(progress))
        grads, loss = None, mx.array(0.0)
        for _ in range(grad_accum_steps):
            x, y = next(loader)
            micro_loss, micro_grads = micro_step(x, y)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss = loss + micro_loss
            mx.eval(loss, grads)  # bound memory to one micro-batch's graph
        if grad_accum_steps > 1:
            grads = tree_map(lambda g: g / grad_accum_steps, grads)
        optimizer_step(grads, lr_mult, wd_mult, mx.array(muon_momentum(step)))
        mx.eval(model.parameters(), optimizer.state)
        train_loss = loss.item() / grad_accum_steps
        dt = time.time() - t0

        # Fast fail: a diverged run wastes the rest of the budget.
        if not math.isfinite(train_loss) or train_loss > 100:
            run.fail("nan", f"train loss is {train_loss} at step {step}")
        if step >= UNTIMED_STEPS:
            training_seconds += dt
        else:
            untimed_seconds += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss  # EMA, debiased below
        run.log_step(step=step, loss=smooth_loss / (1 - 0.9 ** (step + 1)),
                     progress=min(training_seconds / budget, 1.0),
                     tok_per_sec=TOTAL_BATCH_SIZE / dt, dt=dt)
        step += 1
        if step > UNTIMED_STEPS and training_seconds >= budget:
            break

    # Evaluation: per-token loss in nats, the harness turns it into bits per byte. Not compiled:
    # forward-only gains little, and each new batch shape would pay a fresh JIT compile.
    def per_token_loss(x, y):
        if head == "numpy":
            loss, _ = softcap_ce_numpy(np.asarray(model(x, masks)), np.asarray(y), with_grad=False)
            return mx.array(loss.reshape(y.shape))
        return softcap_nll(model(x, masks), y)

    val_bpb = run.evaluate(per_token_loss)

    timed_steps = step - UNTIMED_STEPS
    tok_per_sec = timed_steps * TOTAL_BATCH_SIZE / training_seconds
    peak_tflops = float(os.environ.get("PEAK_FLOPS_TFLOPS") or 0)
    if peak_tflops > 0:
        mfu = 100 * flops_per_token * tok_per_sec / (peak_tflops * 1e12)
    else:
        mfu = 0.0
        print("note: PEAK_FLOPS_TFLOPS unset, mfu_percent reported as 0", flush=True)
    eval_seconds = run.eval_result.seconds if run.eval_result is not None else None
    print(f"phases: startup {startup_seconds:.1f}s | untimed warmup steps {untimed_seconds:.1f}s | "
          f"training {training_seconds:.1f}s | eval {eval_seconds or 0:.1f}s", flush=True)
    run.finish(val_bpb=val_bpb, training_seconds=training_seconds, num_steps=step,
               num_params_M=counts["total"] / 1e6, depth=DEPTH, mfu_percent=mfu,
               total_tokens_M=step * TOTAL_BATCH_SIZE / 1e6, tok_per_sec=tok_per_sec,
               params=counts, flops_per_token=flops_per_token,
               grad_accum_steps=grad_accum_steps, untimed_seconds=untimed_seconds, loss_head=head,
               optimizer=OPTIMIZER,
               config=dataclasses.asdict(config))


if __name__ == "__main__":
    harness.run_main(main)
