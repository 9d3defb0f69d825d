"""A simulated night for the report and dashboard tests: a real ``Coordinator`` (real ledger,
real git) driven in-process, with a fake clock so eight hours of research take a second.

Nothing is trained: each "run" reports the val_bpb the plan gives it. The fleet end-to-end
tests (test_report.py) cover the same report built from a ledger real processes wrote.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.core import Coordinator

M1, M4 = "Apple M1 Pro/16GB/metal", "Apple M4 Max/64GB/metal"


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
    kept: list[int] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    def hello(self, wid: str, hw: str) -> None:
        self.core.worker_hello(wid, wid, {"chip": hw}, hw, None)

    def run(self, wid: str, bpb: float | None, seconds: float = 330.0,
            status: str = "ok") -> object:
        """The worker takes its next assignment and reports ``bpb`` after ``seconds``."""
        a = self.core.next_assignment(wid)
        assert a is not None, f"{wid} got no work"
        self.core.worker_seen(wid, a.attempt_id, {"step": 40, "progress": 0.5, "loss": 3.2,
                                                  "tok_per_sec": 9000.0, "elapsed": 150.0})
        self.clock.advance(seconds)
        outcome = {"status": status, "val_bpb": bpb, "exit_code": 0 if status == "ok" else 1,
                   "log_tail": "step 10 | loss nan\nFloatingPointError: loss is nan"
                   if status == "nan" else "", "result": {"peak_vram_mb": 4096.0}}
        ack = self.core.record_result(wid, a.attempt_id, outcome)
        for d in ack.decisions:
            getattr(self, {"kept": "kept", "discarded": "discarded",
                           "failed": "failed"}[d.verdict]).append(d.candidate_id)
        return a


BASE = {M1: 1.500, M4: 1.300}


def simulate(repo, variant) -> Night:
    """Two classes, three workers, nine candidates: kept ones on both classes, discards, a nan
    and a crash; after a keep on one class the head is re-measured on the other. A variant's
    val_bpb is the class's baseline + the kept changes' effects + its own (plus small noise)."""
    clock = Clock()
    core = Coordinator(repo, clock=clock)
    n = Night(core, clock)
    n.hello("m1-a", M1)
    n.hello("m1-b", M1)
    n.hello("m4", M4)
    plan = [  # (description, effect on val_bpb (None = fails), worker)
        ("raise learning rate to 0.04", -0.030, "m1-a"),
        ("wider MLP (4x -> 5x)", +0.020, "m1-b"),
        ("rotary base 10000 -> 50000", -0.035, "m4"),
        ("untie embeddings", -0.002, "m1-a"),
        ("drop weight decay", +0.010, "m1-b"),
        ("muon momentum 0.95", -0.025, "m4"),
        ("bad init (diverges)", None, "m1-a"),
        ("GQA with 2 kv heads", -0.020, "m1-b"),
        ("typo in forward", None, "m4"),
    ]
    return play(n, plan, variant)


def play(n: Night, plan, variant) -> Night:
    # Each variant rewrites the stand-in's BPB line, so each is submitted on top of the head as
    # it stands when its turn comes (as an agent would): written against an older head, it
    # would conflict with the keeps since (coordinator.rebase) and end stale, not run.
    gained = 0.0
    noise = iter([0.002, -0.003, 0.001, 0.004, -0.002, 0.0, 0.003, -0.001, 0.002, -0.004] * 9)
    for i, (desc, effect, wid) in enumerate(plan):
        n.core.submit(variant(bpb=round(1.0 + i / 100, 3), sleep=0.01), desc)
        hw = n.core.ledger.worker(wid)["hw_class"]
        head = n.core.ledger.head()
        measured = n.core.ledger.scalar(
            "SELECT COUNT(*) FROM attempts WHERE candidate_id = ? AND hw_class = ? AND "
            "state = 'done' AND status = 'ok'", head["candidate_id"], hw)
        if not measured:   # the current head first, on this class
            n.run(wid, BASE[hw] + gained + next(noise), 300)
        if effect is None:
            n.run(wid, None, 40, status="nan" if "diverges" in desc else "crash")
            continue
        before = len(n.kept)
        n.run(wid, BASE[hw] + gained + effect + next(noise), 330)
        if len(n.kept) > before:
            gained += effect
    return n
