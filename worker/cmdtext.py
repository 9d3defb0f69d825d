"""Reading the text of macOS/Linux probe commands: the two shapes every probe meets.

``sysctl``, ``vm_stat``, ``memory_pressure`` and ``system_profiler`` print "key: value" lines;
counts come as "1234" or "1234." (vm_stat ends its page counts with a period). One reader for
both, so the hardware profile and the memory probes cannot drift apart.
"""
from __future__ import annotations


def colon_fields(text: str | None) -> dict:
    """"key: value" lines -> {key: value}; quoted keys (vm_stat's "Translation faults") unquoted."""
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip().strip('"')] = value.strip()
    return out


def to_int(text) -> int | None:
    """A whole number as printed ("16", "3632."), or None when it is not one."""
    try:
        return int(str(text).strip().rstrip("."))
    except (TypeError, ValueError):
        return None
