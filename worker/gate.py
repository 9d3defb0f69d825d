"""May this worker take new work now? A pure rule over one reading of its machine.

Someone's laptop lends itself to the fleet only while that costs them nothing:

* **power**: new work only on AC power, by default. On battery (or on a UPS, i.e. mains is
  down) the worker finishes the run it has, reports it, and pauses until it is plugged in
  again; ``--allow-battery`` lifts that. A source that cannot be read (``unknown``) does not
  pause a worker: a desktop whose ``pmset`` fails must still work.
* **idle** (``--when-idle MINUTES``): new work only when the keyboard and mouse have been idle
  that long (macOS HID idle time). A run that has started finishes even if someone comes back.

Only *new* work is gated; a running attempt is never stopped here. ``paused_reason`` returns
the one line the worker logs and sends with its heartbeats while paused (None: may work).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

POLL_SECONDS = 15.0   # how often the worker re-reads power / idle while it has no run


@dataclass(frozen=True)
class GateSettings:
    allow_battery: bool = False
    when_idle_seconds: float | None = None   # None: do not wait for idle


def paused_reason(conditions: Mapping, settings: GateSettings) -> str | None:
    power = conditions.get("power") if isinstance(conditions, Mapping) else None
    source = power.get("source") if isinstance(power, Mapping) else None
    if not settings.allow_battery and source in ("battery", "ups"):
        pct = power.get("battery_percent")
        what = "battery power" + (f" ({pct}%)" if isinstance(pct, int) else "") \
            if source == "battery" else "UPS power (mains is down)"
        return f"on {what}: no new work until plugged in (--allow-battery to work on battery)"
    if settings.when_idle_seconds:
        idle = conditions.get("idle_seconds")
        want = settings.when_idle_seconds
        if not isinstance(idle, (int, float)):
            return "idle time unknown: --when-idle needs macOS's HID idle time"
        if idle < want:
            return (f"in use: keyboard/mouse idle {_dur(idle)}, waiting for {_dur(want)} idle "
                    "(--when-idle)")
    return None


def _dur(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
