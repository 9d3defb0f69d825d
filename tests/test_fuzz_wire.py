"""Property tests (hypothesis) for what arrives from the network: frames, messages, and the
coordinator core driven by random sequences of worker and client calls.

The core is driven the way coordinator.server drives it: with the field types protocol.validate
guarantees (str ids, dict profile/outcome, str|None base), and anything inside those.
Invariants are checked after every step on the real ledger and the real git repo.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator import repo as R
from coordinator import states as S
from coordinator.core import MAX_DESCRIPTION, Coordinator, SubmitRejected, clean_description
from shared import codec, protocol
from shared import outcome as outcome_contract
from shared.codec import CodecError
from shared.protocol import ProtocolError
from tests.test_core import git

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Anything msgpack can carry (keys: str or bytes, as codec.decode admits).
SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.binary(max_size=20))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4),
    max_leaves=20)
ODD_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) \
    | st.sampled_from(["\u202eevil\u202c", "a\x00b", "\u200f\u2066x\u2069", "..", "../../x",
                       "\ufeff", "名前", "🚀" * 10, "x" * 5000])


# ---- frames and messages --------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=2000))
def test_decode_of_arbitrary_bytes_raises_only_codec_error(data):
    try:
        msg = codec.decode(data)
    except CodecError:
        return
    assert isinstance(msg, dict)


@FUZZ
@given(VALUES)
def test_decode_then_validate_raises_only_documented_errors(value):
    try:
        msg = protocol.validate(codec.decode(msgpack.packb(value, use_bin_type=True)))
    except (CodecError, ProtocolError):
        return
    assert msg["type"] in protocol.SCHEMA  # only a well-formed message gets through


def _envelope(type_: str, **fields) -> dict:
    return protocol.make(type_, **fields)


FIELD_VALUES = VALUES | st.sampled_from([True, False, 1, 1.5, "s", {}, [], None, b"b"])


@FUZZ
@given(st.sampled_from(sorted(protocol.SCHEMA)), st.data())
def test_messages_with_random_field_values_validate_or_raise_protocol_error(type_, data):
    fields = {name: data.draw(FIELD_VALUES, label=name)
              for name in [*protocol.SCHEMA[type_].fields, *protocol.SCHEMA[type_].optional]}
    frame = codec.encode(_envelope(type_, **fields))
    try:
        msg = protocol.validate(codec.decode(frame))
    except ProtocolError as exc:
        assert exc.code in ("bad_field", "unknown_type", "version")
        return
    for name, types in protocol.SCHEMA[type_].fields.items():
        assert isinstance(msg[name], types)
        if isinstance(msg[name], bool):  # never a bool where a number / str / map is wanted
            assert bool in types or object in types


@pytest.mark.parametrize("msg, code", [
    ({"type": "ready", "worker_id": "w"}, "version"),                      # no v / harness
    ({"v": protocol.PROTOCOL_VERSION, "harness": "1", "worker_id": "w"}, "unknown_type"),
    (protocol.make("nonsense"), "unknown_type"),
    (protocol.make("ready", worker_id=True), "bad_field"),                   # bool where str
    (protocol.make("assign", attempt_id="a", candidate_id=True, commit="c", train_py="",
                   settings={}, timeout=1.0), "bad_field"),                  # bool where int
    (protocol.make("hello", worker_id="w", name="n", profile="not a map", hw_class="h",
                   attempt_id=None), "bad_field"),                           # str where dict
    (protocol.make("result", worker_id="w", attempt_id="a"), "bad_field"),   # missing field
    (dict(protocol.make("ready", worker_id="w"), v=protocol.PROTOCOL_VERSION + 1), "version"),
])
def test_malformed_messages_name_the_problem(msg, code):
    with pytest.raises(ProtocolError) as info:
        protocol.validate(codec.decode(codec.encode(msg)))
    assert info.value.code == code and str(info.value)


def test_oversized_and_non_map_frames_are_refused():
    big = codec.encode(protocol.make("submit", req_id="r", train_py="x" * codec.MAX_FRAME_BYTES,
                                     description="d", base=None))
    with pytest.raises(CodecError, match="exceeds"):
        codec.decode(big)
    for frame in (msgpack.packb([1, 2]), msgpack.packb("type"), b"", b"\xc1",
                  b"\xdd\xff\xff\xff\xff", msgpack.packb({1: 2}), b"[" * 3000,
                  b"\x91" * 5000):  # 5000 nested arrays
        with pytest.raises(CodecError):
            codec.decode(frame)


# ---- the coordinator core -------------------------------------------------------------------

BASE = "LR = 0.01\nprint('baseline', LR)\n"
WORKERS = ["w1", "w2", "w3"]
CLASSES = ["Apple M1 Pro/16GB/metal", "cpu/x86_64/24GB"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-template") / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    return d


def fresh_repo(template: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=template.parent.parent)) / "run"
    shutil.copytree(template, d, symlinks=True)
    return d


BPB = (st.floats(0.5, 3.0) | st.floats(allow_nan=True, allow_infinity=True)
       | st.integers(-2**63, 2**64 - 1) | st.none() | st.booleans() | st.text(max_size=5)
       | st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf]))
STATUS = st.sampled_from(outcome_contract.STATUSES) | st.text(max_size=8) | VALUES
OUTCOME = st.one_of(
    st.fixed_dictionaries({"status": st.just("ok"), "val_bpb": st.floats(0.5, 3.0)}),
    st.fixed_dictionaries({"status": STATUS, "val_bpb": BPB}, optional={
        "result": VALUES | st.dictionaries(st.text(max_size=8), VALUES, max_size=5),
        "log_tail": ODD_TEXT | VALUES, "exit_code": VALUES, "wall_seconds": VALUES,
        "note": VALUES}),
    st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), VALUES, max_size=5),
)
WID = st.sampled_from(WORKERS) | ODD_TEXT
AID = st.integers(0, 20) | ODD_TEXT          # int: pick one of the attempts handed out so far
TRAIN_PY = (st.integers(0, 50).map(lambda n: f"LR = {n}\nprint('variant', LR)\n")
            | ODD_TEXT | st.sampled_from(["x = 1\0", "def f(:\n", "", "\ufeffx = 1\n"]))
BASES = st.none() | st.sampled_from(["", "HEAD", "-n", "--help", "\x00", "HEAD:train.py",
                                     "refs/autoresearch/candidates/1", "x" * 1000]) | ODD_TEXT

OPS = st.one_of(
    st.tuples(st.just("hello"), WID, ODD_TEXT, VALUES | st.dictionaries(
        st.text(max_size=8) | st.binary(max_size=4), VALUES, max_size=4),
        st.sampled_from(CLASSES) | ODD_TEXT, st.none() | AID),
    st.tuples(st.just("next"), WID),
    st.tuples(st.just("next"), WID),
    st.tuples(st.just("result"), WID, AID, OUTCOME),
    st.tuples(st.just("result"), WID, AID, OUTCOME),
    st.tuples(st.just("seen"), WID, st.none() | AID, VALUES),
    st.tuples(st.just("lost"), WID, ODD_TEXT),
    st.tuples(st.just("bye"), WID, ODD_TEXT),
    st.tuples(st.just("submit"), TRAIN_PY, ODD_TEXT, BASES),
)


class Driver:
    """Applies fuzzed operations; remembers attempt ids handed out and counted results."""

    def __init__(self, coord: Coordinator):
        self.c = coord
        self.attempts: list[str] = []
        self.counted: dict[str, tuple] = {}   # attempt id -> (status, val_bpb) once done

    def aid(self, choice):
        if isinstance(choice, int):
            return self.attempts[choice % len(self.attempts)] if self.attempts else "none"
        return choice

    def apply(self, op) -> None:
        c, kind = self.c, op[0]
        if kind == "hello":
            _, wid, name, profile, hw, aid = op
            profile = profile if isinstance(profile, dict) else {}
            c.worker_hello(wid, name, profile, hw, None if aid is None else self.aid(aid))
        elif kind == "next":
            try:
                a = c.next_assignment(op[1])
            except ValueError as exc:
                assert "say hello first" in str(exc)
                return
            if a is not None:
                self.attempts.append(a.attempt_id)
                assert a.attempt_id not in self.counted
        elif kind == "result":
            _, wid, aid, outcome = op
            ack = c.record_result(wid, self.aid(aid), outcome)
            assert isinstance(ack.note, str)
            assert all(d.verdict in S.VERDICTS for d in ack.decisions)
        elif kind == "seen":
            _, wid, aid, progress = op
            c.worker_seen(wid, None if aid is None else self.aid(aid), progress)
        elif kind == "lost":
            c.worker_lost(op[1], op[2])
        elif kind == "bye":
            c.worker_bye(op[1], op[2])
        elif kind == "submit":
            _, text, desc, base = op
            try:
                out = c.submit(text, desc, base)
            except SubmitRejected as exc:
                assert str(exc)
                return
            if out["duplicate"]:  # answered with the earlier candidate, its own description
                assert out["description"] == c.ledger.candidate(out["candidate_id"])["description"]
            else:
                assert out["description"] == clean_description(desc)
            assert len(out["description"]) <= MAX_DESCRIPTION
        else:  # pragma: no cover
            raise AssertionError(kind)

    def check(self) -> None:
        L = self.c.ledger
        cands = {r["id"]: r["state"] for r in L.all("SELECT id, state FROM candidates")}
        assert set(cands.values()) <= set(S.CANDIDATE_STATES)
        atts = L.all("SELECT * FROM attempts")
        assert {a["state"] for a in atts} <= set(S.ATTEMPT_STATES)
        decisions = L.all("SELECT candidate_id, attempt_ids FROM decisions")
        per_cand = {}
        for d in decisions:
            per_cand[d["candidate_id"]] = per_cand.get(d["candidate_id"], 0) + 1
        assert all(n == 1 for n in per_cand.values())          # at most one decision each
        for cid, state in cands.items():
            if cid == 0:
                continue
            assert (state in S.CANDIDATE_FINAL) == (cid in per_cand), (cid, state)
            # (a kept candidate is the head: its head leases on other classes are not its own)
            leased = [a for a in atts if a["candidate_id"] == cid and a["state"] == S.LEASED
                      and a["purpose"] == "candidate"]
            assert (len(leased) > 0) == (state == S.RUNNING), (cid, state, len(leased))
            if state == S.MEASURED:
                assert any(a["state"] == S.DONE and a["status"] == "ok" and
                           a["candidate_id"] == cid for a in atts)
        by_worker = {}
        for a in atts:
            if a["state"] == S.LEASED:
                by_worker[a["worker_id"]] = by_worker.get(a["worker_id"], 0) + 1
            if a["state"] == S.DONE and a["status"] == "ok":
                assert isinstance(a["val_bpb"], float) and math.isfinite(a["val_bpb"])
                assert a["val_bpb"] > 0
            if a["state"] == S.DONE:  # a counted result never changes afterwards
                key = (a["status"], a["val_bpb"])
                assert self.counted.setdefault(a["attempt_id"], key) == key
        assert all(n == 1 for n in by_worker.values())
        # Each candidate attempt is counted in at most one decision.
        firsts = [json.loads(d["attempt_ids"])[:1] for d in decisions if d["candidate_id"]]
        flat = [x for f in firsts for x in f]
        assert len(flat) == len(set(flat))
        head = L.head()
        assert cands[head["candidate_id"]] == S.KEPT
        assert git(self.c.repo_dir, "rev-parse", self.c.branch_ref) == head["commit_sha"]
        msgpack.packb(self.c.status(), use_bin_type=True)
        msgpack.packb(self.c.log(limit=20), use_bin_type=True)
        assert self.c.export_tsv().startswith("commit\t")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.lists(OPS, min_size=1, max_size=14))
def test_core_survives_random_operation_sequences(template, ops):
    repo = fresh_repo(template)
    try:
        with Coordinator(repo) as coord:
            drv = Driver(coord)
            for op in ops:
                drv.apply(op)
                drv.check()
        # Restart: reconcile finds nothing to fix in a consistent run.
        with Coordinator(repo) as again:
            assert not [f for f in again.fixed if "moved" in f or "recreated" in f]
            Driver(again).check()
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(WORKERS), st.sampled_from(CLASSES),
                          st.sampled_from(["next", "ok", "ok", "bad", "dup", "lost", "submit"]),
                          st.floats(0.5, 3.0)), min_size=4, max_size=25))
def test_core_realistic_sequences_keep_the_branch_on_the_ledger_head(template, steps):
    """Mostly well-formed traffic, so keeps and discards really happen."""
    repo = fresh_repo(template)
    try:
        with Coordinator(repo) as coord:
            drv, last, n = Driver(coord), {}, 0
            for wid in WORKERS:
                coord.worker_hello(wid, wid, {}, CLASSES[WORKERS.index(wid) % 2], None)
            for wid, hw, action, bpb in steps:
                if action == "next":
                    a = coord.next_assignment(wid)
                    if a is not None:
                        drv.attempts.append(a.attempt_id)
                        last[wid] = a.attempt_id
                elif action in ("ok", "bad", "dup") and wid in last:
                    outcome = ({"status": "ok", "val_bpb": bpb} if action != "bad" else
                               {"status": "ok", "val_bpb": -bpb, "result": [1]})
                    coord.record_result(wid, last[wid], outcome)
                elif action == "lost":
                    coord.worker_lost(wid, "silent")
                    coord.worker_hello(wid, wid, {}, hw, last.get(wid))
                elif action == "submit":
                    n += 1
                    try:
                        coord.submit(f"LR = {bpb!r}\nN = {n}\n", f"v{n}")
                    except SubmitRejected:
                        pytest.fail("a compiling variant was refused")
                drv.check()
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


# ---- regressions found by the fuzzing (each failed before the fix in coordinator/core.py) ----

@pytest.fixture
def coord(template):
    repo = fresh_repo(template)
    c = Coordinator(repo)
    yield c
    c.close()
    shutil.rmtree(repo.parent, ignore_errors=True)


def _deep(n):
    out = x = []
    for _ in range(n):
        x.append([])
        x = x[0]
    return out


def lease(c, wid="w1", hw=CLASSES[0]):
    c.worker_hello(wid, wid, {}, hw, None)
    return c.next_assignment(wid)


@pytest.mark.parametrize("outcome", [
    {"status": "crash", "result": {b"bytes key": 1}},                  # TypeError in json.dumps
    {"status": "crash", "result": {"deep": _deep(1020)}},  # RecursionError
    {"status": "crash", "exit_code": 2**64 - 1},                       # OverflowError in SQLite
    {"status": "crash", "exit_code": -2**63 - 1, "wall_seconds": 10**400},
    {"status": "crash", "result": [1, 2], "log_tail": 5},              # .get on a list
    {"status": "crash", "result": {"error": 17}},                      # .strip on an int
])
def test_regression_hostile_outcome_maps_are_stored(coord, outcome):
    coord.submit("X = 2\n", "candidate")
    head = lease(coord, "w1")
    assert coord.record_result("w1", head.attempt_id, {"status": "ok", "val_bpb": 1.5}).accepted
    a = coord.next_assignment("w1")
    assert a.purpose == "candidate"
    ack = coord.record_result("w1", a.attempt_id, outcome)
    assert ack.accepted and [d.verdict for d in ack.decisions] == ["failed"]
    Driver(coord).check()


def test_regression_deep_nesting_arrives_through_the_codec():
    # msgpack admits ~1050 levels; json.dumps (the ledger) recursed out at 1000 before the fix.
    assert codec.decode(msgpack.packb({"r": _deep(1020)}))["r"]


@pytest.mark.parametrize("bpb", [0.0, -1.5, -0.0])
def test_regression_non_positive_val_bpb_is_not_ok(coord, bpb):
    head = lease(coord)
    ack = coord.record_result("w1", head.attempt_id, {"status": "ok", "val_bpb": bpb})
    row = coord.ledger.attempt(head.attempt_id)
    assert row["status"] == "crash" and row["val_bpb"] is None and "val_bpb" in row["note"]
    assert ack.accepted


@pytest.mark.parametrize("bpb", [math.nan, math.inf, -math.inf, None, "1.5", True])
def test_non_finite_or_non_numeric_val_bpb_is_not_ok(coord, bpb):
    head = lease(coord)
    coord.record_result("w1", head.attempt_id, {"status": "ok", "val_bpb": bpb})
    row = coord.ledger.attempt(head.attempt_id)
    assert row["status"] in ("nan", "crash") and row["val_bpb"] is None


def test_regression_profile_with_bytes_keys(coord):
    coord.worker_hello("w1", "n", {b"chip": b"M1", "nested": {b"k": [b"v"]}}, CLASSES[0], None)
    assert json.loads(coord.ledger.worker("w1")["profile"]) == {"chip": "M1",
                                                                 "nested": {"k": ["v"]}}


def test_regression_heartbeat_progress_that_is_not_a_map(coord):
    lease(coord)
    coord.worker_seen("w1", "a", [1, 2, 3])
    coord.worker_seen("w1", "a", "text")
    coord.status()


@pytest.mark.parametrize("base", ["\x00", "-n", "--output=/tmp/x", "x" * 1000, "a\x00b"])
def test_regression_hostile_base_is_refused(coord, base):
    with pytest.raises(SubmitRejected, match="not a commit"):
        coord.submit("X = 3\n", "d", base)


def test_descriptions_lose_bidi_and_invisible_characters_and_are_capped(coord):
    raw = "\u202eevil\u202c \u2066iso\u2069 zero\u200bwidth \ufeffbom \u200fmark " \
          "👨\u200d👩\u200d👧 \x00nul\x1b[31m " + "y" * 100_000
    out = coord.submit("X = 4\n", raw)["description"]
    for ch in "\u202e\u202c\u2066\u2069\u200b\ufeff\u200f\x00\x1b":
        assert ch not in out
    assert out.startswith("evil iso zerowidth bom mark 👨\u200d👩\u200d👧 nul[31m y")
    assert len(out) == MAX_DESCRIPTION and out.endswith("…")
    stored = coord.ledger.candidate(coord.status()["queue"][0]["candidate_id"])["description"]
    assert stored == out
    assert "\u202e" not in git(coord.repo_dir, "log", "-1", "--format=%B",
                               "refs/autoresearch/candidates/1")
