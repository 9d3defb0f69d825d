"""Keep the machine awake while a process runs (macOS ``caffeinate`` tied to its pid).

Used by the worker for each trainer and by the coordinator for itself. A Mac that idle-sleeps
mid-run goes silent, loses its lease after the liveness window, and the run is wasted; a
coordinator Mac that sleeps stalls the whole fleet. ``caffeinate -i -s -w PID`` holds two power assertions until process PID exits:
``-i`` prevents idle sleep, ``-s`` prevents system sleep while on AC power (macOS ignores it on
battery). Because ``-w`` ties it to the trainer's pid, the assertion ends with the run even if
the worker itself is killed -- nothing is left holding the machine awake. The display may still
sleep (no ``-d``): the screen is not needed for training.

What caffeinate cannot do: keep a MacBook awake with its lid closed unless it is in clamshell
mode (on AC with an external display). README's laptops section says so.

Elsewhere this is a no-op: Linux servers and VMs do not idle-sleep, and a Linux laptop's policy
belongs to its desktop session.
"""
from __future__ import annotations

import platform
import subprocess
from typing import Callable

CAFFEINATE = "caffeinate"


def keep_awake_argv(pid: int, system: str | None = None) -> list[str] | None:
    """The command that keeps this machine awake until ``pid`` exits; None where none is
    needed (not macOS)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive integer, got {pid!r}")
    if (system or platform.system()) != "Darwin":
        return None
    return [CAFFEINATE, "-i", "-s", "-w", str(pid)]


class KeepAwake:
    """Handle on the caffeinate process of one run. ``stop()`` is idempotent and reaps it."""

    def __init__(self, proc: subprocess.Popen | None, argv: list[str] | None, note: str = ""):
        self.proc, self.argv, self.note = proc, argv, note

    @classmethod
    def start(cls, pid: int, *, system: str | None = None,
              popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> "KeepAwake":
        argv = keep_awake_argv(pid, system)
        if argv is None:
            return cls(None, None, "not needed on this system")
        try:
            proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            # The run goes ahead; the worker's log says the Mac may sleep.
            return cls(None, argv, f"could not start {argv[0]}: {exc}")
        return cls(proc, argv)

    @property
    def active(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 2.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
