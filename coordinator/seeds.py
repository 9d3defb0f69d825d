"""The run's seed sequence: repeat i of any train.py on a class runs with seed i.

Seed i is the run's ``seed`` setting plus i, so the first run of everything uses the run's own
seed (what a person running ``python train.py`` gets) and a researcher can read any attempt's
seed off its index. The candidate's run i and the head's run i on a class therefore share
initialisation and data order (AUTORESEARCH_SEED drives both, see trainer.harness.start and
Run.train_loader), which is what lets coordinator.rule pair them.
"""
from __future__ import annotations

# AUTORESEARCH_SEED must fit what the harness accepts (a non-negative int) and numpy's seeding.
MAX_SEED = 2**32 - 1


def seed_for(base_seed: int, index: int) -> int:
    """The seed of repeat ``index`` (0-based) in a run whose seed setting is ``base_seed``."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"seed index must be an integer >= 0 (got {index!r})")
    return (int(base_seed) + index) % (MAX_SEED + 1)


def next_index(used: set[int]) -> int:
    """The smallest seed index not in ``used`` (the ok runs and live leases of one text):
    a lost or failed attempt's index is run again, so pairs stay aligned."""
    i = 0
    while i in used:
        i += 1
    return i
