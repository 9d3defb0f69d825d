"""Power source and thermal state of the machine a worker runs on, read now.

macOS: ``pmset -g batt`` says where power comes from ("Now drawing from 'AC Power'" /
'Battery Power' / 'UPS Power') and, on a laptop, one line per internal battery with its percent
and charge state; a desktop (Mac mini, Studio, Pro) prints the first line only. ``pmset -g
therm`` prints "Note: No ... has been recorded" lines while nothing was ever reported, "Thermal
warning level set to N." / "Performance warning level set to N." once the OS reported one, and
on Intel Macs a "CPU Power notify" block with ``CPU_Speed_Limit`` (percent of full clock the OS
allows) and ``CPU_Scheduler_Limit``. Lines it does not recognise are kept verbatim in
``unknown_lines``: a new macOS may report throttling in words this code has never seen, and the
ledger should show them rather than a confident "nominal".

Linux: ``/sys/class/power_supply/*`` (``type`` Mains/Battery/UPS, ``online``, ``status``,
``capacity``); thermal throttling from the per-CPU ``thermal_throttle/*_throttle_count``
counters where the kernel has them (Intel), else unknown.

Everything is a pure parser plus a thin probe taking an injectable runner / reader (the same
``Runner`` / ``Reader`` shapes as ``worker.profile``), so the macOS paths are tested on Linux
with recorded outputs (tests/data/conditions/). Probes never raise: a missing tool is
"unknown".
"""
from __future__ import annotations

import glob
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

Runner = Callable[[list], "str | None"]   # argv -> stdout, None if it could not run
Reader = Callable[[str], "str | None"]    # path -> text, None if unreadable

AC, BATTERY, UPS, UNKNOWN = "ac", "battery", "ups", "unknown"
NOMINAL, THROTTLED, WARNING = "nominal", "throttled", "warning"

_SOURCE_RE = re.compile(r"Now drawing from '([^']*)'")
_BATTERY_RE = re.compile(r"^\s*-(?P<name>\S+).*?\t\s*(?P<pct>\d+)%;\s*(?P<state>[^;]+)")
_LEVEL_RE = re.compile(r"^(thermal|performance) warning level set to (\d+)\.?$", re.IGNORECASE)
_LIMIT_RE = re.compile(r"^(CPU_\w+)\s*=\s*(\d+)$")
_NOTE_RE = re.compile(r"^Note: No .* has been recorded\.?$", re.IGNORECASE)
_NOTIFY_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} (CPU Power notify|"
                        r"Thermal Warning Level notify|Performance Warning Level notify)",
                        re.IGNORECASE)


