"""Environment for a trainer process: a fast system BLAS on Linux, and thread counts.

mlx-free (the worker imports it to build each attempt's environment).

Why: MLX's Linux CPU wheel links a slow reference BLAS (f32 1024^2 matmul ~6 GFLOP/s here);
preloading Debian/Ubuntu's OpenBLAS (apt: libopenblas0-pthread) makes the same matmul ~30x
faster, because the dynamic linker binds MLX's cblas_sgemm to the preloaded library. OpenBLAS
starts a thread per core, so several trainers on one machine each get OPENBLAS_NUM_THREADS.
macOS uses Accelerate through MLX's Metal/CPU build: nothing to preload there.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from typing import Mapping

ENV_OVERRIDE = "AUTORESEARCH_OPENBLAS"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

_TRIPLETS = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
             "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}
# How `ldconfig -p` names the architecture of a 64-bit library.
_LDCONFIG_ARCH = {"x86_64-linux-gnu": "x86-64", "aarch64-linux-gnu": "AArch64"}


def _candidates(machine: str) -> list[str]:
    triplet = _TRIPLETS.get(machine.lower())
    if triplet is None:
        return []
    return [f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
            f"/usr/lib/{triplet}/libopenblas.so.0",
            f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0"]


@functools.lru_cache(maxsize=4)
def _from_ldconfig(machine: str) -> str | None:
    """libopenblas.so.0 from the dynamic linker's cache, matching this architecture."""
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if ldconfig is None:
        return None
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    arch = _LDCONFIG_ARCH.get(_TRIPLETS.get(machine.lower(), ""), "")
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("libopenblas.so.0 ") or "=>" not in line:
            continue
        if arch and arch not in line.split("=>")[0]:
            continue
        path = line.split("=>", 1)[1].strip()
        if os.path.exists(path):
            return path
    return None


def openblas_path(environ: Mapping[str, str] | None = None) -> str | None:
    """Path of a system OpenBLAS to preload, or None (not Linux, disabled, or none installed).

    AUTORESEARCH_OPENBLAS overrides the search: a path to use, or "" to disable preloading.
    A path that does not exist is an error (a typo should not silently cost 30x speed).
    """
    env = os.environ if environ is None else environ
    if ENV_OVERRIDE in env:
        value = env[ENV_OVERRIDE].strip()
        if not value:
            return None
        if not os.path.exists(value):
            raise ValueError(f"{ENV_OVERRIDE}={value}: no such file")
        return value
    if not sys.platform.startswith("linux"):
        return None
    machine = platform.machine()
    for path in _candidates(machine):
        if os.path.exists(path):
            return path
    return _from_ldconfig(machine)


# glibc malloc tunables for the trainer (see trainer_env): serve big blocks from the heap and
# don't trim it back to the kernel after every step.
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def trainer_env(base_env: Mapping[str, str], threads: int | None = None) -> dict[str, str]:
    """A copy of base_env for a trainer process: LD_PRELOAD of the system OpenBLAS (Linux only,
    prepended to any existing LD_PRELOAD) and, when threads is given, the BLAS/OpenMP thread
    counts. AUTORESEARCH_OPENBLAS is read from base_env."""
    env = dict(base_env)
    if sys.platform.startswith("linux"):
        lib = openblas_path(env)
        if lib:
            existing = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
            if lib not in existing:
                env["LD_PRELOAD"] = ":".join([lib] + existing)
        # MLX's CPU backend frees its large temporaries back to glibc, which returns them to the
        # kernel (mmap'd blocks), so every step re-faults and re-zeroes fresh pages: measured 8x
        # slower elementwise ops on the 4096x8192 logits and a 10-30% slower step. Keeping big
        # blocks on the heap avoids that; the same for every candidate, so comparisons stay fair.
        for var, value in GLIBC_MALLOC_ENV.items():
            env.setdefault(var, value)
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        for var in THREAD_VARS:
            env[var] = str(int(threads))
    return env


def preloaded_openblas(env: Mapping[str, str]) -> str | None:
    """The OpenBLAS library named in env's LD_PRELOAD, if any."""
    for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        if "openblas" in os.path.basename(p):
            return p
    return None
