"""The laptop rules as pure functions on hand-written readings: power / idle gating
(worker.gate), slowed-by-the-machine flagging (coordinator.slowdown) and memory routing
(coordinator.routing). Readings come from the recorded Mac outputs where they can."""
from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.routing import after_oom, fits, worker_memory
from coordinator.slowdown import (MAX_FLAGGED, judge, machine_evidence, run_tok_per_sec)
from worker.conditions import read_conditions
from worker.gate import GateSettings, paused_reason

DATA = Path(__file__).parent / "data" / "conditions"
GB = 2**30


def mac(**files):
    def run(argv):
        key = argv[0] if argv[0] != "pmset" else f"pmset_{argv[2]}"
        return (DATA / files[key]).read_text() if key in files else None

    return read_conditions(system="Darwin", run=run)


# ---- gate ----------------------------------------------------------------------------------

def test_battery_pauses_new_work_unless_allowed():
    on_battery = mac(pmset_batt="pmset_batt_macbook_battery.txt")
    why = paused_reason(on_battery, GateSettings())
    assert why.startswith("on battery power (87%): no new work until plugged in")
    assert paused_reason(on_battery, GateSettings(allow_battery=True)) is None
    for name in ("pmset_batt_macbook_ac_charged.txt", "pmset_batt_macbook_ac_charging.txt",
                 "pmset_batt_desktop.txt"):
        assert paused_reason(mac(pmset_batt=name), GateSettings()) is None
    # pmset missing: unknown power never pauses a worker
    assert paused_reason(mac(), GateSettings()) is None
    ups = {"power": {"source": "ups"}}
    assert "UPS power" in paused_reason(ups, GateSettings())


def test_when_idle():
    active = mac(pmset_batt="pmset_batt_desktop.txt", ioreg="ioreg_hid_active.txt")
    idle = mac(pmset_batt="pmset_batt_desktop.txt", ioreg="ioreg_hid_idle.txt")
    ten = GateSettings(when_idle_seconds=600)
    assert paused_reason(active, ten) == ("in use: keyboard/mouse idle 1s, waiting for "
                                          "10m00s idle (--when-idle)")
    assert paused_reason(idle, ten) is None     # two hours idle
    assert paused_reason(active, GateSettings()) is None
    assert "unknown" in paused_reason({"idle_seconds": None}, ten)


# ---- slowdown ------------------------------------------------------------------------------

def reading(swapouts=0, level="normal", thermal="nominal", speed=None):
    return {"memory": {"level": level, "swapins": 0, "swapouts": swapouts, "page_size": 16384},
            "thermal": {"state": thermal, "cpu_speed_limit": speed}}


def result(tok_s, seconds=300.0):
    return {"total_tokens_M": tok_s * seconds / 1e6, "training_seconds": seconds,
            "tok_per_sec": 1.0}


def test_run_tok_per_sec_is_the_average():
    assert run_tok_per_sec(result(20000)) == pytest.approx(20000)
    assert run_tok_per_sec({"tok_per_sec": 1234.0}) == 1234.0
    assert run_tok_per_sec({}) is None and run_tok_per_sec(None) is None


def test_machine_evidence_from_the_recorded_swapping_mac():
    start = mac(sysctl="sysctl_memory_normal.txt", vm_stat="vm_stat_normal.txt",
                pmset_therm="pmset_therm_nominal.txt")
    end = mac(sysctl="sysctl_memory_critical.txt", vm_stat="vm_stat_swapping.txt",
              pmset_therm="pmset_therm_intel_throttled.txt")
    ev = machine_evidence({"start": start, "end": end})
    swapped = (412873 + 698114) * 16384 / 2**20
    assert ev == [f"swapped {swapped:.0f} MiB during the run", "memory pressure critical at end",
                  "thermal throttled (CPU speed limit 58%) at end"]
    assert machine_evidence({"start": start, "end": start}) == []
    assert machine_evidence(None) == [] and machine_evidence({"start": 1, "end": "x"}) == []


