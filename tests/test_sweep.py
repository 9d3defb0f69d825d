"""Sweep specs, point generation and application to the real baseline train.py."""
from __future__ import annotations

import math

import pytest

from coordinator import sweep as S
from trainer.presets import TRAIN_PY, baseline_train_py

HEAD = baseline_train_py("tiny")


# ---- parsing --------------------------------------------------------------------------------

def test_list_values_keep_the_type_they_are_written_in():
    a = S.parse_param("DEPTH=2,3,4")
    assert a.kind == "list" and a.values == (2, 3, 4)
    assert all(type(v) is int for v in a.values)
    b = S.parse_param("MATRIX_LR=0.02, 4e-2 ,.1")
    assert b.values == (0.02, 0.04, 0.1) and all(type(v) is float for v in b.values)
    c = S.parse_param("WINDOW_PATTERN='SSSL',\"SSLL\"")
    assert c.values == ("SSSL", "SSLL")
    assert S.parse_param("FLAG=true,False").values == (True, False)
    assert S.parse_param("DEPTH=2,2,3").values == (2, 3)     # repeats dropped


def test_ranges():
    a = S.parse_param("MATRIX_LR=log:0.01:0.1")
    assert (a.kind, a.low, a.high, a.steps, a.ints) == ("log", 0.01, 0.1, None, False)
    b = S.parse_param("DEPTH=lin:1:8:4")
    assert (b.kind, b.steps, b.ints) == ("lin", 4, True)
    assert b.grid_values() == (1, 3, 6, 8)
    c = S.parse_param("MATRIX_LR=log:0.01:1:3")
    assert c.grid_values() == (0.01, 0.1, 1.0)


@pytest.mark.parametrize("spec, words", [
    ("DEPTH", "expected NAME=SPEC"),
    ("=2,3", "expected NAME=SPEC"),
    ("2X=1", "not a train.py constant name"),
    ("DEPTH=", "no values given"),
    ("DEPTH=2,,3", "--param DEPTH=2,,3: an empty value"),
    ("DEPTH=two", "'two' is not a number"),
    ("LR=0.0.1", "'0.0.1' is not a number"),
    ("LR=lin:1", "expected lin:LOW:HIGH[:N]"),
    ("LR=lin:1:2:3:4", "expected lin:LOW:HIGH[:N]"),
    ("LR=lin:2:1", "LOW must be below HIGH"),
    ("LR=log:0:1", "a log range needs 0 < LOW"),
    ("LR=log:-1:1", "a log range needs 0 < LOW"),
    ("LR=lin:0:1:x", "N must be a positive integer"),
    ("LR=lin:0:1:0", "N must be a positive integer"),
    ("LR=lin:'a':1", "range bounds must be numbers"),
])
def test_bad_specs_name_the_spec(spec, words):
    with pytest.raises(S.SweepError) as e:
        S.parse_param(spec)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_a_name_twice_and_no_params_are_errors():
    with pytest.raises(S.SweepError, match="given twice"):
        S.parse_params(["DEPTH=2,3", "DEPTH=4"])
    with pytest.raises(S.SweepError, match="at least one --param"):
        S.parse_params([])


# ---- generation -----------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_first_axis_slowest_capped_by_count():
    axes = S.parse_params(["DEPTH=2,3", "MATRIX_LR=0.02,0.04,0.08"])
    pts = S.points(axes)
    assert len(pts) == 6
    assert pts[:3] == [{"DEPTH": 2, "MATRIX_LR": 0.02}, {"DEPTH": 2, "MATRIX_LR": 0.04},
                       {"DEPTH": 2, "MATRIX_LR": 0.08}]
    assert S.points(axes, count=4) == pts[:4]


def test_default_mode_and_grid_needs_steps():
    assert S.resolve_mode(S.parse_params(["DEPTH=2,3"]), None) == "grid"
    assert S.resolve_mode(S.parse_params(["LR=log:0.01:0.1"]), None) == "random"
    with pytest.raises(S.SweepError, match="needs a number of values"):
        S.points(S.parse_params(["LR=log:0.01:0.1"]), mode="grid")
    with pytest.raises(S.SweepError, match="needs --count"):
        S.points(S.parse_params(["LR=log:0.01:0.1"]), mode="random")
    with pytest.raises(S.SweepError, match="unknown sweep mode"):
        S.resolve_mode(S.parse_params(["DEPTH=2"]), "spiral")