@dataclass
class PowerState:
    source: str                   # ac | battery | ups | unknown
    has_battery: bool | None      # None: could not tell
    battery_percent: int | None = None
    battery_state: str | None = None   # charged | charging | discharging | "AC attached" ...

    @property
    def on_ac(self) -> bool:
        return self.source == AC

    def describe(self) -> str:
        if self.source == UNKNOWN:
            return "unknown"
        where = {AC: "AC power", BATTERY: "battery", UPS: "UPS (mains is down)"}[self.source]
        if self.battery_percent is not None:
            return f"{where}, battery {self.battery_percent}% {self.battery_state or ''}".strip()
        return f"{where}, no battery" if self.has_battery is False else where

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ThermalState:
    state: str                            # nominal | throttled | warning | unknown
    thermal_warning_level: int | None = None    # 0 = none recorded
    performance_warning_level: int | None = None
    cpu_speed_limit: int | None = None    # percent of full clock allowed (Intel Macs, Linux: None)
    cpu_scheduler_limit: int | None = None
    throttle_count: int | None = None     # Linux: sum of the kernel's throttle event counters
    unknown_lines: list = field(default_factory=list)

    def describe(self) -> str:
        parts = [self.state]
        if self.cpu_speed_limit is not None:
            parts.append(f"CPU speed limit {self.cpu_speed_limit}%")
        if self.thermal_warning_level:
            parts.append(f"thermal warning level {self.thermal_warning_level}")
        if self.performance_warning_level:
            parts.append(f"performance warning level {self.performance_warning_level}")
        if self.throttle_count is not None:
            parts.append(f"{self.throttle_count} throttle events since boot")
        if self.unknown_lines:
            parts.append(f"unrecognised: {'; '.join(self.unknown_lines)[:200]}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- macOS ---------------------------------------------------------------------------------

def parse_pmset_batt(text: str | None) -> PowerState:
    """``pmset -g batt`` -> PowerState. No battery line (desktop Macs) -> has_battery False."""
    lines = (text or "").splitlines()
    m = _SOURCE_RE.search(lines[0]) if lines else None
    if not m:
        return PowerState(UNKNOWN, None)
    name = m.group(1).lower()
    source = AC if name.startswith("ac") else BATTERY if name.startswith("battery") \
        else UPS if name.startswith("ups") else UNKNOWN
    for line in lines[1:]:
        b = _BATTERY_RE.match(line)
        # A UPS attached over USB is listed like a battery; only the internal one says how
        # long this machine lasts unplugged.
        if b and b.group("name").startswith("InternalBattery"):
            return PowerState(source, True, int(b.group("pct")), b.group("state").strip())
    return PowerState(source, False)


def parse_pmset_therm(text: str | None) -> ThermalState:
    """``pmset -g therm`` -> ThermalState. throttled: CPU_Speed_Limit or CPU_Scheduler_Limit
    below 100; warning: a thermal / performance warning level above 0; nominal: every line
    says nothing was recorded or the limits are 100; unknown: nothing recognised at all."""
    therm = ThermalState(UNKNOWN)
    known = False
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        level = _LEVEL_RE.match(line)
        limit = _LIMIT_RE.match(line)
        if _NOTE_RE.match(line):
            low = line.lower()
            if "thermal warning" in low:
                therm.thermal_warning_level = 0
            elif "performance warning" in low:
                therm.performance_warning_level = 0
            known = True
        elif level:
            attr = f"{level.group(1).lower()}_warning_level"
            setattr(therm, attr, int(level.group(2)))
            known = True
        elif limit:
            key, value = limit.group(1), int(limit.group(2))
            if key == "CPU_Speed_Limit":
                therm.cpu_speed_limit = value
            elif key == "CPU_Scheduler_Limit":
                therm.cpu_scheduler_limit = value
            elif key != "CPU_Available_CPUs":
                therm.unknown_lines.append(line)
                continue
            known = True
        elif _NOTIFY_RE.match(line):
            known = True   # the timestamp header of a block whose values follow
        else:
            therm.unknown_lines.append(line)
    if not known:
        return therm
    if any(v is not None and v < 100 for v in (therm.cpu_speed_limit, therm.cpu_scheduler_limit)):
        therm.state = THROTTLED
    elif therm.thermal_warning_level or therm.performance_warning_level:
        therm.state = WARNING
    else:
        therm.state = NOMINAL
    return therm


# ---- Linux ---------------------------------------------------------------------------------

def linux_power(read: Reader, supplies: list[str]) -> PowerState:
    """From ``/sys/class/power_supply`` entries (``supplies``: their directory paths). No
    supply at all (servers, VMs, desktops) is mains power without a battery."""
    mains_online = None
    battery = None
    ups_on_battery = False
    for d in supplies:
        kind = (read(f"{d}/type") or "").strip().lower()
        if kind == "mains":
            online = (read(f"{d}/online") or "").strip()
            if online in ("0", "1"):
                mains_online = bool(mains_online) or online == "1"
        elif kind in ("battery", "ups"):
            scope = (read(f"{d}/scope") or "").strip().lower()
            if scope == "device":
                continue    # a wireless mouse's battery says nothing about this machine
            status = (read(f"{d}/status") or "").strip() or None
            cap = (read(f"{d}/capacity") or "").strip()
            if kind == "ups":
                ups_on_battery = ups_on_battery or (status or "").lower() == "discharging"
                continue
            if battery is None:
                battery = (int(cap) if cap.isdigit() else None, status)
    if battery is None:
        return PowerState(UPS if ups_on_battery else AC, False)
    pct, status = battery
    if mains_online is None:   # no Mains entry: judge by the battery's own status
        on_ac = (status or "").lower() not in ("discharging",)
    else:
        on_ac = mains_online
    return PowerState(AC if on_ac else BATTERY, True, pct, status.lower() if status else None)


def linux_throttle_count(read: Reader, paths: list[str]) -> int | None:
    total, seen = 0, False
    for p in paths:
        text = (read(p) or "").strip()
        if text.isdigit():
            total += int(text)
            seen = True
    return total if seen else None


# ---- probes --------------------------------------------------------------------------------

def _default_run(argv: list) -> str | None:
    from worker.profile import run_command
    return run_command(argv, timeout=10.0)


def _default_read(path: str) -> str | None:
    from worker.profile import read_text
    return read_text(path)


def probe_power(*, system: str | None = None, run: Runner | None = None,
                read: Reader | None = None, listdir: Callable[[str], list] | None = None
                ) -> PowerState:
    system = system or platform.system()
    if system == "Darwin":
        return parse_pmset_batt((run or _default_run)(["pmset", "-g", "batt"]))
    if system == "Linux":
        base = "/sys/class/power_supply"
        names = (listdir or _listdir)(base)
        return linux_power(read or _default_read, [f"{base}/{n}" for n in sorted(names)])
    return PowerState(UNKNOWN, None)


def probe_thermal(*, system: str | None = None, run: Runner | None = None,
                  read: Reader | None = None,
                  globber: Callable[[str], list] | None = None) -> ThermalState:
    system = system or platform.system()
    if system == "Darwin":
        return parse_pmset_therm((run or _default_run)(["pmset", "-g", "therm"]))
    if system == "Linux":
        paths = sorted((globber or glob.glob)(
            "/sys/devices/system/cpu/cpu[0-9]*/thermal_throttle/*_throttle_count"))
        count = linux_throttle_count(read or _default_read, paths)
        # A counter is evidence only as a difference between two readings (start/end of a
        # run); a single reading says nothing about now, so the state stays unknown.
        return ThermalState(UNKNOWN, throttle_count=count)
    return ThermalState(UNKNOWN)


def _listdir(path: str) -> list:
    try:
        return os.listdir(path)
    except OSError:
        return []