def test_slow_against_the_median_of_the_same_text_is_flagged():
    quiet = {"start": reading(), "end": reading()}
    j = judge(result(12000), quiet, [20000, 21000, 19000], flagged_before=0)
    assert j.flagged and j.reference_tok_per_sec == 20000
    assert "12,000 tok/s is 40% below the median 20,000 tok/s of the same train.py" in j.reason
    assert j.reason.startswith("slowed by the machine, not counted, re-run")
    ok = judge(result(17000), quiet, [20000, 21000, 19000], flagged_before=0)
    assert not ok.flagged and ok.reason == ""


def test_evidence_without_reference_flags_with_reference_needs_slowness():
    hot = {"start": reading(), "end": reading(swapouts=10_000, level="critical")}
    first = judge(result(15000), hot, [], flagged_before=0)
    assert first.flagged and "no earlier run of this train.py on this class" in first.reason
    assert "swapped 156 MiB during the run" in first.reason
    # a candidate that always swaps but runs at its usual speed is measured as it is
    same = judge(result(15000), hot, [15500], flagged_before=0)
    assert not same.flagged and same.reason.startswith("counted despite swapped 156 MiB")
    slow = judge(result(9000), hot, [15500], flagged_before=1)
    assert slow.flagged and "memory pressure critical at end" in slow.reason


def test_flagging_stops_after_max_flagged():
    j = judge(result(5000), {"start": reading(thermal="throttled", speed=40), "end": reading()},
              [20000], flagged_before=MAX_FLAGGED)
    assert not j.flagged
    assert j.reason.startswith("counted although slowed by the machine")
    assert f"{MAX_FLAGGED} attempts of it were flagged already" in j.reason


def test_judge_tolerates_missing_figures():
    j = judge({}, None, [20000], flagged_before=0)
    assert not j.flagged and j.tok_per_sec is None


# ---- routing -------------------------------------------------------------------------------

def test_oom_routes_to_the_largest_connected_class_with_more_memory():
    connected = [("Apple M1 Pro/16GB/metal", 11 * GB), ("Apple M4 Max/64GB/metal", 48 * GB),
                 ("Apple M2/24GB/metal", 18 * GB)]
    r = after_oom("Apple M1 Pro/16GB/metal", 11 * GB, None, connected)
    assert r.requeue and r.min_memory == 11 * GB and r.target_class == "Apple M4 Max/64GB/metal"
    assert "routed to classes with more than 11.0 GB" in r.reason
    # OOM again on the 24 GB class: still one bigger
    r2 = after_oom("Apple M2/24GB/metal", 18 * GB, r.min_memory, connected)
    assert r2.requeue and r2.min_memory == 18 * GB
    # OOM on the largest: fails, saying so
    r3 = after_oom("Apple M4 Max/64GB/metal", 48 * GB, r2.min_memory, connected)
    assert not r3.requeue and r3.min_memory == 48 * GB
    assert r3.reason == ("out of memory on Apple M4 Max/64GB/metal (48.0 GB usable), and no "
                         "connected class has more than 48.0 GB")


def test_oom_with_only_smaller_or_equal_or_unknown_classes_fails():
    r = after_oom("A/16GB/metal", 11 * GB, None, [("B/16GB/cpu/2t", 11 * GB), ("C", None)])
    assert not r.requeue
    r = after_oom("A/?GB/nomlx", None, None, [("B", 64 * GB)])
    assert not r.requeue and "report no memory size" in r.reason


def test_fits_and_worker_memory():
    assert fits(None, None) and fits(0, 1)
    assert fits(11 * GB, 48 * GB) and not fits(11 * GB, 11 * GB) and not fits(11 * GB, None)
    assert worker_memory({"usable_memory_bytes": 5, "memory_bytes": 8}) == 5
    assert worker_memory({"memory_bytes": 8}) == 8
    assert worker_memory({"usable_memory_bytes": True}) is None and worker_memory(None) is None
