"""The candidate and attempt state machines: every legal move allowed, everything else refused."""
from __future__ import annotations

import itertools

import pytest

from coordinator import states as st

LEGAL_CANDIDATE = {
    ("queued", "running"), ("running", "measured"), ("running", "failed"),
    ("running", "queued"), ("measured", "kept"), ("measured", "discarded"),
    # repeats (coordinator.rule asks for more runs; decided when all its leases are in)
    ("running", "repeating"), ("running", "kept"), ("running", "discarded"),
    ("measured", "repeating"), ("repeating", "running"), ("repeating", "measured"),
    ("repeating", "kept"), ("repeating", "discarded"),
    # rebasing: a change that does not replay onto the head ends it (coordinator.rebase)
    ("queued", "stale"), ("running", "stale"), ("measured", "stale"), ("repeating", "stale"),
    ("failed", "queued"),   # only by an admin's retry (Coordinator.retry)
    # the last worker of its class is gone: unbound, back to the queue (Coordinator)
    ("measured", "queued"), ("repeating", "queued"),
}
LEGAL_ATTEMPT = {
    ("leased", "done"), ("leased", "lost"), ("leased", "cancelled"),
    ("lost", "stale"), ("cancelled", "stale"),
}


@pytest.mark.parametrize("old,new", list(itertools.product(st.CANDIDATE_STATES, repeat=2)))
def test_candidate_transitions(old, new):
    if (old, new) in LEGAL_CANDIDATE:
        assert st.check_candidate(old, new) == new
    else:
        with pytest.raises(st.IllegalTransition, match=f"{old} -> {new} is not allowed"):
            st.check_candidate(old, new)


@pytest.mark.parametrize("old,new", list(itertools.product(st.ATTEMPT_STATES, repeat=2)))
def test_attempt_transitions(old, new):
    if (old, new) in LEGAL_ATTEMPT:
        assert st.check_attempt(old, new) == new
    else:
        with pytest.raises(st.IllegalTransition):
            st.check_attempt(old, new)


def test_final_states_go_nowhere_and_unknown_states_are_refused():
    for s in ("kept", "discarded"):
        assert not st.CANDIDATE_TRANSITIONS[s]
    assert st.CANDIDATE_TRANSITIONS["failed"] == {"queued"} and st.RETRYABLE == {"failed"}
    with pytest.raises(st.IllegalTransition, match="unknown state 'paused'"):
        st.check_candidate("queued", "paused")
    with pytest.raises(st.IllegalTransition, match="unknown state"):
        st.check_attempt("zombie", "done")


def test_describe_prints_every_transition():
    text = st.describe()
    for old, new in LEGAL_CANDIDATE | LEGAL_ATTEMPT:
        assert any(line.split() == [old, "->", new] for line in text.splitlines()), (old, new)
    assert "kept       (final)" in text and "stale      (final)" in text
