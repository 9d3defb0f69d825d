"""What every state machine of the fleet shares: the refusal of an illegal move, and the
printout. The machines themselves (their states and tables) live with their owners:
``coordinator.states`` (candidates, attempts) and ``worker.states`` (the worker)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


class IllegalTransition(ValueError):
    """A state change the machine does not allow (a bug in the caller, never user input)."""


def check(kind: str, table: Mapping[str, frozenset[str]], old: str, new: str) -> str:
    """Return ``new`` if ``table`` allows ``old -> new``; else IllegalTransition naming
    ``kind`` and what ``old`` may become."""
    if old not in table:
        raise IllegalTransition(f"{kind}: unknown state {old!r}")
    if new not in table:
        raise IllegalTransition(f"{kind}: unknown state {new!r}")
    if new not in table[old]:
        allowed = ", ".join(sorted(table[old])) or "nothing (final)"
        raise IllegalTransition(f"{kind}: {old} -> {new} is not allowed ({old} -> {allowed})")
    return new


def describe(states: Sequence[str], table: Mapping[str, frozenset[str]]) -> list[str]:
    """One line per transition, in the order of ``states``; a state with no way out is final."""
    lines = []
    for s in states:
        if not table[s]:
            lines.append(f"  {s:<10} (final)")
        for t in sorted(table[s], key=states.index):
            lines.append(f"  {s:<10} -> {t}")
    return lines
