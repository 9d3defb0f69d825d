"""The brief agents read, rendered from plain data dicts; backpressure and backoff."""
from __future__ import annotations

from coordinator import pacing
from coordinator.brief import BriefContext, Feedback, render_brief

SNAP = {
    "tag": "nov25",
    "head": {"commit": "abcdef1234567890", "candidate_id": 7, "description": "wider mlp",
             "values": [{"hw_class": "Apple M1 Pro/16GB/metal", "mean": 1.4123, "sem": 0.004,
                         "runs": 3}]},
    "decisions": [
        {"candidate_id": 9, "verdict": "discarded", "description": "deeper | narrower",
         "hw_class": "Apple M1 Pro/16GB/metal", "mean": 1.4301, "sem": 0.0051, "runs": 4,
         "head_mean": 1.4123, "head_sem": 0.004, "reason": "not better after 4 paired runs"},
        {"candidate_id": 8, "verdict": "failed", "description": "bf16 softmax",
         "hw_class": "Apple M1 Pro/16GB/metal", "reason": "nan on Apple M1 Pro/16GB/metal"},
        {"candidate_id": 7, "verdict": "kept", "description": "wider mlp", "val_bpb": 1.41,
         "head_bpb": 1.45, "reason": "1.4100 < head 1.4500"},
        {"candidate_id": 0, "verdict": "kept", "description": "baseline", "reason": "baseline"},
    ],
    "queued": [{"candidate_id": 12, "description": "lower warmdown"}],
    "running": [{"candidate_id": 11, "description": "rope base 50000", "worker": "mac-3",
                 "hw_class": "Apple M1 Pro/16GB/metal"}],
    "awaiting": [{"candidate_id": 10, "description": "matrix lr 0.03", "mean": 1.405,
                  "sem": 0.006, "runs": 2, "hw_class": "Apple M1 Pro/16GB/metal",
                  "waiting_for": "2 more paired repeats"}],
    "failures": [{"candidate_id": 8, "description": "bf16 softmax", "status": "nan",
                  "hw_class": "Apple M1 Pro/16GB/metal", "reason": "nan",
                  "log_tail": "\n".join(f"step {i} loss {i}" for i in range(40))
                              + "\nloss is nan at step 41\n"}],
    "noise": [{"hw_class": "Apple M1 Pro/16GB/metal", "sigma": 0.0213, "runs": 9}],
    "workers": 3,
    "program_md": "# autoresearch run `nov25`\n\nThe rules of this run.",
}


def ctx(previous=None) -> BriefContext:
    return BriefContext(proposer="p2", proposers=4, workdir="/tmp/x/work",
                        train_py="/tmp/x/work/train.py",
                        description_file="/tmp/x/work/description.txt", timeout=600,
                        previous=previous)


def test_brief_has_the_contract_head_decisions_in_flight_failures_noise_and_program():
    text = render_brief(SNAP, ctx())
    # the contract: which file, which description file, the time
    assert "`/tmp/x/work/train.py`" in text and "`/tmp/x/work/description.txt`" in text
    assert "600 seconds" in text and "proposer p2 of 4" in text
    # the head with mean ± sem
    assert "abcdef1234567890" in text and "1.4123 ± 0.0040 (3)" in text
    # decisions with numbers and reasons, the baseline row left out
    assert "DISCARDED #9 'deeper | narrower': 1.4301 ± 0.0051 (4) vs head 1.4123 ± 0.0040" \
        in text
    assert "not better after 4 paired runs" in text
    assert "FAILED #8 'bf16 softmax' [Apple M1 Pro/16GB/metal] -- nan on" in text
    assert "KEPT #7 'wider mlp': 1.4100 vs head 1.4500" in text
    assert "#0 'baseline'" not in text
    # in flight: queued, running (with worker), awaiting repeats (with the running mean)
    assert "- #12 'lower warmdown'" in text
    assert "- #11 'rope base 50000' on mac-3 [Apple M1 Pro/16GB/metal]" in text
    assert "- #10 'matrix lr 0.03': 1.4050 ± 0.0060 (2)" in text
    assert "2 more paired repeats" in text and "3 workers connected" in text
    # failure with the tail of its log (the last lines, not the first)
    assert "### #8 'bf16 softmax': nan" in text
    assert "loss is nan at step 41" in text and "step 39 loss 39" in text
    assert "step 3 loss 3\n" not in text
    # noise and program.md verbatim
    assert "σ ≈ 0.0213 (9 runs)" in text
    assert "The rules of this run." in text
    assert text.index("## Your task") < text.index("## The head") < text.index("## In flight")


def test_empty_snapshot_renders():
    text = render_brief({}, ctx())
    assert "Not measured yet" in text and "(none)" in text
    assert "No class has repeated runs yet" in text
    assert "first proposal" in text


def test_previous_feedback_kinds():
    assert "was unchanged: train.py was identical to the head" in render_brief(
        SNAP, ctx(Feedback("unchanged", description="nothing")))
    t = render_brief(SNAP, ctx(Feedback("does_not_compile",
                                        "SyntaxError: invalid syntax (line 3)", None, "typo")))
    assert "does not compile" in t and "SyntaxError: invalid syntax (line 3)" in t
    t = render_brief(SNAP, ctx(Feedback("duplicate", "", 9, "deeper")))
    assert "a duplicate of #9" in t
    assert "#9 now: DISCARDED: 1.4301 ± 0.0051 (4) vs head" in t
    t = render_brief(SNAP, ctx(Feedback("submitted", "", 11, "rope")))
    assert "submitted as #11" in t and "#11 now: running now" in t
    t = render_brief(SNAP, ctx(Feedback("timeout", "killed after 600 s")))
    assert "ran out of time" in t and "killed after 600 s" in t


# ---- pacing ---------------------------------------------------------------------------------

def test_in_flight_counts_every_undecided_state():
    counts = {"queued": 2, "running": 1, "measured": 3, "kept": 5, "discarded": 9, "failed": 1,
              "attempts": 40}
    assert pacing.in_flight(counts) == 6
    assert pacing.in_flight({}) == 0


def test_room_holds_in_flight_within_workers_plus_slack():
    assert pacing.room(in_flight_now=0, workers=3, slack=1) == 4
    assert pacing.room(in_flight_now=3, workers=3, slack=1, proposing=1) == 0
    assert pacing.room(in_flight_now=2, workers=3, slack=1, proposing=1) == 1
    assert pacing.room(in_flight_now=9, workers=3, slack=1) == 0
    assert pacing.room(in_flight_now=0, workers=0, slack=2) == 2   # primes a queue for joiners
    for flight in range(8):
        for proposing in range(4):
            r = pacing.room(flight, 3, 2, proposing)
            assert flight + proposing + r <= 5 or r == 0


def test_backoff_doubles_and_is_capped():
    assert pacing.backoff(0) == 0
    assert [pacing.backoff(n, 5, 300) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert pacing.backoff(10_000, 1, 60) == 60


def test_mean_sem():
    from coordinator.stats import mean_sem

    m, s = mean_sem([1.0, 1.2, 1.1])
    assert abs(m - 1.1) < 1e-12 and abs(s - 0.0577350) < 1e-6
    assert mean_sem([1.0]) == (1.0, None) and mean_sem([]) == (None, None)
    assert mean_sem([1.0, float("nan"), 3.0]) == (2.0, 1.0)
