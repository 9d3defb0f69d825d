"""What machine is this worker on: the profile sent in ``hello`` and its hardware class.

``profile_machine()`` returns a flat, JSON-safe dict:

    chip            normalised chip / CPU brand ("Apple M1 Pro", "Intel Xeon Platinum 8375C")
    cpu_brand       the raw brand string as the OS reports it
    cpu_count       logical CPUs;  cpu_available: CPUs this process may run on (affinity)
    cpu_perf_cores, cpu_eff_cores   Apple performance / efficiency cores (macOS only)
    gpu_cores       Apple GPU cores (macOS only)
    memory_bytes    installed memory (macOS hw.memsize; Linux MemTotal)
    usable_memory_bytes  what one run may use: on Metal MLX's recommended working set (about
                    3/4 of unified memory), on Linux MemTotal or the memory cgroup's limit if
                    lower (containers); what memory-aware routing compares
    os, os_version  "macOS" "14.5" | "Linux" "Debian GNU/Linux 12 (bookworm)"
    machine         "arm64" | "x86_64" | ...
    python          "3.11.9"
    mlx_version     None when MLX is not importable (such a worker can only crash)
    backend         "metal" | "cpu" | None (no MLX)
    metal           {"architecture", "memory_size", "max_recommended_working_set_size"} or None
    blas_threads    BLAS threads the trainer runs with: the ``threads`` argument, or on the CPU
                    backend the CPUs available to this process (OpenBLAS's own default)
    hw_class        see ``worker.hwclass.hardware_class``

Every probe goes through an injectable command runner / file reader, so the macOS path is
tested on Linux with recorded outputs (tests/data/profile/). MLX is imported lazily, only
inside ``probe_mlx``: the worker process must not pay for (or depend on) MLX to start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Callable

from worker.cmdtext import colon_fields, to_int
from worker.hwclass import hardware_class, memory_bucket_gb, normalise_chip

__all__ = [
    "profile_machine", "hardware_class", "memory_bucket_gb", "normalise_chip",
    "run_command", "read_text", "probe_mlx", "main",
]

Runner = Callable[[list], "str | None"]   # argv -> stdout, None if it could not run
Reader = Callable[[str], "str | None"]    # path -> text, None if unreadable

SYSCTL_KEYS = (
    "machdep.cpu.brand_string", "hw.memsize", "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu", "hw.logicalcpu", "hw.machine",
)
METAL_KEYS = ("architecture", "memory_size", "max_recommended_working_set_size")


def run_command(argv: list, timeout: float = 20.0) -> str | None:
    """stdout of a command, even when it exits non-zero (sysctl does when one key is
    unknown but still prints the others); None if it cannot be run at all."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def probe_mlx() -> dict:
    """MLX version and backend, imported here only. Tolerates MLX being absent or broken."""
    try:
        import mlx.core as mx
    except Exception:  # ImportError, or a broken install raising anything at load time
        return {"mlx_version": None, "backend": None, "device_info": None}
    version = getattr(mx, "__version__", None)
    try:
        metal = bool(mx.metal.is_available())
    except Exception:
        metal = False
    info = None
    if metal:
        try:
            # mx.device_info() replaced the deprecated mx.metal.device_info() in newer MLX.
            getter = getattr(mx, "device_info", None) or mx.metal.device_info
            info = dict(getter())
        except Exception:
            info = None
    return {"mlx_version": version, "backend": "metal" if metal else "cpu", "device_info": info}




def parse_sysctl(text: str | None) -> dict:
    """``sysctl key1 key2 ...`` output ("key: value" lines) -> {key: value}."""
    return colon_fields(text)


def parse_gpu_cores(text: str | None) -> int | None:
    """GPU core count from ``system_profiler SPDisplaysDataType -json`` ("sppci_cores")."""
    try:
        data = json.loads(text or "")
    except ValueError:
        return None
    entries = data.get("SPDisplaysDataType") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and "sppci_cores" in entry:
            cores = to_int(entry["sppci_cores"])
            if cores:
                return cores
    return None


def _key_values(text: str | None, sep: str) -> dict[str, str]:
    """``key<sep>value`` lines as {lower-case key: value}; the first line of a key wins
    (/proc/cpuinfo repeats every field once per core)."""
    fields: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, found, value = line.partition(sep)
        if found:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def parse_cpuinfo_model(text: str | None) -> str | None:
    """CPU model from /proc/cpuinfo: "model name" (x86), else fields ARM kernels use."""
    fields = _key_values(text, ":")
    for key in ("model name", "hardware", "cpu model", "model"):
        if fields.get(key):
            return fields[key]
    return None


def parse_meminfo_total(text: str | None) -> int | None:
    """MemTotal from /proc/meminfo, in bytes (the file says kB, meaning KiB)."""
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            kib = to_int(parts[1]) if len(parts) > 1 else None
            return kib * 1024 if kib else None
    return None


def parse_os_release(text: str | None) -> str | None:
    fields = _key_values(text, "=")
    name = fields.get("pretty_name") or fields.get("name")
    return name.strip('"').strip("'") if name else None


CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max",                    # cgroup v2
                      "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v1
NO_CGROUP_LIMIT = 2**60   # v1 says "no limit" with a huge page-rounded number


