"""Program identity (coordinator.identity) and the three-way rebase (coordinator.rebase), with
real git (``git merge-file``). The coordinator's use of them is in tests/test_rebase_core.py."""
from __future__ import annotations

import pytest

from coordinator import rebase as rb
from coordinator.identity import program_sha, text_sha
from coordinator.repo import merge_file

BASE = '''"""A stand-in train.py."""
import math

LR = 0.04          # learning rate
DEPTH = 4
WARMUP = 10


def schedule(step):
    return LR * min(1.0, step / WARMUP)


def main():
    print("depth", DEPTH, schedule(5), math.pi)
'''

SAME_PROGRAM = [
    BASE.replace("LR = 0.04          # learning rate", "LR = 0.04"),           # comment gone
    BASE.replace("DEPTH = 4\n", "DEPTH = 4  # layers\n"),                     # comment added
    BASE.replace("\n\n\ndef main", "\n\ndef main"),                           # blank lines
    BASE.replace('print("depth", DEPTH, schedule(5), math.pi)',
                 "print('depth', DEPTH,\n          schedule(5), math.pi)"),     # quotes, wrap
    BASE.replace("return LR * min(1.0, step / WARMUP)",
                 "return (LR *\n            min(1.0, step / WARMUP))"),        # parentheses
    "# header comment\n" + BASE + "\n\n# trailing comment\n",
]

DIFFERENT_PROGRAM = [
    BASE.replace("LR = 0.04", "LR = 0.05"),
    BASE.replace("DEPTH = 4", "DEPTH = 5"),
    BASE.replace("min(1.0, step / WARMUP)", "min(1.0, step / (WARMUP + 1))"),
    BASE.replace('"""A stand-in train.py."""', '"""Another docstring."""'),  # __doc__ changes
    BASE.replace("import math\n", "import math\nimport os\n"),
]


@pytest.mark.parametrize("variant", SAME_PROGRAM)
def test_comments_and_formatting_do_not_change_the_program(variant):
    assert variant != BASE and text_sha(variant) != text_sha(BASE)
    assert program_sha(variant) == program_sha(BASE)


@pytest.mark.parametrize("variant", DIFFERENT_PROGRAM)
def test_a_real_change_is_another_program(variant):
    assert program_sha(variant) != program_sha(BASE)


def test_program_sha_names_the_python_that_parsed_it():
    assert program_sha(BASE).startswith("py3.")
    with pytest.raises(SyntaxError):
        program_sha("def f(:\n")


# ---- git merge-file ---------------------------------------------------------------------------

def test_merge_file_replays_a_change(tmp_path):
    # Not adjacent lines: git counts changes to touching lines as one conflicting hunk.
    head = BASE.replace("LR = 0.04", "LR = 0.03")
    cand = BASE.replace("WARMUP = 10", "WARMUP = 20")
    merged, conflicts = merge_file(tmp_path, head, BASE, cand)
    assert conflicts == 0 and "LR = 0.03" in merged and "WARMUP = 20" in merged


def test_merge_file_counts_conflicts_and_labels_them(tmp_path):
    head = BASE.replace("LR = 0.04", "LR = 0.03").replace("WARMUP = 10", "WARMUP = 5")
    cand = BASE.replace("LR = 0.04", "LR = 0.06")
    merged, conflicts = merge_file(tmp_path, head, BASE, cand, ("head abc", "base", "#7 lr up"))
    assert conflicts == 1
    assert "<<<<<<< head abc\nLR = 0.03" in merged and ">>>>>>> #7 lr up" in merged
    assert "||||||| base\nLR = 0.04" in merged   # diff3: what both started from


def test_conflict_hunks_keep_only_the_hunks_with_context():
    merged = "\n".join(["a", "b", "c", "<<<<<<< head", "x", "=======", "y", ">>>>>>> cand",
                        "d", "e", "f", "g", "h", "<<<<<<< head", "p", "=======", "q",
                        ">>>>>>> cand", "i"])
    assert rb.conflict_hunks(merged, context=1) == "\n".join(
        ["c", "<<<<<<< head", "x", "=======", "y", ">>>>>>> cand", "d", "...",
         "h", "<<<<<<< head", "p", "=======", "q", ">>>>>>> cand", "i"])


# ---- rebase -----------------------------------------------------------------------------------

def keep(cid, text):
    return rb.Keep(cid, f"{cid:040d}", text)


def test_clean_rebase_carries_both_changes(tmp_path):
    head = BASE.replace("WARMUP = 10", "WARMUP = 20")
    r = rb.rebase(tmp_path, base_text=BASE, text=BASE.replace("LR = 0.04", "LR = 0.02"),
                  head_commit="h" * 40, head_text=head, keeps=[keep(1, head)], head_candidate=1)
    assert r.kind == rb.CLEAN and r.onto == "h" * 40
    assert "WARMUP = 20" in r.text and "LR = 0.02" in r.text and not r.conflicts


def test_the_same_change_kept_meanwhile_is_already_there(tmp_path):
    head = BASE.replace("LR = 0.04          # learning rate", "LR = 0.02          # halved")
    r = rb.rebase(tmp_path, base_text=BASE, text=BASE.replace("LR = 0.04", "LR = 0.02"),
                  head_commit="h" * 40, head_text=head, keeps=[keep(1, head)], head_candidate=1)
    assert r.kind == rb.CONFLICT   # same line changed differently (comment): git says conflict
    same = BASE.replace("LR = 0.04", "LR = 0.02")
    r = rb.rebase(tmp_path, base_text=BASE, text=same, head_commit="h" * 40, head_text=same,
                  keeps=[keep(1, same)], head_candidate=1)
    assert r.kind == rb.ALREADY and r.text == same


def test_conflict_names_the_keep_that_introduced_it(tmp_path):
    k1 = BASE.replace("WARMUP = 10", "WARMUP = 12")                # unrelated to the candidate
    k2 = k1.replace("LR = 0.04", "LR = 0.03")                      # the conflicting keep
    k3 = k2.replace('print("depth"', 'print("layers"')             # unrelated again
    cand = BASE.replace("LR = 0.04", "LR = 0.08")
    r = rb.rebase(tmp_path, base_text=BASE, text=cand, head_commit="h" * 40, head_text=k3,
                  keeps=[keep(1, k1), keep(2, k2), keep(3, k3)], head_candidate=3)
    assert r.kind == rb.CONFLICT and r.text is None and r.conflicts_with == 2
    assert "LR = 0.03" in r.conflicts and "LR = 0.08" in r.conflicts
    assert r.conflicts.count("<<<<<<<") == 1 and "def main" not in r.conflicts


def test_a_clean_merge_that_does_not_compile_is_a_conflict(tmp_path):
    base = "def f():\n    x = 1\n    return x\n\n\nY = 2\n"
    head = base.replace("    return x\n", "    return x\n\n\nZ = 3\n")
    cand = base.replace("    x = 1\n", "    x = 1\n  y = (\n")
    r = rb.rebase(tmp_path, base_text=base, text=cand, head_commit="h" * 40, head_text=head,
                  head_candidate=4)
    assert r.kind == rb.CONFLICT and "does not compile" in r.conflicts and r.conflicts_with == 4
