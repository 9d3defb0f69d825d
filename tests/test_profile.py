"""Machine profile and hardware class, fed with recorded macOS / Linux probe outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.hwclass import hardware_class, memory_bucket_gb, normalise_chip
from worker.profile import (
    parse_cpuinfo_model, parse_gpu_cores, parse_sysctl, profile_machine,
)

DATA = Path(__file__).parent / "data" / "profile"


def mac_probes(name: str):
    """Command runner and MLX probe that answer from one recorded Mac."""
    d = DATA / name
    outputs = {
        "sysctl": (d / "sysctl.txt").read_text(),
        "sw_vers": (d / "sw_vers.txt").read_text(),
        "system_profiler": (d / "system_profiler_displays.json").read_text(),
    }
    calls = []

    def run(argv):
        calls.append(list(argv))
        return outputs.get(argv[0])

    def mlx():
        return {"mlx_version": (d / "mlx_version.txt").read_text().strip(), "backend": "metal",
                "device_info": json.loads((d / "device_info.json").read_text())}

    return run, mlx, calls


def linux_reader(name: str):
    d = DATA / name
    files = {"/proc/cpuinfo": d / "cpuinfo", "/proc/meminfo": d / "meminfo",
             "/etc/os-release": d / "os-release"}

    def read(path):
        p = files.get(path)
        return p.read_text() if p else None

    return read


def cpu_mlx():
    return {"mlx_version": "0.32.4", "backend": "cpu", "device_info": None}


def no_files(path):
    raise AssertionError(f"macOS profile must not read {path}")


def test_m1_pro_profile_from_recorded_outputs():
    run, mlx, calls = mac_probes("macos_m1pro_16gb")
    p = profile_machine(system="Darwin", run=run, read=no_files, mlx_probe=mlx)
    assert p["hw_class"] == "Apple M1 Pro/16GB/metal"
    assert p["chip"] == "Apple M1 Pro"
    assert p["memory_bytes"] == 16 * 2**30
    assert (p["cpu_perf_cores"], p["cpu_eff_cores"], p["cpu_count"]) == (8, 2, 10)
    assert p["gpu_cores"] == 16
    assert p["os"] == "macOS" and p["os_version"] == "14.5"
    assert p["machine"] == "arm64"
    assert p["backend"] == "metal" and p["mlx_version"] == "0.29.1"
    assert p["metal"] == {"architecture": "applegpu_g13s", "memory_size": 17179869184,
                          "max_recommended_working_set_size": 11453251584}
    assert p["blas_threads"] is None  # irrelevant on Metal
    assert ["system_profiler", "SPDisplaysDataType", "-json"] in calls
    json.dumps(p)  # goes into a hello message as is


def test_m4_max_profile_from_recorded_outputs():
    run, mlx, _ = mac_probes("macos_m4max_64gb")
    p = profile_machine(system="Darwin", run=run, read=no_files, mlx_probe=mlx)
    assert p["hw_class"] == "Apple M4 Max/64GB/metal"
    assert p["gpu_cores"] == 40
    assert (p["cpu_perf_cores"], p["cpu_eff_cores"]) == (12, 4)
    assert p["metal"]["architecture"] == "applegpu_g16c"


def test_metal_class_ignores_threads():
    run, mlx, _ = mac_probes("macos_m1pro_16gb")
    p = profile_machine(2, system="Darwin", run=run, read=no_files, mlx_probe=mlx)
    assert p["hw_class"] == "Apple M1 Pro/16GB/metal"


def test_mac_missing_probes_degrade_to_unknowns():
    # A Mac where every command fails: still a profile, never an exception.
    p = profile_machine(system="Darwin", run=lambda argv: None, read=no_files,
                        mlx_probe=lambda: {"mlx_version": None, "backend": None,
                                           "device_info": None},
                        machine="arm64")
    assert p["gpu_cores"] is None and p["memory_bytes"] is None
    assert p["hw_class"] == "arm64/?GB/nomlx"


def test_linux_profile_with_threads_in_class():
    read = linux_reader("linux_xeon_24gb")
    p = profile_machine(system="Linux", read=read, mlx_probe=cpu_mlx,
                        cpu_count=2, cpu_available=2, machine="x86_64")
    assert p["chip"] == "Intel Xeon Platinum 8375C"
    assert p["cpu_brand"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert p["memory_bytes"] == 24525072 * 1024
    assert p["os"] == "Linux" and p["os_version"] == "Ubuntu 22.04.4 LTS"
    assert p["blas_threads"] == 2  # OpenBLAS default: one thread per available CPU
    assert p["hw_class"] == "Intel Xeon Platinum 8375C/24GB/cpu/2t"


def test_cpu_class_depends_on_thread_count():
    # Two workers at 1 thread each on one 2-core machine are another class than one at 2.
    read = linux_reader("linux_xeon_24gb")
    kw = dict(system="Linux", read=read, mlx_probe=cpu_mlx, cpu_count=2, cpu_available=2)
    one = profile_machine(1, **kw)["hw_class"]
    two = profile_machine(2, **kw)["hw_class"]
    assert one == "Intel Xeon Platinum 8375C/24GB/cpu/1t"
    assert two == "Intel Xeon Platinum 8375C/24GB/cpu/2t"


def test_profile_is_deterministic():
    read = linux_reader("linux_xeon_24gb")
    kw = dict(system="Linux", read=read, mlx_probe=cpu_mlx, cpu_count=2, cpu_available=2)
    assert profile_machine(**kw) == profile_machine(**kw)


@pytest.mark.parametrize("raw, clean", [
    ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "Intel Xeon Platinum 8375C"),
    ("Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz", "Intel Core i7-9750H"),
    ("11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", "11th Gen Intel Core i7-1165G7"),
    ("AMD EPYC 7R13 Processor", "AMD EPYC 7R13"),
    ("  Apple   M1\tPro ", "Apple M1 Pro"),
    ("Weird/Chip", "Weird-Chip"),
    ("", "unknown"),
    (None, "unknown"),
])
def test_normalise_chip(raw, clean):
    assert normalise_chip(raw) == clean


@pytest.mark.parametrize("gib, bucket", [
    (8, 8), (7.6, 8), (15.6, 16), (16, 16), (18, 18), (23.4, 24), (36, 36), (47, 48),
    (64, 64), (96, 96), (128, 128), (192, 192), (3.8, 4),
])
def test_memory_bucket(gib, bucket):
    assert memory_bucket_gb(int(gib * 2**30)) == bucket


def test_memory_bucket_unknown():
    assert memory_bucket_gb(None) is None and memory_bucket_gb(0) is None


def test_hardware_class_cpu_falls_back_to_cpu_count():
    assert hardware_class({"chip": "AMD EPYC", "memory_bytes": 8 * 2**30, "backend": "cpu",
                           "cpu_count": 4}) == "AMD EPYC/8GB/cpu/4t"


def test_parsers_tolerate_garbage():
    assert parse_gpu_cores("not json") is None
    assert parse_gpu_cores('{"SPDisplaysDataType": [{"_name": "x"}]}') is None
    assert parse_cpuinfo_model("") is None
    assert parse_cpuinfo_model("processor : 0\nHardware : BCM2835\n") == "BCM2835"
    assert parse_sysctl("sysctl: unknown oid 'hw.perflevel0.physicalcpu'\nhw.memsize: 8\n") \
        == {"sysctl": "unknown oid 'hw.perflevel0.physicalcpu'", "hw.memsize": "8"}


def test_bad_threads_rejected():
    with pytest.raises(ValueError, match="threads"):
        profile_machine(0, mlx_probe=cpu_mlx)


def test_cli_prints_json_profile_of_this_machine():
    proc = subprocess.run([sys.executable, "-m", "worker.profile", "--threads", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    profile = json.loads(proc.stdout)
    assert profile["hw_class"] in proc.stderr
    assert profile["python"].count(".") == 2
    if profile["backend"] == "cpu":
        assert profile["hw_class"].endswith("/1t")


def test_usable_memory_metal_working_set_and_cgroup_limit():
    from worker.profile import parse_cgroup_limit, usable_memory

    run, mlx, _ = mac_probes("macos_m1pro_16gb")
    p = profile_machine(system="Darwin", run=run, read=no_files, mlx_probe=mlx)
    assert p["usable_memory_bytes"] == 11453251584   # Metal's recommended working set
    read = linux_reader("linux_xeon_24gb")
    p = profile_machine(system="Linux", read=read, mlx_probe=cpu_mlx, cpu_count=2)
    assert p["usable_memory_bytes"] == p["memory_bytes"]   # no cgroup limit recorded
    limited = lambda path: "8589934592\n" if path == "/sys/fs/cgroup/memory.max" else read(path)  # noqa: E731
    p = profile_machine(system="Linux", read=limited, mlx_probe=cpu_mlx, cpu_count=2)
    assert p["usable_memory_bytes"] == 8 * 2**30
    assert p["hw_class"].split("/")[1] == "24GB"   # the class still names the machine
    assert parse_cgroup_limit("max\n") is None
    assert parse_cgroup_limit("9223372036854771712\n") is None   # cgroup v1 "unlimited"
    assert usable_memory(None, None) is None


def test_profile_command_shows_conditions_now():
    from click.testing import CliRunner

    from worker.cli import main

    r = CliRunner().invoke(main, ["profile"])
    assert r.exit_code == 0, r.output
    for label in ("hardware class:", "memory:", "usable by one run", "power:", "thermal:",
                  "idle:"):
        assert label in r.output
    assert "  memory: normal" in r.output or "  memory: warn" in r.output \
        or "  memory: critical" in r.output
    r = CliRunner().invoke(main, ["profile", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["usable_memory_bytes"] > 0
    assert set(data["now"]) == {"at", "power", "thermal", "memory", "idle_seconds"}
    assert data["now"]["power"]["source"] in ("ac", "battery", "ups", "unknown")
    assert data["now"]["memory"]["level"] in ("normal", "warn", "critical")


def test_memory_override_sets_memory_and_class():
    read = linux_reader("linux_xeon_24gb")
    kw = dict(system="Linux", read=read, mlx_probe=cpu_mlx, cpu_count=2, cpu_available=2)
    p = profile_machine(1, memory_gb=4, **kw)
    assert p["memory_bytes"] == p["usable_memory_bytes"] == 4 * 2**30
    assert p["memory_override"] is True
    assert p["hw_class"] == "Intel Xeon Platinum 8375C/4GB/cpu/1t"
    assert "memory_override" not in profile_machine(1, **kw)
    for bad in (0, -1, True, "8"):
        with pytest.raises(ValueError, match="memory_gb"):
            profile_machine(1, memory_gb=bad, **kw)
