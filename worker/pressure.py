"""Memory pressure and swap activity of the machine a worker runs on, read now.

A time-budget run on a machine that swaps trains fewer steps, so its val_bpb measures the
machine. The worker reads this before and after every run; the swap counters are cumulative
since boot, so the difference between the two readings is what the run suffered.

macOS, from three commands every Mac has:

* ``sysctl kern.memorystatus_vm_pressure_level kern.memorystatus_level vm.swapusage``: the
  kernel's pressure level (1 normal, 2 warn, 4 critical -- the levels ``memory_pressure -l``
  speaks of and Activity Monitor colours green/yellow/red), the free percentage, swap in use;
* ``vm_stat``: page size and the ``Swapins`` / ``Swapouts`` counters;
* ``memory_pressure`` (only when one of the above is missing): prints the same counters and the
  "System-wide memory free percentage".

Linux: ``/proc/meminfo`` (MemAvailable / MemTotal, swap), ``/proc/vmstat`` (``pswpin`` /
``pswpout``, in pages) and, where the kernel has PSI, ``/proc/pressure/memory``. The level is
derived (there is no kernel level): critical when tasks were fully stalled on memory >= 10% of
the last 10 s (PSI ``full avg10``) or less than 5% is available; warn at PSI ``some avg10`` >= 10
or less than 10% available; else normal.

Pure parsers plus a thin probe with an injectable runner / reader; never raises.
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from typing import Callable

from worker.cmdtext import colon_fields, to_int

Runner = Callable[[list], "str | None"]
Reader = Callable[[str], "str | None"]

NORMAL, WARN, CRITICAL, UNKNOWN = "normal", "warn", "critical", "unknown"
MACOS_LEVELS = {1: NORMAL, 2: WARN, 4: CRITICAL}   # kern.memorystatus_vm_pressure_level
LEVEL_ORDER = {UNKNOWN: -1, NORMAL: 0, WARN: 1, CRITICAL: 2}

# Linux thresholds (see the module docstring).
PSI_CRITICAL_FULL_AVG10 = 10.0
PSI_WARN_SOME_AVG10 = 10.0
FREE_CRITICAL_PERCENT = 5
FREE_WARN_PERCENT = 10

MACOS_SYSCTL_KEYS = ("kern.memorystatus_vm_pressure_level", "kern.memorystatus_level",
                     "vm.swapusage")
_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SWAPUSAGE_RE = re.compile(r"(total|used|free)\s*=\s*([\d.]+)([BKMGT])")
_PAGE_SIZE_RE = re.compile(r"page size of (\d+) bytes")
_MP_PAGE_SIZE_RE = re.compile(r"page size of (\d+)\)")
_FREE_PCT_RE = re.compile(r"memory free percentage:\s*(\d+)%")


@dataclass
class MemoryState:
    level: str                        # normal | warn | critical | unknown
    free_percent: int | None = None   # memory the OS could hand out now, % of installed
    swap_used_bytes: int | None = None
    swap_total_bytes: int | None = None
    swapins: int | None = None        # pages swapped in since boot (cumulative counter)
    swapouts: int | None = None       # pages swapped out since boot
    page_size: int | None = None      # bytes per page of the two counters
    psi_some_avg10: float | None = None   # Linux PSI: % of the last 10 s some task stalled
    psi_full_avg10: float | None = None   # ... all non-idle tasks stalled

    def describe(self) -> str:
        parts = [self.level]
        if self.free_percent is not None:
            parts.append(f"{self.free_percent}% free")
        if self.swap_used_bytes is not None:
            parts.append(f"swap used {self.swap_used_bytes / 2**20:.0f} MiB")
        if self.swapins is not None and self.swapouts is not None:
            parts.append(f"swapins {self.swapins} / swapouts {self.swapouts} pages since boot")
        if self.psi_some_avg10 is not None:
            parts.append(f"PSI some {self.psi_some_avg10:g}% full {self.psi_full_avg10:g}%")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)




# ---- macOS ---------------------------------------------------------------------------------

def parse_swapusage(value: str | None) -> tuple[int | None, int | None]:
    """``total = 2048.00M  used = 1536.25M  free = 511.75M  (encrypted)`` -> (used, total)."""
    found = {k: int(float(n) * _UNITS[u]) for k, n, u in _SWAPUSAGE_RE.findall(value or "")}
    return found.get("used"), found.get("total")


def parse_macos_sysctl(text: str | None) -> dict:
    """Output of ``sysctl`` for MACOS_SYSCTL_KEYS -> level, free_percent, swap used / total."""
    f = colon_fields(text)
    used, total = parse_swapusage(f.get("vm.swapusage"))
    return {"level": MACOS_LEVELS.get(to_int(f.get("kern.memorystatus_vm_pressure_level"))),
            "free_percent": to_int(f.get("kern.memorystatus_level")),
            "swap_used_bytes": used, "swap_total_bytes": total}


def parse_vm_stat(text: str | None) -> dict:
    """``vm_stat`` -> page_size, swapins, swapouts, pages_free (values end in '.')."""
    m = _PAGE_SIZE_RE.search(text or "")
    f = colon_fields(text)
    return {"page_size": int(m.group(1)) if m else None, "swapins": to_int(f.get("Swapins")),
            "swapouts": to_int(f.get("Swapouts")), "pages_free": to_int(f.get("Pages free"))}


def parse_memory_pressure(text: str | None) -> dict:
    """``memory_pressure`` (no arguments) -> page_size, swapins, swapouts, free_percent."""
    m = _MP_PAGE_SIZE_RE.search(text or "")
    pct = _FREE_PCT_RE.search(text or "")
    f = colon_fields(text)
    return {"page_size": int(m.group(1)) if m else None, "swapins": to_int(f.get("Swapins")),
            "swapouts": to_int(f.get("Swapouts")),
            "free_percent": int(pct.group(1)) if pct else None}


def macos_memory(sysctl_text: str | None, vm_stat_text: str | None,
                 memory_pressure_text: str | None = None) -> MemoryState:
    s = parse_macos_sysctl(sysctl_text)
    v = parse_vm_stat(vm_stat_text)
    mp = parse_memory_pressure(memory_pressure_text) if memory_pressure_text else {}

    def pick(key):
        for d in (s, v, mp):
            if d.get(key) is not None:
                return d[key]
        return None

    return MemoryState(level=s["level"] or UNKNOWN, free_percent=pick("free_percent"),
                       swap_used_bytes=s["swap_used_bytes"], swap_total_bytes=s["swap_total_bytes"],
                       swapins=pick("swapins"), swapouts=pick("swapouts"),
                       page_size=pick("page_size"))


# ---- Linux ---------------------------------------------------------------------------------

def parse_meminfo(text: str | None) -> dict:
    """/proc/meminfo -> {field: bytes} (the file says kB, meaning KiB)."""
    out = {}
    for key, value in colon_fields(text).items():
        parts = value.split()
        n = to_int(parts[0]) if parts else None
        if n is not None:
            out[key] = n * 1024 if len(parts) > 1 and parts[1] == "kB" else n
    return out


def parse_vmstat(text: str | None) -> dict:
    """/proc/vmstat ("name value" lines) -> {name: int}."""
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_psi(text: str | None) -> dict:
    """/proc/pressure/memory -> {"some": {"avg10": ...}, "full": {...}}."""
    out = {}
    for line in (text or "").splitlines():
        kind, _, rest = line.partition(" ")
        vals = {}
        for item in rest.split():
            k, _, v = item.partition("=")
            try:
                vals[k] = float(v)
            except ValueError:
                continue
        if kind in ("some", "full") and vals:
            out[kind] = vals
    return out


def linux_level(free_percent: int | None, psi: dict) -> str:
    some = psi.get("some", {}).get("avg10")
    full = psi.get("full", {}).get("avg10")
    if free_percent is None and some is None:
        return UNKNOWN
    if (full or 0) >= PSI_CRITICAL_FULL_AVG10 or \
            (free_percent is not None and free_percent < FREE_CRITICAL_PERCENT):
        return CRITICAL
    if (some or 0) >= PSI_WARN_SOME_AVG10 or \
            (free_percent is not None and free_percent < FREE_WARN_PERCENT):
        return WARN
    return NORMAL


def linux_memory(meminfo_text: str | None, vmstat_text: str | None, psi_text: str | None,
                 page_size: int = 4096) -> MemoryState:
    mi = parse_meminfo(meminfo_text)
    vm = parse_vmstat(vmstat_text)
    psi = parse_psi(psi_text)
    total, avail = mi.get("MemTotal"), mi.get("MemAvailable")
    free_pct = int(100 * avail / total) if total and avail is not None else None
    swap_total, swap_free = mi.get("SwapTotal"), mi.get("SwapFree")
    swap_used = swap_total - swap_free if swap_total is not None and swap_free is not None \
        else None
    return MemoryState(level=linux_level(free_pct, psi), free_percent=free_pct,
                       swap_used_bytes=swap_used, swap_total_bytes=swap_total,
                       swapins=vm.get("pswpin"), swapouts=vm.get("pswpout"),
                       page_size=page_size if "pswpin" in vm else None,
                       psi_some_avg10=psi.get("some", {}).get("avg10"),
                       psi_full_avg10=psi.get("full", {}).get("avg10"))


# ---- probe ---------------------------------------------------------------------------------

def probe_memory(*, system: str | None = None, run: Runner | None = None,
                 read: Reader | None = None, page_size: int | None = None) -> MemoryState:
    from worker.profile import read_text, run_command

    system = system or platform.system()
    if system == "Darwin":
        run = run or (lambda argv: run_command(argv, timeout=10.0))
        sysctl_text = run(["sysctl", *MACOS_SYSCTL_KEYS])
        vm_text = run(["vm_stat"])
        state = macos_memory(sysctl_text, vm_text)
        if state.free_percent is None or state.swapouts is None:
            state = macos_memory(sysctl_text, vm_text, run(["memory_pressure"]))
        return state
    if system == "Linux":
        read = read or read_text
        if page_size is None:
            try:
                page_size = os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, ValueError, OSError):
                page_size = 4096
        return linux_memory(read("/proc/meminfo"), read("/proc/vmstat"),
                            read("/proc/pressure/memory"), page_size)
    return MemoryState(UNKNOWN)