def test_random_is_seeded_distinct_and_in_range():
    axes = S.parse_params(["MATRIX_LR=log:0.001:0.1", "DEPTH=lin:2:6", "EMBEDDING_LR=0.3,0.6"])
    a = S.points(axes, mode="random", count=30, seed=7)
    assert a == S.points(axes, mode="random", count=30, seed=7)
    assert a != S.points(axes, mode="random", count=30, seed=8)
    assert len({tuple(sorted(p.items())) for p in a}) == 30
    for p in a:
        assert 0.001 <= p["MATRIX_LR"] <= 0.1 and type(p["MATRIX_LR"]) is float
        assert p["DEPTH"] in range(2, 7) and type(p["DEPTH"]) is int
        assert p["EMBEDDING_LR"] in (0.3, 0.6)
    # log-uniform: about as many draws per decade (0.001-0.01 vs 0.01-0.1)
    lrs = [p["MATRIX_LR"] for p in S.points(S.parse_params(["MATRIX_LR=log:0.001:0.1"]),
                                            mode="random", count=400, seed=1)]
    low = sum(1 for x in lrs if x < 0.01)
    assert 120 < low < 280, low


def test_random_over_a_small_space_stops_instead_of_looping():
    axes = S.parse_params(["DEPTH=lin:2:4"])
    pts = S.points(axes, mode="random", count=10, seed=0)
    assert sorted(p["DEPTH"] for p in pts) == [2, 3, 4]


def test_the_heads_point_is_left_out():
    axes = S.parse_params(["DEPTH=1,2,3"])
    head = S.head_point(HEAD, axes)
    assert head == {"DEPTH": 2}
    assert S.points(axes, head=head) == [{"DEPTH": 1}, {"DEPTH": 3}]
    # values are compared, not spellings: 2**16 in train.py equals 65536
    full = TRAIN_PY.read_text()
    axes = S.parse_params(["TOTAL_BATCH_SIZE=32768,65536"])
    assert S.points(axes, head=S.head_point(full, axes)) == [{"TOTAL_BATCH_SIZE": 32768}]
    assert not S.same_as_head({"FLAG": 1}, {"FLAG": True})


# ---- train.py -------------------------------------------------------------------------------

def test_apply_rewrites_only_the_named_lines_keeping_comments():
    out = S.apply_point(HEAD, {"MATRIX_LR": 0.02, "DEPTH": 3})
    before, after = HEAD.splitlines(), out.splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 2
    assert any(b.startswith("MATRIX_LR = 0.02 ") and "# every weight matrix" in b
               for _, b in changed)
    assert any(b.startswith("DEPTH = 3 ") and "# number of transformer blocks" in b
               for _, b in changed)
    compile(out, "train.py", "exec")
    assert S.head_values(out, ["MATRIX_LR", "DEPTH"]) == {"MATRIX_LR": 0.02, "DEPTH": 3}
    s = S.apply_point(HEAD, {"WINDOW_PATTERN": "SL"})
    assert S.head_values(s, ["WINDOW_PATTERN"]) == {"WINDOW_PATTERN": "SL"}


def test_a_name_not_in_train_py_is_a_clear_error():
    with pytest.raises(S.SweepError) as e:
        S.check_names(HEAD, S.parse_params(["DEPTH=3", "NOT_A_KNOB=1,2"]))
    assert "NOT_A_KNOB" in str(e.value) and "not a constant" in str(e.value)
    S.check_names(HEAD, S.parse_params(["DEPTH=3", "MATRIX_LR=log:0.01:0.1"]))


def test_descriptions_name_the_values():
    assert S.describe({"MATRIX_LR": 0.02, "DEPTH": 3}) == "sweep: MATRIX_LR=0.02, DEPTH=3"
    assert S.describe({"WINDOW_PATTERN": "SL"}) == "sweep: WINDOW_PATTERN='SL'"


def test_drawn_floats_are_rounded_to_readable_values():
    pts = S.points(S.parse_params(["MATRIX_LR=lin:0.01:0.09"]), mode="random", count=5, seed=3)
    for p in pts:
        x = p["MATRIX_LR"]
        assert x == float(f"{x:.{S.SIG_DIGITS}g}") and math.isfinite(x)
        assert len(repr(x)) <= len("0.") + S.SIG_DIGITS + 1   # 0.0xxxx at most
