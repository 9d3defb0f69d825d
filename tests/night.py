"""A simulated night for the report and dashboard tests: a real ``Coordinator`` (real ledger,
real git) driven in-process, with a fake clock so hours of research take a second.

Nothing is trained. Each candidate has an *effect* on val_bpb; a run of candidate c on class C
reports ``BASE[C] + effect[c] + noise`` (noise from a fixed sequence), a failing one reports
crash/nan. Workers simply ask for work until nobody gets any, so the night follows whatever the
coordinator's scheduling and decision rule do (one screening run, repeats, head re-measures).
The fleet end-to-end tests (test_report.py) cover the report built from a ledger that real
processes wrote.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from coordinator.core import Coordinator

M1, M4 = "Apple M1 Pro/16GB/metal", "Apple M4 Max/64GB/metal"
BASE = {M1: 1.500, M4: 1.300}
NOISE = [0.002, -0.003, 0.001, 0.004, -0.002, 0.0, 0.003, -0.001, 0.002, -0.004, 0.001, -0.002]
RUN_SECONDS = 330.0

# (description, effect on val_bpb; None = the run fails) -- submitted in this order
PLAN = [
    ("raise learning rate to 0.04", -0.060),
    ("wider MLP (4x -> 5x)", +0.020),
    ("rotary base 10000 -> 50000", -0.120),
    ("untie embeddings", -0.100),
    ("drop weight decay", +0.010),
    ("muon momentum 0.95", -0.180),
    ("bad init (diverges)", None),
    ("GQA with 2 kv heads", -0.240),
    ("typo in forward", None),
]


@dataclass
class Clock:
    t: float = 1_764_547_200.0   # an evening, epoch seconds

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@dataclass
class Night:
    core: Coordinator
    clock: Clock
    effects: dict[int, float | None] = field(default_factory=lambda: {0: 0.0})
    kept: list[int] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    _noise: itertools.cycle = field(default_factory=lambda: itertools.cycle(NOISE))

    def hello(self, wid: str, hw: str) -> None:
        self.core.worker_hello(wid, wid, {"chip": hw}, hw, None)
        self.workers.append(wid)

    def submit(self, variant, desc: str, effect: float | None) -> int:
        n = len(self.effects)
        # A distinct text per candidate, whatever its effect: each sets its own knob of the
        # stand-in, on its own line, so candidates from one head rebase onto each other's keeps
        # (coordinator.rebase) instead of conflicting, as different ideas would.
        cid = self.core.submit(variant(knob=n), desc)["candidate_id"]
        self.effects[cid] = effect
        return cid

    def step(self, wid: str) -> bool:
        """``wid`` asks for work and reports its run; False if it got none."""
        a = self.core.next_assignment(wid)
        if a is None:
            return False
        hw = self.core.ledger.worker(wid)["hw_class"]
        effect = self.effects.get(a.candidate_id, 0.0)
        self.core.worker_seen(wid, a.attempt_id, {"step": 40, "progress": 0.5, "loss": 3.2,
                                                  "tok_per_sec": 9000.0, "elapsed": 150.0})
        if effect is None:
            status = "nan" if self.core.ledger.candidate(a.candidate_id)["description"] \
                .startswith("bad init") else "crash"
            self.clock.advance(40)
            outcome = {"status": status, "val_bpb": None, "exit_code": 1,
                       "log_tail": "step 10 | loss nan\nFloatingPointError: loss is nan"
                       if status == "nan" else "Traceback ...\nAttributeError: no Linaer"}
        else:
            self.clock.advance(RUN_SECONDS)
            outcome = {"status": "ok", "val_bpb": BASE[hw] + effect + next(self._noise),
                       "exit_code": 0, "result": {"peak_vram_mb": 4096.0}}
        ack = self.core.record_result(wid, a.attempt_id, outcome)
        for d in ack.decisions:
            getattr(self, d.verdict).append(d.candidate_id)
        return True

    def run_until_idle(self, limit: int = 500) -> None:
        for _ in range(limit):
            if not any([self.step(w) for w in self.workers]):
                return
        raise AssertionError("the simulated night did not settle")


def research_repo(tmp_path):
    """A research repo on the run's default decision rule (screen, paired repeats, the head
    run several times), unlike conftest's fleet_repo (single runs), with the stand-in train.py
    as its baseline."""
    from conftest import _FLEET_TRAIN_PY
    from coordinator.repo import init_repo

    repo = tmp_path / "research"
    init_repo(repo, tag="night", preset="tiny", train_py=_FLEET_TRAIN_PY)
    return repo


def simulate(repo, variant, plan=PLAN) -> Night:
    """Two classes of two workers each, the plan's candidates, run until idle."""
    clock = Clock()
    n = Night(Coordinator(repo, clock=clock), clock)
    n.hello("m1-a", M1)
    n.hello("m1-b", M1)
    n.hello("m4-a", M4)
    n.hello("m4-b", M4)
    for desc, effect in plan:
        n.submit(variant, desc, effect)
    n.run_until_idle()
    return n


def mid_repeat(n: Night, variant) -> tuple[int, int, object]:
    """After a night: a promising candidate screened on M1 (so the rule wants repeats) whose
    repeat m1-b is running mid-way (progress heartbeat), and one more candidate queued.
    Returns (promising id, queued id, the running assignment)."""
    promising = n.submit(variant, "promising: half the warmup", -0.30)
    assert n.step("m1-a")                       # the screening run
    a = n.core.next_assignment("m1-b")          # a repeat, the queue being empty
    assert a is not None and a.candidate_id == promising, a
    queued = n.submit(variant, "smaller batch, more steps", +0.01)
    n.core.worker_seen("m1-b", a.attempt_id, {"step": 123, "progress": 0.42, "loss": 3.4567,
                                              "tok_per_sec": 12345.0, "elapsed": 130.0})
    return promising, queued, a
