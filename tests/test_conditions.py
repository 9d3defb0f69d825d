"""Machine conditions (power, thermal, memory pressure, idle, keep-awake) from recorded macOS
outputs and this Linux machine's real /proc and /sys."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared.awake import KeepAwake, keep_awake_argv
from worker.conditions import describe_conditions, read_conditions
from worker.idle import parse_hid_idle, probe_idle_seconds
from worker.power import (AC, BATTERY, NOMINAL, THROTTLED, UNKNOWN, UPS, WARNING,
                          parse_pmset_batt, parse_pmset_therm, probe_power, probe_thermal)
from worker.pressure import (CRITICAL, NORMAL, WARN, linux_memory, macos_memory,
                             parse_swapusage, probe_memory)

DATA = Path(__file__).parent / "data" / "conditions"


def rec(name: str) -> str:
    return (DATA / name).read_text()


def mac_runner(**files):
    """A command runner answering like one recorded Mac: argv[0] (+ argv[2] for pmset) ->
    recorded file; anything else could not run (None)."""
    calls = []

    def run(argv):
        calls.append(list(argv))
        key = argv[0] if argv[0] != "pmset" else f"pmset_{argv[2]}"
        name = files.get(key)
        return rec(name) if name else None

    return run, calls


# ---- power ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, source, has_battery, pct, state", [
    ("pmset_batt_macbook_ac_charged.txt", AC, True, 100, "charged"),
    ("pmset_batt_macbook_ac_charging.txt", AC, True, 64, "charging"),
    ("pmset_batt_macbook_battery.txt", BATTERY, True, 87, "discharging"),
    ("pmset_batt_macbook_battery_noestimate.txt", BATTERY, True, 23, "discharging"),
    ("pmset_batt_desktop.txt", AC, False, None, None),
])
def test_pmset_batt_recordings(name, source, has_battery, pct, state):
    p = parse_pmset_batt(rec(name))
    assert (p.source, p.has_battery, p.battery_percent, p.battery_state) == \
        (source, has_battery, pct, state)
    assert p.on_ac == (source == AC)


def test_pmset_batt_odd_outputs():
    # mains down, desktop on a USB UPS: not AC (a well-behaved job stops taking work)
    ups = parse_pmset_batt("Now drawing from 'UPS Power'\n"
                           " -CP1500PFCLCD (id=1234)\t92%; discharging; 0:31 remaining\n")
    assert ups.source == UPS and not ups.on_ac and ups.has_battery is False
    assert parse_pmset_batt("").source == UNKNOWN
    assert parse_pmset_batt(None).source == UNKNOWN
    assert parse_pmset_batt("pmset: command not found").source == UNKNOWN
    assert parse_pmset_batt(rec("pmset_batt_desktop.txt")).describe() == "AC power, no battery"
    assert parse_pmset_batt(rec("pmset_batt_macbook_battery.txt")).describe() == \
        "battery, battery 87% discharging"


# ---- thermal -------------------------------------------------------------------------------

def test_pmset_therm_nominal_apple_silicon():
    t = parse_pmset_therm(rec("pmset_therm_nominal.txt"))
    assert t.state == NOMINAL and t.thermal_warning_level == 0
    assert t.performance_warning_level == 0 and t.cpu_speed_limit is None
    assert t.unknown_lines == []


def test_pmset_therm_intel_blocks():
    full = parse_pmset_therm(rec("pmset_therm_intel_full_speed.txt"))
    assert full.state == NOMINAL and full.cpu_speed_limit == 100
    hot = parse_pmset_therm(rec("pmset_therm_intel_throttled.txt"))
    assert hot.state == THROTTLED and hot.cpu_speed_limit == 58
    assert hot.cpu_scheduler_limit == 100 and hot.unknown_lines == []
    assert "CPU speed limit 58%" in hot.describe()


def test_pmset_therm_warning_levels():
    t = parse_pmset_therm(rec("pmset_therm_warning.txt"))
    assert t.state == WARNING
    assert (t.thermal_warning_level, t.performance_warning_level) == (2, 1)


def test_pmset_therm_unknown_line_is_kept_not_guessed():
    t = parse_pmset_therm(rec("pmset_therm_unknown_line.txt"))
    assert t.unknown_lines == ["Thermal pressure level: Heavy"]
    assert t.state == NOMINAL   # the known lines say nominal; the stranger is recorded
    assert "unrecognised: Thermal pressure level: Heavy" in t.describe()
    only = parse_pmset_therm("Something macOS 16 says\n")
    assert only.state == UNKNOWN and only.unknown_lines == ["Something macOS 16 says"]
    assert parse_pmset_therm(None).state == UNKNOWN


# ---- memory --------------------------------------------------------------------------------

@pytest.mark.parametrize("sysctl, vm, level, free, used, swapouts", [
    ("sysctl_memory_normal.txt", "vm_stat_normal.txt", NORMAL, 54, 0, 0),
    ("sysctl_memory_warn.txt", "vm_stat_swapping.txt", WARN, 18, int(2331.5 * 2**20), 698114),
    ("sysctl_memory_critical.txt", "vm_stat_swapping.txt", CRITICAL, 6, int(5870.75 * 2**20),
     698114),
])
def test_macos_memory_recordings(sysctl, vm, level, free, used, swapouts):
    m = macos_memory(rec(sysctl), rec(vm))
    assert (m.level, m.free_percent, m.swap_used_bytes, m.swapouts) == \
        (level, free, used, swapouts)
    assert m.page_size == 16384


def test_macos_probe_runs_memory_pressure_only_when_needed():
    run, calls = mac_runner(sysctl="sysctl_memory_warn.txt", vm_stat="vm_stat_swapping.txt",
                            memory_pressure="memory_pressure_warn.txt")
    m = probe_memory(system="Darwin", run=run)
    assert m.level == WARN and m.swapins == 412873
    assert [c[0] for c in calls] == ["sysctl", "vm_stat"]
    # vm_stat missing: memory_pressure supplies the swap counters and page size
    run, calls = mac_runner(sysctl="sysctl_memory_warn.txt",
                            memory_pressure="memory_pressure_warn.txt")
    m = probe_memory(system="Darwin", run=run)
    assert (m.level, m.swapins, m.swapouts, m.page_size) == (WARN, 412873, 698114, 16384)
    assert [c[0] for c in calls] == ["sysctl", "vm_stat", "memory_pressure"]
    # nothing runs at all: unknown, not an exception
    m = probe_memory(system="Darwin", run=lambda argv: None)
    assert m.level == "unknown" and m.swapouts is None


def test_swapusage_units():
    assert parse_swapusage("total = 2.00G  used = 512.00M  free = 1.50G  (encrypted)") == \
        (512 * 2**20, 2 * 2**30)
    assert parse_swapusage("garbage") == (None, None)


def test_linux_swapping_recording():
    d = DATA / "linux_laptop_swapping"
    m = linux_memory((d / "meminfo").read_text(), (d / "vmstat").read_text(),
                     (d / "pressure_memory").read_text(), page_size=4096)
    assert m.level == CRITICAL            # PSI full avg10 12.08 >= 10
    assert m.free_percent == 5            # 946112 / 16120392
    assert m.swap_used_bytes == (8388604 - 3011280) * 1024
    assert (m.swapins, m.swapouts, m.page_size) == (2114873, 3398120, 4096)
    assert m.psi_some_avg10 == 31.42 and m.psi_full_avg10 == 12.08


def test_linux_levels_from_psi_and_free():
    meminfo = "MemTotal: 1000 kB\nMemAvailable: {} kB\n"
    psi = "some avg10={} avg60=0 avg300=0 total=0\nfull avg10={} avg60=0 avg300=0 total=0\n"
    assert linux_memory(meminfo.format(500), "", psi.format(0, 0)).level == NORMAL
    assert linux_memory(meminfo.format(500), "", psi.format(15, 2)).level == WARN
    assert linux_memory(meminfo.format(80), "", psi.format(0, 0)).level == WARN
    assert linux_memory(meminfo.format(40), "", None).level == CRITICAL   # no PSI kernel
    assert linux_memory(None, None, None).level == "unknown"


def test_linux_memory_of_this_machine_for_real():
    m = probe_memory()
    meminfo = Path("/proc/meminfo").read_text()
    assert m.level in (NORMAL, WARN, CRITICAL)
    assert 0 <= m.free_percent <= 100
    assert m.page_size == os.sysconf("SC_PAGE_SIZE")
    # a cumulative counter: read again afterwards, it can only have grown
    later = int(Path("/proc/vmstat").read_text().split("pswpout ")[1].split()[0])
    assert 0 <= m.swapouts <= later
    assert ("SwapTotal:" in meminfo) == (m.swap_total_bytes is not None)


# ---- power / thermal on Linux --------------------------------------------------------------

def sysfs_reader(root: Path):
    def read(path):
        p = root / Path(path).relative_to("/sys/class/power_supply")
        return p.read_text() if p.is_file() else None

    return read


def test_linux_laptop_unplugged_recording():
    root = DATA / "linux_laptop_battery"
    p = probe_power(system="Linux", read=sysfs_reader(root),
                    listdir=lambda path: os.listdir(root))
    assert (p.source, p.has_battery, p.battery_percent, p.battery_state) == \
        (BATTERY, True, 71, "discharging")   # the mouse's 40% battery is not this machine's


def test_linux_power_and_thermal_of_this_machine_for_real():
    p = probe_power()
    supplies = os.listdir("/sys/class/power_supply") if os.path.isdir(
        "/sys/class/power_supply") else []
    if not supplies:   # a server / VM: mains, no battery
        assert (p.source, p.has_battery) == (AC, False)
    t = probe_thermal()
    assert t.state == UNKNOWN
    if not any(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/thermal_throttle")):
        assert t.throttle_count is None


def test_linux_throttle_counters_summed():
    files = {"/c0/core_throttle_count": "3\n", "/c0/package_throttle_count": "10\n",
             "/c1/core_throttle_count": "x"}
    t = probe_thermal(system="Linux", read=files.get, globber=lambda pat: sorted(files))
    assert t.throttle_count == 13


# ---- idle ----------------------------------------------------------------------------------

def test_hid_idle_recordings():
    assert parse_hid_idle(rec("ioreg_hid_active.txt")) == pytest.approx(1.402556625)
    assert parse_hid_idle(rec("ioreg_hid_idle.txt")) == pytest.approx(7234.123456789)
    assert parse_hid_idle("") is None and parse_hid_idle(None) is None
    # the stale copy in HIDParameters alone is not a reading
    assert parse_hid_idle('  |   "HIDParameters" = {"HIDIdleTime"=5}\n') is None


def test_idle_probe():
    run, calls = mac_runner(ioreg="ioreg_hid_idle.txt")
    assert probe_idle_seconds(system="Darwin", run=run) == pytest.approx(7234.123456789)
    assert calls == [["ioreg", "-c", "IOHIDSystem"]]
    assert probe_idle_seconds(system="Linux", run=run) is None


# ---- one reading of everything ---------------------------------------------------------------

def test_read_conditions_on_a_recorded_macbook_on_battery():
    run, _ = mac_runner(pmset_batt="pmset_batt_macbook_battery.txt",
                        pmset_therm="pmset_therm_intel_throttled.txt",
                        sysctl="sysctl_memory_warn.txt", vm_stat="vm_stat_swapping.txt",
                        ioreg="ioreg_hid_active.txt")
    c = read_conditions(system="Darwin", run=run)
    json.dumps(c)
    assert c["power"]["source"] == BATTERY and c["thermal"]["cpu_speed_limit"] == 58
    assert c["memory"]["level"] == WARN and c["idle_seconds"] == pytest.approx(1.4, abs=0.01)
    lines = dict(describe_conditions(c))
    assert lines["power"].startswith("battery, battery 87%")
    assert lines["thermal"].startswith("throttled")
    assert lines["memory"].startswith("warn, 18% free")


def test_read_conditions_of_this_machine():
    c = read_conditions()
    json.dumps(c)
    assert set(c) == {"at", "power", "thermal", "memory", "idle_seconds"}
    assert c["idle_seconds"] is None   # Linux: no session-independent idle time


# ---- keep awake ----------------------------------------------------------------------------

def test_keep_awake_is_a_no_op_on_linux():
    started = []
    k = KeepAwake.start(os.getpid(), system="Linux", popen=lambda *a, **kw: started.append(a))
    assert started == [] and k.proc is None and not k.active
    k.stop()
    assert keep_awake_argv(os.getpid(), "Linux") is None


def test_keep_awake_argv_on_darwin():
    assert keep_awake_argv(4242, "Darwin") == ["caffeinate", "-i", "-s", "-w", "4242"]
    with pytest.raises(ValueError):
        keep_awake_argv(0, "Darwin")
    with pytest.raises(ValueError):
        keep_awake_argv(True, "Darwin")


def test_keep_awake_process_lives_as_long_as_the_trainer(tmp_path, monkeypatch):
    # A stand-in `caffeinate` on PATH with the real one's -w semantics: wait for the pid.
    fake = tmp_path / "caffeinate"
    fake.write_text("#!/bin/sh\nwhile [ $# -gt 1 ]; do shift; done\n"
                    "while kill -0 \"$1\" 2>/dev/null; do sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    trainer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)
    k = KeepAwake.start(trainer.pid, system="Darwin")
    assert k.argv == ["caffeinate", "-i", "-s", "-w", str(trainer.pid)]
    assert k.active
    trainer.stdin.close()
    trainer.wait()
    proc = k.proc
    proc.wait(timeout=30)          # caffeinate ends with the trainer, on its own
    assert not k.active
    k.stop()
    k.stop()                        # idempotent
    assert proc.returncode == 0


def test_keep_awake_stop_ends_it_early_and_missing_tool_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "caffeinate"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    k = KeepAwake.start(os.getpid(), system="Darwin")
    proc = k.proc
    k.stop()
    assert proc.returncode is not None and not k.active
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    k = KeepAwake.start(os.getpid(), system="Darwin")
    assert k.proc is None and "could not start caffeinate" in k.note
