"""One reading of the machine's conditions now: power, thermal, memory pressure, idle time.

``read_conditions()`` is what ``autoresearch-worker profile`` shows and what the worker reads
at the start and end of every run. It returns a flat JSON-safe dict:

    power    {"source": "ac"|"battery"|"ups"|"unknown", "has_battery", "battery_percent",
              "battery_state"}                                    (worker.power)
    thermal  {"state": "nominal"|"throttled"|"warning"|"unknown", warning levels,
              cpu_speed_limit, throttle_count, unknown_lines}     (worker.power)
    memory   {"level": "normal"|"warn"|"critical"|"unknown", free_percent, swap used/total,
              swapins, swapouts, page_size, psi}                  (worker.pressure)
    idle_seconds  keyboard/mouse idle time (macOS), else None     (worker.idle)

The probes are injectable (``system``, ``run``, ``read``) so tests feed recorded outputs.
"""
from __future__ import annotations

import platform
import time

from worker.idle import probe_idle_seconds
from worker.power import probe_power, probe_thermal
from worker.pressure import probe_memory


def read_conditions(*, system: str | None = None, run=None, read=None, listdir=None,
                    globber=None, with_idle: bool = True) -> dict:
    system = system or platform.system()
    power = probe_power(system=system, run=run, read=read, listdir=listdir)
    thermal = probe_thermal(system=system, run=run, read=read, globber=globber)
    memory = probe_memory(system=system, run=run, read=read)
    return {
        "at": round(time.time(), 3),
        "power": power.to_dict(),
        "thermal": thermal.to_dict(),
        "memory": memory.to_dict(),
        "idle_seconds": probe_idle_seconds(system=system, run=run) if with_idle else None,
    }


def describe_conditions(c: dict) -> list[tuple[str, str]]:
    """(label, text) lines for people."""
    from worker.power import PowerState, ThermalState
    from worker.pressure import MemoryState

    out = [("power", PowerState(**c["power"]).describe()),
           ("thermal", ThermalState(**c["thermal"]).describe()),
           ("memory", MemoryState(**c["memory"]).describe())]
    idle = c.get("idle_seconds")
    out.append(("idle", f"{idle:.0f}s since the last keyboard/mouse input" if idle is not None
                else "unknown (macOS only)"))
    return out
