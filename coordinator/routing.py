"""Memory-aware routing: where a candidate goes after it ran out of memory. Pure functions.

A candidate that needs more memory than a 16 GB Mac has fails there, though a 64 GB Mac in the
same fleet could measure it. So an ``oom`` on a class whose workers report M bytes of usable
memory does not fail the candidate while a *connected* class with more usable memory exists:
the candidate is marked as needing more than M (``min_memory``: the largest M it ran out of
memory on) and requeued; from then on only workers with more than that take it. There it is
measured from scratch -- the head is measured on that class first, as on any class -- and its
numbers are compared only with that class's (classes are never compared with each other).
When no connected class has more memory, the candidate fails with that reason.

Memory is the worker's ``usable_memory_bytes`` (``worker.profile``: Metal's recommended
working set, or MemTotal / the cgroup limit), falling back to its ``memory_bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping


def worker_memory(profile: Mapping | None) -> int | None:
    p = profile if isinstance(profile, Mapping) else {}
    for key in ("usable_memory_bytes", "memory_bytes"):
        v = p.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GB" if n else "unknown memory"


@dataclass(frozen=True)
class Route:
    requeue: bool            # True: requeued for a bigger class; False: the candidate fails
    min_memory: int | None   # the candidate needs more than this many bytes
    target_class: str | None # the largest connected class that has more (for the log)
    reason: str


def after_oom(hw_class: str, memory: int | None, previous_min: int | None,
              connected: Iterable[tuple[str, int | None]]) -> Route:
    """The route for a candidate that ran out of memory on ``hw_class`` (usable ``memory``).
    ``connected``: (hw_class, usable memory) of the workers connected now."""
    need = max([m for m in (memory, previous_min) if m], default=None)
    bigger = sorted(((m, c) for c, m in connected if m and need and m > need and c != hw_class),
                    reverse=True)
    if need is None:
        return Route(False, None, None, f"out of memory on {hw_class} (its workers report no "
                                        "memory size, so no larger class can be chosen)")
    if not bigger:
        return Route(False, need, None,
                     f"out of memory on {hw_class} ({gib(memory)} usable), and no connected "
                     f"class has more than {gib(need)}")
    size, target = bigger[0]
    return Route(True, need, target,
                 f"out of memory on {hw_class} ({gib(memory)} usable): routed to classes with "
                 f"more than {gib(need)} (largest connected: {target}, {gib(size)})")


def fits(min_memory: int | None, memory: int | None) -> bool:
    """May a worker with ``memory`` usable bytes take a candidate that needs > ``min_memory``?"""
    return not min_memory or (memory is not None and memory > min_memory)
