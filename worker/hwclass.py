"""Hardware class: the label under which val_bpb numbers are compared.

A number measured after a fixed time budget depends on how fast the machine trains, so the
coordinator only compares numbers within one class. The class must therefore be
deterministic (same machine -> same string, every start) and coarse enough that identical
machines share it: chip name, memory bucket, backend, and on the CPU backend the BLAS thread
count (two workers sharing a 2-core machine at 1 thread each train at a different speed than
one worker with 2 threads).

Examples: ``Apple M1 Pro/16GB/metal``, ``Intel Xeon Platinum 8375C/24GB/cpu/2t``.

Pure functions of the profile dict (see ``worker.profile``); nothing here probes the machine.
"""
from __future__ import annotations

import math
import re

# Memory sizes machines are commonly sold or provisioned with, in GB. A profile's memory is
# snapped to the nearest of these (by ratio), because the OS reports less than is installed
# (Linux MemTotal omits kernel-reserved memory) and VMs get odd sizes.
MEMORY_BUCKETS_GB = (
    1, 2, 3, 4, 6, 8, 12, 16, 18, 24, 32, 36, 48, 64, 96, 128, 192, 256, 384, 512,
    768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
)

# Marketing noise in CPU brand strings that says nothing about speed class, or repeats it.
_NOISE = [
    re.compile(r"\((?:R|TM|C)\)", re.IGNORECASE),           # (R) (TM) (C)
    re.compile(r"\bCPU\s*@\s*[\d.]+\s*[GM]Hz", re.IGNORECASE),  # "CPU @ 2.90GHz"
    re.compile(r"@\s*[\d.]+\s*[GM]Hz", re.IGNORECASE),          # "@ 2.80GHz"
    re.compile(r"\b(?:CPU|Processor)\s*$", re.IGNORECASE),      # trailing "CPU"/"Processor"
]


def normalise_chip(name: str | None) -> str:
    """Chip/CPU brand string without trademarks, clock suffixes or odd whitespace."""
    text = name or ""
    for pattern in _NOISE:
        text = pattern.sub(" ", text)
    text = text.replace("/", "-")  # "/" separates the class fields
    text = " ".join(text.split())
    return text or "unknown"


def memory_bucket_gb(memory_bytes: int | None) -> int | None:
    """Nearest commonly sold memory size in GB (1 GB = 2**30 bytes here, as Apple counts)."""
    if not memory_bytes or memory_bytes <= 0:
        return None
    gib = memory_bytes / 2**30
    # Ratio distance so 15.6 GiB -> 16 and 47 GiB -> 48 alike; ties go to the smaller
    # bucket (min() keeps the first), which keeps the result deterministic.
    return min(MEMORY_BUCKETS_GB, key=lambda b: abs(math.log(gib / b)))


def hardware_class(profile: dict) -> str:
    """``<chip>/<mem>GB/<backend>`` plus ``/<threads>t`` on the CPU backend."""
    chip = normalise_chip(profile.get("chip"))
    bucket = memory_bucket_gb(profile.get("memory_bytes"))
    mem = f"{bucket}GB" if bucket else "?GB"
    backend = profile.get("backend") or "nomlx"
    parts = [chip, mem, backend]
    if backend == "cpu":
        threads = profile.get("blas_threads") or profile.get("cpu_count") or 1
        parts.append(f"{int(threads)}t")
    return "/".join(parts)