def parse_cgroup_limit(text: str | None) -> int | None:
    """A memory cgroup limit file -> bytes, or None for "max" / unlimited / unreadable."""
    value = to_int(text)
    return value if value and value < NO_CGROUP_LIMIT else None


def usable_memory(memory_bytes: int | None, metal: dict | None,
                  cgroup_limit: int | None = None) -> int | None:
    """Memory one run may use (see the module docstring)."""
    candidates = [memory_bytes, cgroup_limit,
                  (metal or {}).get("max_recommended_working_set_size")]
    known = [int(v) for v in candidates if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(known) if known else None


def _macos(run: Runner) -> dict:
    # Keys are queried by name (not -n) so a key this Mac lacks (Intel Macs have no
    # perflevels) cannot shift the other values out of place.
    sysctl = parse_sysctl(run(["sysctl", *SYSCTL_KEYS]))
    version = (run(["sw_vers", "-productVersion"]) or "").strip() or None
    return {
        "cpu_brand": sysctl.get("machdep.cpu.brand_string"),
        "memory_bytes": to_int(sysctl.get("hw.memsize")),
        "cpu_perf_cores": to_int(sysctl.get("hw.perflevel0.physicalcpu")),
        "cpu_eff_cores": to_int(sysctl.get("hw.perflevel1.physicalcpu")),
        "cpu_count": to_int(sysctl.get("hw.logicalcpu")),
        "machine": sysctl.get("hw.machine"),
        "gpu_cores": parse_gpu_cores(run(["system_profiler", "SPDisplaysDataType", "-json"])),
        "os": "macOS",
        "os_version": version,
    }


def _linux(read: Reader) -> dict:
    limits = [parse_cgroup_limit(read(p)) for p in CGROUP_LIMIT_FILES]
    return {
        "cpu_brand": parse_cpuinfo_model(read("/proc/cpuinfo")),
        "memory_bytes": parse_meminfo_total(read("/proc/meminfo")),
        "cgroup_limit": min([v for v in limits if v], default=None),
        "os": "Linux",
        "os_version": parse_os_release(read("/etc/os-release")),
    }


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return None


def profile_machine(
    threads: int | None = None,
    *,
    system: str | None = None,
    run: Runner = run_command,
    read: Reader = read_text,
    mlx_probe: Callable[[], dict] = probe_mlx,
    cpu_count: int | None = None,
    cpu_available: int | None = None,
    machine: str | None = None,
    memory_gb: float | None = None,
) -> dict:
    """Profile this machine. ``threads``: the BLAS thread count the trainer will be given
    (None = the OpenBLAS default, one per available CPU). ``memory_gb`` replaces the memory
    the probes found (installed and usable alike, so the hardware class follows): for tests
    and machines that misreport it (``join --memory-gb``). The other keyword-only arguments
    replace the probes (tests feed recorded outputs through them)."""
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if memory_gb is not None and (isinstance(memory_gb, bool)
                                  or not isinstance(memory_gb, (int, float))
                                  or not memory_gb > 0):
        raise ValueError(f"memory_gb must be a positive number, got {memory_gb!r}")
    system = system or platform.system()
    if system == "Darwin":
        found = _macos(run)
    elif system == "Linux":
        found = _linux(read)
    else:
        found = {"cpu_brand": platform.processor() or None, "memory_bytes": None,
                 "os": system, "os_version": platform.release() or None}

    mlx_info = mlx_probe() or {}
    device = mlx_info.get("device_info") or None
    metal = {k: device.get(k) for k in METAL_KEYS if k in device} if device else None

    count = found.get("cpu_count") or cpu_count or os.cpu_count()
    available = cpu_available or _affinity() or count
    backend = mlx_info.get("backend")
    memory = found.get("memory_bytes") or (metal or {}).get("memory_size")
    profile = {
        "chip": normalise_chip(found.get("cpu_brand") or machine or platform.machine()),
        "cpu_brand": found.get("cpu_brand"),
        "cpu_count": count,
        "cpu_available": available,
        "cpu_perf_cores": found.get("cpu_perf_cores"),
        "cpu_eff_cores": found.get("cpu_eff_cores"),
        "gpu_cores": found.get("gpu_cores"),
        "memory_bytes": memory,
        "usable_memory_bytes": usable_memory(memory, metal, found.get("cgroup_limit")),
        "os": found.get("os"),
        "os_version": found.get("os_version"),
        "machine": found.get("machine") or machine or platform.machine(),
        "python": platform.python_version(),
        "mlx_version": mlx_info.get("mlx_version"),
        "backend": backend,
        "metal": metal,
        # On the CPU backend OpenBLAS starts one thread per available core unless told
        # otherwise; that default is what the class must describe.
        "blas_threads": threads if threads is not None else (available if backend == "cpu" else None),
    }
    if memory_gb is not None:
        profile["memory_bytes"] = profile["usable_memory_bytes"] = int(memory_gb * 2**30)
        profile["memory_override"] = True
    profile["hw_class"] = hardware_class(profile)
    return profile


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.profile",
        description="Print this machine's worker profile (JSON) and its hardware class.",
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads the trainer will use (CPU backend); default: all available CPUs")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads <= 0:
        parser.error("--threads must be a positive integer")
    profile = profile_machine(args.threads)
    # stdout stays pure JSON (pipe it to jq); the class line is for the person reading.
    json.dump(profile, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stderr.write(f"hw_class: {profile['hw_class']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
