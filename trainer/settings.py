"""The fixed settings of one research run, read from the environment (never from train.py).

mlx-free: the worker and coordinator import this to build a trainer's environment.

Only five fields change what val_bpb means (seq_len, eval_tokens, time_budget, seed,
eval_batch); those are what ``to_env`` emits and what the result JSON records under
"settings". The other fields say *where* things live on this machine (cache, dataset,
result and progress files) and never travel between machines.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# env var <-> field of the settings that define a research run, and the file locations: the
# trainer boundary's names (shared.trainer_contract), re-exported for the harness's readers.
from shared.trainer_contract import (
    ENV_CACHE, ENV_DATA, ENV_FOR_FIELD, ENV_PROGRESS, ENV_RESULT, RESEARCH_ENV,
)
from shared.trainer_contract import RUN_FIELDS as RESEARCH_FIELDS

DEFAULT_CACHE = "~/.cache/autoresearch"


def _check_int(var: str, value, *, allow_zero: bool = False) -> int:
    """An integer > 0 (>= 0 when allow_zero); ValueError naming the variable otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{var}={value!r}: expected an integer")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{var}={value!r}: expected an integer") from None
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{var}={value!r}: expected an integer")
        value = int(value)
    elif not isinstance(value, int):
        raise ValueError(f"{var}={value!r}: expected an integer")
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{var}={value}: must be {'>= 0' if allow_zero else '> 0'}")
    return value


@dataclass(frozen=True)
class RunSettings:
    seq_len: int = 2048                 # T: tokens per row (targets per row)
    eval_tokens: int = 3 * 524288       # validation tokens evaluated (the seed's; capped by val)
    time_budget: int = 300              # training seconds, startup and compile excluded
    seed: int = 42                      # data order and init
    eval_batch: int = 16                # rows per eval batch (bounds eval memory)
    # Machine-local locations (not part of the research run's identity).
    cache: Path = Path(DEFAULT_CACHE).expanduser()
    data: Path | None = None            # one prepared dataset dir; None -> cache/datasets/CURRENT
    result_path: Path = Path("result.json")
    progress_path: Path | None = None

    def __post_init__(self):
        # Validate on construction too, so a settings dict from the wire fails as clearly as env.
        for field in RESEARCH_FIELDS:
            # Seed 0 is a perfectly good seed (the eval order uses it), so only seeds < 0 are bad.
            value = _check_int(ENV_FOR_FIELD[field], getattr(self, field),
                               allow_zero=(field == "seed"))
            object.__setattr__(self, field, value)
        for field in ("cache", "data", "result_path", "progress_path"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, field, Path(value).expanduser())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RunSettings":
        env = os.environ if environ is None else environ
        kwargs: dict = {}
        for var, field in RESEARCH_ENV.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                kwargs[field] = _check_int(var, raw, allow_zero=(field == "seed"))
        kwargs["cache"] = Path(env.get(ENV_CACHE) or DEFAULT_CACHE).expanduser()
        if env.get(ENV_DATA):
            kwargs["data"] = Path(env[ENV_DATA]).expanduser()
        kwargs["result_path"] = Path(env.get(ENV_RESULT) or "result.json").expanduser()
        if env.get(ENV_PROGRESS):
            kwargs["progress_path"] = Path(env[ENV_PROGRESS]).expanduser()
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunSettings":
        """Research fields from a dict (e.g. an assignment's settings); unknown keys are an error."""
        unknown = set(d) - set(RESEARCH_FIELDS)
        if unknown:
            raise ValueError(f"unknown run settings: {', '.join(sorted(unknown))}")
        return cls(**dict(d))

    def research(self) -> dict:
        """The fields that define a research run, as a plain dict (what results record)."""
        return {field: getattr(self, field) for field in RESEARCH_FIELDS}

    def to_env(self) -> dict[str, str]:
        """Env vars for the research-run fields only (locations are the runner's business)."""
        return {ENV_FOR_FIELD[f]: str(v) for f, v in self.research().items()}

    def replace(self, **changes) -> "RunSettings":
        return dataclasses.replace(self, **changes)
