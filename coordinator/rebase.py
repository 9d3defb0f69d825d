"""Rebase a candidate's change onto the current head, with git's own three-way merge.

A candidate is a change: its base commit's train.py -> the train.py it was submitted with. Most
candidates are measured after the head has moved (N workers run in parallel), so before a run
the change is merged onto the head's train.py by ``git merge-file`` (base: the base's text,
ours: the head's, theirs: the candidate's), exactly as ``git rebase`` would replay it. The
result is one of:

    same      the candidate's base is the head: run its own text
    clean     the merged text; the core stores it as a commit whose parent is the head
    already   the merged text is the head's program: the same change was kept meanwhile
    conflict  no text: the change and a keep since its base touch the same lines (or the merge
              is clean but the merged train.py does not compile)

A conflict names the kept candidate it conflicts with: the keeps since the base are replayed in
order and the first whose train.py the change does not merge onto cleanly is the one (usually
there is one keep in between; this is only done when the merge onto the head conflicts). The
conflicting hunks (with git's markers) go into the candidate's log.

git only, no hand-written diff3: ``coordinator.repo.merge_file`` runs ``git merge-file``. As
in any git merge, changes to touching lines conflict even when they change different constants:
one unchanged line between two edits is what lets both stand.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from coordinator.identity import program_sha
from coordinator.repo import merge_file

SAME, CLEAN, ALREADY, CONFLICT = "same", "clean", "already", "conflict"
HUNK_CONTEXT = 2            # lines of context kept around each conflicting hunk
MAX_CONFLICT_TEXT = 8_000   # characters of hunks kept for the log


@dataclass(frozen=True)
class Keep:
    """One step of the branch: candidate ``candidate_id`` kept as commit ``commit``."""
    candidate_id: int
    commit: str
    text: str


@dataclass(frozen=True)
class Rebased:
    kind: str                          # same | clean | already | conflict
    onto: str                          # the head commit it was rebased onto
    text: str | None = None            # the train.py to run (None for a conflict)
    conflicts: str = ""                # conflicting hunks, with git's markers
    conflicts_with: int | None = None  # the kept candidate whose change it conflicts with


def conflict_hunks(merged: str, context: int = HUNK_CONTEXT) -> str:
    """The conflicting hunks of a merge-file result (markers included), each with ``context``
    lines around it, separated by ``...`` lines; capped at MAX_CONFLICT_TEXT characters."""
    lines = merged.splitlines()
    keep: set[int] = set()
    start = None
    for i, line in enumerate(lines):
        if line.startswith("<<<<<<< "):
            start = i
        elif line.startswith(">>>>>>> ") and start is not None:
            keep.update(range(max(0, start - context), min(len(lines), i + 1 + context)))
            start = None
    out: list[str] = []
    last = None
    for i in sorted(keep):
        if last is not None and i != last + 1:
            out.append("...")
        out.append(lines[i])
        last = i
    return "\n".join(out)[:MAX_CONFLICT_TEXT]


def rebase(repo: Path, *, base_text: str, text: str, head_commit: str, head_text: str,
           keeps: Sequence[Keep] | Callable[[], Sequence[Keep]] = (),
           head_candidate: int | None = None, label: str = "candidate") -> Rebased:
    """Replay the change ``base_text -> text`` onto the head (``head_text`` at ``head_commit``).

    ``keeps``: the keeps from the candidate's base to the head, oldest first (the last one is
    the head), or a function returning them (called only on a conflict); used to name the keep
    a conflict is with (else ``head_candidate``)."""
    merged, conflicts = merge_file(repo, head_text, base_text, text,
                                   labels=(f"head {head_commit[:10]}", "base", label))
    if conflicts:
        chain = keeps() if callable(keeps) else keeps
        return Rebased(CONFLICT, head_commit, None, conflict_hunks(merged),
                       _first_conflicting(repo, base_text, text, chain) or head_candidate)
    if merged == head_text or _same_program(merged, head_text):
        return Rebased(ALREADY, head_commit, merged)
    broken = _compile_error(merged)
    if broken:  # two clean hunks can still make a program that does not parse
        return Rebased(CONFLICT, head_commit, None, f"the merged train.py does not compile: "
                                                    f"{broken}", head_candidate)
    return Rebased(CLEAN, head_commit, merged)


def _compile_error(text: str) -> str | None:
    try:
        compile(text, "train.py", "exec")
    except (SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _same_program(a: str, b: str) -> bool:
    try:
        return program_sha(a) == program_sha(b)
    except (SyntaxError, ValueError):
        return False


def _first_conflicting(repo: Path, base_text: str, text: str,
                       keeps: Sequence[Keep]) -> int | None:
    for keep in keeps:
        _, conflicts = merge_file(repo, keep.text, base_text, text,
                                  labels=(f"#{keep.candidate_id}", "base", "candidate"))
        if conflicts:
            return keep.candidate_id
    return None


__all__ = ["rebase", "conflict_hunks", "Keep", "Rebased", "SAME", "CLEAN", "ALREADY",
           "CONFLICT"]
