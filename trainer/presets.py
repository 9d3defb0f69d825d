"""Named starting points for a research run: run settings + the baseline train.py to start from.

mlx-free: the coordinator imports this to initialise a run (`autoresearch-coord init --preset`).

A preset has two halves. The run settings (seq_len, eval_tokens, time_budget, seed, eval_batch)
travel to the harness through the environment and are fixed for the whole run; the overrides
rewrite constant lines at the top of trainer/train.py, giving the baseline that research then
edits freely.

seed  The seed article's setup (its MLX port of upstream autoresearch on a Mac): T=2048,
      3*524288 = 1,572,864 validation tokens (the port's "reduced for Apple Silicon" eval),
      5-minute budget, train.py unchanged (DEPTH 4, d_model 256, 2**16 tokens per step).
upstream-h100
      The same, but upstream's H100 evaluation of 40*524288 = 20,971,520 tokens: 13x the seed's
      eval, which on an M1 Pro takes minutes per experiment instead of ~20 s. Use it only to
      compare numbers with upstream's.
tiny  What a 2-core Linux CPU (MLX CPU backend, OpenBLAS at one thread per worker, two workers
      sharing the cores) turns into dozens of optimizer steps in a 15 s budget: T=128, DEPTH 2,
      d_model 128 (two 64-channel heads), 8 rows x 128 tokens per step, no accumulation, 16K
      validation tokens. Measured on the build machine (loaded): 0.2-0.5 s per step at one BLAS
      thread, so 30-80 steps in 15 s. Used by the demo and the tests; its val_bpb is only
      comparable with other tiny runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TRAIN_PY = Path(__file__).with_name("train.py")


@dataclass(frozen=True)
class Preset:
    name: str
    seq_len: int
    eval_tokens: int
    time_budget: int
    seed: int = 42
    eval_batch: int = 16
    # Hard wall-clock limit for one attempt (whole process): startup (imports, data, mx.compile
    # tracing and JIT), the budget, and evaluation all have to fit.
    timeout: int = 0
    overrides: dict = field(default_factory=dict)  # train.py constant -> value

    def settings(self) -> dict:
        """The research-run settings (RunSettings fields) of this preset."""
        return {"seq_len": self.seq_len, "eval_tokens": self.eval_tokens,
                "time_budget": self.time_budget, "seed": self.seed, "eval_batch": self.eval_batch}


PRESETS = {
    # Timeout 2*budget + 600: a slow machine (this project's 2-core CPU, ~1/10 of an M1 Pro)
    # needs minutes for startup and eval even at the seed's eval size; a hang still ends.
    "seed": Preset(name="seed", seq_len=2048, eval_tokens=3 * 524288, time_budget=300,
                   timeout=2 * 300 + 600),
    # Same timeout: 40*524288 eval tokens take 4-5 minutes on an M1 Pro.
    "upstream-h100": Preset(name="upstream-h100", seq_len=2048, eval_tokens=40 * 524288,
                            time_budget=300, timeout=2 * 300 + 600),
    # Timeout 4*budget + 120: first-step JIT compilation of fused CPU kernels takes several
    # seconds, and two workers on one 2-core machine slow each other down.
    "tiny": Preset(name="tiny", seq_len=128, eval_tokens=16384, time_budget=15,
                   timeout=4 * 15 + 120,
                   overrides={"DEPTH": 2, "ASPECT_RATIO": 64, "HEAD_DIM": 64,
                              "TOTAL_BATCH_SIZE": 8 * 128, "DEVICE_BATCH_SIZE": 8}),
}


def _literal(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (bool, int, float, tuple)):
        return repr(value)
    raise TypeError(f"unsupported override value {value!r}")


def _rewrite(m: re.Match, literal: str) -> str:
    """NAME = <literal>, keeping the trailing comment in its column where it fits."""
    if not m.group(3):
        return m.group(1) + literal
    comment = m.group(3).lstrip()
    width = len(m.group(2)) + len(m.group(3)) - len(comment)
    return m.group(1) + literal + " " * max(2, width - len(literal)) + comment


def apply_overrides(text: str, overrides: dict) -> str:
    """Rewrite `NAME = value  # comment` lines (at column 0), keeping the comment.
    Each name must match exactly one line, else RuntimeError."""
    for name, value in overrides.items():
        pattern = re.compile(rf"^({re.escape(name)}\s*=\s*)([^#\n]*?)([ \t]*#[^\n]*)?$",
                             re.MULTILINE)
        hits = pattern.findall(text)
        if len(hits) != 1:
            raise RuntimeError(f"train.py: expected exactly one '{name} = ...' line, "
                               f"found {len(hits)}")
        text = pattern.sub(lambda m: _rewrite(m, _literal(value)), text)
    return text


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None


def baseline_train_py(preset_name: str) -> str:
    """The baseline train.py text for a preset: trainer/train.py with its overrides applied."""
    preset = get_preset(preset_name)
    return apply_overrides(TRAIN_PY.read_text(encoding="utf-8"), preset.overrides)
