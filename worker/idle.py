"""How long the keyboard and mouse of this machine have been idle (``--when-idle``).

macOS: ``ioreg -c IOHIDSystem`` lists the HID system's properties; ``"HIDIdleTime" = N`` is
nanoseconds since the last keyboard / mouse / trackpad event of any logged-in user. Some
machines list the IOHIDSystem node more than once; the smallest value is the truth (any
recent input means someone is there).  The same key inside the node's "HIDParameters" dict is
a stale snapshot and is ignored.

Other systems: None (unknown). Linux has no session-independent equivalent a background job
can read (X11 and Wayland each keep their own), so ``--when-idle`` is refused there rather
than silently ignored.
"""
from __future__ import annotations

import platform
import re
from typing import Callable

Runner = Callable[[list], "str | None"]

# The node's own property line (``|   "HIDIdleTime" = N``), not the copy inside the
# "HIDParameters" dict, which is a snapshot from whenever the parameters were last set.
_HID_IDLE_RE = re.compile(r'^[\s|]*"HIDIdleTime" = (\d+)\s*$', re.MULTILINE)


def parse_hid_idle(text: str | None) -> float | None:
    """Seconds since the last HID event from ``ioreg -c IOHIDSystem`` output, or None."""
    values = [int(v) for v in _HID_IDLE_RE.findall(text or "")]
    return min(values) / 1e9 if values else None


def idle_supported(system: str | None = None) -> bool:
    return (system or platform.system()) == "Darwin"


def probe_idle_seconds(*, system: str | None = None, run: Runner | None = None) -> float | None:
    if not idle_supported(system):
        return None
    if run is None:
        from worker.profile import run_command
        run = lambda argv: run_command(argv, timeout=10.0)  # noqa: E731
    return parse_hid_idle(run(["ioreg", "-c", "IOHIDSystem"]))
